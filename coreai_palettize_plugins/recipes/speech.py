"""Speech for Whisper recipes (``model.task: speech-to-text``): audio, token ids and the two
metrics, WER and the teacher-forced decoder cross-entropy.

- Audio: a ``.txt`` data file is one sentence per line (``#`` comments skipped), spoken by
  ``espeak-ng`` (``apt-get install espeak-ng``; voice en-us, 160 words/min, resampled to 16 kHz)
  and cached as ``.npy``; a ``.jsonl`` record names a ``.wav`` file (``data.audio_field``, relative
  to the ``.jsonl``) and its transcript (``data.text_field``). Log-mel features come from
  transformers' ``WhisperFeatureExtractor`` (its ``chunk_length`` is the model's audio window).
- WER: greedy decoding (prompt ``<|startoftranscript|>[<|en|><|transcribe|>]<|notimestamps|>``,
  special and suppressed tokens masked), word-level edit distance after lower-casing and dropping
  punctuation, summed over sentences / reference words.
- CE: teacher-forced decoder cross-entropy (nats per token) of the reference tokens + end of text.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checks import RecipeError
from .whisper_ct2 import cache_dir, folder_tokenizer, special_ids, suppressed_ids

SAMPLE_RATE = 16000


class SpeechUnavailable(RecipeError):
    """espeak-ng is not installed; the message says how to get it."""


def read_sentences(path: str | Path) -> list[str]:
    """The non-empty, non-``#`` lines of a text file."""
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def synthesize(text: str, cache: Path | None = None) -> np.ndarray:
    """16 kHz float32 mono audio of ``text`` spoken by espeak-ng (cached by text)."""
    cache = Path(cache) if cache is not None else cache_dir() / "speech"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / (hashlib.sha1(text.encode()).hexdigest()[:16] + ".npy")
    if path.is_file():
        return np.load(path)
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeechUnavailable("recipe.data.files: .txt sentences are spoken by espeak-ng, which "
                                "is not installed (Debian: apt-get install -y espeak-ng); or give "
                                ".jsonl records with .wav files")
    wav = path.with_suffix(f".{time.monotonic_ns()}.wav")
    subprocess.run([exe, "-v", "en-us", "-s", "160", "-w", str(wav), text], check=True,
                   capture_output=True, timeout=60)
    audio = read_audio(wav)
    wav.unlink()
    tmp = path.with_suffix(f".{time.monotonic_ns()}.npy")
    np.save(tmp, audio)
    tmp.replace(path)
    return audio


