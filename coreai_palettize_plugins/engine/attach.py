"""The attach phase: coreai-opt's palettized structure inserted into a model, nothing clustered.

``build(model, settings, example_inputs)`` returns everything attach made (``Attached``: the
palettizer, what the tracing forward learned, the compact base, the adapters); ``validate``
is its dry run on a copy. Nothing here sees the engine: it calls these and keeps the result.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch.nn as nn
from coreai_opt.palettization import KMeansPalettizer

from .. import _coreai_compat as compat
from ..accuracy import adapters, fitting
from ..core import strategies
from ..core._inputs import CallSpec, keyword_call
from ..core._modelcopy import (
    copy_for_export,
    materialize,
    meta_skeleton,
    model_device,
    tracing_forward,
)
from ..core.checks import PalettizeConfigError
from ..core.dist_context import DistContext
from ..export.dense_reasons import check_overrides, dense_weights
from ..settings.coreai_config import to_coreai_config
from .compact import CompactBase

if TYPE_CHECKING:
    from ..settings.schema import PalettizeSettings

__all__ = ["Attached", "PalettizationWarning", "check_module_patterns", "insert",
           "nothing_palettized", "prepare_parameters", "settings_of_rank_zero", "tied_keys_hook",
           "validate", "warn_dense"]

log = logging.getLogger("coreai_palettize_plugins.engine")


class PalettizationWarning(UserWarning):
    """A layer the config asked for was left dense, or similar surprises."""


@dataclass
class Attached:
    """What attach's tracing forward learned about the model."""

    palettizer: KMeansPalettizer
    skipped: dict[str, str] = field(default_factory=dict)
    """Weights coreai-opt skipped, with its reason."""
    consumers: dict[str, str] = field(default_factory=dict)
    """First torch function that consumed each parameter in the tracing forward."""
    tied: dict[str, str] = field(default_factory=dict)
    """Tied weight prefixes: alias -> source."""
    config: Any = None
    """The coreai-opt config, extended for the model's linear-like modules."""
    skeleton: nn.Module | None = None
    """A zero-memory meta copy of the model before attach (the export rebuilds it)."""
    compact: CompactBase | None = None
    adapters: adapters.LoraAttachment | None = None

    def trace_record(self, settings: PalettizeSettings) -> dict[str, Any]:
        """What attach learned, for the dense reasons (``report.dense_weights``)."""
        return {"skipped": self.skipped, "consumers": self.consumers, "settings": settings,
                "module_configs": compat.resolved_module_configs(self.palettizer)}


def build(model: nn.Module, settings: PalettizeSettings, example_inputs: CallSpec, *,
          skeleton: bool) -> Attached:
    """The palettized structure for ``settings`` in ``model`` (in place), the strategies'
    parameters, the compact base and the LoRA adapters; with ``skeleton`` a meta copy taken
    before (for the export). Before the model is wrapped and the optimizer exists.

    Raises:
        PalettizeConfigError: a ``modules`` regex matches no module, or nothing is palettized.
    """
    check_module_patterns(settings.modules, model)
    # Extended for the model's linear-like modules (HF Conv1D, fused MoE experts): the config
    # checkpoints, the packed artifact and load_palettized carry.
    config = adapters.exclude_adapter_layers(to_coreai_config(settings, model), model)
    copy_ = copy_for_export(model) if skeleton else None
    attached = insert(model, config, example_inputs, settings.num_workers,
                      fit_layouts=settings.fit_layouts)
    # Fitted layouts (palettize.fit_layouts) as per-module-name configs: every re-prepare of
    # the config (export, load_palettized) builds them again.
    attached.config, attached.skeleton = fitting.extend_config(config, model), copy_
    tensors = compat.fake_palettized_tensors(model)
    if not tensors:
        raise nothing_palettized(model, settings.describe(), attached.skipped)
    check_overrides(model, **attached.trace_record(settings))
    prepare_parameters(tensors, settings.start_step)
    attached.compact = CompactBase(model, tensors, bool(settings.compact))
    # After the structure, before the optimizer and DDP: LoRA on the frozen base.
    attached.adapters = adapters.attach(model, settings.adapters, settings.training_strategy,
                                        tensors)
    return attached


