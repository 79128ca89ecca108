"""The ``palettize`` schema: typed, self-validating settings shared by Hydra, recipes and callbacks.

========================  =====================================================================
key                       meaning
========================  =====================================================================
``preset``                ``w2``/``w3``/``w4``/``w6``/``w8``, ``none`` (no global palettization)
                          or a spec mapping
``overrides.<type>``      per module type (an alias such as ``linear`` or a dotted class path):
                          a preset name, ``null`` (leave dense), a spec mapping, or ``inherit``;
                          ``conv1d_hf`` (HF Conv1D) and ``experts`` (fused MoE experts)
                          inherit the ``linear`` spec (``linear_like.py``)
``modules.<regex>``       per module name (``re.fullmatch``), same values; highest precedence
``fit_layouts``           true (default): a weight the grouping cannot take gets the nearest
                          layout that fits (``fitting.py``); false: coreai-opt's (left dense)
``config_file``           a coreai-opt YAML file (``kmeans_palettization_config:``); replaces
                          ``preset`` as the base that overrides and modules apply to
``schedule.start_step``   optimizer step at which palettization turns on (coreai-opt PATSchedule)
``training``              how palettized weights train (default ``ste``, ``frozen`` with
                          ``adapters``; ``frozen`` is coreai-opt's own)
``num_workers``           k-means worker processes per rank
``distributed``           ``sharded`` or ``rank0``: who runs k-means under torch.distributed
``export``                ``formats`` (``coreai``, ``torch``) and ``dir``
``calibration``           null (off) or ``{samples: N}`` / ``{batches: N}`` (+ ``path``,
                          ``show_progress``): sensitivity-weighted k-means (``calibration.py``)
``budget``                null, or per-layer bits for a whole-model target (``budget.py``):
                          ``{bits_per_weight: 3.5, choices: [2, 3, 4, 6, 8]}``
``adapters``              null, or LoRA adapters on the frozen palettized base (``adapters.py``)
``distillation``          null, or a KL term from a dense teacher added to the training loss
                          (``distillation.py``): ``{weight: 1.0, temperature: 1.0, teacher: null}``
========================  =====================================================================

A spec mapping has the keys ``preset`` (base), ``n_bits``, ``granularity`` (``per_tensor`` or
``per_grouped_channel``), ``group_size``, ``axis``, ``cluster_dim``, ``lut_dtype`` and
``enable_per_channel_scale``.

Every check runs when a ``PalettizeSettings`` is built (``__post_init__``, with the value checks
of ``checks.py``); a bad value raises ``PalettizeConfigError`` whose one-line message names the
dotted key and the valid choices. ``coreai_config.py`` translates valid settings into coreai-opt
objects.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coreai_opt.palettization import KMeansPalettizerConfig

from ..accuracy.adapters import AdapterSettings, build_adapter_settings, check_adapter_training
from ..accuracy.budget import check_budget
from ..accuracy.calibration import CalibrationSettings, build_calibration
from ..accuracy.distillation import DistillationSettings, build_distillation
from ..core import strategies
from ..core._utils import is_int
from ..core.checks import (
    DISTRIBUTED_MODES,
    EXPORT_FORMATS,
    INHERIT,
    LINEAR_LIKE_ALIASES,
    MODULE_TYPE_ALIASES,
    PRESETS,
    SPEC_KEYS,
    TRAINING_STRATEGY_KEYS,
    VALID_N_BITS,
    PalettizeConfigError,
    build_section,
    check_export_formats,
    check_module_type,
    check_training,
    check_value,
    choices,
    normalize_spec,
    resolve_module_type,
    section_mapping,
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


def _to_plain(source: Any) -> Any:
    """DictConfig / dataclass / mapping -> plain python containers, interpolations resolved."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(source, (DictConfig, ListConfig)):
        return OmegaConf.to_container(source, resolve=True)
    if isinstance(source, PalettizeSettings):
        return source.to_dict()
    if dataclasses.is_dataclass(source) and not isinstance(source, type):
        return dataclasses.asdict(source)
    if isinstance(source, Mapping):
        return {k: _to_plain(v) for k, v in source.items()}
    if isinstance(source, (list, tuple)):
        return [_to_plain(v) for v in source]
    return source


def _build(cls: type, value: Any, key: str) -> Any:
    """A nested section (``schedule``, ``export``) from its dataclass or a mapping."""
    if isinstance(value, cls):
        return value
    plain = _to_plain(value) if value is not None else {}
    section = section_mapping(cls, plain, key, f"must be a mapping, got {value!r}")
    return build_section(cls, section, key)


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


@dataclass
class ScheduleSettings:
    """When palettization turns on. ``start_step`` null or 0: palettized from the first step."""

    start_step: int | None = None

    def __post_init__(self) -> None:
        start = self.start_step
        if start is not None and (not is_int(start) or start < 0):
            raise PalettizeConfigError("start_step", f"must be a non-negative integer, got {start!r}")


@dataclass
class ExportSettings:
    """What is written at the end of training."""

    formats: list[str] = field(default_factory=lambda: list(EXPORT_FORMATS))
    dir: str | None = None

    def __post_init__(self) -> None:
        self.formats = check_export_formats(self.formats, "formats")
        if self.dir is not None:
            self.dir = os.fspath(self.dir)


