"""Which weights of linear-like layers stayed dense, and why: the report's ``dense_layers``, the
single attach warning, and the check that every ``overrides``/``modules`` entry palettizes
something."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from .._coreai_compat import consumer_op, fake_palettized_tensors, palettizable_ops
from ..accuracy.adapters import ADAPTER_LAYER_PATTERN
from ..core.checks import (
    EXPERTS,
    INHERIT,
    MODULE_TYPE_ALIASES,
    PalettizeConfigError,
    resolve_module_type,
)
from ..core.linear_like import FUSED_EXPERTS, HF_CONV1D, experts_types

if TYPE_CHECKING:
    from ..settings.schema import PalettizeSettings

__all__ = ["SILENT_KINDS", "DenseLayer", "check_overrides", "dense_weights"]

# Module types whose weights coreai-opt can palettize (the ``overrides`` aliases).
_PALETTIZABLE_TYPES = tuple(resolve_module_type(alias, alias) for alias in MODULE_TYPE_ALIASES)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

SILENT_KINDS = ("config", "embedding", "adapter")
"""``DenseLayer.kind`` values the attach warning leaves out: the user's own config chose them."""


@dataclass
class DenseLayer:
    """A weight of a linear-like layer (``nn.Linear``, convolutions, HF ``Conv1D``,
    ``nn.MultiheadAttention``'s projections, fused 3-D expert weights, embeddings, or anything
    an op coreai-opt palettizes consumed) left dense.

    ``kind`` (the ``reason``'s category): ``shape`` (coreai-opt skipped it: its shape does
    not fit the spec), ``config`` (``overrides.<type>``/``modules.<regex>`` = null, preset
    ``none``), ``embedding`` (embeddings need ``overrides.embedding`` or ``modules.<name>``),
    ``op`` (its first consumer is a torch function coreai-opt does not palettize, e.g.
    ``torch.addmm``), ``state_spec`` (a palettizable op consumed it as an argument the config's
    ``op_state_spec`` does not name), ``not_run`` (the tracing forward did not use it), ``other``.
    """

    name: str
    shape: list[int]
    reason: str
    kind: str = "other"

    @property
    def warned(self) -> bool:
        """Named in the attach warning (everything the config did not choose itself)."""
        return self.kind not in SILENT_KINDS


def dense_weights(
    model: nn.Module,
    skipped: Mapping[str, str] | None = None,
    *,
    consumers: Mapping[str, str] | None = None,
    settings: PalettizeSettings | None = None,
    module_configs: Mapping[str, tuple[str, Any]] | None = None,
) -> list[DenseLayer]:
    """Every weight of a linear-like layer of a prepared ``model`` that is not palettized,
    with the reason, in module order (a tied weight once).

    Linear-like: ``nn.Linear``, convolutions, HF ``Conv1D``, ``nn.MultiheadAttention``'s
    projection weights, 3-D float parameters of fused-experts modules, embeddings, and any
    >= 2-D parameter coreai-opt considered (``skipped``) or a palettizable op consumed.

    Args:
        skipped: ``{name: reason}`` coreai-opt dropped for their shape.
        consumers: ``{parameter name: first torch function that consumed it}`` recorded in
            the tracing forward (``_coreai_compat.record_first_consumers``).
        settings: the settings, to name the ``overrides``/``modules`` entry that excluded one.
        module_configs: ``{module name: (level, config)}`` coreai-opt resolved
            (``_coreai_compat.resolved_module_configs``).
    """
    why = _Reasons(model, skipped, consumers, settings, module_configs)
    palettized = {id(t.parameter) for t in fake_palettized_tensors(model)}
    dense: list[DenseLayer] = []
    seen: set[int] = set()
    for module_name, module in why.modules.items():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen or id(param) in palettized:
                continue
            seen.add(id(param))
            name = _join(module_name, attr)
            if not why.linear_like(module, attr, param, name):
                continue
            kind, reason = why(module_name, module, attr, name)
            dense.append(DenseLayer(name, list(param.shape), reason, kind))
    return dense


