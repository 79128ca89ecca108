"""What coreai-opt's tracing forward saw and resolved: the first torch function consuming each weight,
the ops it palettizes, the module configs, storage sizes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch.nn as nn
from coreai_opt.palettization import KMeansPalettizer
from torch.overrides import TorchFunctionMode

from .tensors import PalettizedTensor

__all__ = [
    "function_name", "palettizable_ops", "record_first_consumers", "resolved_module_configs",
    "storage_bits",
]


_METADATA_READS = frozenset({
    "dim", "ndimension", "size", "numel", "nelement", "stride", "element_size", "data_ptr",
    "get_device", "is_floating_point", "is_complex", "is_contiguous", "storage_offset",
})
"""Tensor methods that read metadata only: not a "consumer" of a weight (nor are properties
such as ``.shape``/``.dtype``/``.device``, whose ``__get__`` also reaches torch function modes)."""


def function_name(func: Any) -> str | None:
    """``torch.addmm``, ``torch.nn.functional.linear``, ``torch.Tensor.transpose``; None for a
    property read or a metadata method (they do not consume the values)."""
    from torch.overrides import resolve_name

    name = resolve_name(func) or getattr(func, "__qualname__", None) or repr(func)
    if name.endswith(".__get__") or name.rsplit(".", 1)[-1] in _METADATA_READS:
        return None
    return name


class _FirstConsumers(TorchFunctionMode):
    """Records, while ``active``, the first torch function each watched parameter is passed to
    (positionally, by keyword or inside a list/tuple argument)."""

    def __init__(self, watched: set[int]) -> None:
        super().__init__()
        self.watched = watched
        self.first: dict[int, str] = {}
        self.active = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            for value in (*args, *kwargs.values()):
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    key = id(item)
                    if key in self.watched and key not in self.first:
                        name = function_name(func)
                        if name is not None:
                            self.first[key] = name
        return func(*args, **kwargs)


@contextlib.contextmanager
def record_first_consumers(model: nn.Module) -> Iterator[dict[str, str]]:
    """Around ``insert_parametrizations``: ``{parameter name: first torch function that consumed
    it}`` during coreai-opt's own tracing forward (no extra forward), filled when the block
    exits; a tied parameter under each of its names. A parameter the forward never used is
    absent.

    The recording ``TorchFunctionMode`` is entered before coreai-opt pushes its own, so it sits
    outside it and sees each call as coreai-opt passes it on; it records only while the root
    module's forward runs (not coreai-opt's registration work after it).
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    mode = _FirstConsumers(set(names))

    def start(*_: Any) -> None:
        mode.active = True

    def stop(*_: Any) -> None:
        mode.active = False

    hooks = [model.register_forward_pre_hook(start, prepend=True),
             model.register_forward_hook(stop, always_call=True)]
    found: dict[str, str] = {}
    try:
        with mode:
            yield found
    finally:
        for hook in hooks:
            hook.remove()
        for key, func in mode.first.items():
            found.update(dict.fromkeys(names[key], func))


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
