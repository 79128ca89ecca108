"""``Palettization``: the framework-agnostic lifecycle both callbacks sit on.

    engine = Palettization("w4", overrides={"linear": "w8"})
    engine.attach(model, example_inputs)    # palettized structure, before wrap and optimizer
    engine.cluster()                        # k-means, unless a checkpoint restored the state
    engine.start_training(step)             # coreai-opt training mode + PAT schedule
    engine.sync_step(optimizer_step)        # after each optimizer step
    engine.stop_training()
    engine.export_on_main("out/")           # .aimodel + packed artifact + report

``prepare(model, example_inputs, state_dict=None)`` does attach + (load or cluster) in one call.
"""

from __future__ import annotations

import copy
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
from . import distributed, strategies
from .export import ExportResult, export_palettized, quiet_prepare
from .report import CompressionReport, build_report
from .settings import (
    ConfigSource,
    PalettizeConfigError,
    config_from_settings,
    config_to_yaml,
    resolve_settings,
    training_name,
)

__all__ = ["Palettization", "PalettizationWarning", "as_example_inputs"]

log = logging.getLogger("coreai_palettize_plugins")


class PalettizationWarning(UserWarning):
    """A layer the config asked for was left dense, or similar surprises."""


def as_example_inputs(value: Any) -> tuple[Any, ...]:
    """Normalise example inputs to the positional tuple coreai-opt's ``prepare`` needs."""
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, Mapping):
        raise TypeError("example inputs must be positional (a tensor or a tuple of tensors), "
                        f"got a mapping with keys {sorted(value)}")
    raise TypeError(f"example inputs must be a tensor or a tuple, got {type(value).__name__}")


