"""Lightning adapter: ``PalettizationCallback`` maps Lightning hooks onto the ``Palettization`` engine.

Hook order (``Trainer._run``): ``setup`` -> ``configure_model`` -> checkpoint restore (model
weights, then callback state) -> ``strategy.setup`` (DDP wrap, optimizers) -> ``on_fit_start``.
So the palettized structure is built in ``setup(stage="fit")`` (or right after the module's own
``configure_model``, when it overrides it), before wrapping and before the optimizer exists;
k-means runs in ``on_fit_start`` only if no checkpoint restored the state. Until then, reading a
palettized weight returns the dense Parameter (no lazy k-means).

``validate``/``test``/``predict`` with ``ckpt_path``: the structure is built when the checkpoint's
weights are loaded and they are palettized, so a fresh process restores them without k-means.

A LightningModule without ``forward`` (``training_step`` calls ``self.model(...)``, as Lightning
allows) is traced, palettized and exported through its network: the one child module that holds
all of its parameters, with the batch mapped onto that child's forward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from .. import _coreai_compat as compat
from ..accuracy.calibration import CalibrationData
from ..core import integrity
from ..core._inputs import CallSpec
from ..engine import distributed, fsdp
from ..engine.lifecycle import Palettization, as_example_inputs
from ..export.report import CompressionReport
from ..export.writer import ExportResult
from ..settings.schema import ConfigSource, PalettizeConfigError
from ._batches import call_spec_from_batch

__all__ = ["PalettizationCallback", "default_example_inputs", "traced_module"]


def _check_strategy(trainer: pl.Trainer, engine: Palettization) -> str:
    """Fail before training for strategies that cannot work; switch DDP to
    ``find_unused_parameters=True`` where the schedule needs it. Returns the strategy's kind."""
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    strategy = trainer.strategy
    kind = ("fsdp" if isinstance(strategy, FSDPStrategy)
            else "deepspeed" if isinstance(strategy, DeepSpeedStrategy)
            else "model_parallel" if isinstance(strategy, ModelParallelStrategy)
            else "ddp" if isinstance(strategy, DDPStrategy) else "single")
    ddp_kwargs = _ddp_kwargs(strategy) if kind == "ddp" else {}
    if distributed.check_parallelism(
            engine.settings, kind, what=f"the {type(strategy).__name__}",
            find_unused=ddp_kwargs.get("find_unused_parameters"),
            fix="use strategy='ddp_find_unused_parameters_true'"):
        ddp_kwargs["find_unused_parameters"] = True
    return kind


def _ddp_kwargs(strategy: Any) -> dict[str, Any]:
    """The keyword arguments DDPStrategy passes to ``DistributedDataParallel`` (Lightning-private,
    the only way to change them after the strategy was built; tested against lightning 2.x)."""
    return strategy._ddp_kwargs


def _first_training_batch(trainer: pl.Trainer) -> Any:
    """The first batch of the fit loop's train dataloader (Lightning-private ``_data_source``,
    the only way to reach it from ``setup``; tested against lightning 2.x)."""
    return next(iter(trainer.fit_loop._data_source.dataloader()))


def _first_batch_of_stage(trainer: pl.Trainer, stage: str) -> Any:
    """The first batch of ``stage``'s dataloader (``"fit"``: train; ``"validate"``, ``"test"``,
    ``"predict"``: that loop's), through the loop's Lightning-private ``_data_source`` as
    ``_first_training_batch`` does; tested against lightning 2.x. A list of dataloaders: the first."""
    loops = {"fit": trainer.fit_loop, "validate": trainer.validate_loop,
             "test": trainer.test_loop, "predict": trainer.predict_loop}
    loop = loops[getattr(stage, "value", stage)]  # a TrainerFn or its string
    loaders = loop._data_source.dataloader()
    if isinstance(loaders, (list, tuple)) and loaders and not isinstance(loaders[0], torch.Tensor):
        loaders = loaders[0]
    return next(iter(loaders))


def _replace_method(module: object, name: str, replacement: Callable[..., Any]
                    ) -> Callable[[], None]:
    """Set ``replacement`` as ``module``'s instance attribute ``name``; returns the undo.

    Lightning calls hooks as ``getattr(pl_module, name)`` (call.py). No ``functools.wraps``:
    ``is_overridden`` follows ``__wrapped__`` and would then skip the hook."""
    had, previous = name in vars(module), vars(module).get(name)
    object.__setattr__(module, name, replacement)

    def undo() -> None:
        if vars(module).get(name) is not replacement:
            return  # replaced again since: leave it alone
        if had:
            object.__setattr__(module, name, previous)
        else:
            object.__delattr__(module, name)

    return undo


