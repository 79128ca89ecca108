"""How the plugin calls the user's model: one ``CallSpec`` for every forward it runs.

    spec = call_spec_from_batch(model, batch)      # any forward signature, one sample
    spec.call(model)                                # model(*spec.args, **spec.kwargs)
    with keyword_call(model, spec) as inputs:       # coreai-opt's prepare: model(*inputs) only
        palettizer.prepare(inputs)

- ``CallSpec(args, kwargs)``: the positional and keyword inputs of one forward. Tensors (also
  inside tuples, lists and dicts) are the traced inputs; top-level keyword values without a
  tensor (``use_cache=False``) are constants bound at every call, never traced inputs.
- ``call_spec_from_batch`` (``_batches.py``): a real batch mapped onto
  ``inspect.signature(model.forward)``: dict batches become a keyword call with the parameters the
  batch provides (labels dropped, ``decoder_input_ids`` derived from ``labels`` with the model's
  own shift, ``use_cache=False``); tuple/list batches fill the required positional parameters
  (``(x, y)`` -> ``forward(x)``, ``(inputs, target)`` -> ``forward(inputs, target)``).
- ``keyword_call``: coreai-opt's ``prepare`` calls ``model(*example_inputs)``. A temporary root
  forward pre-hook turns that positional call into the spec's real call, so module names (and
  ``modules=`` regexes, state-dict keys) stay those of the user's model.
- ``constants_bound``: ``torch.export`` takes the traced inputs; constants are bound the same way.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ._utils import one_line

__all__ = ["CallSpec", "ExampleInputsError", "as_call_spec", "constants_bound", "keyword_call"]

FIX = ("pass example_inputs= (a tensor, a tuple of positional inputs or a mapping of keyword "
       "inputs); Lightning: or LightningModule.example_input_array or example_inputs_fn=; "
       "Hugging Face: or example_inputs_fn=")
"""What a user can do when the plugin cannot call the model (adapters pass their own)."""

_LABEL_EXTRA = frozenset({"start_positions", "end_positions", "return_loss"})


class ExampleInputsError(TypeError):
    """The plugin cannot build (or run) a forward of the model from the given inputs/batch."""


def is_label_key(key: str) -> bool:
    """A training target, not a model input (Hugging Face's ``find_labels`` rule)."""
    return "label" in key or key in _LABEL_EXTRA


# --------------------------------------------------------------------------------------------
# Nested values: tensors inside tuples, lists and mappings
# --------------------------------------------------------------------------------------------


def _leaves(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    else:
        yield path, value


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, Mapping):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for _, leaf in _leaves(value))


def _one_sample(value: Any) -> Any:
    return _map_tensors(value, lambda t: t[:1] if t.dim() > 0 else t)


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shape(v) for v in value) + ")"
    return repr(value)


