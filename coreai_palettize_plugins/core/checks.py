"""The vocabulary of the ``palettize`` settings (presets, module types, strategies, formats), its
error type, and the checks of single values. Pure: no coreai-opt object is built here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch.nn as nn

from ._utils import is_int

__all__ = [
    "DISTRIBUTED_MODES",
    "EXPERTS",
    "EXPORT_FORMATS",
    "GRANULARITIES",
    "INHERIT",
    "LINEAR_LIKE_ALIASES",
    "LUT_DTYPES",
    "MODULE_TYPE_ALIASES",
    "PRESETS",
    "SPEC_KEYS",
    "TRAINING_STRATEGY_KEYS",
    "VALID_N_BITS",
    "PalettizeConfigError",
    "build_section",
    "check_export_formats",
    "check_module_type",
    "check_training",
    "check_value",
    "choices",
    "normalize_spec",
    "resolve_module_type",
    "section_mapping",
    "training_name",
    "training_options",
]


class PalettizeConfigError(ValueError):
    """A bad palettization setting: ``<root>.<key>: <message>``, one line naming the valid choices.

    ``key`` is the dotted path inside the settings (``overrides.linear.n_bits``); ``root`` is how
    the caller names the settings (``palettize``, or ``recipe.palettize`` in recipes).
    """

    def __init__(self, key: str, message: str, *, root: str = "palettize") -> None:
        self.key, self.message, self.root = key, message, root
        super().__init__(f"{root}.{key}: {message}" if key else f"{root}: {message}")

    def within(self, parent: str) -> PalettizeConfigError:
        """The same error one level deeper: ``key`` becomes ``<parent>.<key>``."""
        return PalettizeConfigError(f"{parent}.{self.key}" if self.key else parent, self.message,
                                    root=self.root)

    def with_root(self, root: str) -> PalettizeConfigError:
        """The same error under another name for the settings (``recipe.palettize``)."""
        return PalettizeConfigError(self.key, self.message, root=root)

    def __reduce__(self):
        return _rebuild_error, (self.key, self.message, self.root)


def _rebuild_error(key: str, message: str, root: str) -> PalettizeConfigError:
    return PalettizeConfigError(key, message, root=root)


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

EXPERTS = "experts"
LINEAR_LIKE_ALIASES: dict[str, str | None] = {
    "conv1d_hf": "transformers.pytorch_utils.Conv1D",
    EXPERTS: None,
}
"""``overrides`` keys of the linear-like modules no coreai-opt op consumes (``linear_like.py``):
Hugging Face ``Conv1D`` (GPT-2) and fused MoE experts. ``experts`` names no single class: it
applies to every experts module transformers' ``@use_experts_implementation`` builds. Both
default to the ``linear`` spec; they are resolved per model when the engine attaches."""

VALID_N_BITS = (1, 2, 3, 4, 6, 8)
DISTRIBUTED_MODES = ("sharded", "rank0")
EXPORT_FORMATS = ("coreai", "torch")
TRAINING_STRATEGY_KEYS: dict[str, str] = {"frozen": "default", "ste": "ste", "lut": "lut"}
"""``palettize.training`` name -> coreai-opt ``TrainingStrategySpec`` registry key
(``strategies.py`` registers ``ste`` and ``lut``)."""

SPEC_KEYS = ("preset", "n_bits", "granularity", "group_size", "axis", "cluster_dim", "lut_dtype",
             "enable_per_channel_scale")
GRANULARITIES = ("per_tensor", "per_grouped_channel")
LUT_DTYPES = ("int8", "uint8", "float8_e4m3fn", "float8_e5m2")


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


def choices(values: Iterable[Any]) -> str:
    return ", ".join(str(v) for v in values)


def normalize_spec(mapping: Mapping[str, Any], key: str) -> dict[str, Any]:
    """Check a spec mapping and return it complete: ``n_bits``, ``granularity``, ``group_size``
    and ``axis`` (grouped only), ``cluster_dim``, ``lut_dtype``, ``enable_per_channel_scale``."""
    unknown = sorted(set(mapping) - set(SPEC_KEYS))
    if unknown:
        raise PalettizeConfigError(f"{key}.{unknown[0]}", f"unknown key; valid: {choices(SPEC_KEYS)}")
    base: dict[str, Any] = {}
    if "preset" in mapping:
        preset = mapping["preset"]
        if preset not in PRESETS or PRESETS[preset] is None:
            valid = [p for p, v in PRESETS.items() if v is not None]
            raise PalettizeConfigError(f"{key}.preset",
                                       f"unknown preset {preset!r}; valid: {choices(valid)}")
        base = dict(PRESETS[preset])
    own = {k: v for k, v in mapping.items() if k != "preset"}
    if "group_size" in own and "granularity" not in own:
        own["granularity"] = "per_grouped_channel"
    if own.get("granularity") == "per_tensor":
        base.pop("group_size", None)
        base.pop("axis", None)
    spec = {**base, **own}

    n_bits = spec.get("n_bits", 4)
    if not is_int(n_bits) or n_bits not in VALID_N_BITS:
        raise PalettizeConfigError(f"{key}.n_bits",
                                   f"{n_bits!r} is not supported; valid: {choices(VALID_N_BITS)}")
    granularity = spec.get("granularity", "per_tensor")
    if granularity not in GRANULARITIES:
        raise PalettizeConfigError(f"{key}.granularity", f"unknown granularity {granularity!r}; "
                                   f"valid: {choices(GRANULARITIES)}")
    out: dict[str, Any] = {"n_bits": n_bits, "granularity": granularity}
    if granularity == "per_grouped_channel":
        group_size, axis = spec.get("group_size", 16), spec.get("axis", 0)
        if not is_int(group_size) or group_size <= 0:
            raise PalettizeConfigError(f"{key}.group_size",
                                       f"must be a positive integer, got {group_size!r}")
        if axis not in (0, 1) or not is_int(axis):
            raise PalettizeConfigError(f"{key}.axis", f"must be 0 or 1, got {axis!r}")
        out.update(group_size=group_size, axis=axis)
    elif "group_size" in own:
        raise PalettizeConfigError(f"{key}.group_size",
                                   "is only valid with granularity per_grouped_channel")
    cluster_dim = spec.get("cluster_dim", 1)
    if not is_int(cluster_dim) or cluster_dim < 1:
        raise PalettizeConfigError(f"{key}.cluster_dim",
                                   f"must be a positive integer, got {cluster_dim!r}")
    lut_dtype = spec.get("lut_dtype")
    if lut_dtype is not None and lut_dtype not in LUT_DTYPES:
        raise PalettizeConfigError(f"{key}.lut_dtype",
                                   f"unknown dtype {lut_dtype!r}; valid: {choices(LUT_DTYPES)}")
    out.update(cluster_dim=cluster_dim, lut_dtype=lut_dtype,
               enable_per_channel_scale=bool(spec.get("enable_per_channel_scale", False)))
    return out


def check_value(value: Any, key: str, *, allow_inherit: bool) -> None:
    """A preset name, ``null``, a spec mapping (or ``inherit`` under ``overrides``)."""
    if value is None:
        return
    if isinstance(value, str):
        valid = [*PRESETS, *([INHERIT] if allow_inherit else [])]
        if value not in valid:
            raise PalettizeConfigError(key, f"unknown preset {value!r}; valid: {choices(valid)}, "
                                       "null or a spec mapping")
        return
    if not isinstance(value, Mapping):
        raise PalettizeConfigError(key, f"expected a preset name, null or a spec mapping, got {value!r}")
    normalize_spec(value, key)


def check_module_type(type_key: str, key: str, value: Any = None) -> None:
    """An ``overrides`` key: an alias or an importable dotted class path. The linear-like
    aliases are not imported while their value is ``inherit`` (no transformers import)."""
    if type_key == EXPERTS or (type_key in LINEAR_LIKE_ALIASES and value == INHERIT):
        return
    resolve_module_type(type_key, key)


def resolve_module_type(type_key: str, key: str) -> type[nn.Module]:
    """Alias or dotted class path -> the module class (coreai-opt derives its FQN key).

    A class, not a string: coreai-opt 0.4 silently never matches a type key that is not the
    class's fully qualified name (``"torch.nn.Linear"`` instead of
    ``"torch.nn.modules.linear.Linear"``).
    """
    if type_key == EXPERTS:
        raise PalettizeConfigError(key, f"{EXPERTS!r} names every fused MoE experts class, not "
                                   "one; it is resolved per model (linear_like.py)")
    path = MODULE_TYPE_ALIASES.get(type_key) or LINEAR_LIKE_ALIASES.get(type_key)
    if path is None and "." not in type_key:
        raise PalettizeConfigError(key, f"unknown module type alias {type_key!r}; valid: "
                                   f"{choices([*MODULE_TYPE_ALIASES, *LINEAR_LIKE_ALIASES])}, "
                                   "or a dotted class path")
    module_name, _, cls_name = (path or type_key).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        return cls
    raise PalettizeConfigError(key, f"{type_key!r} is not an importable torch.nn.Module class")


def training_name(value: Any) -> str:
    """``palettize.training`` (a name or ``{type: name, ...options}``) -> the strategy name."""
    return str(value.get("type", "")) if isinstance(value, Mapping) else str(value)


def training_options(value: Any) -> dict[str, Any]:
    """The options of ``palettize.training`` (``{}`` for a bare name)."""
    return {k: v for k, v in value.items() if k != "type"} if isinstance(value, Mapping) else {}


def check_training(value: Any, spec_class: Callable[[str], type[Any] | None]) -> None:
    """``palettize.training``: a known strategy and valid options for its coreai-opt spec class
    (``spec_class(name)``: ``strategies.spec_class``, None for a strategy without options)."""
    from pydantic import ValidationError

    name, options = training_name(value), training_options(value)
    if name not in TRAINING_STRATEGY_KEYS:
        raise PalettizeConfigError("training", f"unknown strategy {name!r}; "
                                   f"valid: {choices(TRAINING_STRATEGY_KEYS)}")
    spec_cls = spec_class(name)
    if spec_cls is None and options:
        raise PalettizeConfigError("training", f"{name!r} takes no options")
    fields = [] if spec_cls is None else [f for f in spec_cls.model_fields if f != "type"]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise PalettizeConfigError(f"training.{unknown[0]}",
                                   f"unknown option; valid: {choices(fields) or 'none'}")
    if spec_cls is not None:
        try:
            spec_cls(**options)
        except ValidationError as e:
            error = e.errors()[0]
            where = ".".join(str(p) for p in error.get("loc", ()))
            raise PalettizeConfigError(f"training.{where}" if where else "training",
                                       error["msg"]) from None


def check_export_formats(formats: Any, key: str) -> list[str]:
    """``formats`` as a list (a single name or null accepted), each one of ``EXPORT_FORMATS``."""
    formats = [] if formats is None else [formats] if isinstance(formats, str) else formats
    if not isinstance(formats, (list, tuple)):
        raise PalettizeConfigError(key, f"must be a list, got {formats!r}")
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise PalettizeConfigError(key,
                                       f"unknown format {fmt!r}; valid: {choices(EXPORT_FORMATS)}")
    return list(formats)


def section_mapping(cls: type, value: Any, key: str, not_mapping: str) -> Mapping[str, Any]:
    """``value`` checked as the mapping of dataclass section ``cls`` at ``key``: a mapping
    (else ``not_mapping`` is the message) whose keys are all fields of ``cls``."""
    if not isinstance(value, Mapping):
        raise PalettizeConfigError(key, not_mapping)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in value if k not in names)
    if unknown:
        raise PalettizeConfigError(f"{key}.{unknown[0]}", f"unknown key; valid: {choices(names)}")
    return value


def build_section(cls: type, value: Mapping[str, Any], key: str) -> Any:
    """``cls(**value)``; a ``PalettizeConfigError`` of its own checks is re-rooted at ``key``."""
    try:
        return cls(**value)
    except PalettizeConfigError as e:
        raise e.within(key) from None
