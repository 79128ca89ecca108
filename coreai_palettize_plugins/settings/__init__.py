"""The typed ``palettize`` schema (``PalettizeSettings``) and its coreai-opt translation.

``coreai_palettize_plugins.settings`` was a module: its names are re-exported from ``schema``.
"""

from .schema import (
    DISTRIBUTED_MODES,
    EXPORT_FORMATS,
    INHERIT,
    MODULE_TYPE_ALIASES,
    PRESETS,
    TRAINING_STRATEGY_KEYS,
    VALID_N_BITS,
    ConfigSource,
    ExportSettings,
    PalettizeConfigError,
    PalettizeSettings,
    ScheduleSettings,
    check_export_formats,
    normalize_spec,
    register_configs,
    resolve_module_type,
    resolve_settings,
    training_name,
)

__all__ = [
    "DISTRIBUTED_MODES",
    "EXPORT_FORMATS",
    "INHERIT",
    "MODULE_TYPE_ALIASES",
    "PRESETS",
    "TRAINING_STRATEGY_KEYS",
    "VALID_N_BITS",
    "ConfigSource",
    "ExportSettings",
    "PalettizeConfigError",
    "PalettizeSettings",
    "ScheduleSettings",
    "check_export_formats",
    "normalize_spec",
    "register_configs",
    "resolve_module_type",
    "resolve_settings",
    "training_name",
]