def _to_device(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _disable_kv_cache(model: nn.Module) -> None:
    """transformers models return a KV-cache object torch.export cannot trace: export without."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None):
        config.use_cache = False


def _copy_for_export(model: nn.Module) -> nn.Module:
    try:
        return meta_skeleton(model)
    except Exception as e:
        raise RuntimeError(
            f"cannot copy {type(model).__name__} for the end-of-training export "
            f"({type(e).__name__}: {e}); pass model_factory= (a callable returning a new "
            "instance of the model)") from e


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and persistent buffers live on the meta device.

    Costs no memory; non-persistent buffers (rotary tables, masks) are copied for real because
    no state dict restores them. ``materialize`` turns it into a usable model for export.
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


class Palettization:
    """Owns one model's coreai-opt ``KMeansPalettizer`` from prepare to export.

    Args:
        config: anything ``build_palettizer_config`` accepts (a preset name, settings, a
            coreai-opt YAML path, a ``KMeansPalettizerConfig``).
        overrides: per module type, e.g. ``{"linear": "w8", "embedding": None}``.
        modules: per module name regex, e.g. ``{"lm_head": "w8"}``.
        model_factory: builds a new instance of the model for export. By default a
            zero-memory meta copy taken before prepare is used.
        export_dir / export_formats: shortcuts for ``export={"dir": ..., "formats": ...}``.
            key: how error messages name these settings (``recipe.palettize`` in recipes).
        **fields: other ``palettize`` keys (``num_workers``, ``distributed``, ``schedule``,
            ``training``, ``export``).
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
        key: str = "palettize",
        **fields: Any,
    ) -> None:
        export = dict(fields.pop("export", None) or {})
        if export_dir is not None:
            export["dir"] = str(export_dir)
        if export_formats is not None:
            export["formats"] = list(export_formats)
        if export:
            fields["export"] = export
        self.key = key  # how error messages name the settings, e.g. "recipe.palettize"
        self.settings = resolve_settings(config, overrides=overrides, modules=modules, key=key,
                                         **fields)
        self.config = config_from_settings(self.settings, key=key)
        self.model: nn.Module | None = None
        self.palettizer: KMeansPalettizer | None = None
        self.example_inputs: tuple[Any, ...] = ()
        self.skipped: dict[str, str] = {}
        self.restored = False
        self._model_factory = model_factory
        self._skeleton: nn.Module | None = None
        self.tied: dict[str, str] = {}
        self.cluster_stats: distributed.ClusterStats | None = None
        self._training: Any = None

    # ---------------------------------------------------------------- structure and clustering

    @property
    def attached(self) -> bool:
        return self.palettizer is not None

    def tensors(self) -> list[compat.PalettizedTensor]:
        """The palettized weights of the attached model."""
        return compat.fake_palettized_tensors(self.model) if self.model is not None else []

    @property
    def clustered(self) -> bool:
        """True once every palettized weight has centroids (k-means ran or state was loaded)."""
        tensors = self.tensors()
        return bool(tensors) and all(t.initialized for t in tensors)

    def attach(self, model: nn.Module, example_inputs: Any) -> None:
        """Insert the palettized structure into ``model`` (in place) without running k-means.

        Call before the model is wrapped (DDP/FSDP) and before the optimizer is built. Attaching
        the same model again is a no-op.
        """
        if self.model is not None:
            if model is self.model:
                return
            raise RuntimeError("this Palettization is already attached to another model")
        if KMeansPalettizer._is_model_prepared(model):
            raise RuntimeError(f"{type(model).__name__} is already palettized (prepared by "
                               "coreai-opt); build a new model or reuse its Palettization")
        example_inputs = as_example_inputs(example_inputs)
        with distributed.agree("palettize setup"):  # a failure on any rank stops every rank
            self._use_settings_of_rank_zero()
            self._check_module_patterns(model)
            if self._model_factory is None:
                self._skeleton = _copy_for_export(model)
            self._insert_structure(model, example_inputs)
            self._check_palettizes_something()
            self._prepare_parameters()
        if distributed.rank() == 0:
            for name, reason in self.skipped.items():
                warnings.warn(f"palettize: {name} left dense: {reason}", PalettizationWarning,
                              stacklevel=2)

    def _insert_structure(self, model: nn.Module, example_inputs: tuple[Any, ...]) -> None:
        palettizer = KMeansPalettizer(model, self.config)
        palettizer._num_workers = int(self.settings["num_workers"])
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with quiet_prepare(model):
            self.skipped = compat.attach_structure(
                palettizer, tuple(_to_device(x, device) for x in example_inputs))
        self.model, self.palettizer = model, palettizer
        self.example_inputs = tuple(
            x.detach().cpu().clone() if isinstance(x, torch.Tensor) else x for x in example_inputs)
        self.tied = compat.tied_prefixes(model)
        if self.tied:
            model.register_load_state_dict_pre_hook(self._fill_tied_keys)

    def _prepare_parameters(self) -> None:
        """Before the optimizer and DDP exist: the strategies' parameters, and dense weights that
        never get a gradient frozen, so plain DDP does not wait for them ("Expected to have
        finished reduction in the prior iteration")."""
        strategies.prepare_parameters(self.tensors())
        if self.frozen_weights:
            for tensor in self.tensors():
                tensor.original.requires_grad_(False)

    def _check_palettizes_something(self) -> None:
        if not self.tensors():
            raise self._nothing_palettized(self.model, self.skipped)

    def _nothing_palettized(self, model: nn.Module, skipped: Mapping[str, str]) -> Exception:
        return PalettizeConfigError(
            f"{self.key}: the config palettizes no weight of {type(model).__name__} "
            f"({self._what_was_asked()}); check {self.key}.preset/overrides/modules"
            + (f" (skipped: {', '.join(skipped)})" if skipped else ""))

    @property
    def schedule_start(self) -> int:
        return int((self.settings.get("schedule") or {}).get("start_step") or 0)

    @property
    def training_strategy(self) -> str:
        return training_name(self.settings["training"])

    @property
    def frozen_weights(self) -> bool:
        """Dense weights never get a gradient: ``frozen`` or ``lut`` strategy, no warm-up."""
        return self.training_strategy in ("frozen", "lut") and not self.schedule_start

    @property
    def needs_unused_parameter_detection(self) -> bool:
        """Weights that train dense during a warm-up stop getting gradients when palettization
        switches on: DDP must then run with ``find_unused_parameters=True``."""
        return self.training_strategy in ("frozen", "lut") and self.schedule_start > 0

    def _use_settings_of_rank_zero(self) -> None:
        """One resolved config on every rank (lazily resolved interpolations such as ``${now:}``
        may differ per process): rank 0's settings win, with a warning naming what differed."""
        ours = {k: v for k, v in self.settings.items() if k != "_config"}
        theirs = distributed.broadcast_object(ours)
        if theirs == ours:
            return
        differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        log.warning("palettize: rank %d had different settings (%s); using rank 0's",
                    distributed.rank(), ", ".join(differing))
        self.settings = {**theirs, **({"_config": self.settings["_config"]}
                                      if "_config" in self.settings else {})}
        self.config = config_from_settings(self.settings, key=self.key)

    def check(self, model: nn.Module, example_inputs: Any) -> None:
        """Validate the config against ``model`` without touching it (a dry run on a copy).

        Raises ``PalettizeConfigError`` for a name regex that matches no module and for a config
        that palettizes no weight. Use it to fail before any training starts.
        """
        self._check_module_patterns(model)
        copy_ = materialize(meta_skeleton(model))
        palettizer = KMeansPalettizer(copy_, self.config)
        with quiet_prepare(copy_):
            skipped = compat.attach_structure(palettizer, as_example_inputs(example_inputs))
        if not compat.fake_palettized_tensors(copy_):
            raise self._nothing_palettized(model, skipped)

    def _fill_tied_keys(self, module, state_dict, prefix, *args) -> None:
        """Checkpoints may hold a tied weight's palettized state once (HF drops duplicates):
        copy it to the alias keys, or the alias would load stale indices and re-derive them."""
        for alias, source in self.tied.items():
            for key in [k for k in state_dict if k.startswith(prefix + source)]:
                state_dict.setdefault(prefix + alias + key[len(prefix + source):], state_dict[key])

    def _what_was_asked(self) -> str:
        s = self.settings
        parts = [f"preset={s['preset']}"] if s.get("preset") is not None else []
        parts += [f"overrides.{k}={v}" for k, v in (s["overrides"] or {}).items()
                  if v != "inherit"]
        parts += [f"modules.{k}={v}" for k, v in (s["modules"] or {}).items()]
        return ", ".join(parts) or "a coreai-opt config"

    def _check_module_patterns(self, model: nn.Module) -> None:
        names = [n for n, _ in model.named_modules() if n]
        for pattern in self.settings["modules"] or {}:
            if not any(re.fullmatch(pattern, n) for n in names):
                sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                raise PalettizeConfigError(
                    f"{self.key}.modules.{pattern}: matches no module of {type(model).__name__} "
                    f"(re.fullmatch); module names look like: {sample}")

    def cluster(self) -> None:
        """Run k-means for every palettized weight that has no current centroids: once across
        all ranks (``palettize.distributed``), every rank ending with the identical result."""
        self._require_attached()
        pending = [t for t in self.tensors() if not t.initialized]
        if pending:
            self.cluster_stats = distributed.cluster(
                self.palettizer, pending, self.settings["distributed"])
            strategies.after_cluster(pending)
        compat.finish_clustering(self.palettizer)

    def ensure_clustered(self, resumed: bool = False) -> None:
        """Before training: run k-means unless a checkpoint restored the palettized state.

        A resumed run, or a model holding state for only some weights (a partial checkpoint
        load such as HF's ``strict=False``), must have everything restored: otherwise this
        raises, naming the weights, instead of silently re-clustering or re-deriving them.
        """
        self._require_attached()
        restored = [t.initialized and t.has_indices for t in self.tensors()]
        if resumed or any(restored):
            if not all(restored):
                self.verify_restored()
            return
        self.cluster()

    def prepare(
        self,
        model: nn.Module,
        example_inputs: Any,
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> nn.Module:
        """Attach, then load ``state_dict`` (skipping k-means) or cluster. Returns ``model``."""
        self.attach(model, example_inputs)
        if state_dict is not None:
            model.load_state_dict(state_dict)
            self.verify_restored()
        else:
            self.cluster()
        return model

    def verify_restored(self) -> None:
        """Raise unless every palettized weight got its centroids and indices from a loaded
        state (a partial load, e.g. HF's ``strict=False``, must not pass silently)."""
        missing = [t.name for t in self.tensors() if not (t.initialized and t.has_indices)]
        if missing:
            raise RuntimeError(
                f"the loaded checkpoint has no palettized state (centroids/indices) for "
                f"{len(missing)} weight(s): {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}; it does not come from this config")
        self.restored = True

    def _require_attached(self) -> None:
        if self.palettizer is None:
            raise RuntimeError("call attach() or prepare() first")

    # ---------------------------------------------------------------- training

    @property
    def step(self) -> int:
        return compat.get_step(self.palettizer) if self.palettizer is not None else 0

    def start_training(self, step: int = 0) -> None:
        """Enter coreai-opt's training mode at optimizer step ``step`` (resume-aware)."""
        self._require_attached()
        if self._training is not None:
            return
        compat.set_step(self.palettizer, step)
        self._training = self.palettizer.training_mode()
        self._training.__enter__()

    def sync_step(self, step: int) -> None:
        """Advance the PAT schedule to optimizer step ``step``: call after optimizer steps.

        When the schedule switches palettization on, coreai-opt would re-cluster inside the next
        forward on every rank; the engine clusters the switched weights here instead, once.
        """
        if self.palettizer is not None and compat.get_step(self.palettizer) != step:
            compat.set_step(self.palettizer, step)
            tensors = self.tensors()
            switched_on = [t for t in tensors if not t.initialized]
            if switched_on:
                self.cluster_stats = distributed.cluster(
                    self.palettizer, switched_on, self.settings["distributed"])
                strategies.after_cluster(switched_on)
            strategies.after_optimizer_step(tensors, step)

    def stop_training(self) -> None:
        """Leave training mode (restores the model's train/eval state)."""
        if self._training is not None:
            strategies.training_finished(self.tensors())
            context, self._training = self._training, None
            context.__exit__(None, None, None)

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides the model's own state: the PAT step and config."""
        return {"version": 1, "step": self.step, "config": config_to_yaml(self.config)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()``. The model's tensors come from its own state dict."""
        saved = state.get("config")
        if saved is not None and saved != config_to_yaml(self.config):
            raise PalettizeConfigError(
                f"{self.key}: the checkpoint was palettized with a different config than this "
                "run's; resume with the same palettize settings")
        if self.palettizer is not None:
            compat.set_step(self.palettizer, int(state.get("step", 0)))
        self.restored = True

    # ---------------------------------------------------------------- report and export

    def report(self) -> CompressionReport:
        self._require_attached()
        return build_report(self.model, self.skipped)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state as coreai-opt knows it (without the strategies' extra tensors)."""
        extra = set(strategies.strategy_state_keys(self.model))
        return {k: v for k, v in self.model.state_dict().items() if k not in extra}

    def new_model(self) -> nn.Module:
        """A new, unprepared instance of the model's architecture (for export)."""
        if self._model_factory is not None:
            with torch.random.fork_rng(devices=[]):
                return self._model_factory()
        if self._skeleton is None:
            raise RuntimeError("attach() a model first")
        return materialize(self._skeleton)

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
        """
        self._require_attached()
        export_settings = self.settings["export"]
        directory = directory or export_settings.get("dir")
        if directory is None:
            raise ValueError("no export directory: pass one or set palettize.export.dir")
        result = export_palettized(
            self.model,
            config=self.config,
            example_inputs=self.example_inputs,
            directory=directory,
            factory=self._export_factory(configure_model),
            formats=formats if formats is not None else export_settings["formats"],
            report=self.report(),
            state_dict=self.export_state_dict(),
            metadata=metadata,
            extra_files=extra_files,
            strict=strict,
        )
        log.info("palettize: exported %s to %s", ", ".join(result.written) or "nothing",
                 result.directory)
        return result

    def _export_factory(self, configure: Callable[[nn.Module], None] | None):
        def build() -> nn.Module:
            model = self.new_model()
            _disable_kv_cache(model)
            if configure is not None:
                configure(model)
            return model

        return build

    def finish_training(self, default_export_dir: str | Path, **export_kwargs: Any
                        ) -> ExportResult | None:
        """End of training: leave training mode, then export on rank 0 (if any format is set)
        to ``palettize.export.dir`` or ``default_export_dir``. Returns the result on rank 0."""
        self.stop_training()
        if not self.settings["export"]["formats"]:
            return None
        directory = self.settings["export"].get("dir") or default_export_dir
        return self.export_on_main(directory, **export_kwargs)

    def export_on_main(self, directory: str | Path | None = None, **kwargs: Any) -> ExportResult | None:
        """``export`` on global rank 0 only; every rank waits at a barrier afterwards."""
        result = None
        try:
            if distributed.rank() == 0:
                result = self.export(directory, **kwargs)
        finally:
            distributed.barrier()
        return result
