"""Hugging Face adapter: ``PalettizationTrainerCallback`` maps ``Trainer`` events onto the engine.

Order inside ``Trainer`` (transformers 5.x): ``__init__`` ends with ``on_init_end`` (the model is
built, not wrapped, no optimizer; the callback gets ``model`` and ``processing_class`` but not the
Trainer) -> ``train()``: checkpoint ``load_state_dict(strict=False)`` -> optimizer -> wrap (DDP)
-> ``on_train_begin`` (with ``train_dataloader``). So:

- ``on_init_end`` checks the parallel setup (``args`` + accelerate's state) and builds the
  palettized structure from example inputs it can get without data: ``example_inputs=``, else a
  tokenizer sample or ``model.dummy_inputs`` completed, else inputs sized by the model's config
  and forward signature (``_synthetic.py``: images, audio, both towers of contrastive models);
- ``on_train_begin`` runs k-means unless the checkpoint load restored the state (verified), and
  takes the export's example inputs from one sample of the train dataloader (no iteration, no RNG);
- ``on_save`` writes ``palettize_state.json`` (config, step, LUT/index checksums) into the
  checkpoint directory; a resume compares the config before the checkpoint's weights load
  (``integrity.watch_loads``) and the checksums and step in ``on_train_begin``;
- metrics are logged as ``Trainer.log`` logs them: appended to ``state.log_history`` and sent
  through the ``CallbackHandler``'s ``on_log`` to every callback, ``report_to`` backends included
  (they come before user callbacks, so a callback cannot add keys to the Trainer's own logs).
  No callback event receives the Trainer or its handler; the handler is the one object that
  lists this callback in its ``callbacks`` (found once with ``gc.get_referrers``, no frames).
  ``attach_to_trainer(trainer)`` is optional (then ``Trainer.log`` itself is used).
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..accuracy import adapters
from ..accuracy.calibration import CalibrationData, move_to_device
from ..core import integrity
from ..core._inputs import CallSpec
from ..engine import distributed, fsdp
from ..engine.lifecycle import Palettization, as_example_inputs
from ..export.report import CompressionReport
from ..export.writer import ExportResult
from ..settings.schema import ConfigSource, PalettizeConfigError
from ._batches import call_spec_from_batch
from ._hf_support import (
    declare_tied,
    disable_kv_cache,
    handler_of,
    kv_cache_disabled,
    parallelism,
    runs,
)
from ._synthetic import synthetic_candidates

__all__ = ["PalettizationTrainerCallback", "batch_to_example_inputs", "disable_kv_cache",
           "kv_cache_disabled"]

log = logging.getLogger(__name__)
_SAMPLE_TEXT = "Palettization keeps every weight as an index into a table."
_FIX = "pass example_inputs= or example_inputs_fn= to PalettizationTrainerCallback"


def batch_to_example_inputs(model: nn.Module, batch: Mapping[str, Any]) -> CallSpec:
    """A collated batch -> the call of ``model.forward`` one sample of it makes (a keyword
    ``CallSpec``): the forward's parameters the batch provides (main input, ``attention_mask``,
    ``pixel_values``, ``input_features``, ...; labels dropped), ``decoder_input_ids`` derived from
    ``labels`` with the model's own shift (its decoder start token without labels), and
    ``use_cache=False`` (torch.export cannot trace transformers' cache objects).

    Raises:
        ExampleInputsError: the batch does not fit the forward's signature (names the fix).
    """
    return call_spec_from_batch(model, batch, fix=_FIX)


class PalettizationTrainerCallback(TrainerCallback):
    """Palettization-aware training for a Hugging Face ``Trainer``, in one callback.

        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          callbacks=[PalettizationTrainerCallback("w4", overrides={"linear": "w8"},
                                                                  export_dir="out/")])
        trainer.train()

    Args:
        config / overrides / modules / **fields: as ``Palettization`` (the same ``palettize``
            schema as the Hydra group and recipes).
        export_dir: where the compressed model goes at the end of ``train`` (default:
            ``<output_dir>/palettized``); ``export_formats=()`` disables the export.
        example_inputs: inputs of the tracing forwards (structure and export): a tensor or a
            tuple (positional), a mapping (keywords) or a ``CallSpec``. Default: a tokenizer
            sample or ``model.dummy_inputs`` for the structure, one sample of the train
            dataloader for the export, each through ``example_inputs_fn``.
        example_inputs_fn: ``fn(model, collated batch) -> inputs`` (any of the above); the
            default maps the batch onto the forward's parameters (``batch_to_example_inputs``).
        model_factory: builds a new instance of the model for export (default: a zero-memory
            copy taken before prepare).
        extra_export_files: ``fn(tmp_dir)`` adding files to the export directory.
        strict_export: raise if a format cannot be written (default: log the error).

    Raises:
        PalettizeConfigError: a bad setting, FSDP/DeepSpeed, or a DDP setup that cannot work.
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
        example_inputs_fn: Callable[[nn.Module, Mapping[str, Any]], Any] = batch_to_example_inputs,
        model_factory: Callable[[], nn.Module] | None = None,
        extra_export_files: Callable[[Path], None] | None = None,
        strict_export: bool = False,
        **fields: Any,
    ) -> None:
        self.engine = Palettization(config, overrides=overrides, modules=modules,
                                    model_factory=model_factory, export_dir=export_dir,
                                    export_formats=export_formats, **fields)
        self.example_inputs = example_inputs
        self.example_inputs_fn = example_inputs_fn
        self.extra_export_files = extra_export_files
        self.strict_export = strict_export
        self.report: CompressionReport | None = None
        self.export_result: ExportResult | None = None
        self._trainer: weakref.ref | None = None
        self._handler: weakref.ref | None = None
        self._warned_no_handler = False
        self._train_loader: Any = None
        self._batch_size: int | None = None
        self._sharded = False  # accelerate FSDP2 (set by the parallelism check)

    @property
    def trainer(self) -> Trainer | None:
        return self._trainer() if self._trainer is not None else None

    # ------------------------------------------------------------------ structure

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, processing_class: Any = None,
                    **kwargs: Any) -> None:
        self._check_parallelism(args, model)
        if model is None or self.engine.attached:
            return
        inputs = self._inputs_without_data(model, processing_class)
        if inputs is None:
            raise PalettizeConfigError(
                "", f"no example inputs for {type(model).__name__}: its config sizes none of "
                "the forward's inputs (input_ids, pixel_values, input_features, input_values) "
                "and it has no dummy_inputs; pass example_inputs= to "
                "PalettizationTrainerCallback")
        self._attach(model, inputs)

    def attach_to_trainer(self, trainer: Trainer) -> PalettizationTrainerCallback:
        """Optional: give the callback its Trainer (metrics then go through ``Trainer.log``,
        ``palettize.calibration`` before ``train()`` uses its train dataset). Registers the
        callback if it was not passed to ``Trainer(callbacks=...)``, and builds the palettized
        structure now (from one train-dataset sample) if it is not built yet. Harmless when the
        callback was passed to ``Trainer(callbacks=...)``: everything works without it."""
        self._trainer = weakref.ref(trainer)
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._check_parallelism(trainer.args, trainer.model)
        if not self.engine.attached:
            inputs = self._inputs_from_dataset(trainer.model, trainer.train_dataset,
                                               trainer.data_collator)
            if inputs is None:
                inputs = self._inputs_without_data(trainer.model, trainer.processing_class)
            if inputs is None:
                raise TypeError("no example inputs: pass example_inputs= to "
                                "PalettizationTrainerCallback")
            self._attach(trainer.model, inputs)
        return self

    set_trainer = attach_to_trainer  # the name transformers' own callbacks use

    def _check_parallelism(self, args: TrainingArguments, model: nn.Module | None) -> None:
        """The parallelism rules and the export directory, before training."""
        kind, what, find_unused = parallelism(args, model)
        self._sharded = kind == "model_parallel"  # accelerate wraps the model with fully_shard
        distributed.check_parallelism(
            self.engine.settings, kind, what=what, find_unused=find_unused,
            fix="set TrainingArguments(ddp_find_unused_parameters=True)")
        self.engine.check_export_dir(Path(getattr(args, "output_dir", None) or ".") / "palettized")

    def _attach(self, model: nn.Module, example_inputs: Any) -> None:
        with kv_cache_disabled(model):
            self.engine.attach(model, example_inputs)
        if self._sharded:  # accelerate FSDP2: a sharded checkpoint loads only existing keys
            fsdp.placeholder_centroids(self.engine.tensors())
        self.engine.calibration_data = self._calibration_data
        if self.engine.tied and hasattr(model, "_tied_weights_keys"):
            declare_tied(model, self.engine.tied)

    def _inputs_without_data(self, model: nn.Module, tokenizer: Any) -> CallSpec | None:
        """``example_inputs=``, else a tokenizer sample or ``dummy_inputs`` completed with the
        other inputs the forward takes, else inputs sized by the config (``_synthetic.py``);
        where several candidates exist, the most complete one the forward runs on."""
        if self.example_inputs is not None:
            return as_example_inputs(self.example_inputs)
        main = getattr(model, "main_input_name", "input_ids")
        base: Mapping[str, Any] | None = None
        if main == "input_ids" and tokenizer is not None and callable(tokenizer):
            try:
                base = dict(tokenizer([_SAMPLE_TEXT], return_tensors="pt"))
            except Exception as e:  # a processor that takes no text
                log.debug("palettize: no tokenizer sample (%s)", e)
        dummy = getattr(model, "dummy_inputs", None)
        if base is None and isinstance(dummy, Mapping) and main in dummy:
            base = dict(dummy)
        specs = []
        for candidate in synthetic_candidates(model, base):
            try:
                specs.append(as_example_inputs(self.example_inputs_fn(model, candidate), model))
            except Exception as e:  # the next candidate may fit
                log.debug("palettize: structure inputs %s do not fit (%s)", list(candidate), e)
        if len(specs) > 1:
            for spec in specs:
                if runs(model, spec):
                    return spec
        return specs[0] if specs else None  # attach names the forward's error

    def _inputs_from_dataset(self, model: nn.Module, dataset: Any,
                             collate: Callable[[list[Any]], Any] | None) -> CallSpec | None:
        """One collated sample (``dataset[0]``: no iteration, so no RNG is drawn)."""
        if self.example_inputs is not None:
            return as_example_inputs(self.example_inputs)
        if (dataset is None or collate is None or not hasattr(dataset, "__getitem__")
                or isinstance(dataset, torch.utils.data.IterableDataset)):  # streamed: no [0]
            return None
        return as_example_inputs(self.example_inputs_fn(model, collate([dataset[0]])))

    # ------------------------------------------------------------------ training

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, train_dataloader: Any = None,
                       **kwargs: Any) -> None:
        if not self.engine.attached:
            raise PalettizeConfigError(
                "", "the palettized structure was not built (the callback was added after "
                "Trainer.__init__): pass it to Trainer(callbacks=...), or pass example_inputs= "
                "to PalettizationTrainerCallback")
        self._train_loader, self._batch_size = train_dataloader, args.per_device_train_batch_size
        if self._sharded and state.global_step == 0:
            # accelerate may have broadcast the placeholder LUTs as a state dict (rank 0's
            # copy, cpu_ram_efficient_loading): coreai-opt then marks them clustered
            fsdp.forget_placeholders(self.engine.tensors())
        # HF loaded any checkpoint with strict=False just before: verify, don't trust it.
        try:
            self.engine.ensure_clustered(expect_restored=state.global_step > 0)
        except integrity.IntegrityError:
            raise
        except RuntimeError as e:  # e.g. a PeftModel's checkpoint: transformers saves adapters only
            raise RuntimeError(f"{e}{adapters.resume_hint(self.engine.adapters)}") from e
        if state.global_step > 0:
            self._verify_resume(args, state)
        sample = self._inputs_from_dataset(self.engine.model,
                                           getattr(train_dataloader, "dataset", None),
                                           getattr(train_dataloader, "collate_fn", None))
        if sample is not None:
            self.engine.set_export_inputs(sample)
        elif state.is_world_process_zero:  # e.g. an IterableDataset: no dataset[0] to collate
            log.warning("palettize: the train dataset cannot be indexed, so the export traces the "
                        "structure's example inputs (%s); pass example_inputs= for the input "
                        "shape the exported model should take", self.engine.example_inputs.describe())
        self.engine.start_training(step=state.global_step)
        self.report = self.engine.report()
        self._log(args, state, control, self.report.metrics())

    def _calibration_data(self) -> CalibrationData:
        """``palettize.calibration``: ``Trainer.compute_loss`` (the model's own loss when the
        callback does not know its Trainer) on batches of the train dataloader's dataset and
        collate_fn; before ``train()`` (``engine.cluster()``), of the Trainer's train dataset
        with its collator (columns the model does not take removed, as the Trainer does)."""
        trainer, model = self.trainer, self.engine.model
        device = next(model.parameters()).device

        def loss(batch: Any, batch_idx: int) -> torch.Tensor:
            inputs = move_to_device(batch, device)
            if trainer is None:
                outputs = model(**inputs)
                return outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]
            with trainer.compute_loss_context_manager():
                return trainer.compute_loss(model, inputs)

        if self._train_loader is not None:
            return CalibrationData.from_loader(loss, self._train_loader, self._batch_size)
        if trainer is None or trainer.train_dataset is None:
            raise PalettizeConfigError(
                "calibration", "no training data yet: call callback.attach_to_trainer(trainer), "
                "or let Trainer.train() calibrate at its start")
        dataset, collate = trainer.train_dataset, trainer.data_collator
        try:  # transformers-private, mirrors Trainer._get_dataloader (tested against 5.x)
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = trainer._remove_unused_columns(dataset, description="calibration")
            else:
                collate = trainer._get_collator_with_removed_columns(collate, "calibration")
        except ImportError:
            collate = trainer._get_collator_with_removed_columns(collate, "calibration")
        return CalibrationData(loss=loss, loader=None, dataset=dataset, collate_fn=collate,
                               batch_size=trainer.args.per_device_train_batch_size)

    def _verify_resume(self, args: TrainingArguments, state: TrainerState) -> None:
        """The checkpoint's ``palettize_state.json`` (written by ``on_save``): config, step and
        LUT checksums against what was restored. The config was compared before the load when
        the load ran inside ``Trainer._load_from_checkpoint`` (``integrity.watch_loads``)."""
        directory = integrity.loaded_from(self.engine.model)
        checked_before = directory is not None and self.engine.settings.budget is None
        if directory is None and isinstance(args.resume_from_checkpoint, str):
            directory = args.resume_from_checkpoint
        if directory is None:
            candidate = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            directory = str(candidate) if candidate.is_dir() else None
        if directory is None:
            log.warning("palettize: resumed at step %d from a checkpoint this callback cannot "
                        "locate: its palettize config cannot be verified", state.global_step)
            return
        integrity.verify_record(directory, self.engine.tensors(), self.engine.config_yaml(),
                                config=not checked_before, luts=True, step=state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """Record the config, step and LUT checksums in the checkpoint just written, so a
        resume can verify them (HF checkpoints carry no callback state)."""
        if not args.should_save or not self.engine.attached or not self.engine.clustered:
            return
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if directory.is_dir():
            integrity.write_record(directory, state.global_step, self.engine.tensors(),
                                   self.engine.config_yaml(),
                                   budget=self.engine.settings.budget is not None)
        else:
            log.warning("palettize: no %s after a save: the checkpoint's palettize config is not "
                        "recorded (a resume will not verify it)", directory)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState,
                              control: TrainerControl, **kwargs: Any) -> None:
        self.engine.before_optimizer_step()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        # Called once per optimizer step (micro-batches of gradient accumulation are substeps).
        self.engine.after_optimizer_step(state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     processing_class: Any = None, **kwargs: Any) -> None:
        self.export_result = self.engine.finish_training(
            Path(args.output_dir) / "palettized",
            extra_files=lambda tmp: self._write_hf_files(tmp, self.engine.model, processing_class),
            configure_model=disable_kv_cache,
            strict=self.strict_export,
        )
        if self.export_result is not None:
            self.report = self.export_result.report
            self._log(args, state, control, self.export_result.metrics())

    def _write_hf_files(self, directory: Path, model: nn.Module, tokenizer: Any) -> None:
        """config.json (+ generation config, tokenizer): ``load_palettized(dir)`` needs no code."""
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config = copy.deepcopy(config)
            config.architectures = [type(model).__name__]  # as save_pretrained records it
            config.save_pretrained(directory)
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(directory)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(directory)
        if self.extra_export_files is not None:
            self.extra_export_files(directory)

    def _log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
             metrics: dict[str, float]) -> None:
        """As ``Trainer.log``: into ``state.log_history`` and through the handler's ``on_log``
        (every ``report_to`` backend, every callback)."""
        trainer = self.trainer
        if trainer is not None and trainer.state is state:
            trainer.log(dict(metrics))
            return
        logs = dict(metrics)
        if state.epoch is not None:
            logs["epoch"] = state.epoch
        state.log_history.append({**logs, "step": state.global_step})
        handler = self._handler() if self._handler is not None else None
        if handler is None or not any(c is self for c in handler.callbacks):
            handler = handler_of(self)
            self._handler = weakref.ref(handler) if handler is not None else None
        if handler is not None:
            handler.on_log(args, state, control, logs)
        elif not self._warned_no_handler and state.is_world_process_zero:
            log.warning("palettize: this callback is in no transformers CallbackHandler, so its "
                        "metrics reach trainer.state.log_history only")
            self._warned_no_handler = True


# The documented path stays the callback's home in reprs and pickles (the module itself lives in
# integrations/; ``coreai_palettize_plugins.integrations.hf`` is the same module).
PalettizationTrainerCallback.__module__ = __name__.split(".")[0] + ".hf"
