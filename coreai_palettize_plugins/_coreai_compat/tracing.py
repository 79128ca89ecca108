"""What coreai-opt's tracing forward saw and resolved: the first torch function consuming each weight,
the ops it palettizes, the module configs, storage sizes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from coreai_opt.palettization import KMeansPalettizer

from .tensors import PalettizedTensor
from .uses import WeightUse, WeightUses, op_name

__all__ = [
    "consumer_op", "function_name", "palettizable_ops", "record_first_consumers",
    "resolved_module_configs", "storage_bits", "watch_weight_uses",
]


def function_name(func: Any) -> str | None:
    """``torch.addmm``, ``torch.nn.functional.linear``, ``torch.Tensor.transpose``,
    ``torch.Tensor.T`` (a view property); None for another property read or a metadata method
    (they do not consume the values)."""
    return op_name(func)


@contextlib.contextmanager
def watch_weight_uses(model: nn.Module) -> Iterator[dict[str, WeightUse]]:
    """Around a forward of ``model`` (coreai-opt's tracing forward): ``{parameter name: its
    first use}`` (``uses.WeightUse``: the op, followed through views), filled when the block
    exits; a tied parameter under each of its names. A parameter the forward never used is
    absent.

    The ``TorchFunctionMode`` is entered before coreai-opt pushes its own, so it sits outside
    it and sees each call as coreai-opt passes it on; it records only while the root module's
    forward runs (not coreai-opt's registration work after it).
    """
    names: dict[int, list[str]] = {}
    params: list[torch.Tensor] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in names:
            params.append(param)
        names.setdefault(id(param), []).append(name)
    mode = WeightUses(params)

    def start(*_: Any) -> None:
        mode.active = True

    def stop(*_: Any) -> None:
        mode.active = False

    hooks = [model.register_forward_pre_hook(start, prepend=True),
             model.register_forward_hook(stop, always_call=True)]
    found: dict[str, WeightUse] = {}
    try:
        with mode:
            yield found
    finally:
        for hook in hooks:
            hook.remove()
        for key, use in mode.first.items():
            found.update(dict.fromkeys(names[key], use))
        mode.views.clear()


@contextlib.contextmanager
def record_first_consumers(model: nn.Module) -> Iterator[dict[str, str]]:
    """Around ``insert_parametrizations``: ``{parameter name: the first op that consumed it}``
    during coreai-opt's own tracing forward, as ``WeightUse.describe`` writes it (a view such as
    ``.T`` is followed to the op that consumes it: ``torch.Tensor.matmul (after
    torch.Tensor.T)``). A parameter the forward never used is absent."""
    found: dict[str, str] = {}
    with watch_weight_uses(model) as uses:
        yield found
    found.update({name: use.describe() for name, use in uses.items()})


def consumer_op(consumer: str) -> str:
    """The op of a ``record_first_consumers`` value (without the views before it)."""
    return consumer.split(" (after ", 1)[0]


def palettizable_ops() -> frozenset[str]:
    """Names (as ``function_name`` gives them) of the torch functions coreai-opt's k-means
    palettizer processes with an ``op_state_spec`` (F.linear, convs, MHA forward in 0.4)."""
    from coreai_opt.palettization.kmeans.supported_ops_registry import (
        _KMeansPalettizerSupportedOpsRegistry,
    )

    ops = _KMeansPalettizerSupportedOpsRegistry.get_supported_ops()
    return frozenset(n for n in map(function_name, ops) if n is not None)


def resolved_module_configs(palettizer: KMeansPalettizer) -> dict[str, tuple[str, Any]]:
    """``{module name: (level, config)}`` as coreai-opt resolved them for the prepared model:
    level ``"name"``, ``"type"`` or ``"global"`` (the config's ``set_module_name``,
    ``set_module_type`` or ``global_config``), config a ``ModuleKMeansPalettizerConfig`` (a
    ``None`` entry is stored as one whose specs are all None) or None."""
    from coreai_opt._utils.config_utils import ConfigLevel

    levels = {ConfigLevel.MODULE_NAME: "name", ConfigLevel.MODULE_TYPE: "type",
              ConfigLevel.GLOBAL: "global"}
    resolved: dict[str, tuple[str, Any]] = {}
    for level in ConfigLevel.priority_order():
        for name, config in palettizer._module_config_dict.get(level, {}).items():
            resolved.setdefault(name, (levels[level], config))
    return resolved


def storage_bits(tensor: PalettizedTensor) -> int:
    """coreai-opt's storage cost of one palettized weight, in bits (what
    ``coreai_opt.inspection.bits_per_weight`` sums): n-bit indices, the LUTs at their dtype
    (or ``lut_qspec`` width plus one scale/zero-point per LUT), per-channel scales."""
    from coreai_opt.inspection._bpw_utils import tensor_storage_bits

    return int(tensor_storage_bits(tensor.original, tensor.fake))


_LINEAR_LIKE_MODULES = (nn.Linear, nn.modules.conv._ConvNd)
"""Modules whose ``weight`` is palettized wherever it is used (subclasses included)."""


def _any_use_palettized(module: nn.Module) -> bool:
    """A Linear or convolution (subclasses included), or a linear-like kind coreai-opt's op
    tracing is not told about (HF ``Conv1D``; ``linear_like.LINEAR_LIKE``)."""
    from ..core.linear_like import LINEAR_LIKE

    return isinstance(module, _LINEAR_LIKE_MODULES) or any(
        not kind.state_spec and kind.matches(module) for kind in LINEAR_LIKE)


def _equivalent_op(use: WeightUse | None, ndim: int) -> tuple[Any, bool] | None:
    """``(the op coreai-opt palettizes this layout for, flip the group axis)`` for a weight of
    ``ndim`` axes used as ``use`` says: a matrix whose output channels are axis 0 is
    ``F.linear``'s (axis 1: ``F.linear`` with the groups on axis 1); a convolution kernel's
    output channels on axis 0 (1) are ``conv<N>d``'s (``conv_transpose<N>d``'s)."""
    import torch.nn.functional as F

    if use is None or use.output_axis is None or use.stacked:
        return None
    if ndim == 2:
        return F.linear, use.output_axis == 1
    if 3 <= ndim <= 5 and use.output_axis in (0, 1):
        n = ndim - 2
        name = f"conv{n}d" if use.output_axis == 0 else f"conv_transpose{n}d"
        return getattr(F, name), False
    return None


def _state_constructor(palettizer: KMeansPalettizer, module_name: str, module: nn.Module,
                       attr: str, op: Any) -> Any:
    """The fake-palettize constructor coreai-opt resolves for ``attr`` of ``module`` had ``op``
    consumed it (module_state_spec, then the op-type config, then op_state_spec), or None."""
    from coreai_opt._utils.config_utils import get_last_matching_spec
    from coreai_opt._utils.torch_utils import NamedModule

    components = palettizer._handler.module_components_dict.get(NamedModule(module_name, module))
    if components is None:
        return None
    constructor, found = get_last_matching_spec([attr], components.module_state_components or {})
    if found:
        return constructor
    op_type = palettizer.get_op_type_resolver()(op)
    op_components = (components.op_type_components or {}).get(op_type)
    states = op_components.op_state_components if op_components is not None else components.weight
    constructor, _ = get_last_matching_spec([attr], states or {})
    return constructor


def palettize_every_use(palettizer: KMeansPalettizer, model: nn.Module,
                        uses: dict[str, WeightUse]) -> list[str]:
    """After coreai-opt inserted its structure: palettize the weight of every Linear or
    convolution module (subclasses included) that its tracing forward used through an op it
    does not intercept (``x @ w.T``, ``matmul``, ``bmm``, ``einsum``, a squeeze before a conv,
    a use from a parent module's forward), with the spec coreai-opt resolves for that module, as
    if ``F.linear`` / ``conv<N>d`` had consumed it. Tied weights are left to coreai-opt.
    Returns the names of the weights it palettized."""
    import torch.nn.utils.parametrize as P

    count: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        count[id(param)] = count.get(id(param), 0) + 1
    added = []
    for module_name, module in list(model.named_modules()):
        if not _any_use_palettized(module) or P.is_parametrized(module, "weight"):
            continue
        weight = module._parameters.get("weight")
        name = f"{module_name}.weight" if module_name else "weight"
        if weight is None or count.get(id(weight), 0) != 1 or not weight.is_floating_point():
            continue
        equivalent = _equivalent_op(uses.get(name), weight.dim())
        if equivalent is None:
            continue
        op, flip = equivalent
        constructor = _state_constructor(palettizer, module_name, module, "weight", op)
        if constructor is None:
            continue
        fake = constructor(op_to_optimize=op)
        granularity = fake.granularity
        if flip and getattr(granularity, "axis", None) is not None:
            fake.granularity = granularity.model_copy(update={"axis": 1 - granularity.axis})
        P.register_parametrization(module, "weight", fake, unsafe=True)
        fake.tensor_fqn = name
        added.append(name)
    return added


@contextlib.contextmanager
def every_use_palettized(palettizer: KMeansPalettizer, model: nn.Module) -> Iterator[None]:
    """Around coreai-opt's structure-inserting forward (``handler.prepare``): then
    ``palettize_every_use`` with the uses that forward made."""
    with watch_weight_uses(model) as uses:
        yield
    palettize_every_use(palettizer, model, uses)