_FIX = ("set LightningModule.example_input_array, or pass example_inputs= or example_inputs_fn= "
        "to PalettizationCallback")


def traced_module(pl_module: pl.LightningModule) -> nn.Module:
    """The module the plugin calls, palettizes and exports: ``pl_module`` if it defines
    ``forward``; else its one child that holds all of its parameters (``self.model``).

    Raises:
        PalettizeConfigError: no ``forward`` and no such child (names the fix).
    """
    if is_overridden("forward", pl_module, parent=pl.LightningModule):
        return pl_module
    owners = [(name, child) for name, child in pl_module.named_children()
              if next(child.parameters(), None) is not None]
    if len(owners) == 1 and next(pl_module.parameters(recurse=False), None) is None:
        return owners[0][1]
    found = ", ".join(name for name, _ in owners) or "none"
    raise PalettizeConfigError(
        "", f"{type(pl_module).__name__} has no forward() and its parameters are not all in one "
        f"child module (children with parameters: {found}): define forward(), or keep the "
        "network in one attribute such as self.model")


def default_example_inputs(batch: Any, module: nn.Module | None = None) -> CallSpec:
    """First batch -> the call of ``module.forward`` one sample of it makes: tuple/list batches
    fill the forward's required positional parameters (``(x, y)`` -> ``forward(x)``,
    ``(inputs, target)`` -> ``forward(inputs, target)``), dict batches its keyword parameters
    (labels dropped). Without ``module``: the first element of a tuple batch, ``input_ids`` of
    a dict batch (the 0.1 behaviour).

    Raises:
        ExampleInputsError: the batch does not fit the forward's signature (names the fix).
    """
    if module is not None:
        return call_spec_from_batch(module, batch, fix=_FIX)
    if isinstance(batch, torch.Tensor):
        return CallSpec((batch[:1],))
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return CallSpec((batch[0][:1],))
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        return CallSpec((batch["input_ids"][:1],))
    raise TypeError(f"cannot derive example inputs from a {type(batch).__name__} batch: {_FIX}")


