"""The ``palettize`` config group and its translation to coreai-opt's ``KMeansPalettizerConfig``.

One schema serves the Hydra app, the recipes and the callbacks' arguments:

========================  =====================================================================
key                       meaning
========================  =====================================================================
``preset``                ``w2``/``w3``/``w4``/``w6``/``w8``, ``none`` (no global palettization)
                          or a spec mapping
``overrides.<type>``      per module type (an alias such as ``linear`` or a dotted class path):
                          a preset name, ``null`` (leave dense), a spec mapping, or ``inherit``
``modules.<regex>``       per module name (``re.fullmatch``), same values; highest precedence
``config_file``           a coreai-opt YAML file (``kmeans_palettization_config:``); replaces
                          ``preset`` as the base that overrides and modules apply to
``schedule.start_step``   optimizer step at which palettization turns on (coreai-opt PATSchedule)
``training``              how palettized weights train (``frozen`` = coreai-opt's default)
``num_workers``           k-means worker processes per rank
``distributed``           ``sharded`` or ``rank0``: who runs k-means under torch.distributed
``export``                ``formats`` (``coreai``, ``torch``) and ``dir``
========================  =====================================================================

A spec mapping has the keys ``preset`` (base), ``n_bits``, ``granularity`` (``per_tensor`` or
``per_grouped_channel``), ``group_size``, ``axis``, ``cluster_dim``, ``lut_dtype`` and
``enable_per_channel_scale``.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from coreai_opt.palettization import (
    KMeansPalettizerConfig,
    ModuleKMeansPalettizerConfig,
    PalettizationSpec,
)
from coreai_opt.palettization.config import OpKMeansPalettizerConfig, PATSchedule
from coreai_opt.palettization.spec import PerGroupedChannelGranularity, PerTensorGranularity

__all__ = [
    "INHERIT",
    "MODULE_TYPE_ALIASES",
    "PRESETS",
    "ConfigSource",
    "ExportSettings",
    "PalettizeConfigError",
    "PalettizeSettings",
    "ScheduleSettings",
    "build_palettizer_config",
    "register_configs",
    "resolve_settings",
]


class PalettizeConfigError(ValueError):
    """A bad palettization setting. The message is one line naming the key and the valid choices."""


INHERIT = "inherit"
"""Sentinel for ``overrides.<type>``: no override for this module type (the default)."""

MODULE_TYPE_ALIASES: dict[str, str] = {
    "linear": "torch.nn.Linear",
    "conv1d": "torch.nn.Conv1d",
    "conv2d": "torch.nn.Conv2d",
    "conv3d": "torch.nn.Conv3d",
    "conv_transpose1d": "torch.nn.ConvTranspose1d",
    "conv_transpose2d": "torch.nn.ConvTranspose2d",
    "conv_transpose3d": "torch.nn.ConvTranspose3d",
    "embedding": "torch.nn.Embedding",
    "multihead_attention": "torch.nn.MultiheadAttention",
}
"""Short names accepted under ``overrides``. Any dotted class path works too."""

# Module types that coreai-opt reaches through ``module_state_spec`` because no supported op
# consumes their weight (an embedding lookup is not a palettizable op).
_STATE_SPEC_TYPES: tuple[type, ...] = (nn.Embedding,)

VALID_N_BITS = (1, 2, 3, 4, 6, 8)
DISTRIBUTED_MODES = ("sharded", "rank0")
EXPORT_FORMATS = ("coreai", "torch")
TRAINING_STRATEGIES: dict[str, str] = {"frozen": "default"}
"""``palettize.training`` name -> coreai-opt ``TrainingStrategySpec`` registry key.