def _default_overrides() -> dict[str, Any]:
    return dict.fromkeys([*MODULE_TYPE_ALIASES, *LINEAR_LIKE_ALIASES], INHERIT)


DEFAULT_TRAINING = "ste"
"""``palettize.training`` unless set; with ``palettize.adapters`` the base trains ``frozen``."""


@dataclass
class PalettizeSettings:
    """Typed schema of the ``palettize`` group (Hydra ``palettize/base``); validates itself.

    ``base_config`` (not a Hydra key) holds a ready ``KMeansPalettizerConfig`` given instead of a
    preset; overrides and modules then apply on top of a copy of it.

    Raises:
        PalettizeConfigError: for any bad value, naming its dotted key and the valid choices.
    """

    preset: Any = "w4"
    overrides: dict[str, Any] = field(default_factory=_default_overrides)
    modules: dict[str, Any] = field(default_factory=dict)
    fit_layouts: bool = True
    """A weight whose channels the spec's group size does not divide gets the nearest layout that
    fits (``fitting.py``) instead of staying dense; false gives coreai-opt's behaviour exactly."""
    config_file: str | None = None
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    training: Any = DEFAULT_TRAINING
    num_workers: int = 1
    distributed: str = "sharded"
    compact: bool = True
    export: ExportSettings = field(default_factory=ExportSettings)
    calibration: CalibrationSettings | None = None
    budget: Any = None
    adapters: Any = None
    """null or ``AdapterSettings`` (a mapping ``{type: lora, r, alpha, ...}`` is converted)."""
    distillation: DistillationSettings | None = None
    """null (off) or a dense teacher's KL term added to the loss (``distillation.py``)."""
    base_config: KMeansPalettizerConfig | None = field(
        default=None, repr=False, compare=False, metadata={"omegaconf_ignore": True})

    def __post_init__(self) -> None:
        self.overrides = dict(_to_plain(self.overrides) or {})
        self.modules = dict(_to_plain(self.modules) or {})
        self.training = _to_plain(self.training)
        self.preset = _to_plain(self.preset)
        self.schedule = _build(ScheduleSettings, self.schedule, "schedule")
        self.export = _build(ExportSettings, self.export, "export")
        self.calibration = build_calibration(_to_plain(self.calibration))
        self.adapters: AdapterSettings | None = build_adapter_settings(_to_plain(self.adapters))
        self.distillation = build_distillation(_to_plain(self.distillation))
        if self.preset is not None:
            check_value(self.preset, "preset", allow_inherit=False)
        for type_key, value in self.overrides.items():
            check_module_type(type_key, f"overrides.{type_key}", value)
            check_value(value, f"overrides.{type_key}", allow_inherit=True)
        for pattern, value in self.modules.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise PalettizeConfigError(f"modules.{pattern}",
                                           f"invalid regular expression ({e})") from None
            check_value(value, f"modules.{pattern}", allow_inherit=False)
        if self.config_file is not None:
            self.config_file = os.fspath(self.config_file)
            if not Path(self.config_file).is_file():
                raise PalettizeConfigError("config_file", f"no such file: {self.config_file}")
        check_training(self.training, strategies.spec_class)
        self._check_budget()
        if self.adapters is not None and self.training == DEFAULT_TRAINING:
            self.training = "frozen"  # adapters train on a frozen base; the default ste would not
            logging.getLogger(__name__).info(
                "palettize: adapters set: the palettized base trains frozen (palettize.training "
                "default ste does not apply)")
        check_adapter_training(self.adapters, training_name(self.training))
        if not is_int(self.num_workers) or self.num_workers < 1:
            raise PalettizeConfigError("num_workers",
                                       f"must be an integer >= 1, got {self.num_workers!r}")
        if self.distributed not in DISTRIBUTED_MODES:
            raise PalettizeConfigError("distributed", f"unknown mode {self.distributed!r}; "
                                       f"valid: {choices(DISTRIBUTED_MODES)}")
        if not isinstance(self.fit_layouts, bool):
            raise PalettizeConfigError("fit_layouts", f"must be true or false, got "
                                       f"{self.fit_layouts!r}")
        if not isinstance(self.compact, bool):
            raise PalettizeConfigError("compact", f"must be true or false, got {self.compact!r}")
        if not self._palettizes_anything():
            raise PalettizeConfigError(
                "preset", "preset 'none' with no overrides or modules palettizes nothing; choose "
                f"a preset ({choices(p for p in PRESETS if p != 'none')}) or add "
                "palettize.overrides.<type>=<preset>")

    def _check_budget(self) -> None:
        budget = check_budget(_to_plain(self.budget))
        self.budget = None if budget is None else dataclasses.asdict(budget)

    def _palettizes_anything(self) -> bool:
        if self.preset not in (None, "none") or self.config_file or self.base_config is not None:
            return True
        chosen = [*self.overrides.values(), *self.modules.values()]
        return any(v not in (INHERIT, None, "none") for v in chosen)

    # ------------------------------------------------------------------ derived views

    @property
    def training_strategy(self) -> str:
        """The name of the training strategy (``frozen``, ``ste``, ``lut``)."""
        return training_name(self.training)

    @property
    def start_step(self) -> int:
        """The optimizer step at which palettization turns on (0: from the start)."""
        return self.schedule.start_step or 0

    def to_dict(self) -> dict[str, Any]:
        """Plain containers (YAML/JSON-able); ``base_config`` is left out."""
        return {f.name: _plain_copy(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name != "base_config"}

    def describe(self) -> str:
        """What was asked for, in one line: ``preset=w4, overrides.linear=w8, ...``."""
        parts = [f"preset={self.preset}"] if self.preset is not None else []
        parts += [f"overrides.{k}={v}" for k, v in self.overrides.items() if v != INHERIT]
        parts += [f"modules.{k}={v}" for k, v in self.modules.items()]
        return ", ".join(parts) or "a coreai-opt config"

    # ------------------------------------------------------------------ construction

    @classmethod
    def resolve(
        cls,
        source: ConfigSource | None = "w4",
        *,
        overrides: Mapping[str, Any] | None = None,
        modules: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> PalettizeSettings:
        """Settings from any accepted input plus keyword overrides.

        ``source`` may be a ``PalettizeSettings``, a ``DictConfig`` or mapping (partial: the rest
        are defaults), a preset name, a path to a coreai-opt YAML file, or a
        ``KMeansPalettizerConfig`` (kept as ``base_config``). ``overrides``, ``modules``,
        ``schedule`` and ``export`` merge into the source's; other fields replace it.

        Raises:
            PalettizeConfigError: an unknown key or preset, or any bad value.
        """
        values = cls().to_dict()
        base = None
        if isinstance(source, PalettizeSettings):
            values, base = source.to_dict(), source.base_config
        elif isinstance(source, KMeansPalettizerConfig):
            values["preset"], base = None, source
        elif isinstance(source, (str, os.PathLike)):
            text = os.fspath(source)
            if text in PRESETS:
                values["preset"] = text
            elif text.endswith((".yaml", ".yml")) or os.sep in text:
                values["config_file"], values["preset"] = text, None
            else:
                raise PalettizeConfigError("", f"unknown preset {text!r}; valid: "
                                           f"{choices(PRESETS)}, or a path to a coreai-opt YAML file")
        elif source is not None:
            plain = _to_plain(source)
            if not isinstance(plain, Mapping):
                raise PalettizeConfigError("", "expected a preset name, a mapping or a "
                                           f"KMeansPalettizerConfig, got {type(source).__name__}")
            if plain.get("config_file") and "preset" not in plain:
                values["preset"] = None
            _merge(values, plain, hint=True)
        _merge(values, {"overrides": overrides, "modules": modules, **fields})
        return cls(**values, base_config=base)


def _plain_copy(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain_copy(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_copy(v) for v in value]
    return value


_MERGED = ("overrides", "modules", "schedule", "export")


def _merge(values: dict[str, Any], update: Mapping[str, Any], *, hint: bool = False) -> None:
    """Apply ``update`` to plain settings ``values``: nested sections merge, the rest replace."""
    for name, value in update.items():
        if name not in values:
            extra = (" (a spec mapping goes under preset: {preset: {n_bits: ..., ...}})"
                     if hint and name in SPEC_KEYS else "")
            raise PalettizeConfigError(str(name), f"unknown key; valid: {choices(values)}{extra}")
        if name in _MERGED:
            if value is None:
                continue
            plain = _to_plain(value)
            values[name] = ({**(values[name] or {}), **plain} if isinstance(plain, Mapping)
                            else plain)
        else:
            values[name] = _to_plain(value)


ConfigSource = PalettizeSettings | Mapping[str, Any] | str | os.PathLike | KMeansPalettizerConfig
"""Anything ``PalettizeSettings.resolve`` and ``build_palettizer_config`` accept."""


def resolve_settings(source: ConfigSource | None = "w4", **kwargs: Any) -> PalettizeSettings:
    """Alias of ``PalettizeSettings.resolve`` (kept for code written against 0.1)."""
    return PalettizeSettings.resolve(source, **kwargs)


def register_configs() -> None:
    """Register the ``palettize`` schema as ``palettize/base`` in Hydra's ConfigStore.

    The YAML options of the group (``conf/palettize/w4.yaml`` ...) extend it with
    ``defaults: [base]``, which makes them typed: ``--cfg job`` lists every overridable module
    type, and ``palettize.overrides.linear=w8`` needs no ``+``. Importing this module calls it
    (the package's one intended import side effect).
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    node = OmegaConf.structured(PalettizeSettings)
    # An all-null calibration node (off) rather than null: Hydra cannot override a key under a
    # null node, so ``palettize.calibration.samples=8`` needs it to exist.
    node.calibration = OmegaConf.structured(CalibrationSettings)
    node.distillation = OmegaConf.structured(DistillationSettings)  # all null: off, as above
    ConfigStore.instance().store(group="palettize", name="base", node=node)


register_configs()  # the ``palettize`` YAML options extend ``palettize/base``
