"""Palettization-aware training for PyTorch Lightning and Hugging Face, on coreai-opt."""

from . import _quiet

_quiet.install()

# ruff: noqa: E402

from . import strategies  # registers the ste/lut coreai-opt training strategies
from .engine import Palettization, PalettizationWarning
from .export import ExportError, ExportResult, load_palettized
from .report import CompressionReport
from .settings import (
    PalettizeConfigError,
    PalettizeSettings,
    build_palettizer_config,
    register_configs,
)

__all__ = [
    "CompressionReport",
    "ExportError",
    "ExportResult",
    "Palettization",
    "PalettizationWarning",
    "PalettizeConfigError",
    "PalettizeSettings",
    "build_palettizer_config",
    "load_palettized",
    "register_configs",
    "strategies",
]
__version__ = "0.1.0"

# The YAML files of a `palettize` config group extend `palettize/base`: make it available.
register_configs()