``strategies.py`` adds its own entries when imported."""

_SPEC_KEYS = (
    "preset",
    "n_bits",
    "granularity",
    "group_size",
    "axis",
    "cluster_dim",
    "lut_dtype",
    "enable_per_channel_scale",
)
_GRANULARITIES = ("per_tensor", "per_grouped_channel")
_LUT_DTYPES = ("int8", "uint8", "float8_e4m3fn", "float8_e5m2")


def _grouped(n_bits: int) -> dict[str, Any]:
    return {"n_bits": n_bits, "granularity": "per_grouped_channel", "axis": 0, "group_size": 16}


PRESETS: dict[str, dict[str, Any] | None] = {
    "w2": _grouped(2),
    "w3": _grouped(3),
    "w4": _grouped(4),  # == coreai-opt presets.w4()
    "w6": _grouped(6),  # == coreai-opt presets.w6()
    "w8": {"n_bits": 8, "granularity": "per_tensor"},  # == coreai-opt presets.w8()
    "none": None,
}
"""Preset name -> spec mapping. ``w4``/``w6``/``w8`` are built with coreai-opt's own presets."""
_COREAI_PRESETS = ("w4", "w6", "w8")


@dataclass
class ScheduleSettings:
    """When palettization turns on. ``start_step`` null or 0: palettized from the first step."""

    start_step: int | None = None


@dataclass
class ExportSettings:
    """What is written at the end of training."""

    formats: list[str] = field(default_factory=lambda: list(EXPORT_FORMATS))
    dir: str | None = None


@dataclass
class PalettizeSettings:
    """Typed schema of the Hydra group ``palettize`` (registered as ``palettize/base``)."""

    preset: Any = "w4"
    overrides: dict[str, Any] = field(
        default_factory=lambda: dict.fromkeys(MODULE_TYPE_ALIASES, INHERIT)
    )
    modules: dict[str, Any] = field(default_factory=dict)
    config_file: str | None = None
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    training: Any = "frozen"
    num_workers: int = 1
    distributed: str = "sharded"
    export: ExportSettings = field(default_factory=ExportSettings)


ConfigSource = PalettizeSettings | Mapping[str, Any] | str | os.PathLike | KMeansPalettizerConfig
"""Anything ``build_palettizer_config`` accepts."""


