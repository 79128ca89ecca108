"""Which op consumed each weight, followed through views (``.T``, ``transpose``, ``view``,
``squeeze``, indexing ...), and which axis of the stored weight that op treats as its output
channels. Pure torch: a ``TorchFunctionMode`` that watches the parameters during one forward.

A weight read as ``x @ self.weight.T``, ``torch.einsum("bi,oi->bo", x, w)``,
``torch.bmm(x, w.t().expand(...))``, ``w @ x`` or ``F.conv1d(x, w.squeeze(1).unsqueeze(1))``
is used like a Linear (or a convolution): its output channels are the axis the op keeps in its
result that no other operand shares, and the contracted axes are its inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, resolve_name

__all__ = ["WeightUse", "WeightUses", "op_name"]

Axes = tuple[int | None, ...]
"""For each axis of a view: the stored weight's axis it comes from (None: a new or broadcast
axis)."""

_METADATA = frozenset({
    "dim", "ndimension", "size", "numel", "nelement", "stride", "element_size", "data_ptr",
    "get_device", "is_floating_point", "is_complex", "is_contiguous", "storage_offset",
})
_VIEW_PROPERTIES = frozenset({"T", "mT", "H", "mH"})
_SAME_AXES = frozenset({
    "to", "float", "half", "bfloat16", "double", "type", "type_as", "contiguous", "clone",
    "detach", "requires_grad_", "cpu", "cuda", "conj", "resolve_conj", "resolve_neg",
    "_to_copy",
})
_RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
                       "view_as", "reshape_as", "ravel"})
_EXPANDS = frozenset({"expand", "expand_as", "broadcast_to"})
_SPLITS = frozenset({"chunk", "split", "tensor_split", "narrow", "split_with_sizes"})
_MATMULS = frozenset({"matmul", "__matmul__", "mm", "bmm"})
_ADD_MATMULS = frozenset({"addmm", "baddbmm", "addbmm"})
_CONVS = re.compile(r"conv(_transpose)?[123]d")


def op_name(func: Any) -> str | None:
    """``torch.Tensor.T`` (a view property), ``torch.nn.functional.linear``; None for a
    property read or a metadata method (they do not use the values)."""
    name = resolve_name(func) or getattr(func, "__qualname__", None) or repr(func)
    if name.endswith(".__get__"):
        prop = name[: -len(".__get__")]
        return prop if prop.rsplit(".", 1)[-1] in _VIEW_PROPERTIES else None
    return None if name.rsplit(".", 1)[-1] in _METADATA else name


@dataclass
class WeightUse:
    """The first use of a weight that is not a view: ``op`` (as ``op_name`` gives it), the views
    taken before it (``via``), and, when the op computes like a Linear or a convolution, the
    stored weight's ``output_axis`` and whether it is a convolution (``conv``). ``stacked``: the
    op also keeps an axis shared with another operand (a batch of matrices, e.g. experts)."""

    op: str
    via: list[str] = field(default_factory=list)
    output_axis: int | None = None
    conv: bool = False
    stacked: bool = False

    def describe(self) -> str:
        return self.op + (f" (after {', '.join(dict.fromkeys(self.via))})" if self.via else "")


class WeightUses(TorchFunctionMode):
    """While ``active``: ``first[id(param)]`` is the ``WeightUse`` of each watched parameter
    (views of it are followed; the views are kept alive until the mode is dropped)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.views: dict[int, tuple[torch.Tensor, int, Axes, list[str]]] = {
            id(p): (p, id(p), tuple(range(p.dim())), []) for p in params}
        self.first: dict[int, WeightUse] = {}
        self.active = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.active:
            try:
                self._record(func, args, kwargs, out)
            except Exception as e:  # never break the forward over bookkeeping
                self._unanalysed(func, args, kwargs, e)
        return out

    # ----------------------------------------------------------------------------- record

    def _unanalysed(self, func: Any, args: tuple, kwargs: dict, error: Exception) -> None:
        """A call the analysis failed on: its watched operands' first use, without an axis."""
        name = f"{op_name(func) or func} (not analysed: {type(error).__name__})"
        for value in (*args, *kwargs.values()):
            tracked = self._tracked(value)
            if tracked is not None and tracked[1] not in self.first:
                self.first[tracked[1]] = WeightUse(name, list(tracked[3]))

    def _tracked(self, value: Any) -> tuple[torch.Tensor, int, Axes, list[str]] | None:
        return self.views.get(id(value)) if isinstance(value, torch.Tensor) else None

    def _record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        flat = [*args, *kwargs.values()]
        flat += [x for v in list(flat) if isinstance(v, (list, tuple)) for x in v]
        hits = [(v, t) for v in flat if (t := self._tracked(v)) is not None]
        if not hits:
            return
        name = op_name(func)
        if name is None:
            return
        short = name.rsplit(".", 1)[-1]
        head = self._tracked(args[0]) if args else None
        if head is not None:
            source, root, axes, via = head
            mapped = self._view_axes(short, args, kwargs, source, axes, out)
            if mapped is not None:
                for tensor, tensor_axes in mapped:
                    if isinstance(tensor, torch.Tensor) and id(tensor) not in self.views:
                        self.views[id(tensor)] = (tensor, root, tensor_axes, [*via, name])
                return
        for value, (_, root, axes, via) in hits:
            if root not in self.first:
                self.first[root] = self._use(name, short, func, args, kwargs, value, axes, via)

    def _view_axes(self, short: str, args: tuple, kwargs: dict, source: torch.Tensor,
                   axes: Axes, out: Any) -> list[tuple[Any, Axes]] | None:
        """``[(view, its axes)]`` when ``short`` is a view-like op of ``source``, else None."""
        n = source.dim()

        def dim(i: int, default: int | None = None) -> int | None:
            value = args[i] if len(args) > i else default
            return value % n if isinstance(value, int) and n else value

        if short in _SAME_AXES:
            return [(out, axes)]
        if short in ("T", "t", "numpy_T"):
            return [(out, tuple(reversed(axes)))]
        if short in ("mT", "H", "mH") or short in ("transpose", "swapaxes", "swapdims"):
            a, b = (n - 2, n - 1) if short in ("mT", "H", "mH") else (dim(1), dim(2))
            swapped = list(axes)
            swapped[a], swapped[b] = swapped[b], swapped[a]
            return [(out, tuple(swapped))]
        if short == "permute":
            order = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            return [(out, tuple(axes[d % n] for d in order))]
        if short in _RESHAPES and isinstance(out, torch.Tensor):
            return [(out, _reshape_axes(axes, tuple(source.shape), tuple(out.shape)))]
        if short in _EXPANDS and isinstance(out, torch.Tensor):
            extra = out.dim() - n
            return [(out, tuple(None if k < extra or (source.shape[k - extra] == 1
                                                      and out.shape[k] != 1)
                                else axes[k - extra] for k in range(out.dim())))]
        if short in _SPLITS:
            return [(t, axes) for t in (out if isinstance(out, (list, tuple)) else (out,))]
        if short == "unbind":
            d = dim(1, 0)
            return [(t, axes[:d] + axes[d + 1:]) for t in out]
        if short == "__getitem__" and isinstance(out, torch.Tensor):
            return [(out, _index_axes(axes, args[1], out.dim()))]
        return None

    def _use(self, name: str, short: str, func: Any, args: tuple, kwargs: dict,
             value: torch.Tensor, axes: Axes, via: list[str]) -> WeightUse:
        use = WeightUse(name, list(via))
        roles = _roles(short, name, args, kwargs, value)
        if roles is None:
            return use
        features, batch, conv = roles
        kept = {axes[k] for k in features} - {None}
        use.stacked = bool({axes[k] for k in batch} - {None})
        if len(kept) == 1:
            use.output_axis, use.conv = kept.pop(), conv
        return use


