"""Export of a palettized model: Core AI ``.aimodel``, a packed PyTorch artifact, and a report.

Everything is written into a temporary directory beside the target and renamed into place at
the end, so a failed export never leaves a partial directory or damages an earlier one. Each
format is produced independently: if one fails (say ``torch.export`` cannot trace the model), the
error names the format and its cause and the other formats are still written.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from coreai_opt import ExportBackend
from coreai_opt.palettization import KMeansPalettizer, KMeansPalettizerConfig

from ._coreai_compat import fake_palettized_tensors, widen_for_coreai
from .report import CompressionReport
from .settings import config_from_yaml_text, config_to_yaml

__all__ = [
    "AIMODEL_NAME",
    "MANIFEST_NAME",
    "PACKED_NAME",
    "ExportError",
    "ExportResult",
    "atomic_directory",
    "export_palettized",
    "load_palettized",
    "model_outputs",
    "pack_indices",
    "quiet_prepare",
    "unpack_indices",
]

log = logging.getLogger(__name__)

AIMODEL_NAME = "model.aimodel"
PACKED_NAME = "palettized.safetensors"
MANIFEST_NAME = "palettized.json"
EXAMPLE_INPUTS_NAME = "example_inputs.safetensors"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
FORMAT_ID = "coreai-palettize-plugins/packed-v1"


class ExportError(RuntimeError):
    """One or more export formats could not be produced."""


@dataclass
class ExportResult:
    directory: Path
    written: dict[str, Path] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    report: CompressionReport | None = None


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        _apply_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, backup)
    os.replace(tmp, final)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _apply_umask(root: Path) -> None:
    """mkdtemp and some writers create owner-only files: give the result normal permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def quiet_prepare(model: nn.Module) -> Iterator[None]:
    """The tracing forward of ``prepare``: eval mode, no grad, the caller's RNG untouched."""
    was_training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def model_outputs(model: nn.Module, example_inputs: Sequence[Any]) -> list[torch.Tensor]:
    """Every tensor the model returns for ``example_inputs`` (eval, no grad), on the CPU."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with quiet_prepare(model):
        out = model(*[_to(x, device) for x in example_inputs])
    return [t.detach().float().cpu() for t in _tensor_leaves(out)]


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensor_leaves(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensor_leaves(v)]
    return []


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max((float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)


def pack_indices(indices: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Pack uint8 indices (< 2**n_bits) into an n-bit little-endian bit stream (uint8 bytes)."""
    flat = indices.detach().cpu().reshape(-1).numpy().astype(np.uint8, copy=False)
    if n_bits == 8:
        return torch.from_numpy(flat.copy())
    chunk = 8 * (1 << 20)  # a multiple of 8 values ends on a byte boundary for any n_bits
    parts = []
    for start in range(0, flat.size, chunk):
        block = flat[start:start + chunk]
        bits = np.unpackbits(block[:, None], axis=1, bitorder="little")[:, :n_bits]
        parts.append(np.packbits(bits.reshape(-1), bitorder="little"))
    return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.uint8))


