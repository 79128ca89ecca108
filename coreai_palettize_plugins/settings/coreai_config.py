"""Translation of valid ``PalettizeSettings`` into coreai-opt's ``KMeansPalettizerConfig``, and
the coreai-opt YAML round trip. Validation happens in ``settings.py``; nothing here checks input.
"""

from __future__ import annotations

import enum
import io
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
from coreai_opt.palettization import (
    KMeansPalettizerConfig,
    ModuleKMeansPalettizerConfig,
    PalettizationSpec,
)
from coreai_opt.palettization.config import OpKMeansPalettizerConfig, PATSchedule
from coreai_opt.palettization.spec import (
    PerGroupedChannelGranularity,
    PerTensorGranularity,
    TrainingStrategySpec,
)

from ..core import linear_like
from ..core._utils import dtype_name
from ..core.checks import (
    EXPERTS,
    INHERIT,
    PRESETS,
    TRAINING_STRATEGY_KEYS,
    normalize_spec,
    resolve_module_type,
    training_options,
)
from .schema import ConfigSource, PalettizeSettings

__all__ = ["build_palettizer_config", "config_from_settings", "config_from_yaml_text",
           "config_to_yaml", "to_coreai_config"]

# Module types that coreai-opt reaches through ``module_state_spec`` because no supported op
# consumes their weight (an embedding lookup is not a palettizable op).
_STATE_SPEC_TYPES: tuple[type, ...] = (nn.Embedding,)
_COREAI_PRESETS = ("w4", "w6", "w8")


def build_palettizer_config(
    source: ConfigSource | None = "w4",
    *,
    overrides: Mapping[str, Any] | None = None,
    modules: Mapping[str, Any] | None = None,
    **fields: Any,
) -> KMeansPalettizerConfig:
    """Translate palettize settings (or a preset name, a coreai-opt YAML path, a ready config)
    into a ``KMeansPalettizerConfig``.

    ``build_palettizer_config("w4", overrides={"linear": "w8"})`` equals
    ``KMeansPalettizerConfig.presets.w4().set_module_type(nn.Linear,
    ModuleKMeansPalettizerConfig.presets.w8())``. A ``KMeansPalettizerConfig`` with no other
    arguments is returned unchanged.

    Raises:
        PalettizeConfigError: for a bad setting (one line naming the key and valid choices).
    """
    if isinstance(source, KMeansPalettizerConfig) and not (overrides or modules or fields):
        return source
    settings = PalettizeSettings.resolve(source, overrides=overrides, modules=modules, **fields)
    return to_coreai_config(settings)


def to_coreai_config(settings: PalettizeSettings, model: nn.Module | None = None
                     ) -> KMeansPalettizerConfig:
    """Valid settings -> a new ``KMeansPalettizerConfig`` (the base config is copied).

    With ``model``, the config is extended for its linear-like modules (HF ``Conv1D``, fused MoE
    experts: ``linear_like.extend_for_model``); ``overrides.experts`` needs the model to name
    the experts classes and is ignored without one.
    """
    config = _global_config(settings)
    for type_key, value in settings.overrides.items():
        if value == INHERIT:
            continue
        if type_key == EXPERTS:
            for experts_type in linear_like.experts_types(model) if model is not None else ():
                config.set_module_type(experts_type, _module_config(value))
            continue
        module_type = resolve_module_type(type_key, f"overrides.{type_key}")
        config.set_module_type(module_type, _module_config(value, module_type))
    for pattern, value in settings.modules.items():
        config.set_module_name(pattern, _module_config(value))
    if model is not None:
        _embedding_entries(config, settings, model)
    _apply_training_and_schedule(config, settings)
    if model is not None:
        config = linear_like.extend_for_model(config, model)
    return config


config_from_settings = to_coreai_config
"""Alias kept for code written against 0.1."""


def _embedding_entries(config: KMeansPalettizerConfig, settings: PalettizeSettings,
                       model: nn.Module) -> None:
    """An embedding named by a ``modules`` pattern gets that spec as a ``module_state_spec``
    (an exact-name entry after the patterns): no palettizable op consumes its weight, so the
    patterns' ``op_state_spec`` alone would leave it dense."""
    for name, module in model.named_modules():
        if not isinstance(module, _STATE_SPEC_TYPES) or "parametrizations" in name.split("."):
            continue
        pattern = next((p for p in reversed(list(settings.modules)) if re.fullmatch(p, name)),
                       None)
        if pattern is not None and settings.modules[pattern] not in (None, "none"):
            config.set_module_name(re.escape(name), _module_config(settings.modules[pattern],
                                                                   type(module)))


def _spec(value: str | Mapping[str, Any]) -> PalettizationSpec:
    spec = normalize_spec(PRESETS[value] if isinstance(value, str) else value, "spec")
    if spec["granularity"] == "per_grouped_channel":
        granularity = PerGroupedChannelGranularity(axis=spec["axis"], group_size=spec["group_size"])
    else:
        granularity = PerTensorGranularity()
    lut_qspec = None
    if spec["lut_dtype"] is not None:
        from coreai_opt.quantization import QuantizationSpec

        lut_qspec = QuantizationSpec(dtype=getattr(torch, spec["lut_dtype"]), qscheme="symmetric")
    return PalettizationSpec(n_bits=spec["n_bits"], granularity=granularity,
                             cluster_dim=spec["cluster_dim"], lut_qspec=lut_qspec,
                             enable_per_channel_scale=spec["enable_per_channel_scale"])


