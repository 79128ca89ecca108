"""Linear-like weights that coreai-opt 0.4 does not palettize on its own, and the spec each
module type inherits.

A weight of a Linear or convolution module (subclasses included) is palettized wherever it is
used: ``_coreai_compat.palettize_every_use`` follows it through views to the op that consumes
it (``x @ w.T``, ``matmul``, ``bmm``, ``einsum``, ``addmm``, a squeeze before a conv) and reads
the layout from that op. Two kinds of modules need more than that:

==========================  =================  ================================================
module                      ``overrides`` key  stored weight -> LUT groups
==========================  =================  ================================================
HF ``Conv1D`` (GPT-2,       ``conv1d_hf``      ``(in, out)``, read by ``torch.addmm``: the op
DistilGPT2, ...)                               analysis finds its output columns (axis 1); it
                                               is not an ``nn.Linear``, so it is named here
fused MoE experts           ``experts``        ``(E, out, in)`` or, transposed (GPT-OSS),
(Mixtral, Qwen3-MoE,                           ``(E, in, out)`` ``nn.Parameter``\\s: a stack of
OLMoE, GPT-OSS, ...)                           matrices, palettized through coreai-opt's
                                               ``module_state_spec`` with a per-expert layout
==========================  =================  ================================================

Spec inheritance (``extend_for_model``): a module class without its own ``overrides`` entry
takes that of its nearest base class that has one (a ``FalconLinear`` follows
``overrides.linear``, a ``Conv2d`` subclass ``overrides.conv2d``); the kinds above take their
own alias, else ``overrides.linear``, else the preset. ``null`` leaves them dense, by type or by
name (``modules``). Specs are written as for a ``Linear`` (``axis: 0`` = output channels).
Fused experts also need a reshape strategy coreai-opt lacks; ``_coreai_compat.apply_layouts``
sets it on their fake-palettize modules wherever the structure is inserted.

``extend_for_model`` applies all this to a ``KMeansPalettizerConfig`` for one model (the engine
calls it at attach, so the config in checkpoints and the packed artifact is the extended one).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch.nn as nn
from coreai_opt.palettization import KMeansPalettizerConfig, ModuleKMeansPalettizerConfig
from coreai_opt.palettization.spec import PalettizationSpec, PerGroupedChannelGranularity

from .checks import EXPERTS, LINEAR_LIKE_ALIASES, PalettizeConfigError

__all__ = [
    "LINEAR_LIKE",
    "LinearLike",
    "experts_transposed",
    "experts_types",
    "extend_for_model",
    "linear_like_modules",
    "module_state_config",
]

LINEAR_FQN = "torch.nn.modules.linear.Linear"


def _fqn(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"  # coreai-opt's type-key convention


class LinearLike:
    """One kind of linear-like module: which modules, which weights, how a Linear-convention
    spec maps onto the stored layout, and what the kind cannot take."""

    alias: str
    description: str
    state_spec: bool = True
    """Palettized through ``module_state_spec`` (coreai-opt's op tracing cannot reach it); False:
    the op analysis of ``palettize_every_use`` does, with the config as written for a Linear."""

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def weight_names(self, module: nn.Module | None) -> tuple[str, ...]:
        raise NotImplementedError

    def stored_spec(self, spec: PalettizationSpec) -> PalettizationSpec:
        """The Linear-convention ``spec`` for the weight as stored."""
        return spec

    def unsupported(self, spec: PalettizationSpec) -> str | None:
        """What in ``spec`` this kind cannot take (one phrase), or None."""
        return None


class _HFConv1D(LinearLike):
    """``transformers.pytorch_utils.Conv1D``: ``y = x @ W + b`` with ``W`` stored ``(in, out)``."""

    alias = "conv1d_hf"
    description = "Hugging Face Conv1D"
    state_spec = False  # torch.addmm(bias, x, W): the op analysis finds axis 1
    class_path = LINEAR_LIKE_ALIASES["conv1d_hf"]

    def matches(self, module: nn.Module) -> bool:
        return any(_fqn(c) == self.class_path for c in type(module).__mro__)

    def matches_type(self, cls: type) -> bool:
        return any(_fqn(c) == self.class_path for c in cls.__mro__)

    def weight_names(self, module: nn.Module | None) -> tuple[str, ...]:
        return ("weight",)

    def stored_spec(self, spec: PalettizationSpec) -> PalettizationSpec:
        granularity = spec.granularity
        if not isinstance(granularity, PerGroupedChannelGranularity):
            return spec
        axis = 1 - (granularity.axis or 0)  # output channels are axis 1 of (in, out)
        return spec.model_copy(update={"granularity": granularity.model_copy(update={"axis": axis})})

class _FusedExperts(LinearLike):
    """Modules built by transformers' ``@use_experts_implementation`` (it sets ``is_transposed``,
    ``has_gate``... on the instance), with 3-D ``nn.Parameter`` expert stacks."""

    alias = EXPERTS
    description = "fused MoE experts"

    def matches(self, module: nn.Module) -> bool:
        return experts_transposed(module) is not None and bool(self.weight_names(module))

    def weight_names(self, module: nn.Module | None) -> tuple[str, ...]:
        if module is None:
            return ()
        return tuple(name for name, p in module.named_parameters(recurse=False)
                     if p.dim() == 3 and p.is_floating_point())

    def unsupported(self, spec: PalettizationSpec) -> str | None:
        granularity = spec.granularity
        if spec.cluster_dim > 1:
            return f"cluster_dim={spec.cluster_dim}"
        if spec.enable_per_channel_scale:
            return "enable_per_channel_scale"
        if spec.lut_qspec is not None:
            return "lut_dtype"
        if isinstance(granularity, PerGroupedChannelGranularity) and granularity.axis == 1:
            return "axis 1 (input-channel groups)"
        return None


HF_CONV1D = _HFConv1D()
FUSED_EXPERTS = _FusedExperts()
LINEAR_LIKE: tuple[LinearLike, ...] = (HF_CONV1D, FUSED_EXPERTS)
"""The registry: one entry per kind, keyed by its ``overrides`` alias."""


def experts_transposed(module: nn.Module) -> bool | None:
    """``is_transposed`` of a fused-experts module (True: ``(E, in, out)``), None otherwise."""
    transposed = getattr(module, "is_transposed", None)
    if isinstance(transposed, bool) and hasattr(module, "has_gate"):
        return transposed
    return None


def linear_like_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, LinearLike]]:
    """Every linear-like module of ``model``: ``(name, module, kind)``."""
    for name, module in model.named_modules():
        for kind in LINEAR_LIKE:
            if kind.matches(module):
                yield name, module, kind
                break


def experts_types(model: nn.Module) -> list[type[nn.Module]]:
    """The fused-experts classes ``model`` holds (what ``overrides.experts`` applies to)."""
    found: dict[str, type[nn.Module]] = {}
    for _, module, kind in linear_like_modules(model):
        if kind is FUSED_EXPERTS:
            found.setdefault(_fqn(type(module)), type(module))
    return list(found.values())


def kind_of_type(cls: type) -> LinearLike | None:
    """The kind whose modules are all of class ``cls`` (known without an instance)."""
    return HF_CONV1D if HF_CONV1D.matches_type(cls) else None


def _enabled(config: ModuleKMeansPalettizerConfig | None) -> bool:
    return config is not None and bool(config.op_state_spec or config.module_state_spec)


def module_state_config(
    config: ModuleKMeansPalettizerConfig | None,
    kind: LinearLike,
    weights: tuple[str, ...],
    where: str,
) -> ModuleKMeansPalettizerConfig | None:
    """``config`` (as written for a Linear) with its weight spec moved to ``module_state_spec``
    for ``weights`` of a ``kind`` module. Returned unchanged when it palettizes nothing or already
    names those weights (idempotent).

    Raises:
        PalettizeConfigError: the spec holds something ``kind`` cannot take.
    """
    if not _enabled(config) or not weights:
        return config
    if any(w in (config.module_state_spec or {}) for w in weights):
        return config
    spec = (config.op_state_spec or {}).get("weight")
    if spec is None:
        return config
    problem = kind.unsupported(spec)
    if problem is not None:
        raise PalettizeConfigError(
            f"overrides.{kind.alias}",
            f"{problem} is not supported on {kind.description} ({where}); give "
            f"overrides.{kind.alias} (or the modules entry that selects it) a spec without it, "
            "or null to leave them dense")
    stored = kind.stored_spec(spec)
    return config.model_copy(deep=True, update={
        "op_state_spec": {},
        "module_state_spec": dict.fromkeys(weights, stored),
    })


def _resolved_configs(config: KMeansPalettizerConfig, model: nn.Module
                      ) -> dict[str, tuple[str, ModuleKMeansPalettizerConfig]]:
    """``{module name: (level name, config)}`` as coreai-opt resolves them (name > type > global,
    parents' configs inherited), from its public ``build_module_config_dict``."""
    resolved: dict[str, tuple[str, ModuleKMeansPalettizerConfig]] = {}
    for level, table in config.build_module_config_dict(model).items():
        for name, module_config in table.items():
            resolved.setdefault(name, (getattr(level, "name", str(level)), module_config))
    return resolved


def _inherited(cls: type, own_types: dict[str, Any]) -> Any:
    """The type config of ``cls``'s nearest base class that has one (``_MISSING`` if none)."""
    for base in cls.__mro__[1:]:
        if base in (nn.Module, object):
            break
        if _fqn(base) in own_types:
            return own_types[_fqn(base)]
    return _MISSING


_MISSING = object()


def extend_for_model(config: KMeansPalettizerConfig, model: nn.Module) -> KMeansPalettizerConfig:
    """``config`` with every module class of ``model`` given its type's spec.

    A class without its own type config gets its nearest base class's (subclasses of
    ``nn.Linear`` or a convolution follow its override). A linear-like kind (``LINEAR_LIKE``)
    takes its own type config, else the ``Linear`` one, else the global config; kinds with
    ``state_spec`` get it translated to ``module_state_spec`` (a disabled one stays disabled),
    and their modules whose config comes from a ``modules`` name pattern (theirs or a parent's)
    get an exact-name entry with that config translated. Returns ``config`` itself when nothing
    changes, else a copy.

    Raises:
        PalettizeConfigError: a spec that a linear-like kind cannot take.
    """
    original = config
    config = config.model_copy(deep=True)
    resolved = _resolved_configs(config, model)
    own_types = dict(config.module_type_configs)
    linear = own_types.get(LINEAR_FQN, config.global_config)
    found = list(linear_like_modules(model))
    kinds = {_fqn(type(module)): (kind, name, module) for name, module, kind in reversed(found)}
    changed = False
    for cls in {type(m) for m in model.modules()}:
        key = _fqn(cls)
        if key in kinds:
            kind, name, module = kinds[key]
            source = own_types.get(key, linear)
            if kind.state_spec:
                source = module_state_config(source, kind, kind.weight_names(module), name)
            elif key in own_types or not own_types:
                continue  # its own override, or nothing to inherit: coreai-opt resolves it
        elif key in own_types or (source := _inherited(cls, own_types)) is _MISSING:
            continue
        config.set_module_type(key, source)
        changed = True
    for name, module, kind in found:
        if not kind.state_spec:
            continue
        level, module_config = resolved.get(name, ("GLOBAL", None))
        if level == "GLOBAL" or module_config is own_types.get(_fqn(type(module))):
            continue  # the type config set above applies
        translated = module_state_config(module_config, kind, kind.weight_names(module), name)
        if translated is not module_config:
            config.set_module_name(re.escape(name), translated)
            changed = True
    return config if changed else original