def register_configs() -> None:
    """Register the ``palettize`` schema as ``palettize/base`` in Hydra's ConfigStore.

    The YAML options of the group (``conf/palettize/w4.yaml`` ...) extend it with
    ``defaults: [base]``, which makes them typed: ``--cfg job`` lists every overridable module
    type, and ``palettize.overrides.linear=w8`` needs no ``+``. Importing the package calls this.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="palettize", name="base", node=PalettizeSettings)


# --------------------------------------------------------------------------------------------
# Normalisation: every accepted input becomes one validated plain dict.
# --------------------------------------------------------------------------------------------


def _to_plain(source: Any) -> Any:
    """DictConfig / dataclass / mapping -> plain python containers, interpolations resolved."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(source, (DictConfig, ListConfig)):
            return OmegaConf.to_container(source, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if dataclasses.is_dataclass(source) and not isinstance(source, type):
        return dataclasses.asdict(source)
    if isinstance(source, Mapping):
        return {k: _to_plain(v) for k, v in source.items()}
    if isinstance(source, (list, tuple)):
        return [_to_plain(v) for v in source]
    return source


def _fail(key: str, message: str) -> PalettizeConfigError:
    return PalettizeConfigError(f"{key}: {message}")


def _choices(values: Iterable[Any]) -> str:
    return ", ".join(str(v) for v in values)


def resolve_settings(
    source: ConfigSource | None = "w4",
    *,
    overrides: Mapping[str, Any] | None = None,
    modules: Mapping[str, Any] | None = None,
    key: str = "palettize",
    **fields: Any,
) -> dict[str, Any]:
    """Normalise any accepted input (plus keyword overrides) to a validated settings dict.

    ``source`` may be a ``PalettizeSettings``, a ``DictConfig``/mapping, a preset name, a path to a
    coreai-opt YAML file, or a ``KMeansPalettizerConfig`` (kept under ``"_config"``).
    """
    defaults = _to_plain(PalettizeSettings())
    settings: dict[str, Any] = dict(defaults)
    if source is None:
        pass
    elif isinstance(source, KMeansPalettizerConfig):
        settings["_config"] = source
        settings["preset"] = None
    elif isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text in PRESETS:
            settings["preset"] = text
        elif text.endswith((".yaml", ".yml")) or os.sep in text:
            settings["config_file"] = text
            settings["preset"] = None
        else:
            raise _fail(f"{key}", f"unknown preset {text!r}; valid: {_choices(PRESETS)}, "
                        "or a path to a coreai-opt YAML file")
    else:
        plain = _to_plain(source)
        if not isinstance(plain, Mapping):
            raise _fail(key, f"expected a preset name, a mapping or a KMeansPalettizerConfig, "
                        f"got {type(source).__name__}")
        unknown = sorted(set(plain) - set(defaults))
        if unknown:
            hint = (" (a spec mapping goes under preset: {preset: {n_bits: ..., ...}})"
                    if unknown[0] in _SPEC_KEYS else "")
            raise _fail(f"{key}.{unknown[0]}", f"unknown key; valid: {_choices(defaults)}{hint}")
        for name, value in plain.items():
            if name in ("overrides", "schedule", "export") and value is not None:
                merged = dict(settings[name])
                merged.update(value)
                settings[name] = merged
            else:
                settings[name] = value
        if plain.get("config_file") and "preset" not in plain:
            settings["preset"] = None
    if overrides:
        settings["overrides"] = {**settings["overrides"], **_to_plain(overrides)}
    if modules:
        settings["modules"] = {**(settings["modules"] or {}), **_to_plain(modules)}
    for name, value in fields.items():
        if name not in defaults:
            raise _fail(f"{key}.{name}", f"unknown key; valid: {_choices(defaults)}")
        if name in ("schedule", "export") and isinstance(value, Mapping):
            settings[name] = {**settings[name], **_to_plain(value)}
        else:
            settings[name] = _to_plain(value)
    _validate_settings(settings, key)
    return settings


def _validate_settings(s: dict[str, Any], key: str) -> None:
    if s["preset"] is not None:
        _validate_value(s["preset"], f"{key}.preset", allow_inherit=False)
    for type_key, value in (s["overrides"] or {}).items():
        _resolve_module_type(type_key, f"{key}.overrides.{type_key}")
        _validate_value(value, f"{key}.overrides.{type_key}", allow_inherit=True)
    for pattern, value in (s["modules"] or {}).items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise _fail(f"{key}.modules.{pattern}", f"invalid regular expression ({e})") from None
        _validate_value(value, f"{key}.modules.{pattern}", allow_inherit=False)
    if s["config_file"] is not None and not Path(s["config_file"]).is_file():
        raise _fail(f"{key}.config_file", f"no such file: {s['config_file']}")
    start = (s["schedule"] or {}).get("start_step")
    if start is not None and (not isinstance(start, int) or isinstance(start, bool) or start < 0):
        raise _fail(f"{key}.schedule.start_step", f"must be a non-negative integer, got {start!r}")
    unknown = sorted(set(s["schedule"] or {}) - {"start_step"})
    if unknown:
        raise _fail(f"{key}.schedule.{unknown[0]}", "unknown key; valid: start_step")
    _training_spec(s.get("training", "frozen"), f"{key}.training")
    workers = s["num_workers"]
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise _fail(f"{key}.num_workers", f"must be an integer >= 1, got {workers!r}")
    if s["distributed"] not in DISTRIBUTED_MODES:
        raise _fail(f"{key}.distributed",
                    f"unknown mode {s['distributed']!r}; valid: {_choices(DISTRIBUTED_MODES)}")
    export = s["export"] or {}
    unknown = sorted(set(export) - {"formats", "dir"})
    if unknown:
        raise _fail(f"{key}.export.{unknown[0]}", "unknown key; valid: formats, dir")
    formats = export.get("formats") or []
    if isinstance(formats, str):
        formats = [formats]
        export["formats"] = formats
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise _fail(f"{key}.export.formats",
                        f"unknown format {fmt!r}; valid: {_choices(EXPORT_FORMATS)}")
    has_global = s["preset"] not in (None, "none") or s["config_file"] or "_config" in s
    has_any = has_global or any(
        v not in (INHERIT, None, "none")
        for v in [*(s["overrides"] or {}).values(), *(s["modules"] or {}).values()]
    )
    if not has_any:
        raise _fail(f"{key}.preset", "preset 'none' with no overrides or modules palettizes "
                    f"nothing; choose a preset ({_choices(p for p in PRESETS if p != 'none')}) "
                    "or add palettize.overrides.<type>=<preset>")


def _validate_value(value: Any, key: str, *, allow_inherit: bool) -> None:
    if value is None:
        return
    if isinstance(value, str):
        valid = [*PRESETS, *([INHERIT] if allow_inherit else [])]
        if value not in valid:
            raise _fail(key, f"unknown preset {value!r}; valid: {_choices(valid)}, null "
                        "or a spec mapping")
        return
    if not isinstance(value, Mapping):
        raise _fail(key, f"expected a preset name, null or a spec mapping, got {value!r}")
    _spec_from_mapping(value, key)


def _resolve_module_type(type_key: str, key: str) -> type[nn.Module]:
    """Alias or dotted class path -> the module class (coreai-opt derives its FQN key).

    A class, not a string: coreai-opt 0.4 silently never matches a type key that is not the
    class's fully qualified name (``"torch.nn.Linear"`` instead of
    ``"torch.nn.modules.linear.Linear"``).
    """
    path = MODULE_TYPE_ALIASES.get(type_key)
    if path is None and "." not in type_key:
        raise _fail(key, f"unknown module type alias {type_key!r}; valid: "
                    f"{_choices(MODULE_TYPE_ALIASES)}, or a dotted class path")
    module_name, _, cls_name = (path or type_key).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        return cls
    raise _fail(key, f"{type_key!r} is not an importable torch.nn.Module class")


# --------------------------------------------------------------------------------------------
# Translation to coreai-opt objects.
# --------------------------------------------------------------------------------------------


def _spec_from_mapping(mapping: Mapping[str, Any], key: str) -> PalettizationSpec:
    unknown = sorted(set(mapping) - set(_SPEC_KEYS))
    if unknown:
        raise _fail(f"{key}.{unknown[0]}", f"unknown key; valid: {_choices(_SPEC_KEYS)}")
    base: dict[str, Any] = {}
    if "preset" in mapping:
        preset = mapping["preset"]
        if preset not in PRESETS or PRESETS[preset] is None:
            valid = [p for p, v in PRESETS.items() if v is not None]
            raise _fail(f"{key}.preset", f"unknown preset {preset!r}; valid: {_choices(valid)}")
        base = dict(PRESETS[preset])
    fields_ = {k: v for k, v in mapping.items() if k != "preset"}
    if "group_size" in fields_ and "granularity" not in fields_:
        fields_["granularity"] = "per_grouped_channel"
    if fields_.get("granularity") == "per_tensor":
        base.pop("group_size", None)
        base.pop("axis", None)
    spec = {**base, **fields_}

    n_bits = spec.get("n_bits", 4)
    if n_bits not in VALID_N_BITS or isinstance(n_bits, bool):
        raise _fail(f"{key}.n_bits", f"{n_bits!r} is not supported; valid: {_choices(VALID_N_BITS)}")
    granularity_name = spec.get("granularity", "per_tensor")
    if granularity_name not in _GRANULARITIES:
        raise _fail(f"{key}.granularity",
                    f"unknown granularity {granularity_name!r}; valid: {_choices(_GRANULARITIES)}")
    if granularity_name == "per_grouped_channel":
        group_size = spec.get("group_size", 16)
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
            raise _fail(f"{key}.group_size", f"must be a positive integer, got {group_size!r}")
        axis = spec.get("axis", 0)
        if axis not in (0, 1):
            raise _fail(f"{key}.axis", f"must be 0 or 1, got {axis!r}")
        granularity = PerGroupedChannelGranularity(axis=axis, group_size=group_size)
    else:
        if "group_size" in fields_:
            raise _fail(f"{key}.group_size", "is only valid with granularity per_grouped_channel")
        granularity = PerTensorGranularity()
    cluster_dim = spec.get("cluster_dim", 1)
    if not isinstance(cluster_dim, int) or isinstance(cluster_dim, bool) or cluster_dim < 1:
        raise _fail(f"{key}.cluster_dim", f"must be a positive integer, got {cluster_dim!r}")
    lut_qspec = None
    if spec.get("lut_dtype") is not None:
        lut_dtype = spec["lut_dtype"]
        if lut_dtype not in _LUT_DTYPES:
            raise _fail(f"{key}.lut_dtype",
                        f"unknown dtype {lut_dtype!r}; valid: {_choices(_LUT_DTYPES)}")
        from coreai_opt.quantization import QuantizationSpec

        lut_qspec = QuantizationSpec(dtype=getattr(torch, lut_dtype), qscheme="symmetric")
    return PalettizationSpec(
        n_bits=n_bits,
        granularity=granularity,
        cluster_dim=cluster_dim,
        lut_qspec=lut_qspec,
        enable_per_channel_scale=bool(spec.get("enable_per_channel_scale", False)),
    )


def _module_config(value: Any, key: str, module_type: type | None = None):
    """A preset name / null / spec mapping -> ModuleKMeansPalettizerConfig (or None = dense)."""
    if value is None or value == "none":
        return None
    if module_type is not None and issubclass(module_type, _STATE_SPEC_TYPES):
        # Embedding lookups are not palettizable ops: coreai-opt needs module_state_spec.
        spec = _spec_from_mapping(PRESETS[value] if isinstance(value, str) else value, key)
        return ModuleKMeansPalettizerConfig(
            op_input_spec=None, op_output_spec=None, op_state_spec=None,
            module_state_spec={"weight": spec}, enable_fast_kmeans_mode=spec.cluster_dim == 1,
        )
    if isinstance(value, str) and value in _COREAI_PRESETS:
        return getattr(ModuleKMeansPalettizerConfig.presets, value)()
    spec = _spec_from_mapping(PRESETS[value] if isinstance(value, str) else value, key)
    return ModuleKMeansPalettizerConfig(
        op_input_spec=None,
        op_output_spec=None,
        op_state_spec=dict.fromkeys(OpKMeansPalettizerConfig.get_default_state_spec(), spec),
        # coreai-opt's fast (fp16-rounded) k-means is scalar-only.
        enable_fast_kmeans_mode=spec.cluster_dim == 1,
    )


def _global_config(settings: dict[str, Any], key: str) -> KMeansPalettizerConfig:
    if "_config" in settings:
        return settings["_config"].model_copy(deep=True)
    if settings.get("config_file"):
        # A coreai-opt YAML file is the whole base config: ``preset`` does not apply.
        return KMeansPalettizerConfig.from_yaml(settings["config_file"])
    preset = settings["preset"]
    if isinstance(preset, str) and preset in _COREAI_PRESETS:
        return getattr(KMeansPalettizerConfig.presets, preset)()
    # coreai-opt inserts a default 4-bit global config when none is given: pass None explicitly.
    return KMeansPalettizerConfig(global_config=_module_config(preset, f"{key}.preset"))


def build_palettizer_config(
    source: ConfigSource | None = "w4",
    *,
    overrides: Mapping[str, Any] | None = None,
    modules: Mapping[str, Any] | None = None,
    key: str = "palettize",
    **fields: Any,
) -> KMeansPalettizerConfig:
    """Translate palettize settings (or a preset name, a coreai-opt YAML path, a ready config)
    into a ``KMeansPalettizerConfig``.

    ``build_palettizer_config("w4", overrides={"linear": "w8"})`` equals
    ``KMeansPalettizerConfig.presets.w4().set_module_type(nn.Linear,
    ModuleKMeansPalettizerConfig.presets.w8())``. A ``KMeansPalettizerConfig`` with no other
    arguments is returned unchanged.
    """
    if isinstance(source, KMeansPalettizerConfig) and not (overrides or modules or fields):
        return source
    settings = resolve_settings(source, overrides=overrides, modules=modules, key=key, **fields)
    return config_from_settings(settings, key=key)


def config_from_settings(settings: dict[str, Any], *, key: str = "palettize"):
    """A validated settings dict (see ``resolve_settings``) -> ``KMeansPalettizerConfig``."""
    config = _global_config(settings, key)
    for type_key, value in (settings["overrides"] or {}).items():
        if value == INHERIT:
            continue
        module_type = _resolve_module_type(type_key, f"{key}.overrides.{type_key}")
        config.set_module_type(module_type, _module_config(
            value, f"{key}.overrides.{type_key}", module_type))
    for pattern, value in (settings["modules"] or {}).items():
        config.set_module_name(pattern, _module_config(value, f"{key}.modules.{pattern}"))
    return _apply_training_and_schedule(config, settings)


def _module_configs(config: KMeansPalettizerConfig) -> Iterable[tuple[Callable, Any]]:
    """(setter, module config) for every enabled module config in ``config``."""
    if config.global_config is not None:
        yield (lambda c: setattr(config, "global_config", c)), config.global_config
    for name, cfg in list(config.module_type_configs.items()):
        if cfg is not None:
            yield (lambda c, n=name: config.module_type_configs.__setitem__(n, c)), cfg
    for name, cfg in list(config.module_name_configs.items()):
        if cfg is not None:
            yield (lambda c, n=name: config.module_name_configs.__setitem__(n, c)), cfg


def _apply_training_and_schedule(config: KMeansPalettizerConfig, settings: dict[str, Any]):
    start = (settings.get("schedule") or {}).get("start_step")
    strategy_spec = _training_spec(settings.get("training", "frozen"), "palettize.training")
    if not start and strategy_spec is None:
        return config
    for setter, module_cfg in _module_configs(config):
        update: dict[str, Any] = {}
        if start:
            update["pat_schedule"] = PATSchedule(enable_fake_palettize=start)
        if strategy_spec is not None:
            for spec_field in ("op_state_spec", "module_state_spec"):
                specs = getattr(module_cfg, spec_field)
                update[spec_field] = {
                    name: (spec.model_copy(update={"training_strategy_spec": strategy_spec})
                           if spec is not None else None)
                    for name, spec in specs.items()
                }
        setter(module_cfg.model_copy(update=update))
    return config


def training_name(value: Any) -> str:
    """``palettize.training`` (a name or ``{type: name, ...options}``) -> the strategy name."""
    return value.get("type", "") if isinstance(value, Mapping) else str(value)


def _training_spec(value: Any, key: str):
    """``palettize.training`` -> a coreai-opt ``TrainingStrategySpec`` (None for ``frozen``)."""
    from coreai_opt.palettization.spec import TrainingStrategySpec

    name = training_name(value)
    if name not in TRAINING_STRATEGIES:
        raise _fail(key, f"unknown strategy {name!r}; valid: {_choices(TRAINING_STRATEGIES)}")
    if name == "frozen":
        if isinstance(value, Mapping) and len(value) > 1:
            raise _fail(key, "'frozen' takes no options")
        return None
    options = {k: v for k, v in value.items() if k != "type"} if isinstance(value, Mapping) else {}
    spec_cls = TrainingStrategySpec.REGISTRY[TRAINING_STRATEGIES[name]]
    unknown = sorted(set(options) - set(spec_cls.model_fields))
    if unknown:
        raise _fail(f"{key}.{unknown[0]}",
                    f"unknown option; valid: {_choices(spec_cls.model_fields) or 'none'}")
    try:
        return spec_cls(**options)
    except ValueError as e:
        errors = getattr(e, "errors", lambda: [])()
        if errors:
            where = ".".join(str(p) for p in errors[0].get("loc", ()))
            raise _fail(f"{key}.{where}" if where else key, errors[0]["msg"]) from None
        raise _fail(key, str(e)) from None


def config_to_yaml(config: KMeansPalettizerConfig) -> str:
    """Dump a config in coreai-opt's YAML format (``from_yaml`` reads it back)."""
    import yaml

    return yaml.safe_dump(_jsonable(config.to_dict()), sort_keys=False)


def config_from_yaml_text(text: str) -> KMeansPalettizerConfig:
    """Inverse of ``config_to_yaml`` (``from_yaml`` treats a str as a path: use a stream)."""
    return KMeansPalettizerConfig.from_yaml(io.StringIO(text))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, type):
        return _registry_key(value)
    return value


def _registry_key(cls: type) -> str:
    """coreai-opt dumps classes (``lut_qspec.fake_quantize_cls`` ...) as objects but parses them
    back by registry key: find the key under which ``cls`` is registered."""
    for base in cls.__mro__:
        registry = base.__dict__.get("REGISTRY")
        if isinstance(registry, Mapping):
            for key, registered in registry.items():
                if registered is cls:
                    return key
    return f"{cls.__module__}.{cls.__qualname__}"
