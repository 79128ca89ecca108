"""Phases that decide how weights are clustered: calibration, the bits budget, LoRA adapters."""
