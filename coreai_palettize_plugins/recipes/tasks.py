"""What a recipe's ``model.task`` loads and measures: the model, its datasets and collator, and
the held-out metrics (``perplexity`` for both tasks; ``wer`` for speech-to-text)."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checks import RecipeError
from .data import TokenBlocks, train_and_eval_blocks
from .hub import LocalOnly
from .modeling import build_model, load_tokenizer, perplexity
from .schema import Recipe, resolve_builtin

Metrics = dict[str, float | None]


@dataclass
class TaskRun:
    """A recipe's loaded model and data, and how to measure the model on the held-out set."""

    model: nn.Module
    processing_class: Any
    train_dataset: torch.utils.data.Dataset
    eval_dataset: torch.utils.data.Dataset | None
    data_collator: Callable[[list[Any]], Mapping[str, Any]] | None
    evaluate: Callable[[nn.Module], Metrics]
    seq_len: int
    example_inputs: Any = None
    export_files: dict[str, Path] = field(default_factory=dict)  # copied into the export dir

    @property
    def train_count(self) -> int:
        return len(self.train_dataset)

    @property
    def eval_count(self) -> int:
        return len(self.eval_dataset) if self.eval_dataset is not None else 0


def load_task(recipe: Recipe, local: LocalOnly) -> TaskRun:
    """Load the recipe's tokenizer, data and model (on ``training_args.device``) for its task."""
    if recipe.model.task == "speech-to-text":
        return _speech_to_text(recipe, local)
    return _causal_lm(recipe, local)


def _causal_lm(recipe: Recipe, local: LocalOnly) -> TaskRun:
    from transformers import default_data_collator, set_seed

    args = recipe.training_args
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.name_or_path,
                               local_files_only=local.tokenizer)
    train_blocks, eval_blocks = train_and_eval_blocks(recipe.data, tokenizer,
                                                      local_files_only=local.dataset)
    set_seed(args.seed)
    model = build_model(recipe.model, tokenizer, local_files_only=local.model).to(args.device)
    batch = args.per_device_eval_batch_size
    return TaskRun(
        model=model, processing_class=tokenizer, train_dataset=TokenBlocks(train_blocks),
        eval_dataset=TokenBlocks(eval_blocks) if len(eval_blocks) else None,
        data_collator=default_data_collator, seq_len=recipe.data.seq_len,
        evaluate=lambda m: {"perplexity": perplexity(m, eval_blocks, batch)})


# ---------------------------------------------------------------- speech-to-text (Whisper)


def _speech_to_text(recipe: Recipe, local: LocalOnly) -> TaskRun:
    from transformers import set_seed

    from . import speech
    from .whisper_ct2 import load_whisper, resolve_ct2_source

    args, section = recipe.training_args, recipe.model
    set_seed(args.seed)
    ct2_dir = resolve_ct2_source(section.name_or_path)
    if ct2_dir is not None:
        model = load_whisper(ct2_dir, section.audio_window)
        tokens = speech.SpeechTokens.from_folder(ct2_dir, model.config.vocab_size)
        tokenizer_file = ct2_dir / "tokenizer.json"
    else:
        model, tokens, tokenizer_file = _hf_whisper(recipe, local.model)
    model = model.to(getattr(torch, section.dtype)).to(args.device)
    texts, audio = _speech_texts(recipe)
    fraction = recipe.data.eval_fraction
    held_out = math.ceil(len(texts) * fraction) if fraction > 0 else 0
    train_end = len(texts) - held_out
    train_stop = min(train_end, recipe.data.max_train_blocks or train_end)
    if train_stop == 0:
        raise RecipeError(f"recipe.data: {len(texts)} utterance(s), none left for training; add "
                          "data or lower data.eval_fraction")

    def split(start: int, stop: int) -> speech.SpeechSet:
        part = speech.speech_set(texts[start:stop], tokens, section.audio_window,
                                 audio[start:stop], num_mel_bins=model.config.num_mel_bins,
                                 max_tokens=model.config.max_target_positions)
        part.features = part.features.to(getattr(torch, section.dtype))  # the model's dtype
        return part

    train = split(0, train_stop)
    evaluation = split(train_end, len(texts)) if held_out else None
    batch = args.per_device_eval_batch_size

    def evaluate(m: nn.Module) -> Metrics:
        if evaluation is None:
            return {"perplexity": None, "wer": None}
        result = speech.evaluate(m, evaluation, tokens, batch=batch)
        return {"perplexity": math.exp(result["ce"]), "wer": result["wer"]}

    example = {"input_features": train.features[:1].to(args.device),
               "decoder_input_ids": train.decoder_input_ids[:1].to(args.device),
               "use_cache": False}
    return TaskRun(
        model=model, processing_class=None, train_dataset=train, eval_dataset=evaluation,
        data_collator=speech.collate, evaluate=evaluate, seq_len=train.labels.shape[1],
        example_inputs=example, export_files={"tokenizer.json": tokenizer_file})


