"""Copies of a model and the forward passes used to trace and compare them.

- ``meta_skeleton`` / ``materialize``: a zero-memory copy of a model's architecture taken before
  prepare, turned back into a usable (zero-weight) instance for export.
- ``tracing_forward``: the context every non-training forward of the plugin runs in (eval mode,
  no grad, the caller's RNG streams untouched).
- ``model_outputs`` / ``max_abs_diff``: compare two models on the same inputs.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from ._inputs import as_call_spec

__all__ = ["copy_for_export", "materialize", "max_abs_diff", "meta_skeleton", "model_outputs",
           "tensor_leaves", "tracing_forward"]


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and persistent buffers live on the meta device.

    Costs no memory; non-persistent buffers (rotary tables, masks) are copied for real because
    no state dict restores them. ``materialize`` turns it into a usable model.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                           requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                memo.setdefault(id(b), torch.empty_like(b, device="meta"))
    return copy.deepcopy(model, memo)


def copy_for_export(model: nn.Module) -> nn.Module:
    """``meta_skeleton`` with an error that names the fix when the model cannot be deep-copied."""
    try:
        return meta_skeleton(model)
    except Exception as e:
        raise RuntimeError(
            f"cannot copy {type(model).__name__} for the end-of-training export "
            f"({type(e).__name__}: {e}); pass model_factory= (a callable returning a new "
            "instance of the model)") from e


def materialize(skeleton: nn.Module) -> nn.Module:
    """A new model from a ``meta_skeleton``: meta tensors become zeros on the CPU (ties kept)."""
    model = copy.deepcopy(skeleton)
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in made:
                    data = torch.zeros(t.shape, dtype=t.dtype)
                    made[id(t)] = (nn.Parameter(data, requires_grad=t.requires_grad)
                                   if isinstance(t, nn.Parameter) else data)
                store[name] = made[id(t)]
    return model


@contextlib.contextmanager
def tracing_forward(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for a forward that is not training; the caller's RNG untouched."""
    was_training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def model_outputs(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    """Every tensor the model returns for ``example_inputs`` (a ``CallSpec``, a tensor, a tuple
    of positional inputs or a mapping of keyword inputs; eval, no grad), on the CPU."""
    spec = as_call_spec(example_inputs).to(model_device(model))
    with tracing_forward(model):
        out = spec.call(model)
    return [t.detach().float().cpu() for t in tensor_leaves(out)]


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """The tensors of a nested output (tensors, mappings, lists, tuples), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensor_leaves(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensor_leaves(v)]
    return []


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute difference between two output lists (inf if their shapes differ)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max((float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
