"""The recipe runner: ``finetune`` loads, palettizes, fine-tunes, exports and evaluates one recipe
and returns (and writes) a ``FinetuneResult``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .checks import thaw
from .hub import local_only
from .loading import load_recipe
from .schema import RECIPE_FILE, Recipe, last_checkpoint
from .tasks import Metrics, TaskRun, copy_export_files, load_task

RESULTS_FILE = "finetune_results.json"


class RecipeSnapshotCallback(TrainerCallback):
    """Writes the resolved recipe into every checkpoint directory (main process only)."""

    def __init__(self, recipe_yaml: str) -> None:
        self.recipe_yaml = recipe_yaml

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            (checkpoint / RECIPE_FILE).write_text(self.recipe_yaml)


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Perplexity:
    """A held-out metric of the dense, freshly palettized and fine-tuned model (None: not
    measured, e.g. ``palettized`` on resume or no held-out data). ``FinetuneResult.perplexity``
    is the perplexity (speech-to-text: the decoder's, teacher-forced on the reference
    transcripts); ``FinetuneResult.wer`` the word error rate of greedy transcription."""

    dense: float | None
    palettized: float | None
    finetuned: float | None

    @classmethod
    def of(cls, key: str, *stages: Metrics | None) -> Perplexity:
        return cls(*((stage or {}).get(key) for stage in stages))


_LIVE = ("report", "trainer")


@dataclass(frozen=True)
class FinetuneResult:
    """What a run measured and wrote. ``to_json()`` is the ``finetune_results.json`` content;
    ``report`` (``CompressionReport``) and ``trainer`` (its ``model`` is the fine-tuned palettized
    model) are live objects, not serialised."""

    recipe: str
    perplexity: Perplexity
    prepare_seconds: float | None  # k-means; None when resumed from a checkpoint
    train_seconds: float | None
    global_step: int
    resumed_from: str | None
    train_blocks: int
    eval_blocks: int
    seq_len: int
    bits_per_weight: float
    compression_ratio: float
    palettized_layers: int
    dense_layers: int
    dense_bytes: int
    palettized_bytes: int
    output_dir: str
    export_dir: str | None
    artifacts: dict[str, str]
    artifact_bytes: dict[str, int | None]
    export_errors: dict[str, str]
    results_file: str | None = None
    task: str = "causal-lm"
    wer: Perplexity | None = None  # speech-to-text only
    report: Any = field(default=None, repr=False, compare=False)
    trainer: Any = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready dict (``results_file`` only once written)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in _LIVE}
        out["perplexity"] = dataclasses.asdict(self.perplexity)
        out["wer"] = dataclasses.asdict(self.wer) if self.wer is not None else None
        for name in ("artifacts", "artifact_bytes", "export_errors"):
            out[name] = dict(out[name])
        if out["results_file"] is None:
            del out["results_file"]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FinetuneResult:
        """Back from ``to_json()`` (or a ``finetune_results.json`` file's content)."""
        wer = data.get("wer")
        return cls(**{**data, "perplexity": Perplexity(**data["perplexity"]),
                      "wer": Perplexity(**wer) if wer is not None else None})

    def summary(self) -> str:
        """A few lines for the end of a run: perplexities, k-means time, size, where things are."""

        def ppl(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.2f}"

        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.1f} %"

        p, w = self.perplexity, self.wer
        lines = [
            f"{self.recipe}: held-out perplexity dense {ppl(p.dense)} | palettized "
            f"{ppl(p.palettized)} | fine-tuned {ppl(p.finetuned)} "
            + (f"({self.eval_blocks} blocks x {self.seq_len} tokens)" if w is None else
               f"(decoder, {self.eval_blocks} utterances)"),
            *([f"{self.recipe}: held-out WER dense {pct(w.dense)} | palettized "
               f"{pct(w.palettized)} | fine-tuned {pct(w.finetuned)}"] if w is not None else []),
            ("k-means (prepare) skipped: resumed from " + str(self.resumed_from)
             if self.prepare_seconds is None
             else f"k-means (prepare) {self.prepare_seconds:.2f} s")
            + (f"; training {self.train_seconds:.1f} s, {self.global_step} steps"
               if self.train_seconds is not None else ""),
            f"{self.palettized_layers} weights palettized, {self.dense_layers} dense; "
            f"{self.bits_per_weight:.3f} bits/weight; {self.dense_bytes / 1024:.1f} KiB "
            f"-> {self.palettized_bytes / 1024:.1f} KiB ({self.compression_ratio:.2f}x)",
        ]
        for fmt, path in self.artifacts.items():
            size = self.artifact_bytes.get(fmt)
            lines.append(f"  {fmt}: {path}" + (f" ({size / 1024:.1f} KiB)" if size else ""))
        for fmt, error in self.export_errors.items():
            lines.append(f"  {fmt}: not written ({error})")
        if self.results_file:
            lines.append(f"  results: {self.results_file}")
        return "\n".join(lines)