def _speech_texts(recipe: Recipe) -> tuple[list[str], list[Any]]:
    """Transcripts and 16 kHz audio of the recipe's data files, in order (``.txt`` sentences
    spoken by espeak-ng, ``.jsonl`` records with their ``.wav`` files)."""
    from . import speech

    texts: list[str] = []
    audio: list[Any] = []
    for reference in recipe.data.files:
        path = resolve_builtin(reference)
        if path.suffix == ".txt":
            sentences = speech.read_sentences(path)
            texts += sentences
            audio += [speech.synthesize(t) for t in sentences]
        else:
            more_texts, more_audio = speech.read_jsonl_speech(path, recipe.data.text_field,
                                                              recipe.data.audio_field)
            texts += more_texts
            audio += more_audio
    return texts, audio


def _hf_whisper(recipe: Recipe, local_files_only: bool) -> tuple[nn.Module, Any, Path | None]:
    """A transformers Whisper (an HF id or folder), its tokens and its ``tokenizer.json``."""
    from transformers import AutoConfig, AutoTokenizer, WhisperForConditionalGeneration

    from . import speech
    from .whisper_ct2 import folder_tokenizer, special_ids

    section = recipe.model
    path = resolve_builtin(section.name_or_path)
    source = str(path) if path.exists() else section.name_or_path
    config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    if config.model_type != "whisper":
        raise RecipeError(f"recipe.model.name_or_path: {section.name_or_path!r} is a "
                          f"{config.model_type!r} model; speech-to-text recipes fine-tune Whisper")
    model = WhisperForConditionalGeneration.from_pretrained(source,
                                                            local_files_only=local_files_only)
    shorten_audio_window(model, section.audio_window)
    tokenizer_file = Path(source) / "tokenizer.json"
    if tokenizer_file.is_file():
        tokenizer = folder_tokenizer(source)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only
                                                  ).backend_tokenizer
        tokenizer_file = None
    generation = model.generation_config
    tokens = speech.SpeechTokens(tokenizer, special_ids(tokenizer),
                                 getattr(generation, "suppress_tokens", None) or (),
                                 getattr(generation, "begin_suppress_tokens", None) or (),
                                 multilingual=model.config.vocab_size >= 51865)
    return model, tokens, tokenizer_file


def shorten_audio_window(model: nn.Module, seconds: int) -> None:
    """Keep the encoder's first ``50 * seconds`` positions: inputs are ``seconds`` long."""
    encoder = model.get_encoder()
    positions = 50 * seconds
    if positions >= encoder.embed_positions.num_embeddings:
        return
    table = encoder.embed_positions.weight.detach()[:positions].clone()
    encoder.embed_positions = nn.Embedding(positions, table.shape[1]).requires_grad_(False)
    encoder.embed_positions.weight.data.copy_(table)
    encoder.max_source_positions = positions
    model.config.max_source_positions = positions


def copy_export_files(files: Mapping[str, Path | None], directory: Path) -> None:
    """Copy a task's extra files (e.g. the tokenizer) into the export ``directory``."""
    for name, source in files.items():
        if source is not None and Path(source).is_file():
            shutil.copyfile(source, Path(directory) / name)