def unpack_indices(packed: torch.Tensor, n_bits: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``pack_indices``."""
    numel = math.prod(shape)
    data = packed.cpu().numpy().astype(np.uint8, copy=False)
    if n_bits == 8:
        return torch.from_numpy(data[:numel].copy()).reshape(tuple(shape))
    bits = np.unpackbits(data, bitorder="little")[: numel * n_bits].reshape(numel, n_bits)
    padded = np.zeros((numel, 8), dtype=np.uint8)
    padded[:, :n_bits] = bits
    values = np.packbits(padded, axis=1, bitorder="little").reshape(-1)
    return torch.from_numpy(values).reshape(tuple(shape))


def _dedupe(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tied tensors once: returns (unique tensors, {alias key: stored key})."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple, str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype)
        if t.numel() and ident in by_storage:
            aliases[key] = by_storage[ident]
            continue
        by_storage[ident] = key
        unique[key] = t.detach().cpu().contiguous()
    return unique, aliases


# --------------------------------------------------------------------------------------------
# Fresh copy, packed artifact, Core AI
# --------------------------------------------------------------------------------------------


def rebuild_prepared(
    factory: Callable[[], nn.Module],
    config: KMeansPalettizerConfig,
    example_inputs: Sequence[Any],
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[nn.Module, KMeansPalettizer]:
    """A new prepared model loaded from ``state_dict`` (no k-means): coreai-opt's public path.

    Finalizing a ``deepcopy`` of a prepared model would break the original (the copy shares its
    generated parametrization class), so export always works on a model rebuilt like this.
    """
    fresh = factory()
    palettizer = KMeansPalettizer(fresh, config)
    with quiet_prepare(fresh):
        palettizer.prepare(tuple(example_inputs), state_dict=dict(state_dict))
    fresh.eval()
    return fresh, palettizer


def write_packed(
    model: nn.Module,
    config: KMeansPalettizerConfig,
    example_inputs: Sequence[Any],
    directory: Path,
    metadata: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write the packed artifact of a prepared model: n-bit indices, LUTs, the dense rest."""
    from safetensors.torch import save_file

    tensors = fake_palettized_tensors(model)
    with torch.no_grad():
        for t in tensors:  # settle stale indices (e.g. after straight-through training)
            t.fake.hard_assign(t.original)
    # Tied tensors (an lm_head sharing the embedding) are stored once, under an alias.
    state, aliases = _dedupe(model.state_dict())
    entries: dict[str, Any] = {}
    packed_state: dict[str, torch.Tensor] = {}
    for t in tensors:
        original = t.original
        indices_key = f"{t.state_prefix}0.indices"
        indices = state[indices_key]
        entries[t.name] = {
            "prefix": t.state_prefix,
            "shape": list(original.shape),
            "dtype": str(original.dtype).removeprefix("torch."),
            "n_bits": t.fake.n_bits,
            "cluster_dim": t.fake.cluster_dim,
            "indices_shape": list(indices.shape),
        }
        packed_state[indices_key] = pack_indices(indices, t.fake.n_bits)
    prefixes = tuple(e["prefix"] for e in entries.values())
    for key, value in state.items():
        if key.startswith(prefixes) and key.endswith((".original", ".0.indices")):
            continue  # dense master weights are not exported; indices are stored packed
        packed_state[key] = value
    manifest = {
        "format": FORMAT_ID,
        "palettized": entries,
        "aliases": aliases,
        "palettizer_config": config_to_yaml(config),
        "num_example_inputs": len(example_inputs),
        "versions": _versions(),
        **(metadata or {}),
    }
    packed_path = directory / PACKED_NAME
    save_file(packed_state, str(packed_path), metadata={"format": FORMAT_ID})
    inputs_path = directory / EXAMPLE_INPUTS_NAME
    save_file({f"input_{i}": x.detach().cpu().contiguous()
               for i, x in enumerate(example_inputs)}, str(inputs_path))
    manifest_path = directory / MANIFEST_NAME
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return [packed_path, manifest_path, inputs_path]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("coreai-palettize-plugins", "coreai-opt", "torch"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def write_aimodel(
    model: nn.Module,
    palettizer: KMeansPalettizer,
    example_inputs: Sequence[Any],
    path: Path,
) -> float:
    """Finalize for Core AI, ``torch.export``, convert and save. Returns the graph's max abs
    difference to the model's eager outputs (the graph handed to the converter).

    ``model`` must be a fresh prepared copy: finalizing frees its dense weights.
    """
    import coreai_torch

    expected = model_outputs(model, example_inputs)
    widened = widen_for_coreai(model)
    if widened:
        log.info("coreai-torch stores no 3-bit indices: %d weight(s) go into the .aimodel with "
                 "4-bit indices and a padded LUT (same values): %s", len(widened),
                 ", ".join(widened))
    finalized = palettizer.finalize(model, backend=ExportBackend.CoreAI).eval()
    try:
        with torch.no_grad():
            program = torch.export.export(finalized, tuple(example_inputs))
    except Exception as e:
        raise RuntimeError(f"torch.export could not trace {type(model).__name__}: "
                           f"{_first_line(e)}") from e
    program = program.run_decompositions(coreai_torch.get_decomp_table())
    with torch.no_grad():
        graph_outputs = [t.detach().float().cpu()
                         for t in _tensor_leaves(program.module()(*example_inputs))]
    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    converter.add_exported_program(program, input_names=_input_names(model, len(example_inputs)))
    converter.to_coreai().save_asset(path)
    return max_abs_diff(expected, graph_outputs)


def _input_names(model: nn.Module, count: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params[:count]]
    except (TypeError, ValueError):
        names = []
    return names if len(names) == count else [f"input_{i}" for i in range(count)]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def export_palettized(
    model: nn.Module,
    *,
    config: KMeansPalettizerConfig,
    example_inputs: Sequence[Any],
    directory: str | os.PathLike,
    factory: Callable[[], nn.Module],
    formats: Sequence[str] = ("coreai", "torch"),
    report: CompressionReport | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
    extra_files: Callable[[Path], None] | None = None,
    strict: bool = False,
) -> ExportResult:
    """Export a prepared model to ``directory`` atomically.

    ``factory`` builds a new, unprepared instance of the model's architecture (any weights): the
    export loads ``model``'s state into it, so the live model is never modified.
    ``extra_files(tmp_dir)`` may add files (an HF config, a tokenizer) before the rename.
    With ``strict``, a format that fails raises ``ExportError`` after the others are written.
    """
    directory = Path(directory)
    result = ExportResult(directory=directory, report=report)
    example_inputs = [x.detach().cpu() if isinstance(x, torch.Tensor) else x
                      for x in example_inputs]
    state = {k: v.detach().cpu()
             for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
    expected = model_outputs(model, example_inputs)

    with atomic_directory(directory) as tmp:
        fresh, palettizer = rebuild_prepared(factory, config, example_inputs, state)
        diff = max_abs_diff(expected, model_outputs(fresh, example_inputs))
        if report is not None:
            report.extra["rebuilt_model_max_abs_diff"] = diff
        if diff > 1e-4:
            log.warning("The model rebuilt for export differs from the trained one by %.3g "
                        "(max abs output difference)", diff)
        if "torch" in formats:
            try:
                write_packed(fresh, config, example_inputs, tmp, metadata)
                result.written["torch"] = tmp / PACKED_NAME
            except Exception as e:
                result.errors["torch"] = _first_line(e)
        if extra_files is not None:
            extra_files(tmp)
        if "coreai" in formats:
            try:
                graph_diff = write_aimodel(fresh, palettizer, example_inputs, tmp / AIMODEL_NAME)
                result.written["coreai"] = tmp / AIMODEL_NAME
                if report is not None:
                    report.extra["coreai_graph_max_abs_diff"] = graph_diff
            except Exception as e:
                shutil.rmtree(tmp / AIMODEL_NAME, ignore_errors=True)
                result.errors["coreai"] = _first_line(e)
        del fresh
        if report is not None:
            for fmt, path in result.written.items():
                report.extra[f"{fmt}_artifact_bytes"] = _disk_bytes(path)
            if "coreai" in result.written:
                report.extra["coreai_vs_floor"] = round(
                    report.extra["coreai_artifact_bytes"] / report.palettized_bytes, 4)
            for fmt, error in result.errors.items():
                report.extra[f"{fmt}_error"] = error
            (tmp / REPORT_JSON).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            (tmp / REPORT_MD).write_text(report.to_markdown())
            from .plots import try_write_report_png  # matplotlib is optional: logged if missing
            try_write_report_png(report.to_dict(), tmp / "report.png")
    result.written = {fmt: directory / p.relative_to(tmp) for fmt, p in result.written.items()}
    for fmt, error in result.errors.items():
        log.error("palettize export: format %r could not be written: %s", fmt, error)
    if strict and result.errors:
        raise ExportError("; ".join(f"{fmt}: {err}" for fmt, err in result.errors.items()))
    return result


def _disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_palettized(
    path: str | os.PathLike,
    model_or_factory: nn.Module | Callable[[], nn.Module] | None = None,
    *,
    finalize: bool = True,
) -> nn.Module:
    """Rebuild a model from a packed artifact; its outputs equal the palettized model's.

    ``model_or_factory`` is an unprepared instance of the architecture (or a callable building
    one); its weights are replaced. It may be omitted for a Hugging Face export (a directory with
    ``config.json``): the ``transformers`` class named there is built. With ``finalize``
    (default) the result is a plain model whose weights hold the palettized values; without it,
    the model stays prepared (coreai-opt parametrizations, dense master weights set to the
    palettized values) so training can go on.
    """
    from safetensors.torch import load_file

    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: not a palettized export directory")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT_ID:
        raise ValueError(f"{manifest_path}: unsupported format {manifest.get('format')!r}; "
                         f"this version reads {FORMAT_ID}")
    stored = load_file(str(directory / PACKED_NAME))
    inputs = load_file(str(directory / EXAMPLE_INPUTS_NAME))
    example_inputs = tuple(inputs[f"input_{i}"] for i in range(manifest["num_example_inputs"]))

    state: dict[str, torch.Tensor] = dict(stored)
    for entry in manifest["palettized"].values():
        prefix = entry["prefix"]
        state[f"{prefix}0.indices"] = unpack_indices(
            state[f"{prefix}0.indices"], entry["n_bits"], entry["indices_shape"])
        state[f"{prefix}original"] = torch.zeros(entry["shape"], dtype=getattr(torch, entry["dtype"]))
    for alias, target in manifest["aliases"].items():
        state[alias] = state[target]

    if model_or_factory is None:
        model_or_factory = _transformers_factory(directory)
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    config = config_from_yaml_text(manifest["palettizer_config"])
    palettizer = KMeansPalettizer(model, config)
    with quiet_prepare(model):
        palettizer.prepare(example_inputs, state_dict=state)
        for t in fake_palettized_tensors(model):
            t.original.copy_(t.fake.hard_assign(t.original))
    model.eval()
    if finalize:
        model = palettizer.finalize(model, backend=ExportBackend.Torch)
    return model


def _transformers_factory(directory: Path) -> Callable[[], nn.Module]:
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} has no config.json: pass the model (or a factory) to "
                         "load_palettized")
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise ValueError(f"{directory}/config.json names no transformers architecture "
                         f"({names}): pass the model (or a factory) to load_palettized")

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            return cls(config)

    return build
