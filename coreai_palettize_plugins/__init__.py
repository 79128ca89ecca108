"""Palettization-aware training for PyTorch Lightning and Hugging Face, on coreai-opt.

Importing the package registers the ``palettize/base`` schema in Hydra's ConfigStore (the YAML
options of the ``palettize`` group extend it); it changes nothing else in the host process.
"""

from .coreai_config import build_palettizer_config
from .engine import Palettization, PalettizationWarning
from .export import ExportError, ExportResult, load_palettized
from .report import CompressionReport
from .settings import PalettizeConfigError, PalettizeSettings, register_configs

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
]
__version__ = "0.1.0"

register_configs()