def insert(model: nn.Module, config: Any, example_inputs: CallSpec,
           num_workers: int, *, fit_layouts: bool = False) -> Attached:
    """Insert the palettized structure (``config``: coreai-opt's) into ``model`` in place, with
    k-means deferred: until it runs, reading a palettized weight returns its dense Parameter (an
    optimizer built from ``m.weight`` gets the real one)."""
    palettizer = KMeansPalettizer(model, config)
    palettizer._num_workers = num_workers
    spec = example_inputs.to(model_device(model))
    # coreai-opt's prepare calls model(*inputs): keyword inputs go through a root pre-hook.
    with tracing_forward(model), keyword_call(model, spec) as inputs, \
            compat.record_first_consumers(model) as consumers:
        skipped = compat.insert_parametrizations(palettizer, inputs, fit_layouts=fit_layouts)
    tied = compat.tied_prefixes(model)
    if tied:
        model.register_load_state_dict_pre_hook(tied_keys_hook(tied))
    compat.defer_clustering(compat.fake_palettized_tensors(model))
    return Attached(palettizer, skipped, dict(consumers), tied)


def tied_keys_hook(tied: Mapping[str, str]) -> Any:
    """A load pre-hook: checkpoints may hold a tied weight's palettized state once (HF drops
    duplicates); copy it to the alias keys, or the alias would load stale indices."""
    def fill(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for alias, source in tied.items():
            for key in [k for k in state_dict if k.startswith(prefix + source)]:
                state_dict.setdefault(prefix + alias + key[len(prefix + source):], state_dict[key])

    return fill


def prepare_parameters(tensors: list[compat.PalettizedTensor], start_step: int) -> None:
    """Before the optimizer and DDP exist: the strategies' parameters, and dense weights that
    never get a gradient frozen, so plain DDP does not wait for them ("Expected to have
    finished reduction in the prior iteration")."""
    for t in tensors:
        hooks = strategies.hooks(t)
        hooks.prepare_parameters(t)
        if not hooks.trains_dense_weight and not start_step:
            t.original.requires_grad_(False)


def check_module_patterns(patterns: Mapping[str, Any], model: nn.Module) -> None:
    """Every ``palettize.modules`` regex must match a module name (``re.fullmatch``)."""
    names = [n for n, _ in model.named_modules() if n]
    for pattern in patterns:
        if not any(re.fullmatch(pattern, n) for n in names):
            sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise PalettizeConfigError(
                f"modules.{pattern}", f"matches no module of {type(model).__name__} "
                f"(re.fullmatch); module names look like: {sample}")


def nothing_palettized(model: nn.Module, described: str,
                       skipped: Mapping[str, str]) -> PalettizeConfigError:
    return PalettizeConfigError(
        "", f"the config palettizes no weight of {type(model).__name__} "
        f"({described}); check palettize.preset/overrides/modules"
        + (f" (skipped: {', '.join(skipped)})" if skipped else ""))


def validate(model: nn.Module, config: Any, example_inputs: CallSpec, *,
             patterns: Mapping[str, Any], described: str, fit_layouts: bool = False) -> None:
    """A dry run of ``insert`` on a copy of ``model`` (``model`` is not touched).

    Raises:
        PalettizeConfigError: a ``modules`` regex matches no module, or the config palettizes
            no weight.
    """
    check_module_patterns(patterns, model)
    copy_ = materialize(meta_skeleton(model))
    palettizer = KMeansPalettizer(copy_, config)
    with tracing_forward(copy_), keyword_call(copy_, example_inputs.to(model_device(copy_))) \
            as inputs:
        skipped = compat.insert_parametrizations(palettizer, inputs, fit_layouts=fit_layouts)
    if not compat.fake_palettized_tensors(copy_):
        raise nothing_palettized(model, described, skipped)


def settings_of_rank_zero(ours: dict[str, Any], dist: DistContext) -> dict[str, Any] | None:
    """One resolved config on every rank (lazily resolved interpolations such as ``${now:}``
    may differ per process): rank 0's settings (``to_dict()``) when they differ from ``ours``,
    with a warning naming what differed; else ``None``."""
    theirs = dist.broadcast_object(ours)
    if theirs == ours:
        return None
    differing = sorted(k for k in ours if ours[k] != theirs.get(k))
    log.warning("palettize: rank %d had different settings (%s); using rank 0's",
                dist.rank, ", ".join(differing))
    return theirs


def warn_dense(model: nn.Module, trace: Mapping[str, Any]) -> None:
    """One warning naming the weights of linear-like layers left dense, with their reasons (and
    one log record naming the fitted layouts, ``fitting.log_fitted``)."""
    fitting.log_fitted(model)
    dense = [d for d in dense_weights(model, **trace) if d.warned]
    if dense:
        warnings.warn(
            f"palettize: {len(dense)} weight(s) of linear-like layers left dense "
            "(report().dense_layers lists them):\n"
            + "\n".join(f"  {d.name}: {d.reason}" for d in dense),
            PalettizationWarning, stacklevel=3)

