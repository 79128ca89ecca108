"""The speech set of ``quality_real.py``: the packaged sentences (16 train, 24 held-out) spoken by
espeak-ng and cached under ``benchmarks/.cache/speech``; the metrics are
``coreai_palettize_plugins.recipes.speech``'s."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coreai_palettize_plugins.recipes import speech as _speech
from coreai_palettize_plugins.recipes.schema import DATA_DIR
from coreai_palettize_plugins.recipes.speech import (  # noqa: F401
    SpeechSet,
    SpeechUnavailable,
    collate,
    evaluate,
    greedy_transcribe,
    teacher_forced_ce,
    wer,
)

CACHE = Path(__file__).resolve().parent / ".cache" / "speech"
N_TRAIN = 16


def sentences() -> tuple[list[str], list[str]]:
    """(train, eval) sentences of ``coreai_palettize_plugins/data/speech_sentences.txt``."""
    lines = _speech.read_sentences(DATA_DIR / "speech_sentences.txt")
    return lines[:N_TRAIN], lines[N_TRAIN:]


def Tokens(model_dir: Path) -> _speech.SpeechTokens:
    return _speech.SpeechTokens.from_folder(model_dir, vocab_size=51864)


def synthesize(text: str) -> np.ndarray:
    return _speech.synthesize(text, CACHE)


def speech_set(texts: list[str], tokens: _speech.SpeechTokens, window_seconds: int = 30) -> SpeechSet:
    return _speech.speech_set(texts, tokens, window_seconds, [synthesize(t) for t in texts])
