"""Hugging Face adapter: ``PalettizationTrainerCallback`` maps ``Trainer`` events onto the engine.

Order inside ``Trainer`` (transformers 5.x): ``__init__`` ends with ``on_init_end`` (the model is
built, not wrapped, no optimizer) -> ``train()``: checkpoint ``load_state_dict(strict=False)`` ->
optimizer -> wrap (DDP) -> ``on_train_begin``. So the palettized structure is built in
``on_init_end`` (or ``attach_to_trainer`` for a callback added later); k-means runs in
``on_train_begin`` only if the checkpoint load did not restore the state, which is verified.
"""

from __future__ import annotations

import copy
import re
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .engine import Palettization, as_example_inputs
from .export import ExportResult
from .report import CompressionReport
from .settings import ConfigSource, PalettizeConfigError

__all__ = ["PalettizationTrainerCallback", "batch_to_example_inputs"]



def batch_to_example_inputs(model: nn.Module, batch: Mapping[str, Any]) -> tuple[Any, ...]:
    """A collated keyword batch -> coreai-opt's positional inputs: the model's main input
    (``input_ids`` for language models), one sample."""
    name = getattr(model, "main_input_name", "input_ids")
    if name not in batch:
        raise TypeError(f"the batch has no {name!r} (keys: {sorted(batch)}): pass example_inputs= "
                        "or example_inputs_fn= to PalettizationTrainerCallback")
    return (torch.as_tensor(batch[name])[:1],)


def _calling_trainer() -> Trainer | None:
    """The ``Trainer`` whose ``__init__`` is running: ``on_init_end`` is not given it."""
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def _check_distributed_setup(trainer: Trainer, engine: Palettization) -> None:
    """Fail before training for setups that cannot work, with the fix."""
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        raise PalettizeConfigError(
            "palettize: FSDP and DeepSpeed are not supported (coreai-opt keeps palettization "
            "state in buffers they would shard or ignore); train with DDP (torchrun / accelerate "
            "multi-process without fsdp/deepspeed), see README 'Distributed'")
    handler = getattr(trainer.accelerator, "ddp_handler", None)
    find_unused = getattr(handler, "find_unused_parameters", None)
    if (engine.needs_unused_parameter_detection and trainer.args.world_size > 1
            and find_unused is False):
        raise PalettizeConfigError(
            "palettize.schedule.start_step: palettized weights stop getting gradients when "
            "palettization switches on, which DDP rejects without find_unused_parameters; set "
            "TrainingArguments(ddp_find_unused_parameters=True)")


class PalettizationTrainerCallback(TrainerCallback):
    """Palettization-aware training for a Hugging Face ``Trainer``, in one callback.

        Trainer(model=model, args=args, train_dataset=ds,
                callbacks=[PalettizationTrainerCallback("w4", overrides={"linear": "w8"},
                                                        export_dir="out/")])

    Args:
        config / overrides / modules / **fields: as ``Palettization`` (the same ``palettize``
            schema as the Hydra group and recipes).
        export_dir: where the compressed model goes at the end of ``train`` (default:
            ``<output_dir>/palettized``); ``export_formats=()`` disables the export.
        example_inputs: positional inputs for coreai-opt's tracing forward. Default: one sample
            of ``example_inputs_fn(collated batch)`` from the train dataset and data collator.
        model_factory: builds a new instance of the model for export (default: a zero-memory
            copy taken before prepare).
        extra_export_files: ``fn(tmp_dir)`` adding files to the export directory.
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

    # ------------------------------------------------------------------ structure

    @property
    def trainer(self) -> Trainer | None:
        return self._trainer() if self._trainer is not None else None

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        trainer = _calling_trainer()
        if trainer is not None:
            self.attach_to_trainer(trainer)
        elif model is not None and not self.engine.attached:
            self._attach(model, self._inputs_without_data(model, kwargs.get("processing_class")))

    def attach_to_trainer(self, trainer: Trainer) -> PalettizationTrainerCallback:
        """Build the palettized structure for ``trainer.model`` now (before ``train()``), taking
        example inputs from its train dataset and data collator. For a callback that was not
        passed to ``Trainer(callbacks=...)``: this also registers it."""
        self._trainer = weakref.ref(trainer)
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        _check_distributed_setup(trainer, self.engine)
        if not self.engine.attached:
            self._attach(trainer.model, self._inputs_from_trainer(trainer))
        return self

    def _attach(self, model: nn.Module, example_inputs: Any) -> None:
        self.engine.attach(model, example_inputs)
        if self.engine.tied and hasattr(model, "_tied_weights_keys"):
            # save_pretrained refuses shared tensors it was not told about: declare the tied
            # parametrization keys so it stores them once (the engine restores them on load).
            # Keys are regexes (re.search): one covers every tensor under the alias, those of the
            # training strategies (trainable LUTs) included.
            tied = dict(model._tied_weights_keys or {})
            tied.update({re.escape(alias) + ".+": source for alias, source in self.engine.tied.items()})
            model._tied_weights_keys = tied

    def _inputs_from_trainer(self, trainer: Trainer) -> tuple[Any, ...]:
        if self.example_inputs is not None:
            return as_example_inputs(self.example_inputs)
        dataset = trainer.train_dataset
        if dataset is None:
            return self._inputs_without_data(trainer.model, trainer.processing_class)
        batch = trainer.data_collator([dataset[0]])
        return as_example_inputs(self.example_inputs_fn(trainer.model, batch))

    def _inputs_without_data(self, model: nn.Module, tokenizer: Any) -> tuple[Any, ...]:
        if self.example_inputs is not None:
            return as_example_inputs(self.example_inputs)
        if tokenizer is not None and callable(tokenizer):
            batch = tokenizer(["Palettization keeps every weight as an index into a table."],
                              return_tensors="pt")
            return as_example_inputs(self.example_inputs_fn(model, batch))
        dummy = getattr(model, "dummy_inputs", None)
        if isinstance(dummy, Mapping):
            return as_example_inputs(self.example_inputs_fn(model, dummy))
        raise TypeError("no example inputs: pass example_inputs= to PalettizationTrainerCallback")

    # ------------------------------------------------------------------ training

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        # HF loaded any checkpoint with strict=False just before: verify, don't trust it.
        self.engine.ensure_clustered(resumed=state.global_step > 0)
        self.engine.start_training(step=state.global_step)
        self.report = self.engine.report()
        self._log(self.report.metrics())

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        # Called once per optimizer step (micro-batches of gradient accumulation are substeps).
        self.engine.sync_step(state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, processing_class: Any = None,
                     **kwargs: Any) -> None:
        self.export_result = self.engine.finish_training(
            Path(args.output_dir) / "palettized",
            extra_files=lambda tmp: self._write_hf_files(tmp, self.engine.model, processing_class),
            strict=self.strict_export,
        )
        if self.export_result is not None:
            self.report = self.export_result.report
            self._log(self.report.metrics())

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

    def _log(self, metrics: dict[str, float]) -> None:
        """Through ``Trainer.log``: ``report_to`` backends and ``state.log_history`` get them."""
        trainer = self.trainer
        if trainer is not None and trainer.state is not None:
            trainer.log(dict(metrics))