def check_overrides(
    model: nn.Module,
    settings: PalettizeSettings,
    skipped: Mapping[str, str] | None = None,
    *,
    consumers: Mapping[str, str] | None = None,
    module_configs: Mapping[str, tuple[str, Any]] | None = None,
) -> None:
    """After attach: every ``overrides.<type>`` and ``modules.<regex>`` that asks for a spec
    must palettize at least one weight of the modules it matches (``null`` opts out and is not
    checked; an override matching no module is not an error here).

    Raises:
        PalettizeConfigError: ``palettize.overrides.<type>: matches <n> module(s) (<names>)
            but palettizes none of their weights (<reason>)``.
    """
    why = _Reasons(model, skipped, consumers, settings, module_configs)
    for type_key, value in settings.overrides.items():
        if value in (INHERIT, None, "none"):
            continue
        classes = _override_classes(model, type_key)
        matched = [n for n, m in why.modules.items()
                   if type(m) in classes and why.level(n, "type")]
        why.require_palettized(f"overrides.{type_key}", matched)
    for pattern, value in settings.modules.items():
        if value in (None, "none"):
            continue
        matched = [n for n in why.modules if re.fullmatch(pattern, n) and why.level(n, "name")]
        why.require_palettized(f"modules.{pattern}", matched)


def _override_classes(model: nn.Module, type_key: str) -> list[type[nn.Module]]:
    """The module classes ``overrides.<type_key>`` applies to (``experts``: those of the model)."""
    if type_key == EXPERTS:
        return experts_types(model)
    return [resolve_module_type(type_key, f"overrides.{type_key}")]


