"""``Palettization``: the framework-agnostic lifecycle both callbacks sit on.

    engine = Palettization("w4", overrides={"linear": "w8"})
    engine.attach(model, example_inputs)       # palettized structure, before wrap and optimizer
    engine.ensure_clustered()                  # k-means, unless a checkpoint restored the state
    engine.start_training(step)                # coreai-opt training mode + PAT schedule
    engine.before_optimizer_step()             # after the last backward of each step
    engine.after_optimizer_step(step)          # after each optimizer step
    engine.finish_training("out/")             # leave training mode; export on rank 0

``prepare(model, example_inputs, state_dict=None)`` does attach + (load or cluster) in one call.
The adapters only map framework hooks onto these methods; nothing here knows a framework. The
phases (attach, calibration, budget, k-means, compact, adapters, report, export) never see the
engine: each gets tensors, its settings section and a ``DistContext``, and returns data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from coreai_opt.palettization import KMeansPalettizer

from .. import _coreai_compat as compat
from ..accuracy import adapters, budget, distillation
from ..accuracy import calibration_phase as _calibration_step
from ..accuracy.calibration import CalibrationData, CalibrationStats
from ..core import integrity, strategies
from ..core._inputs import CallSpec
from ..core._inputs import as_call_spec as as_example_inputs  # the engine's name for it
from ..core.dist_context import DistContext
from ..export import phase as export_step
from ..settings.coreai_config import config_to_yaml, to_coreai_config
from ..settings.schema import ConfigSource, PalettizeSettings
from . import allocation, attach, checkpoint, distributed, fsdp
from .attach import PalettizationWarning
from .compact import CompactBase
from .outputs import ReportAndExport

__all__ = ["CallSpec", "Palettization", "PalettizationWarning", "as_example_inputs"]

log = logging.getLogger(__name__)


class Palettization(ReportAndExport):
    """Owns one model's coreai-opt ``KMeansPalettizer`` from prepare to export.

    Args:
        config: anything ``PalettizeSettings.resolve`` accepts (a preset name, settings, a
            mapping or ``DictConfig``, a coreai-opt YAML path, a ``KMeansPalettizerConfig``).
        overrides: per module type, e.g. ``{"linear": "w8", "embedding": None}``.
        modules: per module name regex, e.g. ``{"lm_head": "w8"}``.
        model_factory: builds a new instance of the model for export. By default a
            zero-memory meta copy taken before prepare is used.
        export_dir, export_formats: shortcuts for ``export={"dir": ..., "formats": ...}``.
        **fields: other ``palettize`` keys (``schedule``, ``training``, ``num_workers``,
            ``distributed``, ``export``).

    Raises:
        PalettizeConfigError: for a bad setting, naming its key (``palettize.<key>``).
    """

    def __init__(
        self,
        config: ConfigSource | None = "w4",
        *,
        overrides: Mapping[str, Any] | None = None,
        modules: Mapping[str, Any] | None = None,
        model_factory: Callable[[], nn.Module] | None = None,
        export_dir: str | Path | None = None,
        export_formats: Sequence[str] | None = None,
        **fields: Any,
    ) -> None:
        export_step.fold_shortcuts(fields, export_dir, export_formats)
        self.settings = PalettizeSettings.resolve(config, overrides=overrides, modules=modules,
                                                  **fields)
        self.config = to_coreai_config(self.settings)
        self.model: nn.Module | None = None
        self.palettizer: KMeansPalettizer | None = None
        self.example_inputs: CallSpec = CallSpec()
        """Inputs of the export's tracing forward (those of ``attach`` unless replaced);
        ``example_inputs[0]`` is the first tensor input."""
        self.skipped: dict[str, str] = {}
        self.consumers: dict[str, str] = {}
        """First torch function that consumed each parameter in attach's tracing forward."""
        self.tied: dict[str, str] = {}
        self.cluster_stats: distributed.ClusterStats | None = None
        self.calibration_data: Callable[[], CalibrationData] | None = None
        """``palettize.calibration``: returns the loss and training data (set by the adapters)."""
        self.calibration_stats: CalibrationStats | None = None
        self._restored = False
        self._built_on_meta = False  # attached on the meta device: re-initialize at k-means
        self._clustered_before_sharding = False  # FSDP2: k-means/restore ran before fully_shard
        self._model_factory = model_factory
        self._skeleton: nn.Module | None = None
        self._training: Any = None
        self._attached: attach.Attached | None = None
        self.allocation: budget.Allocation | None = None
        """The allocation once ``palettize.budget`` was applied (before k-means)."""
        self.sensitivities: dict[str, torch.Tensor] | None = None
        """Per-weight sensitivities (``calibration``): the budget's objective weights by them."""
        self.compact: CompactBase | None = None
        """The compact base (``palettize.compact``), from ``attach``."""
        self.adapters: adapters.LoraAttachment | None = None
        """The LoRA adapters on the palettized base (``palettize.adapters`` or a PeftModel)."""
        self.distiller: distillation.Distiller | None = None
        """``palettize.distillation``: the dense teacher and its loss hook, from ``attach``."""
        self.dist_context: DistContext | None = None
        """The phases' process group (``None``: the default group, read at each phase)."""

    # ---------------------------------------------------------------- structure

    @property
    def attached(self) -> bool:
        return self.palettizer is not None

    def tensors(self) -> list[compat.PalettizedTensor]:
        """The palettized weights of the attached model."""
        return compat.fake_palettized_tensors(self.model) if self.model is not None else []

    def attach(self, model: nn.Module, example_inputs: Any) -> None:
        """Insert the palettized structure into ``model`` (in place) without running k-means.

        Call before the model is wrapped (DDP) and before the optimizer is built. Attaching the
        same model again is a no-op. ``example_inputs``: a tensor or a tuple (positional), a
        mapping (keywords) or a ``CallSpec``; every forward of the plugin makes this call.
        Until ``ensure_clustered``/``cluster``, reading a palettized weight (``module.weight``)
        returns its dense Parameter and never runs k-means.

        Raises:
            PalettizeConfigError: a ``modules`` regex matches no module, or nothing is palettized.
            ExampleInputsError: the forward fails on ``example_inputs`` (names it and the fix).
            RuntimeError: attached to another model already, or ``model`` is already prepared.
        """
        if self.model is not None:
            if model is self.model:
                return
            raise RuntimeError("this Palettization is already attached to another model")
        if compat.is_prepared(model):
            raise RuntimeError(f"{type(model).__name__} is already palettized (prepared by "
                               "coreai-opt); build a new model or reuse its Palettization")
        example_inputs = as_example_inputs(example_inputs, model)
        with self.dist.agree("palettize setup"):  # a failure on any rank stops every rank
            theirs = attach.settings_of_rank_zero(self.settings.to_dict(), self.dist)
            if theirs is not None:  # one resolved config on every rank: rank 0's
                self.settings = PalettizeSettings(**theirs, base_config=self.settings.base_config)
            teacher = (distillation.teacher_for(model, self.settings.distillation)
                       if self.settings.distillation is not None else None)  # dense: before
            self._attached = attach.build(model, self.settings, example_inputs,
                                          skeleton=self._model_factory is None)
        a = self._attached
        self._built_on_meta = fsdp.on_meta(model)
        self.model, self.palettizer, self.config, self._skeleton = (
            model, a.palettizer, a.config, a.skeleton)
        self.skipped, self.consumers, self.tied = a.skipped, a.consumers, a.tied
        self.compact, self.adapters = a.compact, a.adapters
        self.example_inputs = example_inputs.detached_cpu()
        if teacher is not None:  # hooked after the skeleton copy: the export never sees it
            self.distiller = distillation.Distiller(model, teacher, self.settings.distillation,
                                                    active=lambda: self._training is not None)
        integrity.watch_loads(model, self.tensors, self.config_yaml,  # LUT shapes fit the config
                              budget=self.settings.budget is not None)
        if self.dist.is_main:
            attach.warn_dense(model, self._trace_record())

    @property
    def dist(self) -> DistContext:
        """The ranks the phases agree across: ``dist_context`` when set (a sharded run's group
        and mesh), else the default process group."""
        return self.dist_context or DistContext.current()

    def validate_for(self, model: nn.Module, example_inputs: Any) -> None:
        """Validate the config against ``model`` without touching it (a dry run on a copy).

        Raises:
            PalettizeConfigError: a ``modules`` regex matches no module, or the config
                palettizes no weight. Use it to fail before any training starts.
        """
        attach.validate(model, to_coreai_config(self.settings, model),
                        as_example_inputs(example_inputs, model),
                        patterns=self.settings.modules, described=self.settings.describe(),
                        fit_layouts=self.settings.fit_layouts)

    check = validate_for  # the 0.1 name

    def __deepcopy__(self, memo: dict) -> Palettization:
        """The engine is shared, not copied, when a model holding its hooks is deep-copied (an
        EMA or SWA copy): it holds the palettizer's live training state."""
        return self

    # ---------------------------------------------------------------- clustering and state

    @property
    def clustered(self) -> bool:
        """True once every palettized weight has centroids (k-means ran or state was loaded)."""
        tensors = self.tensors()
        return bool(tensors) and all(t.initialized for t in tensors)

    @property
    def restored(self) -> bool:
        """True when the palettized state came from a checkpoint (no k-means ran)."""
        return self._restored

    def cluster(self) -> None:
        """Run k-means for every palettized weight that has no current centroids: once across
        all ranks (``palettize.distributed``), every rank ending with the identical result."""
        self._require_attached()
        self._materialized()
        tensors = self.tensors()
        calibrate = self.settings.calibration is not None and any(
            not t.initialized for t in tensors)
        if calibrate:  # sensitivity-weighted k-means: before it, on the dense weights
            self.calibration_stats, self.sensitivities = _calibration_step.calibrate(
                tensors, self.settings.calibration, model=self.model,
                data=self.calibration_data, dist=self.dist,
                keep_raw=self.settings.budget is not None)
        self._apply_budget()  # after calibration: its sensitivities weight the budget's objective
        self.sensitivities = None
        compat.end_deferral(tensors)
        self._cluster([t for t in tensors if not t.initialized])
        if calibrate:
            _calibration_step.release(tensors, reclusters=self.settings.start_step > 0)
        compat.finish_clustering(self.palettizer)
        self._update_compact()

    def _update_compact(self) -> None:
        self.compact.update(self.step >= self.settings.start_step)

    def _cluster(self, pending: list[compat.PalettizedTensor]) -> None:
        if pending:
            integrity.check_weights_finite(pending, self.dist)  # every rank: no NaN is clustered
            sharded = any(fsdp.is_sharded(t.original) for t in pending)  # FSDP2
            if sharded:  # frozen/lut/adapters: k-means before fully_shard, or refused here
                fsdp.check_supported(self.settings, "fully_shard")
            elif not fsdp.model_is_sharded(self.model):
                self._clustered_before_sharding = True
            self.cluster_stats = (fsdp.cluster if sharded else distributed.cluster)(
                self.palettizer, pending, self.settings.distributed)
            self._run_hooks(pending, "after_cluster")

    def ensure_clustered(self, expect_restored: bool = False) -> None:
        """Before training: run k-means unless a checkpoint restored the palettized state.

        When a restore is expected (``expect_restored``, or ``load_state_dict`` was called),
        or some weights hold state (a partial load such as HF's ``strict=False``), every
        palettized weight must have been restored.

        Raises:
            RuntimeError: naming the weights without restored centroids or indices, instead
                of silently re-clustering or re-deriving them.
        """
        self._require_attached()
        self._materialized()
        tensors = self.tensors()
        restored = [t.initialized and t.has_indices for t in tensors]
        if not (expect_restored or self._restored or any(restored)):
            self.cluster()  # calibration, budget, k-means
            return
        self._apply_budget()  # resume: the allocation the restored LUTs were clustered with
        compat.end_deferral(tensors)  # restored: the fakes palettize from here on
        checkpoint.require_restored(tensors, restored)
        integrity.check_restored(tensors, self.model)  # finite LUTs and weights, indices < 2**n_bits
        self._restored = True
        if not fsdp.model_is_sharded(self.model):
            self._clustered_before_sharding = True
        self._update_compact()

    def _materialized(self) -> None:
        """A model attached on the meta device has been materialized and loaded since: its
        palettization flags get their initial values (``to_empty`` left them uninitialized)."""
        if self._built_on_meta:
            fsdp.reinit_after_materialize(self.model, self.tensors())
            self._built_on_meta = False

    def map_dense_state_dict(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """A dense state dict (the model's before ``attach``, e.g. pretrained weights) keyed for
        the palettized structure, for ``load_state_dict``/``set_model_state_dict`` after a meta
        build: ``<module>.weight`` -> ``<module>.parametrizations.weight.original``."""
        self._require_attached()
        return fsdp.map_dense_state_dict(self.tensors(), dict(state_dict))

    def _apply_budget(self) -> None:
        """With ``palettize.budget``: choose each weight's bits (a restored checkpoint's, else
        rank 0's, broadcast) and rebuild the config with them, before k-means; once.
        ``self.sensitivities`` (set by calibration first) weight the objective."""
        if self.settings.budget is not None and self.allocation is None:
            self._use_allocation(allocation.choose(self.model, self.settings, self.tied,
                                                   self.dist, self.sensitivities))

    def _use_allocation(self, chosen: budget.Allocation) -> None:
        self.allocation = chosen
        self.config = allocation.configure(self.settings, self.model, chosen)

    def allocate_budget(self, sensitivities: Mapping[str, torch.Tensor] | None = None
                        ) -> budget.Allocation:
        """The allocation ``palettize.budget`` gives the attached, not yet clustered model (this
        process only, not applied). ``sensitivities``: per weight name, shaped like the weight."""
        self._require_attached()
        return budget.allocate(allocation.scope(self.model, self.settings, self.tied),
                               self.settings.budget, sensitivities)

    def prepare(self, model: nn.Module, example_inputs: Any,
                state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """Attach, then load ``state_dict`` (no k-means) or cluster. Returns ``model``."""
        self.attach(model, example_inputs)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        self.ensure_clustered(expect_restored=state_dict is not None)
        return model

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides the model's own state: the PAT step and config."""
        return checkpoint.engine_state(self.step, self.config_yaml(),
                                       self.calibration_stats, self.allocation)

    def config_yaml(self) -> str:
        """The resolved coreai-opt config as a checkpoint records it."""
        return config_to_yaml(self.config)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()``. The model's tensors come from its own state dict.

        Raises:
            PalettizeConfigError: the checkpoint was palettized with another config.
        """
        if state.get("budget") is not None and self.allocation is None and self.attached:
            self._use_allocation(budget.restore_allocation(  # no k-means
                self.tensors(), self.settings.budget, state["budget"]))
        step, calibration = checkpoint.read_engine_state(state, self.config_yaml())
        if self.palettizer is not None:
            compat.set_step(self.palettizer, step)
        self.calibration_stats = calibration or self.calibration_stats
        self._restored = True

    def _require_attached(self) -> None:
        if self.palettizer is None:
            raise RuntimeError("call attach() or prepare() first")

    # ---------------------------------------------------------------- training

    @property
    def step(self) -> int:
        """The PAT schedule's optimizer step."""
        return compat.get_step(self.palettizer) if self.palettizer is not None else 0

    def start_training(self, step: int = 0) -> None:
        """Enter coreai-opt's training mode at optimizer step ``step`` (resume-aware)."""
        self._require_attached()
        if self._training is not None:
            return
        if fsdp.model_is_sharded(self.model):  # fully_shard'ed by the user's own loop
            fsdp.check_supported(self.settings, "fully_shard",
                                 clustered_before=self._clustered_before_sharding)
            fsdp.check_placements(self.model)
        compat.set_step(self.palettizer, step)
        self._training = self.palettizer.training_mode()
        self._training.__enter__()
        self._update_compact()

    def before_optimizer_step(self) -> None:
        """After the last backward of an optimizer step: the strategies free what only the
        forwards needed (``ste``'s cached palettized weights), so the step itself runs with
        dense-level memory."""
        self._run_hooks(self.tensors(), "before_optimizer_step")

    def _run_hooks(self, tensors: list[compat.PalettizedTensor], hook: str, *args: Any) -> None:
        """``hook`` of each weight's training strategy (``strategies.StrategyHooks``)."""
        for t in tensors:
            getattr(strategies.hooks(t), hook)(t, *args)

    def after_optimizer_step(self, step: int) -> None:
        """Advance the PAT schedule to optimizer step ``step`` and run the strategies' hooks.

        When the schedule switches palettization on, coreai-opt would re-cluster inside the next
        forward on every rank; the engine clusters the switched weights here instead, once.
        """
        if self.palettizer is None or compat.get_step(self.palettizer) == step:
            return
        compat.set_step(self.palettizer, step)
        tensors = self.tensors()
        self._cluster([t for t in tensors if not t.initialized])
        self._run_hooks(tensors, "after_optimizer_step", step)
        integrity.check_luts_finite(tensors, step)
        self._update_compact()
        if self.distiller is not None and self._training is not None:
            self.distiller.check_used()  # the first step proves the term reached the loss

    sync_step = after_optimizer_step  # the 0.1 name

    def stop_training(self) -> None:
        """Leave training mode (restores the model's train/eval state)."""
        if self._training is not None:
            self._run_hooks(self.tensors(), "finish")
            context, self._training = self._training, None
            context.__exit__(None, None, None)