class PalettizationCallback(Callback):
    """Palettization-aware training for a Lightning ``Trainer``, in one callback.

        Trainer(callbacks=[PalettizationCallback("w4", overrides={"linear": "w8"},
                                                 export_dir="out/")])

    Args:
        config: anything ``build_palettizer_config`` accepts (preset name, settings mapping or
            ``DictConfig``, coreai-opt YAML path, ``KMeansPalettizerConfig``).
        overrides / modules: per module type / per module-name regex (see ``settings``).
        export_dir: where the compressed model goes at the end of ``fit`` (default:
            ``<default_root_dir>/palettized``).
        export_formats: ``("coreai", "torch")`` by default; ``()`` disables the export.
        example_inputs: inputs of the tracing forwards (structure and export): a tensor or a
            tuple (positional), a mapping (keywords) or a ``CallSpec``. Default:
            ``example_input_array`` (a mapping is a keyword call, as Lightning makes it), else one
            sample of the first training batch mapped onto ``forward``'s parameters.
        example_inputs_fn: ``fn(first training batch) -> inputs`` replacing that mapping.
        model_factory: builds a new instance of the LightningModule for export (default: a
            zero-memory copy taken before prepare).

    A LightningModule without ``forward`` works too: the plugin traces, palettizes and exports
    the one child module that holds all its parameters (``self.model``), calling it with the
    batch mapped onto that child's forward (``(x, y)`` -> ``model(x)``).
        strict_export: raise if a format cannot be written (default: log the error).
        **fields: other ``palettize`` keys (``schedule``, ``training``, ``num_workers``,
            ``distributed``).
    """

    def __init__(
        self,
        config: ConfigSource | None = "w4",
        *,
        overrides: Mapping[str, Any] | None = None,
        modules: Mapping[str, Any] | None = None,
        export_dir: str | Path | None = None,
        export_formats: Sequence[str] | None = None,
        example_inputs: Any = None,
        example_inputs_fn: Callable[[Any], Any] = default_example_inputs,
        model_factory: Callable[[], nn.Module] | None = None,
        strict_export: bool = False,
        log_metrics: bool = True,
        **fields: Any,
    ) -> None:
        self.engine = Palettization(config, overrides=overrides, modules=modules,
                                    model_factory=model_factory, export_dir=export_dir,
                                    export_formats=export_formats, **fields)
        self.example_inputs = example_inputs
        self.example_inputs_fn = example_inputs_fn
        self.strict_export = strict_export
        self.log_metrics = log_metrics
        self.report: CompressionReport | None = None
        self.export_result: ExportResult | None = None
        self._undo: list[Callable[[], None]] = []  # instance hooks this callback set
        self._checksums: dict[str, str] | None = None  # of the checkpoint being restored
        self._factory_wrapped = False

    # ------------------------------------------------------------------ structure

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.engine.attached:
            return
        if stage != "fit":
            self._attach_on_palettized_load(trainer, pl_module, stage)
            return
        kind = _check_strategy(trainer, self.engine)
        self.engine.check_export_dir(Path(trainer.default_root_dir) / "palettized")
        self._provide_calibration_data(trainer, pl_module)
        if kind == "model_parallel":  # before configure_model applies fully_shard
            fsdp.attach_before_sharding(self.engine, pl_module,
                                        lambda: self._attach(trainer, pl_module))
            self._shape_placeholders_on_load(trainer, pl_module)
        elif is_overridden("configure_model", pl_module):
            self._attach_after_configure_model(trainer, pl_module)
        else:
            self._attach(trainer, pl_module)

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                stage: str = "fit") -> None:
        network = traced_module(pl_module)
        factory = self.engine._model_factory
        if network is not pl_module and factory is not None and not self._factory_wrapped:
            # model_factory builds the LightningModule; the export needs its network.
            name = next(n for n, c in pl_module.named_children() if c is network)
            self.engine._model_factory = lambda: getattr(factory(), name)
            self._factory_wrapped = True
        self.engine.attach(network, self._resolve_example_inputs(trainer, pl_module, stage,
                                                                 network))

    def _shape_placeholders_on_load(self, trainer: pl.Trainer,
                                    pl_module: pl.LightningModule) -> None:
        """ModelParallelStrategy resume: the strategy loads the sharded checkpoint (after
        ``on_fit_start``) only into tensors of the saved shapes; right before it does, the
        placeholder LUTs take the checkpoint's shapes (a ``palettize.budget`` allocation)."""
        strategy = trainer.strategy
        original = strategy.load_checkpoint
        network = self.engine.model
        prefix = next(name for name, m in pl_module.named_modules() if m is network)
        keys = f"state_dict.{prefix}." if prefix else "state_dict."

        def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
            fsdp.shape_placeholders_like(self.engine.tensors(), checkpoint_path, keys)
            return original(checkpoint_path, *args, **kwargs)

        self._undo.append(_replace_method(strategy, "load_checkpoint", load_checkpoint))

    def _attach_after_configure_model(self, trainer: pl.Trainer,
                                      pl_module: pl.LightningModule) -> None:
        """Layers may exist only after ``configure_model``, which Lightning calls after every
        callback ``setup`` and before DDP wrap/``configure_optimizers``, with no callback hook in
        between: wrap this instance's ``configure_model`` to attach right after it, once."""
        original = pl_module.configure_model

        def configure_model_then_attach() -> None:
            try:
                original()
                if not self.engine.attached:
                    self._attach(trainer, pl_module)
            finally:
                undo()

        undo = _replace_method(pl_module, "configure_model", configure_model_then_attach)
        self._undo.append(undo)

    def _attach_on_palettized_load(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                   stage: str) -> None:
        """``validate``/``test``/``predict(ckpt_path=...)`` load the weights after ``setup`` and
        ``configure_model``: when the state dict being loaded is palettized, build the structure
        first, then verify the load restored every weight (no k-means). A dense state dict loads
        into the dense model as before.

        The instance's ``load_state_dict`` is wrapped rather than a root load pre-hook used: a
        pre-hook that attaches a model with tied weights would register the engine's own pre-hook
        while torch iterates over them ("OrderedDict mutated during iteration")."""
        original = pl_module.load_state_dict

        def load_state_dict(state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
            if (self.engine.attached or compat.is_prepared(pl_module)  # e.g. by an earlier fit
                    or not compat.is_palettized_state(state_dict)):
                return original(state_dict, *args, **kwargs)
            self._attach(trainer, pl_module, stage)
            result = original(state_dict, *args, **kwargs)
            self.engine.ensure_clustered(expect_restored=True)
            return result

        self._undo.append(_replace_method(pl_module, "load_state_dict", load_state_dict))

    def _provide_calibration_data(self, trainer: pl.Trainer, pl_module: pl.LightningModule
                                  ) -> None:
        """``palettize.calibration``: the loss is ``training_step``'s (eval mode, batches moved by
        the strategy, the precision plugin's autocast; ``self.log`` is a no-op meanwhile); the
        data is the train dataloader's dataset and collate_fn (see ``calibration.py``)."""
        if self.engine.settings.calibration is None:
            return
        if not pl_module.automatic_optimization:
            raise PalettizeConfigError(
                "calibration", "needs the training_step loss of automatic optimization; this "
                "LightningModule optimizes manually: set palettize.calibration=null, or compute "
                "sensitivities with calibration.compute_sensitivities and save them at "
                "palettize.calibration.path")

        def no_log(*args: Any, **kwargs: Any) -> None:
            return None

        def loss(batch: Any, batch_idx: int) -> torch.Tensor:
            batch = trainer.strategy.batch_to_device(batch)
            # self.log fails outside the fit loop's result collection: a no-op meanwhile.
            undo = [_replace_method(pl_module, name, no_log) for name in ("log", "log_dict")]
            try:
                with trainer.precision_plugin.train_step_context():
                    out = pl_module.training_step(batch, batch_idx)
            finally:
                for restore in reversed(undo):
                    restore()
            out = out.get("loss") if isinstance(out, Mapping) else out
            if not isinstance(out, torch.Tensor):
                raise PalettizeConfigError("calibration", "training_step returned no loss tensor "
                                           f"(got {type(out).__name__})")
            return out

        def data() -> CalibrationData:
            loader = trainer.fit_loop._data_source.dataloader()  # as _first_training_batch
            if isinstance(loader, (Mapping, list, tuple)):
                raise PalettizeConfigError("calibration", "needs one train DataLoader; this "
                                           f"module returns a {type(loader).__name__} of them")
            return CalibrationData.from_loader(loss, loader)

        self.engine.calibration_data = data

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._undo_instance_hooks()

    def _undo_instance_hooks(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _resolve_example_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                stage: str = "fit", network: nn.Module | None = None) -> Any:
        if self.example_inputs is not None:
            return as_example_inputs(self.example_inputs)
        array = pl_module.example_input_array
        if array is not None:
            return as_example_inputs(array)
        # Iterating a shuffled loader draws from the global RNG: keep the user's stream intact.
        with torch.random.fork_rng(devices=[]):
            batch = (_first_training_batch(trainer) if stage == "fit"
                     else _first_batch_of_stage(trainer, stage))
        if self.example_inputs_fn is default_example_inputs:
            return default_example_inputs(batch, network if network is not None else pl_module)
        return as_example_inputs(self.example_inputs_fn(batch))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A restored checkpoint (model weights, then this callback's state) must hold the state.
        # Strategies that restore after setup (ModelParallelStrategy) restore after on_fit_start:
        # cluster at the sanity check or train start instead.
        if not trainer.strategy.restore_checkpoint_after_setup:
            self._cluster_and_report(trainer)

    def _cluster_and_report(self, trainer: pl.Trainer) -> None:
        if self.report is not None and self.engine.clustered:
            return
        self.engine.ensure_clustered()
        if self._checksums is not None:  # what the checkpoint recorded when it was saved
            integrity.verify_checksums(self.engine.tensors(), self._checksums,
                                       f"the checkpoint {trainer.ckpt_path}")
            self._checksums = None
        self.report = self.engine.report()
        self._log(trainer, self.report.metrics())

    @override
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._cluster_and_report(trainer)

    # ------------------------------------------------------------------ training

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._cluster_and_report(trainer)
        self.engine.start_training(step=trainer.global_step)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        self.engine.before_optimizer_step()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step counts optimizer steps, so gradient accumulation is handled.
        self.engine.after_optimizer_step(trainer.global_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.export_result = self.engine.finish_training(
            Path(trainer.default_root_dir) / "palettized", strict=self.strict_export)
        if self.export_result is not None:
            self.report = self.export_result.report
            self._log(trainer, self.export_result.metrics())

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.engine.stop_training()
        self._undo_instance_hooks()

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        if self.log_metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ checkpoint state

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self.engine.state_dict()
        if self.engine.clustered:  # sha256 of LUTs and indices, verified on resume
            state["checksums"] = integrity.state_checksums(self.engine.tensors())
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)
        self._checksums = state_dict.get("checksums")


# The documented path stays the callback's home in reprs, pickles and Hydra targets (the module
# itself lives in integrations/; ``coreai_palettize_plugins.integrations.lightning`` is the same module).
PalettizationCallback.__module__ = __name__.split(".")[0] + ".lightning"
