"""Helpers of the Hugging Face adapter (``hf.py``): KV-cache switches, the parallel setup read
from ``TrainingArguments`` and accelerate, the ``CallbackHandler`` that logs the callback's
metrics, tied-key declarations."""

from __future__ import annotations

import contextlib
import gc
import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch.nn as nn
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import CallbackHandler

from ..core._inputs import CallSpec
from ..core._modelcopy import model_device, tracing_forward

__all__ = ["declare_tied", "disable_kv_cache", "handler_of", "kv_cache_disabled", "parallelism",
           "runs"]

log = logging.getLogger(__name__)


def _configs(model: nn.Module) -> Iterator[Any]:
    seen: set[int] = set()
    for module in model.modules():
        for config in (getattr(module, "config", None), getattr(module, "generation_config", None)):
            if config is not None and id(config) not in seen:
                seen.add(id(config))
                yield config


def disable_kv_cache(model: nn.Module) -> None:
    """Turn ``use_cache`` off on every config of ``model`` (sub-models keep their own copies) and
    on its generation config: torch.export cannot trace the cache objects transformers returns."""
    for config in _configs(model):
        if getattr(config, "use_cache", None):
            config.use_cache = False


@contextlib.contextmanager
def kv_cache_disabled(model: nn.Module) -> Iterator[None]:
    """``disable_kv_cache`` for the duration of a block (the plugin's tracing forwards of the
    trained model); the configs are restored afterwards."""
    changed = [c for c in _configs(model) if getattr(c, "use_cache", None)]
    for config in changed:
        config.use_cache = False
    try:
        yield
    finally:
        for config in changed:
            config.use_cache = True


def parallelism(args: TrainingArguments, model: nn.Module | None) -> tuple[str, str, bool | None]:
    """``(kind, name, find_unused_parameters)`` of the setup, from ``args`` and accelerate."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState() if AcceleratorState._shared_state else None
    plugin = getattr(state, "fsdp_plugin", None)
    if args.fsdp or plugin is not None:
        config = args.fsdp_config if isinstance(args.fsdp_config, dict) else {}
        version = getattr(plugin, "fsdp_version", None) or config.get("version", 2)
        if int(version) == 2:  # accelerate's fully_shard path (transformers' default)
            return "model_parallel", "accelerate FSDP2 (fsdp_config version 2)", None
        return "fsdp", "FSDP (fsdp_config version 1)", None
    if args.deepspeed or getattr(state, "deepspeed_plugin", None) is not None:
        return "deepspeed", "DeepSpeed", None
    if args.world_size <= 1:
        return "single", "a single process", None
    find_unused = args.ddp_find_unused_parameters
    if find_unused is None and (getattr(model, "is_activation_checkpointing", False)
                                or getattr(args, "activation_checkpointing", False)):
        find_unused = False  # what Trainer picks in that case
    return "ddp", "DDP", find_unused


def handler_of(callback: TrainerCallback) -> CallbackHandler | None:
    """The ``CallbackHandler`` whose ``callbacks`` list holds ``callback``: no callback event
    receives it, and its list is the one object that refers to the callback for the Trainer."""
    for holder in gc.get_referrers(callback):
        if not isinstance(holder, list) or not any(c is callback for c in holder):
            continue
        for owner in gc.get_referrers(holder):
            if isinstance(owner, dict):  # an instance __dict__: one more hop to its object
                owners = [o for o in gc.get_referrers(owner)
                          if isinstance(o, CallbackHandler) and vars(o) is owner]
            else:
                owners = [owner]
            for found in owners:
                if isinstance(found, CallbackHandler) and found.callbacks is holder:
                    return found
    return None


def runs(model: nn.Module, spec: CallSpec) -> bool:
    """Whether ``model`` runs on ``spec`` (eval, no grad, RNG untouched, no KV cache)."""
    try:
        with tracing_forward(model), kv_cache_disabled(model):
            spec.to(model_device(model)).call(model)
    except Exception as e:  # a probe: the caller tries the next candidate
        log.debug("palettize: %s does not run on %s (%s)", type(model).__name__,
                  spec.describe(), e)
        return False
    return True


def declare_tied(model: nn.Module, tied: Mapping[str, str]) -> None:
    """save_pretrained refuses shared tensors it was not told about: declare the tied
    parametrization keys so it stores them once (the engine restores them on load). The keys are
    regexes (``re.search``, transformers 5's ``_tied_weights_keys`` format): one covers every
    tensor under the alias, those of the training strategies (trainable LUTs) included."""
    keys = dict(model._tied_weights_keys or {})
    keys.update({re.escape(alias) + ".+": source for alias, source in tied.items()})
    model._tied_weights_keys = keys
