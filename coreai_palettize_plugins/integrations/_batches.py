"""From a real batch to the call one sample of it makes: ``call_spec_from_batch`` maps dict, tuple
and list batches onto ``inspect.signature(model.forward)`` (labels dropped, ``decoder_input_ids``
derived from ``labels`` with the model's own shift, ``use_cache=False`` where forward takes it).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ..core._inputs import (
    FIX,
    CallSpec,
    ExampleInputsError,
    _one_sample,
    _parameters,
    _shape,
    _signature_text,
    is_label_key,
)
from ..core._utils import one_line

__all__ = ["call_spec_from_batch", "decoder_inputs_from_labels"]


def _as_tensor(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    if type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        return torch.as_tensor(value)
    return None


def call_spec_from_batch(model: nn.Module, batch: Any, *, fix: str = FIX) -> CallSpec:
    """The call of ``model.forward`` one sample (``[:1]``) of ``batch`` makes.

    - dict batches -> keywords: the forward's parameters the batch provides (labels dropped;
      every non-label tensor if the forward only takes ``**kwargs``; the whole mapping as the
      one argument of ``forward(batch)``); ``decoder_input_ids`` derived from ``labels`` with
      the model's own shift (or its decoder start token without labels); ``use_cache=False``
      where the forward takes it;
    - tuple/list batches -> the required positional parameters (all of the batch for
      ``*args``), a bare tensor -> the first positional parameter.

    Raises:
        ExampleInputsError: the batch cannot be mapped onto the forward's signature (the
            message names the signature and ``fix``).
    """
    params = _parameters(model)
    if isinstance(batch, CallSpec):
        return batch
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    if isinstance(batch, Mapping):
        spec = _from_mapping(model, params, batch, fix)
    elif isinstance(batch, (list, tuple)):
        spec = _from_sequence(params, batch)
    else:
        raise ExampleInputsError(f"cannot call {_signature_text(model)} with a "
                                 f"{type(batch).__name__} batch; {fix}")
    if params is not None:
        try:
            inspect.signature(model.forward).bind(*spec.args, **spec.kwargs)
        except TypeError as e:
            raise ExampleInputsError(
                f"cannot call {_signature_text(model)} with one sample of the "
                f"{type(batch).__name__} batch ({_shape(batch)}): {e}; {fix}") from None
    return spec


def _from_sequence(params: Mapping[str, inspect.Parameter] | None, batch: Any) -> CallSpec:
    if params is None:
        return CallSpec(tuple(_one_sample(x) for x in batch))
    positional = [p for p in params.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    takes_var_positional = any(p.kind is p.VAR_POSITIONAL for p in params.values())
    # *args or too short: all of it (a missing required one fails in bind); else the required
    # ones: (x, y) -> forward(x), (inputs, target) -> forward(inputs, target).
    short = takes_var_positional or len(batch) <= len(required)
    n = len(batch) if short else max(len(required), 1)
    return CallSpec(tuple(_one_sample(x) for x in list(batch)[:n]))


def _from_mapping(model: nn.Module, params: Mapping[str, inspect.Parameter] | None,
                  batch: Mapping[str, Any], fix: str) -> CallSpec:
    tensors = {str(k): t for k, v in batch.items() if (t := _as_tensor(v)) is not None}
    features = {k: _one_sample(v) for k, v in tensors.items() if not is_label_key(k)}
    if params is None:
        return CallSpec((), features)
    named = {k: v for k, v in features.items() if k in params
             and params[k].kind in (params[k].POSITIONAL_OR_KEYWORD, params[k].KEYWORD_ONLY)}
    if not named:
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        if params and all(p.kind in variadic for p in params.values()):
            return CallSpec((), features)                       # forward(**batch)
        required = [p for p in params.values() if p.default is p.empty and p.kind not in variadic]
        if len(required) == 1 and required[0].kind is not required[0].KEYWORD_ONLY:
            return CallSpec((_one_sample(dict(tensors)),))      # forward(batch)
        raise ExampleInputsError(
            f"none of the batch's keys ({', '.join(map(str, batch))}) is a parameter of "
            f"{_signature_text(model)}; {fix}")
    kwargs = dict(named)
    if ("decoder_input_ids" in params and "decoder_input_ids" not in kwargs
            and "decoder_inputs_embeds" not in kwargs):
        labels = tensors.get("labels")
        decoder = (decoder_inputs_from_labels(model, labels[:1], fix=fix) if labels is not None
                   else _decoder_start(model))
        if decoder is not None:
            kwargs["decoder_input_ids"] = decoder
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return CallSpec((), kwargs)


def decoder_inputs_from_labels(model: nn.Module, labels: torch.Tensor, *, fix: str = FIX
                               ) -> torch.Tensor:
    """``decoder_input_ids`` from ``labels`` the way the model itself derives them:
    ``prepare_decoder_input_ids_from_labels`` (what ``DataCollatorForSeq2Seq`` calls), T5's
    ``_shift_right``, or the modeling module's ``shift_tokens_right`` (Whisper) with the config's
    pad and decoder start ids."""
    labels = torch.as_tensor(labels)
    try:
        if hasattr(model, "prepare_decoder_input_ids_from_labels"):
            return model.prepare_decoder_input_ids_from_labels(labels=labels)
        if hasattr(model, "_shift_right"):
            return model._shift_right(labels)
        shift = getattr(sys.modules.get(type(model).__module__), "shift_tokens_right", None)
        config = getattr(model, "config", None)
        if shift is not None and config is not None:
            ids = (labels, config.pad_token_id, config.decoder_start_token_id)
            return shift(*ids[:len(inspect.signature(shift).parameters)])
    except Exception as e:
        raise ExampleInputsError(
            f"cannot derive decoder_input_ids from the labels for {_signature_text(model)} "
            f"({one_line(e)}); {fix}") from e
    raise ExampleInputsError(
        f"{_signature_text(model)} takes decoder_input_ids, the batch has none, and the model "
        f"has no label shift (prepare_decoder_input_ids_from_labels, _shift_right, "
        f"shift_tokens_right) to derive them from labels; {fix}")


def _decoder_start(model: nn.Module) -> torch.Tensor | None:
    """A one-token decoder input (the decoder start token) for encoder-decoders, for batches
    without labels (a tokenizer sample)."""
    config = getattr(model, "config", None)
    start = getattr(config, "decoder_start_token_id", None)
    if not getattr(config, "is_encoder_decoder", False) or start is None:
        return None
    return torch.full((1, 1), int(start), dtype=torch.long)