def _roles(short: str, name: str, args: tuple, kwargs: dict, value: torch.Tensor
           ) -> tuple[list[int], list[int], bool] | None:
    """``(output-feature axes, batch axes, conv)`` of ``value`` as an operand of the op, or None
    when the op does not compute like a Linear/convolution on it."""
    d = value.dim()
    if short == "linear":
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        return ([0], [], False) if weight is value and d == 2 else None
    match = _CONVS.fullmatch(short)
    if match:
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        return ([1 if match.group(1) else 0], [], True) if weight is value else None
    if short in _MATMULS or short == "__rmatmul__" or short in _ADD_MATMULS:
        operands = list(args[1:3] if short in _ADD_MATMULS else args[:2])
        if short == "__rmatmul__":
            operands.reverse()
        if d < 2 or len(operands) != 2:
            return None
        batch = list(range(d - 2))
        if operands[1] is value:
            return [d - 1], batch, False
        if operands[0] is value:
            return [d - 2], batch, False
        return None
    if short == "einsum":
        return _einsum_roles(args, value)
    return None


def _einsum_roles(args: tuple, value: torch.Tensor) -> tuple[list[int], list[int], bool] | None:
    equation = args[0].replace(" ", "")
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) \
        else list(args[1:])
    inputs, _, output = equation.partition("->")
    terms = inputs.split(",")
    if "." in equation or len(terms) != len(operands):
        return None
    if "->" not in equation:
        letters = "".join(terms)
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    index = next((i for i, t in enumerate(operands) if t is value), None)
    if index is None or len(terms[index]) != value.dim():
        return None
    others = "".join(t for i, t in enumerate(terms) if i != index)
    mine = terms[index]
    features = [k for k, c in enumerate(mine) if c in output and c not in others]
    batch = [k for k, c in enumerate(mine) if c in output and c in others]
    return features, batch, False