# --------------------------------------------------------------------------------------------
# CallSpec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CallSpec:
    """The inputs of one forward: ``model(*args, **kwargs)``.

    Indexing, ``len`` and iteration see the traced tensors (``inputs``) in call order, so
    ``spec[0]`` is the first tensor input whether it is passed by position or by keyword;
    ``spec["name"]`` is a keyword value.
    """

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    # ---------------------------------------------------------------- views

    def tensor_items(self) -> list[tuple[tuple, torch.Tensor]]:
        """``(path, tensor)`` per traced tensor; a path starts with 0 (positional, then the
        index) or 1 (keyword, then the name), then the keys of nested containers."""
        return [(p, v) for p, v in _leaves((self.args, self.kwargs)) if isinstance(v, torch.Tensor)]

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        """The traced tensors, positional first, then keywords, in order."""
        return tuple(v for _, v in self.tensor_items())

    @property
    def traced_kwargs(self) -> dict[str, Any]:
        """The keyword inputs that hold tensors (what ``torch.export`` traces)."""
        return {k: v for k, v in self.kwargs.items() if _has_tensor(v)}

    @property
    def constants(self) -> dict[str, Any]:
        """Keyword values without a tensor (``use_cache=False``): bound, never traced."""
        return {k: v for k, v in self.kwargs.items() if not _has_tensor(v)}

    def __len__(self) -> int:
        return len(self.inputs)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.inputs)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return self.kwargs[key]
        return self.inputs[key]

    def __repr__(self) -> str:
        return f"CallSpec({self.describe()})"

    def describe(self) -> str:
        """``args=((1, 8) float32), kwargs={input_ids: (1, 12) int64, use_cache: False}``."""
        parts = []
        if self.args:
            parts.append(f"args={_shape(self.args)}")
        if self.kwargs:
            parts.append(f"kwargs={_shape(self.kwargs)}")
        return ", ".join(parts) or "no inputs"

    # ---------------------------------------------------------------- transforms

    def map_tensors(self, fn: Callable[[torch.Tensor], Any]) -> CallSpec:
        return CallSpec(_map_tensors(self.args, fn), _map_tensors(self.kwargs, fn))

    def to(self, device: torch.device | str) -> CallSpec:
        return self.map_tensors(lambda t: t.to(device))

    def detached_cpu(self) -> CallSpec:
        """A copy that holds no graph, device memory or view of a batch."""
        return self.map_tensors(lambda t: t.detach().cpu().clone())

    def with_inputs(self, values: tuple[Any, ...]) -> CallSpec:
        """This spec with its traced tensors replaced by ``values`` (in ``inputs`` order)."""
        it = iter(values)
        return self.map_tensors(lambda _: next(it))

    def bound_to(self, model: nn.Module) -> CallSpec:
        """Normalised for ``model.forward``: positional values from the first one that holds no
        tensor (a ``None`` gap such as ``(input_ids, None, decoder_input_ids)``) become keywords,
        and ``None`` keywords that only restate the default are dropped: ``torch.export`` would
        keep a dead placeholder for them that coreai-torch cannot resolve."""
        params = _parameters(model)
        if params is None:
            return self
        args, kwargs = list(self.args), dict(self.kwargs)
        positional = [p for p in params.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        gap = next((i for i, a in enumerate(args) if not _has_tensor(a)), None)
        if gap is not None and len(args) <= len(positional):
            tail = positional[gap:len(args)]
            if all(p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in kwargs for p in tail):
                kwargs = {**{p.name: a for p, a in zip(tail, args[gap:])}, **kwargs}
                args = args[:gap]
        kwargs = {k: v for k, v in kwargs.items()
                  if not (v is None and (k not in params or params[k].default is None))}
        return CallSpec(tuple(args), kwargs)

    # ---------------------------------------------------------------- calling

    def call(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)

    def input_names(self, model: nn.Module | None = None) -> list[str]:
        """A name per traced tensor (the forward's parameter names, keyword names; nested
        values add their keys), unique, for the converter's ``input_names``."""
        params = _parameters(model) if model is not None else None
        positional = [] if params is None else [
            p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        var_positional = None if params is None else next(
            (p.name for p in params.values() if p.kind is p.VAR_POSITIONAL), None)
        names: list[str] = []
        for path, _ in self.tensor_items():
            where, key, *rest = path
            if where == 0:  # positional
                if key < len(positional):
                    head = positional[key].name
                elif var_positional is not None:
                    head = f"{var_positional}_{key - len(positional)}"
                else:
                    head = f"input_{key}"
            else:
                head = str(key)
            name = re.sub(r"\W", "_", "_".join([head, *map(str, rest)]))
            while name in names:
                name += "_"
            names.append(name)
        return names

    # ---------------------------------------------------------------- storage

    def to_storage(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``({key: tensor}, layout)``: tensors for a safetensors file and a JSON-able layout
        that references them by key (constants stored as JSON values; keywords and mapping
        entries as ``[name, value]`` pairs, in call order)."""
        tensors: dict[str, torch.Tensor] = {}

        def encode(value: Any, key: str) -> Any:
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous().clone()
                return {"tensor": key}
            if isinstance(value, (tuple, list)):
                kind = "tuple" if isinstance(value, tuple) else "list"
                return {kind: [encode(v, f"{key}.{i}") for i, v in enumerate(value)]}
            if isinstance(value, Mapping):  # pairs: the manifest's JSON sorts object keys
                return {"dict": [[str(k), encode(v, f"{key}.{k}")] for k, v in value.items()]}
            if value is None or isinstance(value, (bool, int, float, str)):
                return value
            raise TypeError(f"example input {key} ({type(value).__name__}) cannot be stored: "
                            "only tensors, numbers, strings, None and containers of them")

        layout = {"args": [encode(v, f"args.{i}") for i, v in enumerate(self.args)],
                  "kwargs": [[k, encode(v, f"kwargs.{k}")] for k, v in self.kwargs.items()]}
        return tensors, layout

    @classmethod
    def from_storage(cls, layout: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
                     ) -> CallSpec:
        def decode(value: Any) -> Any:
            if isinstance(value, dict):
                if "tensor" in value:
                    return tensors[value["tensor"]]
                if "tuple" in value:
                    return tuple(decode(v) for v in value["tuple"])
                if "list" in value:
                    return [decode(v) for v in value["list"]]
                return {k: decode(v) for k, v in pairs(value["dict"])}
            return value

        def pairs(items: Any) -> list:
            return list(items.items()) if isinstance(items, Mapping) else items

        return cls(tuple(decode(v) for v in layout.get("args", [])),
                   {k: decode(v) for k, v in pairs(layout.get("kwargs", []))})


def as_call_spec(value: Any, model: nn.Module | None = None) -> CallSpec:
    """Example inputs as a ``CallSpec``: a tensor or a tuple/list (positional), a mapping
    (keywords) or a ``CallSpec``; normalised for ``model`` when given (``bound_to``)."""
    if isinstance(value, CallSpec):
        spec = value
    elif isinstance(value, torch.Tensor):
        spec = CallSpec((value,))
    elif isinstance(value, (list, tuple)):
        spec = CallSpec(tuple(value))
    elif isinstance(value, Mapping):
        spec = CallSpec((), {str(k): v for k, v in value.items()})
    else:
        raise TypeError("example inputs must be a tensor, a tuple (positional inputs), a mapping "
                        f"(keyword inputs) or a CallSpec, got {type(value).__name__}")
    return spec.bound_to(model) if model is not None else spec


# --------------------------------------------------------------------------------------------
# From a batch
# --------------------------------------------------------------------------------------------


def _parameters(model: nn.Module) -> Mapping[str, inspect.Parameter] | None:
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return None


def _signature_text(model: nn.Module) -> str:
    """``Net.forward(x, lengths, *, scale=None)`` (annotations left out)."""
    params = _parameters(model)
    if params is None:
        return f"{type(model).__name__}.forward"
    plain = inspect.Signature([p.replace(annotation=p.empty) for p in params.values()])
    return f"{type(model).__name__}.forward{plain}"


# --------------------------------------------------------------------------------------------
# Calling the model through positional-only APIs
# --------------------------------------------------------------------------------------------


def forward_failed(model: nn.Module, spec: CallSpec, error: BaseException,
                   fix: str = FIX) -> ExampleInputsError:
    return ExampleInputsError(
        f"{_signature_text(model)} failed on the example inputs ({spec.describe()}): "
        f"{one_line(error)}; {fix}")


@contextlib.contextmanager
def keyword_call(model: nn.Module, spec: CallSpec) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield ``spec.inputs``; while active, ``model(*inputs)`` (all coreai-opt's ``prepare``
    can do) runs ``model(*spec.args, **spec.kwargs)`` with those tensors substituted.

    A temporary root forward pre-hook does it (prepended, so it runs before coreai-opt's own
    hooks): module names and state-dict keys stay the model's. A forward that fails raises
    ``ExampleInputsError`` naming the forward, the inputs and the fix.
    """
    state = {"entered": False, "returned": False}
    count = len(spec.inputs)

    def rewrite(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state["entered"] = True
        if kwargs or len(args) != count:
            return None  # not the positional call this context prepared
        call = spec.with_inputs(args)
        return call.args, dict(call.kwargs)

    def returned(module: nn.Module, args: tuple, output: Any) -> None:
        state["returned"] = True

    handles = [model.register_forward_pre_hook(rewrite, with_kwargs=True, prepend=True),
               model.register_forward_hook(returned)]
    try:
        yield spec.inputs
    except Exception as e:
        if state["entered"] and not state["returned"]:
            raise forward_failed(model, spec, e) from e
        raise
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def constants_bound(model: nn.Module, spec: CallSpec) -> Iterator[None]:
    """While active, every call of ``model`` also gets ``spec.constants`` as keywords (for
    ``torch.export``, which would turn them into placeholders coreai-torch cannot resolve)."""
    constants = spec.constants
    if not constants:
        yield
        return

    def bind(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, **constants}

    handle = model.register_forward_pre_hook(bind, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()
