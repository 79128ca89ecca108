"""``Palettization``: the framework-agnostic lifecycle both callbacks sit on.

    engine = Palettization("w4", overrides={"linear": "w8"})
    engine.attach(model, example_inputs)       # palettized structure, before wrap and optimizer
    engine.ensure_clustered()                  # k-means, unless a checkpoint restored the state
    engine.start_training(step)                # coreai-opt training mode + PAT schedule
    engine.before_optimizer_step()             # after the last backward of each step
    engine.after_optimizer_step(step)          # after each optimizer step
    engine.finish_training("out/")             # leave training mode; export on rank 0

``prepare(model, example_inputs, state_dict=None)`` does attach + (load or cluster) in one call.
The adapters only map framework hooks onto these methods; nothing here knows a framework.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from coreai_opt.palettization import KMeansPalettizer

from . import _coreai_compat as compat
from . import adapters, calibration, distributed, strategies
from ._inputs import CallSpec, as_call_spec, keyword_call
from ._modelcopy import copy_for_export, materialize, meta_skeleton, model_device, tracing_forward
from .compact import CompactBase
from .coreai_config import config_to_yaml, to_coreai_config
from .dense_reasons import check_overrides, dense_weights
from .export import ExportResult, export_palettized
from .report import CompressionReport, build_report
from .settings import ConfigSource, PalettizeConfigError, PalettizeSettings

__all__ = ["CallSpec", "Palettization", "PalettizationWarning", "as_example_inputs"]

log = logging.getLogger(__name__)


class PalettizationWarning(UserWarning):
    """A layer the config asked for was left dense, or similar surprises."""


def as_example_inputs(value: Any, model: nn.Module | None = None) -> CallSpec:
    """Example inputs as the ``CallSpec`` every forward of the plugin uses: a tensor or a tuple
    (positional inputs), a mapping (keyword inputs) or a ``CallSpec``; normalised for ``model``
    when given (``None`` gaps become keywords or are dropped)."""
    return as_call_spec(value, model)


class Palettization:
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
        export = dict(fields.pop("export", None) or {})
        if export_dir is not None:
            export["dir"] = str(export_dir)
        if export_formats is not None:
            export["formats"] = list(export_formats)
        if export:
            fields["export"] = export
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
        self.calibration_data: Callable[[], calibration.CalibrationData] | None = None
        """``palettize.calibration``: returns the loss and training data (set by the adapters)."""
        self.calibration_stats: calibration.CalibrationStats | None = None
        self._restored = False
        self._model_factory = model_factory
        self._skeleton: nn.Module | None = None
        self._training: Any = None
        self.allocation: Any = None
        """``budget.Allocation`` once ``palettize.budget`` was applied (before k-means)."""
        self.sensitivities: dict[str, torch.Tensor] | None = None
        """Per-weight sensitivities (``calibration``): the budget's objective weights by them."""
        self.compact: CompactBase | None = None
        """The compact base (``palettize.compact``), from ``attach``."""
        self.adapters: adapters.LoraAttachment | None = None
        """The LoRA adapters on the palettized base (``palettize.adapters`` or a PeftModel)."""

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
        with distributed.agree("palettize setup"):  # a failure on any rank stops every rank
            self._use_settings_of_rank_zero()
            self._check_module_patterns(model)
            # Extended for the model's linear-like modules (HF Conv1D, fused MoE experts): the
            # config checkpoints, the packed artifact and load_palettized carry.
            self.config = adapters.exclude_adapter_layers(to_coreai_config(self.settings, model),
                                                          model)
            if self._model_factory is None:
                self._skeleton = copy_for_export(model)
            self._insert(model, example_inputs)
            if not self.tensors():
                raise self._nothing_palettized(model, self.skipped)
            check_overrides(model, **self._trace_record())
            self._prepare_parameters()
            self.compact = CompactBase(self)
            # After the structure, before the optimizer and DDP: LoRA on the frozen base.
            self.adapters = adapters.attach(model, self.settings.adapters,
                                            self.settings.training_strategy, self.tensors())
        if distributed.rank() == 0:
            dense = [d for d in dense_weights(model, **self._trace_record()) if d.warned]
            if dense:
                warnings.warn(
                    f"palettize: {len(dense)} weight(s) of linear-like layers left dense "
                    "(report().dense_layers lists them):\n"
                    + "\n".join(f"  {d.name}: {d.reason}" for d in dense),
                    PalettizationWarning, stacklevel=2)

    def _insert(self, model: nn.Module, example_inputs: CallSpec) -> None:
        palettizer = KMeansPalettizer(model, self.config)
        palettizer._num_workers = self.settings.num_workers
        spec = example_inputs.to(model_device(model))
        # coreai-opt's prepare calls model(*inputs): keyword inputs go through a root pre-hook.
        with tracing_forward(model), keyword_call(model, spec) as inputs, \
                compat.record_first_consumers(model) as consumers:
            self.skipped = compat.insert_parametrizations(palettizer, inputs)
        self.consumers = consumers
        self.model, self.palettizer = model, palettizer
        self.example_inputs = example_inputs.detached_cpu()
        self.tied = compat.tied_prefixes(model)
        if self.tied:
            model.register_load_state_dict_pre_hook(self._fill_tied_keys)
        # No lazy k-means: until cluster() or a verified restore, reading a palettized weight
        # returns the dense Parameter (an optimizer built from ``m.weight`` gets the real one).
        compat.defer_clustering(self.tensors())

    def _prepare_parameters(self) -> None:
        """Before the optimizer and DDP exist: the strategies' parameters, and dense weights that
        never get a gradient frozen, so plain DDP does not wait for them ("Expected to have
        finished reduction in the prior iteration")."""
        for t in self.tensors():
            hooks = strategies.hooks(t)
            hooks.prepare_parameters(t)
            if not hooks.trains_dense_weight and not self.settings.start_step:
                t.original.requires_grad_(False)

    def _use_settings_of_rank_zero(self) -> None:
        """One resolved config on every rank (lazily resolved interpolations such as ``${now:}``
        may differ per process): rank 0's settings win, with a warning naming what differed."""
        ours = self.settings.to_dict()
        theirs = distributed.broadcast_object(ours)
        if theirs == ours:
            return
        differing = sorted(k for k in ours if ours[k] != theirs.get(k))
        log.warning("palettize: rank %d had different settings (%s); using rank 0's",
                    distributed.rank(), ", ".join(differing))
        self.settings = PalettizeSettings(**theirs, base_config=self.settings.base_config)
        self.config = to_coreai_config(self.settings)

    def _check_module_patterns(self, model: nn.Module) -> None:
        names = [n for n, _ in model.named_modules() if n]
        for pattern in self.settings.modules:
            if not any(re.fullmatch(pattern, n) for n in names):
                sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                raise PalettizeConfigError(
                    f"modules.{pattern}", f"matches no module of {type(model).__name__} "
                    f"(re.fullmatch); module names look like: {sample}")

    def _nothing_palettized(self, model: nn.Module, skipped: Mapping[str, str]) -> Exception:
        return PalettizeConfigError(
            "", f"the config palettizes no weight of {type(model).__name__} "
            f"({self.settings.describe()}); check palettize.preset/overrides/modules"
            + (f" (skipped: {', '.join(skipped)})" if skipped else ""))

    def validate_for(self, model: nn.Module, example_inputs: Any) -> None:
        """Validate the config against ``model`` without touching it (a dry run on a copy).

        Raises:
            PalettizeConfigError: a ``modules`` regex matches no module, or the config
                palettizes no weight. Use it to fail before any training starts.
        """
        self._check_module_patterns(model)
        spec = as_example_inputs(example_inputs, model)
        copy_ = materialize(meta_skeleton(model))
        palettizer = KMeansPalettizer(copy_, to_coreai_config(self.settings, model))
        with tracing_forward(copy_), keyword_call(copy_, spec.to(model_device(copy_))) as inputs:
            skipped = compat.insert_parametrizations(palettizer, inputs)
        if not compat.fake_palettized_tensors(copy_):
            raise self._nothing_palettized(model, skipped)

    check = validate_for  # the 0.1 name

    def __deepcopy__(self, memo: dict) -> Palettization:
        """The engine is shared, not copied, when a model holding its hooks is deep-copied (an
        EMA or SWA copy): it holds the palettizer's live training state."""
        return self

    def _fill_tied_keys(self, module, state_dict, prefix, *args) -> None:
        """Checkpoints may hold a tied weight's palettized state once (HF drops duplicates):
        copy it to the alias keys, or the alias would load stale indices and re-derive them."""
        for alias, source in self.tied.items():
            for key in [k for k in state_dict if k.startswith(prefix + source)]:
                state_dict.setdefault(prefix + alias + key[len(prefix + source):], state_dict[key])


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
        tensors = self.tensors()
        calibrate = self.settings.calibration is not None and any(
            not t.initialized for t in tensors)
        if calibrate:  # sensitivity-weighted k-means: before it, on the dense weights
            self.calibration_stats = calibration.calibrate(self, tensors)
        self._apply_budget()  # after calibration: its sensitivities weight the budget's objective
        self.sensitivities = None
        compat.end_deferral(tensors)
        self._cluster([t for t in tensors if not t.initialized])
        if calibrate:
            calibration.release(self, tensors)
        compat.finish_clustering(self.palettizer)
        self.compact.update()

    def _cluster(self, pending: list[compat.PalettizedTensor]) -> None:
        if pending:
            self.cluster_stats = distributed.cluster(self.palettizer, pending,
                                                     self.settings.distributed)
            for t in pending:
                strategies.hooks(t).after_cluster(t)

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
        tensors = self.tensors()
        restored = [t.initialized and t.has_indices for t in tensors]
        if not (expect_restored or self._restored or any(restored)):
            self.cluster()  # calibration, budget, k-means
            return
        self._apply_budget()  # resume: the allocation the restored LUTs were clustered with
        compat.end_deferral(tensors)  # restored: the fakes palettize from here on
        missing = [t.name for t, ok in zip(tensors, restored) if not ok]
        if missing:
            raise RuntimeError(
                f"the loaded checkpoint has no palettized state (centroids/indices) for "
                f"{len(missing)} weight(s): {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}; it does not come from this config")
        self._restored = True
        self.compact.update()

    def _apply_budget(self) -> None:
        """With ``palettize.budget``: choose each weight's bits (rank 0, broadcast) and rebuild
        the config with them, before k-means; once. ``self.sensitivities`` (set by calibration
        first) weight the objective. After a restore, the allocation is read from the restored
        LUTs instead."""
        if self.settings.budget is None or self.allocation is not None:
            return
        from .budget import allocation_from_state, apply_budget

        # A restored checkpoint (e.g. HF resume) holds the allocation in its LUT sizes.
        self.allocation = allocation_from_state(self) or apply_budget(self, self.sensitivities)

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
        state = {"version": 1, "step": self.step, "config": config_to_yaml(self.config)}
        if self.calibration_stats is not None:
            state["calibration"] = self.calibration_stats.to_dict()
        if self.allocation is not None:
            state["budget"] = self.allocation.to_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()``. The model's tensors come from its own state dict.

        Raises:
            PalettizeConfigError: the checkpoint was palettized with another config.
        """
        if state.get("budget") is not None and self.allocation is None and self.attached:
            from .budget import restore_allocation

            self.allocation = restore_allocation(self, state["budget"])  # no k-means
        saved = state.get("config")
        if saved is not None and saved != config_to_yaml(self.config):
            raise PalettizeConfigError("", "the checkpoint was palettized with a different config "
                                       "than this run's; resume with the same palettize settings")
        if self.palettizer is not None:
            compat.set_step(self.palettizer, int(state.get("step", 0)))
        if state.get("calibration"):
            self.calibration_stats = calibration.CalibrationStats(**state["calibration"])
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
        compat.set_step(self.palettizer, step)
        self._training = self.palettizer.training_mode()
        self._training.__enter__()
        self.compact.update()

    def before_optimizer_step(self) -> None:
        """After the last backward of an optimizer step: the strategies free what only the
        forwards needed (``ste``'s cached palettized weights), so the step itself runs with
        dense-level memory."""
        for t in self.tensors():
            strategies.hooks(t).before_optimizer_step(t)

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
        for t in tensors:
            strategies.hooks(t).after_optimizer_step(t, step)
        self.compact.update()

    sync_step = after_optimizer_step  # the 0.1 name

    def stop_training(self) -> None:
        """Leave training mode (restores the model's train/eval state)."""
        if self._training is not None:
            for t in self.tensors():
                strategies.hooks(t).finish(t)
            context, self._training = self._training, None
            context.__exit__(None, None, None)

    # ---------------------------------------------------------------- report and export

    def _trace_record(self) -> dict[str, Any]:
        """What attach learned, for the dense reasons (``report.dense_weights``)."""
        return {"skipped": self.skipped, "consumers": self.consumers, "settings": self.settings,
                "module_configs": compat.resolved_module_configs(self.palettizer)}

    def report(self) -> CompressionReport:
        """The compression report (whole-model sizes; dense weights with their reasons)."""
        self._require_clustered()
        from . import fsdp

        if fsdp.model_is_sharded(self.model):  # every rank takes part
            return fsdp.report(self)
        report = build_report(self.model, **self._trace_record())
        if self.calibration_stats is not None:
            report.calibration = self.calibration_stats.to_dict()
        if self.allocation is not None:
            report.budget = self.allocation.summary()
        return report

    def _require_clustered(self) -> None:
        """Report and export read the palettized weights: never while clustering is deferred
        (ending the deferral here would run k-means lazily on whichever rank reads first)."""
        self._require_attached()
        pending = compat.deferred(self.tensors())
        if pending:
            raise RuntimeError(
                f"palettize: {len(pending)} weight(s) are not clustered yet ({pending[0]}, ...): "
                "call ensure_clustered() (or cluster()) before report() or export()")

    def set_export_inputs(self, example_inputs: Any) -> None:
        """Trace the export with these inputs (e.g. a real data sample) instead of attach's:
        anything ``attach`` takes (a tensor, a tuple, a mapping of keywords, a ``CallSpec``)."""
        self.example_inputs = as_example_inputs(example_inputs, self.model).detached_cpu()

    def _new_model(self, configure: Callable[[nn.Module], None] | None) -> nn.Module:
        """A new, unprepared instance of the model's architecture (for export)."""
        if self._model_factory is not None:
            with torch.random.fork_rng(devices=[]):
                model = self._model_factory()
        elif self._skeleton is not None:
            model = materialize(self._skeleton)
        else:
            raise RuntimeError("attach() a model first")
        if configure is not None:
            configure(model)
        return model

    def export(
        self,
        directory: str | Path | None = None,
        *,
        formats: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        extra_files: Callable[[Path], None] | None = None,
        configure_model: Callable[[nn.Module], None] | None = None,
        strict: bool = False,
    ) -> ExportResult:
        """Write ``.aimodel``, the packed artifact and the report to ``directory`` (atomic).

        ``configure_model(fresh)`` may adjust the rebuilt export copy (e.g. disable a KV cache);
        ``extra_files(tmp_dir)`` may add files (config, tokenizer) before the rename.

        Raises:
            ValueError: no ``directory`` and no ``palettize.export.dir``.
            ExportError: with ``strict``, a format could not be written.
        """
        self._require_clustered()
        directory = directory or self.settings.export.dir
        if directory is None:
            raise ValueError("no export directory: pass one or set palettize.export.dir")
        extra = set(strategies.strategy_state_keys(self.model))
        if self.allocation is not None:  # + budget_modules.yaml, the allocation as modules:
            from .budget import write_block

            extra_files = write_block(self.allocation, extra_files)
        result = export_palettized(
            self.model,
            config=self.config,
            example_inputs=self.example_inputs,
            directory=directory,
            factory=lambda: self._new_model(configure_model),
            formats=formats if formats is not None else self.settings.export.formats,
            report=self.report(),
            state_dict=self.compact.dense_state_dict(
                {k: v for k, v in self.model.state_dict().items() if k not in extra}),
            metadata=metadata,
            extra_files=extra_files,
            strict=strict,
            adapters=self._adapter_export(),
        )
        log.info("palettize: exported %s to %s", ", ".join(result.written) or "nothing",
                 result.directory)
        return result

    def _adapter_export(self) -> adapters.AdapterExport | None:
        if self.adapters is None:
            return None
        chosen = self.settings.adapters
        return adapters.AdapterExport(self.adapters, merge=bool(chosen and chosen.merge),
                                      refit_luts=bool(chosen and chosen.refit_luts))

    def finish_training(self, default_export_dir: str | Path, **export_kwargs: Any
                        ) -> ExportResult | None:
        """End of training: leave training mode, then export on rank 0 (if any format is set)
        to ``palettize.export.dir`` or ``default_export_dir``. Returns the result on rank 0."""
        self.stop_training()
        result = None
        if self.settings.export.formats:
            result = self.export_on_main(self.settings.export.dir or default_export_dir,
                                         **export_kwargs)
        for t in self.tensors():           # what the export's reads cached: the first eval
            strategies.drop_cache(t.fake)  # forward after training caches it again
        return result

    def export_on_main(self, directory: str | Path | None = None, **kwargs: Any
                       ) -> ExportResult | None:
        """``export`` on global rank 0 only; every rank waits at a barrier afterwards. An FSDP2
        model's full state is gathered to rank 0 first (every rank takes part)."""
        from . import fsdp

        if fsdp.model_is_sharded(self.model):
            return fsdp.export_on_main(self, directory, **kwargs)
        result = None
        try:
            if distributed.rank() == 0:
                result = self.export(directory, **kwargs)
        finally:
            distributed.barrier()
        return result