def read_audio(path: str | Path) -> np.ndarray:
    """A ``.wav`` file as 16 kHz float32 mono (channels averaged, resampled if needed)."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    rate, data = wavfile.read(path)
    if np.issubdtype(data.dtype, np.integer):
        audio = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    else:
        audio = data.astype(np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        g = np.gcd(SAMPLE_RATE, rate)
        audio = resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return audio


class SpeechTokens:
    """Text <-> ids, the decoding prompt and the suppressed ids of one Whisper model."""

    def __init__(self, tokenizer: Any, ids: dict[str, int], suppress: Sequence[int] = (),
                 suppress_begin: Sequence[int] = (), multilingual: bool = False) -> None:
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.eot, self.sot = ids["eot"], ids["sot"]
        language = [ids["en"], ids["transcribe"]] if multilingual and "en" in ids else []
        self.prompt = (self.sot, *language, ids["no_timestamps"])
        self.suppress, self.suppress_begin = list(suppress), list(suppress_begin)

    @classmethod
    def from_folder(cls, model_dir: Path, vocab_size: int) -> SpeechTokens:
        """From a folder with Whisper's ``tokenizer.json`` (and CTranslate2's ``config.json``)."""
        tokenizer = folder_tokenizer(model_dir)
        suppress, begin = suppressed_ids(model_dir)
        return cls(tokenizer, special_ids(tokenizer), suppress, begin,
                   multilingual=vocab_size >= 51865)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i < self.eot])


@dataclass
class SpeechSet(torch.utils.data.Dataset):
    """Features, reference texts and their teacher-forcing tensors, for one split; items are
    what an HF ``Trainer`` gives its collator (:func:`collate`)."""

    texts: list[str]
    features: torch.Tensor           # [n, mel bins, frames] float32
    decoder_input_ids: torch.Tensor  # [n, T] (prompt, tokens..., EOT padding)
    labels: torch.Tensor             # [n, T] next tokens, -100 on the prompt and padding

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_features": self.features[i], "decoder_input_ids": self.decoder_input_ids[i],
                "labels": self.labels[i]}

    def rows(self) -> list[dict[str, torch.Tensor]]:
        return [self[i] for i in range(len(self))]

    def subset(self, count: int) -> SpeechSet:
        return SpeechSet(self.texts[:count], self.features[:count],
                         self.decoder_input_ids[:count], self.labels[:count])


def speech_set(texts: Sequence[str], tokens: SpeechTokens, window_seconds: int = 30,
               audio: Sequence[np.ndarray] | None = None, num_mel_bins: int = 80,
               max_tokens: int | None = None) -> SpeechSet:
    """The features and teacher-forcing tensors of ``texts`` (spoken by espeak-ng unless
    ``audio`` is given). A transcript longer than ``max_tokens`` decoder positions is an error."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, chunk_length=window_seconds)
    audio = [synthesize(t) for t in texts] if audio is None else list(audio)
    for text, clip in zip(texts, audio, strict=True):
        if len(clip) > window_seconds * SAMPLE_RATE:
            raise RecipeError(f"recipe.model.audio_window: the clip of {text[:40]!r} lasts "
                              f"{len(clip) / SAMPLE_RATE:.1f} s, longer than the {window_seconds} s "
                              "window; raise model.audio_window (at most 30)")
    feats = extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    prompt = list(tokens.prompt)
    seqs = [tokens.encode(t) for t in texts]
    width = len(prompt) + max(len(s) for s in seqs)
    if max_tokens is not None and width > max_tokens:
        raise RecipeError(f"recipe.data.files: a transcript takes {width} decoder positions, more "
                          f"than the model's {max_tokens}; shorten it")
    dec = torch.full((len(texts), width), tokens.eot, dtype=torch.long)
    lab = torch.full((len(texts), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        full = prompt + s + [tokens.eot]
        dec[i, :len(full) - 1] = torch.tensor(full[:-1])
        lab[i, len(prompt) - 1:len(full) - 1] = torch.tensor(full[len(prompt):])
    return SpeechSet(list(texts), feats.float(), dec, lab)


def collate(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows of a :class:`SpeechSet` (they share one padded width)."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@torch.no_grad()
def teacher_forced_ce(model: torch.nn.Module, data: SpeechSet, batch: int = 8) -> float:
    """Mean decoder cross-entropy (nats/token) of the references, teacher-forced."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(data), batch):
        logits = model(input_features=data.features[s:s + batch].to(device),
                       decoder_input_ids=data.decoder_input_ids[s:s + batch].to(device),
                       use_cache=False).logits
        labels = data.labels[s:s + batch].to(device)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                   ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    return total / count


@torch.no_grad()
def greedy_transcribe(model: torch.nn.Module, data: SpeechSet, tokens: SpeechTokens,
                      max_new: int = 48, batch: int = 24) -> list[str]:
    """Greedy transcriptions (KV cache; special tokens and the suppressed ids masked)."""
    import inspect

    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    device = next(model.parameters()).device
    # transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns)
    cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: list[str] = []
    for s in range(0, len(data), batch):
        feats = data.features[s:s + batch].to(device)
        enc = model.get_encoder()(feats)
        n = feats.shape[0]
        step_in = torch.tensor([list(tokens.prompt)] * n, device=device)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        done = torch.zeros(n, dtype=torch.bool, device=device)
        result: list[list[int]] = [[] for _ in range(n)]
        for step in range(max_new):
            o = model(encoder_outputs=enc, decoder_input_ids=step_in, use_cache=True,
                      **{cache_key: cache})
            cache = getattr(o, "past_key_values", None) or getattr(o, "cache", None) or cache
            logits = o.logits[:, -1].float()
            logits[:, tokens.sot:] = -float("inf")
            logits[:, tokens.suppress] = -float("inf")
            if step == 0:
                logits[:, tokens.suppress_begin] = -float("inf")
            nxt = logits.argmax(-1)
            nxt[done] = tokens.eot
            for i in range(n):
                if not done[i] and nxt[i] != tokens.eot:
                    result[i].append(int(nxt[i]))
            done |= nxt == tokens.eot
            if bool(done.all()):
                break
            step_in = nxt[:, None]
        out += [tokens.decode(r) for r in result]
    return out


def normalize(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def wer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Word error rate: total word edits / total reference words."""
    edits = words = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = normalize(hyp), normalize(ref)
        prev = list(range(len(h) + 1))
        for i, rw in enumerate(r, 1):
            cur = [i] + [0] * len(h)
            for j, hw in enumerate(h, 1):
                cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
            prev = cur
        edits += prev[-1]
        words += len(r)
    return edits / max(words, 1)


def evaluate(model: torch.nn.Module, data: SpeechSet, tokens: SpeechTokens,
             transcribe: bool = True, batch: int = 8) -> dict[str, Any]:
    """``{"ce", "ce_seconds"[, "wer", "decode_seconds", "examples"]}`` on ``data`` in eval mode,
    each palettized weight assigned once (``parametrize.cached``)."""
    from torch.nn.utils import parametrize

    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with parametrize.cached():
            result: dict[str, Any] = {"ce": teacher_forced_ce(model, data, batch)}
            result["ce_seconds"] = time.perf_counter() - t0
            if transcribe:
                t1 = time.perf_counter()
                max_new = int((data.labels != -100).sum(1).max()) + 8
                hyps = greedy_transcribe(model, data, tokens, max_new=max_new)
                result.update(wer=wer(hyps, data.texts), decode_seconds=time.perf_counter() - t1,
                              examples=hyps[:3])
    finally:
        model.train(was_training)
    return result


def read_jsonl_speech(path: Path, text_field: str, audio_field: str) -> tuple[list[str],
                                                                                list[np.ndarray]]:
    """Transcripts and audio of a ``.jsonl`` file (``audio_field``: a ``.wav`` path, relative to
    the file's folder)."""
    from .data import jsonl_records

    texts, audio = [], []
    for number, record in jsonl_records(path, str(path)):
        for field, key in ((text_field, "text_field"), (audio_field, "audio_field")):
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise RecipeError(f"recipe.data.{key}: {path}:{number} has no string field "
                                  f"{field!r}")
        wav = (path.parent / record[audio_field]).expanduser()
        if not wav.is_file():
            raise RecipeError(f"recipe.data.audio_field: {path}:{number}: no such audio file "
                              f"{str(wav)!r}")
        texts.append(record[text_field])
        audio.append(read_audio(wav))
    return texts, audio