def _join(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def _show(value: Any) -> str:
    return "null" if value is None else str(value) if isinstance(value, str) else "{...}"


def _specs(config: Any, field: str) -> dict[str, Any]:
    return {k: v for k, v in (getattr(config, field, None) or {}).items() if v is not None}


def _enabled(config: Any) -> bool:
    """A coreai-opt module config that palettizes something (``None`` entries become configs
    whose specs are all None)."""
    return config is not None and any(
        _specs(config, f) for f in ("op_state_spec", "module_state_spec", "op_type_config",
                                    "op_name_config"))


class _Reasons:
    """Why a parameter of a prepared model is dense: ``self(module_name, module, attr, name)``
    -> ``(kind, reason)`` (see ``DenseLayer``)."""

    def __init__(self, model: nn.Module, skipped: Mapping[str, str] | None,
                 consumers: Mapping[str, str] | None, settings: PalettizeSettings | None,
                 module_configs: Mapping[str, tuple[str, Any]] | None) -> None:
        # The model's own modules; coreai-opt's parametrization machinery is not the model's.
        self.modules = {n: m for n, m in model.named_modules()
                        if "parametrizations" not in n.split(".")}
        self.model = model
        self.skipped = dict(skipped or {})
        self.consumers = consumers
        self.settings = settings
        self.configs = module_configs
        self.ops = palettizable_ops()

    # ------------------------------------------------------------ which weights

    def linear_like(self, module: nn.Module, attr: str, param: torch.Tensor, name: str) -> bool:
        if name in self.skipped:
            return True
        if not param.is_floating_point() or param.dim() < 2:
            return False
        if isinstance(module, nn.MultiheadAttention):
            return attr in _MHA_WEIGHTS
        if isinstance(module, _PALETTIZABLE_TYPES) or HF_CONV1D.matches(module):
            return attr == "weight"
        if param.dim() == 3 and param.shape[0] > 1 and FUSED_EXPERTS.matches(module):
            return True
        return (self.consumers is not None and name in self.consumers
                and consumer_op(self.consumers[name]) in self.ops)

    # ------------------------------------------------------------ why

    def level(self, module_name: str, wanted: str) -> bool:
        """Whether coreai-opt resolved ``module_name``'s config at level ``wanted`` (True when
        the resolution is unknown)."""
        if self.configs is None:
            return True
        entry = self.configs.get(module_name)
        return entry is not None and entry[0] == wanted

    def __call__(self, module_name: str, module: nn.Module, attr: str, name: str
                 ) -> tuple[str, str]:
        if name in self.skipped:
            return "shape", f"skipped by coreai-opt: {self.skipped[name]}"
        if re.fullmatch(ADAPTER_LAYER_PATTERN, module_name):
            return "adapter", "LoRA adapter (dense, trained on the palettized base)"
        level, config = (self.configs.get(module_name, ("global", None))
                         if self.configs is not None else (None, None))
        if self.configs is not None and not _enabled(config):
            return "config", self._excluded_by(module_name, level)
        module_spec = attr in _specs(config, "module_state_spec")
        if isinstance(module, nn.Embedding) and not module_spec:
            return "embedding", ("embeddings are palettized only with overrides.embedding or "
                                 "modules.<name>")
        if self.consumers is None:
            return "other", "not palettized by the config (or not run by the example inputs)"
        func = self.consumers.get(name)
        if func is None:
            return "not_run", "not used by the tracing forward (not run by the example inputs)"
        if module_spec:
            return "other", f"consumed by {func}; coreai-opt left it dense"
        if consumer_op(func) not in self.ops:
            return "op", f"consumed by {func}, not an op coreai-opt palettizes"
        keys = sorted(_specs(config, "op_state_spec"))
        if attr not in keys and "*" not in keys:
            return "state_spec", (f"consumed by {func}, whose {attr} the config's op_state_spec "
                                  f"does not name (it names {', '.join(keys) or 'nothing'})")
        return "other", f"consumed by {func}; coreai-opt left it dense"

    def _excluded_by(self, module_name: str, level: str | None) -> str:
        """The setting that resolved ``module_name`` to "dense", as coreai-opt picks it: the
        last defined entry of the winning level that matches the module or an ancestor."""
        settings = self.settings
        if settings is None:
            return "excluded by the config"
        parts = module_name.split(".") if module_name else []
        chain = [".".join(parts[:i]) for i in range(len(parts), -1, -1)]
        if level == "name":
            for pattern in reversed(list(settings.modules)):
                if any(re.fullmatch(pattern, n) for n in chain):
                    value = settings.modules[pattern]
                    if value in (None, "none"):
                        return f"excluded by palettize.modules.{pattern}={_show(value)}"
                    break
            return "excluded by a module_name entry of the coreai-opt config"
        if level == "type":
            types = {type(self.modules[n]) for n in chain if n in self.modules}
            # the module's own class first, then a base class it inherits the override from
            for match in (lambda t, c: t is c, issubclass):
                for type_key in reversed(list(settings.overrides)):
                    value = settings.overrides[type_key]
                    if value == INHERIT:
                        continue
                    classes = _override_classes(self.model, type_key)
                    if any(match(t, c) for t in types for c in classes):
                        if value in (None, "none"):
                            return f"excluded by palettize.overrides.{type_key}={_show(value)}"
                        return "excluded by a module_type entry of the coreai-opt config"
            return "excluded by a module_type entry of the coreai-opt config"
        if settings.base_config is None and not settings.config_file:
            return (f"excluded by palettize.preset={_show(settings.preset)} (no override or "
                    "module pattern palettizes it)")
        return "excluded by the coreai-opt config (its global_config is null)"

    # ------------------------------------------------------------ overrides

    def _subtree(self, roots: list[str]) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.modules.items():
            if any(not r or name == r or name.startswith(r + ".") for r in roots):
                yield name, module

    def require_palettized(self, key: str, matched: list[str]) -> None:
        if not matched:
            return
        subtree = list(self._subtree(matched))
        if any(parametrize.is_parametrized(m) for _, m in subtree):
            return
        params = [(n, m, attr, p) for n, m in subtree
                  for attr, p in m.named_parameters(recurse=False) if p.is_floating_point()]
        weights = [x for x in params if x[3].dim() >= 2] or params
        reasons = list(dict.fromkeys(self(n, m, attr, _join(n, attr))[1]
                                     for n, m, attr, _ in weights))
        reason = ("; ".join(reasons[:2]) + ("; ..." if len(reasons) > 2 else "")
                  if reasons else "they have no floating-point weights")
        names = ", ".join(matched[:3]) + (", ..." if len(matched) > 3 else "")
        raise PalettizeConfigError(key, f"matches {len(matched)} module(s) ({names}) but "
                                   f"palettizes none of their weights ({reason})")