def _reshape_axes(axes: Axes, before: tuple[int, ...], after: tuple[int, ...]) -> Axes:
    """The axes of a reshape of ``before`` into ``after``: dims grouped by equal products; each
    output dim of a group maps to the group's outermost non-1 input dim."""
    result: list[int | None] = [None] * len(after)
    i = j = 0
    while i < len(before) and j < len(after):
        group_in, group_out = [i], [j]
        size_in, size_out = before[i], after[j]
        i, j = i + 1, j + 1
        while size_in != size_out:
            if size_in < size_out and i < len(before):
                group_in.append(i)
                size_in *= before[i]
                i += 1
            elif size_out < size_in and j < len(after):
                group_out.append(j)
                size_out *= after[j]
                j += 1
            else:
                return tuple([None] * len(after))
        sources = [axes[k] for k in group_in if before[k] != 1]
        for k in group_out:
            if after[k] != 1 and sources:
                result[k] = sources[0]
    return tuple(result)


def _index_axes(axes: Axes, index: Any, out_dim: int) -> Axes:
    """The axes of ``view[index]`` for basic indexing (ints, slices, None, Ellipsis) and one
    1-D tensor index; None for every axis otherwise."""
    items = list(index) if isinstance(index, tuple) else [index]
    tensors = [x for x in items if isinstance(x, (torch.Tensor, list))]
    if len(tensors) > 1 or any(isinstance(x, torch.Tensor) and (x.dim() != 1 or x.dtype == torch.bool)
                               for x in tensors):
        return tuple([None] * out_dim)
    consumed = sum(1 for x in items if x is not None and x is not Ellipsis)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(axes) - consumed)
    result: list[int | None] = []
    k = 0
    for item in items:
        if item is None:
            result.append(None)
        elif isinstance(item, int):
            k += 1
        else:
            result.append(axes[k])
            k += 1
    result.extend(axes[k:])
    return tuple(result) if len(result) == out_dim else tuple([None] * out_dim)