def _module_config(value: Any, module_type: type | None = None):
    """A preset name / null / spec mapping -> ModuleKMeansPalettizerConfig (or None = dense)."""
    if value is None or value == "none":
        return None
    if module_type is not None and issubclass(module_type, _STATE_SPEC_TYPES):
        spec = _spec(value)  # an embedding lookup is not a palettizable op: module_state_spec
        return ModuleKMeansPalettizerConfig(
            op_input_spec=None, op_output_spec=None, op_state_spec=None,
            module_state_spec={"weight": spec}, enable_fast_kmeans_mode=spec.cluster_dim == 1)
    if isinstance(value, str) and value in _COREAI_PRESETS:
        return getattr(ModuleKMeansPalettizerConfig.presets, value)()
    spec = _spec(value)
    return ModuleKMeansPalettizerConfig(
        op_input_spec=None,
        op_output_spec=None,
        op_state_spec=dict.fromkeys(OpKMeansPalettizerConfig.get_default_state_spec(), spec),
        enable_fast_kmeans_mode=spec.cluster_dim == 1,  # coreai-opt's fast mode is scalar-only
    )


def _global_config(settings: PalettizeSettings) -> KMeansPalettizerConfig:
    if settings.base_config is not None:
        return settings.base_config.model_copy(deep=True)
    if settings.config_file:
        # A coreai-opt YAML file is the whole base config: ``preset`` does not apply.
        return KMeansPalettizerConfig.from_yaml(settings.config_file)
    preset = settings.preset
    if isinstance(preset, str) and preset in _COREAI_PRESETS:
        return getattr(KMeansPalettizerConfig.presets, preset)()
    # coreai-opt inserts a default 4-bit global config when none is given: pass None explicitly.
    return KMeansPalettizerConfig(global_config=_module_config(preset))


def _enabled_module_configs(config: KMeansPalettizerConfig
                            ) -> Iterator[tuple[dict[str, Any] | None, str, Any]]:
    """``(owner dict or None for the global config, key, module config)`` of every enabled one."""
    if config.global_config is not None:
        yield None, "", config.global_config
    for table in (config.module_type_configs, config.module_name_configs):
        for name, module_config in list(table.items()):
            if module_config is not None:
                yield table, name, module_config


def _training_spec(settings: PalettizeSettings) -> TrainingStrategySpec | None:
    if settings.training_strategy == "frozen":
        return None
    from ..core import strategies  # noqa: F401  (registers the ste/lut specs)

    spec_cls = TrainingStrategySpec.REGISTRY[TRAINING_STRATEGY_KEYS[settings.training_strategy]]
    return spec_cls(**training_options(settings.training))


def _trains_with_strategy(spec: PalettizationSpec) -> bool:
    """``ste`` and ``lut`` model plain float LUTs: a quantized LUT (``lut_dtype``) or sparsity
    keeps coreai-opt's own (``frozen``) strategy."""
    return spec.lut_qspec is None and spec.sparsity_detection_threshold is None


def _apply_training_and_schedule(config: KMeansPalettizerConfig,
                                 settings: PalettizeSettings) -> None:
    start, strategy_spec = settings.start_step, _training_spec(settings)
    if not start and strategy_spec is None:
        return
    kept_frozen: list[str] = []
    for table, name, module_config in _enabled_module_configs(config):
        update: dict[str, Any] = {}
        if start:
            update["pat_schedule"] = PATSchedule(enable_fake_palettize=start)
        if strategy_spec is not None:
            for spec_field in ("op_state_spec", "module_state_spec"):
                specs = {}
                for key, spec in getattr(module_config, spec_field).items():
                    if spec is not None and _trains_with_strategy(spec):
                        spec = spec.model_copy(update={"training_strategy_spec": strategy_spec})
                    elif spec is not None:
                        kept_frozen.append(f"{name or 'global'}:{key}")
                    specs[key] = spec
                update[spec_field] = specs
        updated = module_config.model_copy(update=update)
        if table is None:
            config.global_config = updated
        else:
            table[name] = updated
    if kept_frozen:
        warnings.warn(f"palettize.training={settings.training_strategy}: {len(kept_frozen)} "
                      f"spec(s) with lut_dtype or sparsity train frozen (coreai-opt's strategy; "
                      f"{settings.training_strategy} needs a float LUT): "
                      f"{', '.join(kept_frozen)}", stacklevel=3)


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
        return dtype_name(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, type):
        return _registry_key(value)
    return value


def _registry_key(cls: type) -> str:
    """coreai-opt dumps classes (``lut_qspec.fake_quantize_cls`` ...) as objects but parses them
    back by registry key: find the key under which ``cls`` is registered (a coreai-opt
    ``to_dict``/``from_yaml`` asymmetry)."""
    for base in cls.__mro__:
        registry = base.__dict__.get("REGISTRY")
        if isinstance(registry, Mapping):
            for key, registered in registry.items():
                if registered is cls:
                    return key
    return f"{cls.__module__}.{cls.__qualname__}"
