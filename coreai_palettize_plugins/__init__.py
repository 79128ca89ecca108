"""Palettization-aware training for PyTorch Lightning and Hugging Face, on coreai-opt.

The public names below load on first use (importing the package itself imports nothing heavy).
Importing ``coreai_palettize_plugins.settings`` (every adapter does) registers the
``palettize/base`` schema in Hydra's ConfigStore, which the YAML options of the ``palettize``
group extend; nothing else in the host process is changed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "ArtifactError",
    "CompressionReport",
    "ExportError",
    "ExportResult",
    "IntegrityError",
    "Palettization",
    "PalettizationWarning",
    "PalettizeConfigError",
    "PalettizeSettings",
    "build_palettizer_config",
    "load_palettized",
    "register_configs",
]
__version__ = "0.1.0"

_HOMES = {
    "ArtifactError": "export.artifact_checks",
    "CompressionReport": "export.report",
    "ExportError": "export.writer",
    "ExportResult": "export.writer",
    "IntegrityError": "core.integrity",
    "Palettization": "engine.lifecycle",
    "PalettizationWarning": "engine.lifecycle",
    "PalettizeConfigError": "settings.schema",
    "PalettizeSettings": "settings.schema",
    "build_palettizer_config": "settings.coreai_config",
    "load_palettized": "export.artifact",
    "register_configs": "settings.schema",
}

if TYPE_CHECKING:
    from .core.integrity import IntegrityError
    from .engine.lifecycle import Palettization, PalettizationWarning
    from .export.artifact import load_palettized
    from .export.artifact_checks import ArtifactError
    from .export.report import CompressionReport
    from .export.writer import ExportError, ExportResult
    from .settings.coreai_config import build_palettizer_config
    from .settings.schema import PalettizeConfigError, PalettizeSettings, register_configs


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