def format_summary(results: FinetuneResult | Mapping[str, Any]) -> str:
    """``results.summary()``; also takes the JSON dict (``finetune_results.json``)."""
    if not isinstance(results, FinetuneResult):
        results = FinetuneResult.from_json(results)
    return results.summary()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def finetune(source: str | os.PathLike | Mapping[str, Any] | Recipe,
             overrides: Sequence[str] = ()) -> FinetuneResult:
    """Run a recipe: validate, load model and data, palettize, fine-tune, export, evaluate.

    ``source`` is anything ``load_recipe`` reads (then ``overrides`` apply) or a ``Recipe``
    (validated when it was built). Returns the ``FinetuneResult`` and, on the main process,
    writes its JSON to ``<export dir>/finetune_results.json`` (the output dir when nothing is
    exported). A failure before training ends removes the directories the run created empty.
    """

    recipe = source if isinstance(source, Recipe) else load_recipe(source, overrides)
    task = load_task(recipe, local_only(recipe))
    dense = task.evaluate(task.model)

    with _remove_created_dirs_on_failure(recipe.output_dir, recipe.export_dir):
        callback = palettization_callback(recipe, task)
        trainer = build_trainer(recipe, task, callback)
        resume = recipe.resume_from_checkpoint
        if resume is True:
            resume = last_checkpoint(recipe.output_dir)
        prepare_seconds = palettized = None
        if not resume:  # on resume, train() loads the checkpoint's LUTs and indices instead
            prepare_seconds = time_kmeans(callback)
            palettized = task.evaluate(trainer.model)
        train_output = trainer.train(resume_from_checkpoint=resume)
    finetuned = task.evaluate(trainer.model)

    result = collect_results(
        recipe, trainer, callback, Perplexity.of("perplexity", dense, palettized, finetuned),
        prepare_seconds=prepare_seconds, train_seconds=train_output.metrics.get("train_runtime"),
        resumed_from=resume or None, task=task,
        wer=(Perplexity.of("wer", dense, palettized, finetuned)
             if recipe.model.task == "speech-to-text" else None))
    return write_results(result) if recipe.training_args.should_save else result


def palettization_callback(recipe: Recipe, task: TaskRun | None = None) -> Any:
    """The recipe's ``PalettizationTrainerCallback``: its palettize section, export dir and
    formats, the task's example inputs, and the resolved recipe (and the task's files, e.g. the
    tokenizer) written beside the export."""
    from ..integrations.hf import PalettizationTrainerCallback

    recipe_yaml = recipe.to_yaml()
    files = task.export_files if task is not None else {}

    def extra_files(directory: Path) -> None:
        (directory / RECIPE_FILE).write_text(recipe_yaml)
        copy_export_files(files, directory)

    return PalettizationTrainerCallback(
        thaw(recipe.palettize), export_dir=recipe.export_dir,
        export_formats=list(recipe.export.formats), extra_export_files=extra_files,
        example_inputs=task.example_inputs if task is not None else None)


def build_trainer(recipe: Recipe, task: TaskRun, callback: Any) -> Any:
    """The HF ``Trainer`` with ``callback`` attached: the palettized structure is built here
    (before ``train()``), and the callback logs through this ``Trainer``."""
    from transformers import Trainer

    from ..settings.schema import PalettizeConfigError

    try:
        trainer = Trainer(model=task.model, args=recipe.training_args,
                          train_dataset=task.train_dataset, eval_dataset=task.eval_dataset,
                          data_collator=task.data_collator, processing_class=task.processing_class,
                          callbacks=[callback, RecipeSnapshotCallback(recipe.to_yaml())])
        callback.attach_to_trainer(trainer)
    except PalettizeConfigError as e:  # e.g. a modules regex that matches no module
        raise e.with_root("recipe.palettize") from None
    return trainer


def time_kmeans(callback: Any) -> float:
    """Run k-means on the attached model now; its wall time in seconds."""
    started = time.perf_counter()
    callback.engine.cluster()
    return time.perf_counter() - started


def collect_results(recipe: Recipe, trainer: Any, callback: Any, perplexities: Perplexity, *,
                    prepare_seconds: float | None, train_seconds: float | None,
                    resumed_from: str | None, task: TaskRun, wer: Perplexity | None = None,
                    ) -> FinetuneResult:
    """The ``FinetuneResult`` of a finished run: sizes from the compression report, artifacts
    and errors from the export."""
    report = callback.report or callback.engine.report()
    exported = callback.export_result
    written = dict(exported.written) if exported else {}
    return FinetuneResult(
        recipe=recipe.name, perplexity=perplexities, prepare_seconds=prepare_seconds,
        train_seconds=train_seconds, global_step=trainer.state.global_step,
        resumed_from=resumed_from, train_blocks=task.train_count, eval_blocks=task.eval_count,
        seq_len=task.seq_len, bits_per_weight=report.bits_per_weight,
        compression_ratio=report.compression_ratio, palettized_layers=len(report.layers),
        dense_layers=len(report.dense_layers), dense_bytes=report.dense_bytes,
        palettized_bytes=report.palettized_bytes, output_dir=str(recipe.output_dir),
        export_dir=str(exported.directory) if exported else None,
        artifacts={fmt: str(path) for fmt, path in written.items()},
        artifact_bytes={fmt: exported.artifact_bytes.get(fmt) for fmt in written},
        export_errors=dict(exported.errors) if exported else {},
        task=recipe.model.task, wer=wer, report=report, trainer=trainer)


def write_results(result: FinetuneResult) -> FinetuneResult:
    """Write ``finetune_results.json`` (atomically) into the export dir, else the output dir;
    returns the result with ``results_file`` set."""
    directory = Path(result.export_dir or result.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RESULTS_FILE
    result = dataclasses.replace(result, results_file=str(path))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    os.replace(tmp, path)
    return result


@contextlib.contextmanager
def _remove_created_dirs_on_failure(*paths: Path) -> Iterator[None]:
    """On an exception, remove each of ``paths`` and the parents the run created, if empty."""
    keep = [(path.absolute(), _existing_ancestor(path)) for path in paths]
    try:
        yield
    except BaseException:  # e.g. a modules regex that matches no module
        for path, ancestor in keep:
            with contextlib.suppress(OSError):
                while path != ancestor and path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
                    path = path.parent
        raise


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path
