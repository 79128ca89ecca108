"""The packed PyTorch artifact: n-bit indices, LUTs in their own dtype and the dense rest, written
from a prepared model and loaded back into a model whose outputs equal the palettized model's.

Files: ``palettized.safetensors`` (tensors; tied tensors stored once), ``palettized.json`` (the
manifest: shapes, bit widths, aliases, the coreai-opt config, the layout of the example call) and
``example_inputs.safetensors`` (the example call's tensors: positional ``args.<i>`` and keyword
``kwargs.<name>``; artifacts of 0.1 hold positional ``input_<i>`` only, still read).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from coreai_opt import ExportBackend
from coreai_opt.palettization import KMeansPalettizer, KMeansPalettizerConfig

from .._coreai_compat import fake_palettized_tensors, prepare_from_state_dict
from ..core._inputs import CallSpec, as_call_spec, keyword_call
from ..core._modelcopy import tracing_forward
from ..core._utils import dtype_from_name, dtype_name, unique_by_storage
from ..settings.coreai_config import config_from_yaml_text, config_to_yaml
from ._files import finish_interrupted
from .artifact_checks import (
    ArtifactError,
    check_aliases,
    checksums,
    load_checked,
    verify_palettized,
)

__all__ = ["EXAMPLE_INPUTS_NAME", "FORMAT_ID", "MANIFEST_NAME", "PACKED_NAME", "ArtifactError",
           "load_example_inputs", "load_palettized", "pack_indices", "unpack_indices", "write_packed"]

PACKED_NAME = "palettized.safetensors"
MANIFEST_NAME = "palettized.json"
EXAMPLE_INPUTS_NAME = "example_inputs.safetensors"
FORMAT_ID = "coreai-palettize-plugins/packed-v2"
READABLE_FORMATS = ("coreai-palettize-plugins/packed-v1", FORMAT_ID)
"""v2 stores the example call's keyword inputs and constants (v1: positional tensors only)."""


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


def write_packed(
    model: nn.Module,
    config: KMeansPalettizerConfig,
    example_inputs: Any,
    directory: Path,
    metadata: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write the packed artifact of a prepared model: n-bit indices, LUTs, the dense rest, and
    the example call (``example_inputs``: a ``CallSpec`` or what ``as_call_spec`` takes)."""
    from safetensors.torch import save_file

    tensors = fake_palettized_tensors(model)
    with torch.no_grad():
        for t in tensors:  # settle stale indices (e.g. after straight-through training)
            t.fake.hard_assign(t.original)
    # Tied tensors (an lm_head sharing the embedding) are stored once, under an alias.
    state, aliases = unique_by_storage(model.state_dict())
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    entries: dict[str, Any] = {}
    packed_state: dict[str, torch.Tensor] = {}
    for t in tensors:
        original = t.original
        indices_key = f"{t.state_prefix}0.indices"
        indices = state[indices_key]
        entries[t.name] = {
            "prefix": t.state_prefix,
            "shape": list(original.shape),
            "dtype": dtype_name(original.dtype),
            "n_bits": t.fake.n_bits,
            "cluster_dim": t.fake.cluster_dim,
            "indices_shape": list(indices.shape),
        }
        packed_state[indices_key] = pack_indices(indices, t.fake.n_bits)
    input_tensors, input_layout = as_call_spec(example_inputs).to_storage()
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
        "example_inputs": input_layout,
        "versions": _versions(),
        **(metadata or {}),
        # sha256 per tensor, verified by load_palettized (artifact_checks.py)
        "checksums": checksums(packed_state),
        "example_inputs_checksums": checksums(input_tensors),
    }
    packed_path = directory / PACKED_NAME
    # One metadata key: safetensors writes a metadata map in hash order (bytes would differ).
    save_file(packed_state, str(packed_path), metadata={"format": FORMAT_ID})
    inputs_path = directory / EXAMPLE_INPUTS_NAME
    save_file(input_tensors, str(inputs_path))
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

    Raises:
        ArtifactError: a damaged, truncated or edited artifact (naming the file and tensor).
    """
    directory, manifest = _read_manifest(path)
    manifest_path = directory / MANIFEST_NAME
    stored = verify_palettized(directory, manifest, manifest_path, directory / PACKED_NAME)
    example_inputs = _example_inputs(directory, manifest)

    state: dict[str, torch.Tensor] = dict(stored)
    for name, entry in manifest["palettized"].items():
        prefix = entry["prefix"]
        indices = unpack_indices(state[f"{prefix}0.indices"], entry["n_bits"],
                                 entry["indices_shape"])
        if indices.numel() and int(indices.max()) >= 2 ** entry["n_bits"]:
            raise ArtifactError(f"{manifest_path}: tensor {name}: index {int(indices.max())} "
                                f">= 2**n_bits = {2 ** entry['n_bits']}")
        state[f"{prefix}0.indices"] = indices
        state[f"{prefix}original"] = torch.zeros(entry["shape"], dtype=dtype_from_name(entry["dtype"]))
    check_aliases(manifest, manifest_path, state)
    for alias, target in manifest["aliases"].items():
        state[alias] = state[target]

    if model_or_factory is None:
        model_or_factory = _transformers_factory(directory)
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    config = config_from_yaml_text(manifest["palettizer_config"])
    spec = as_call_spec(example_inputs, model)
    palettizer = KMeansPalettizer(model, config)
    with tracing_forward(model):
        with keyword_call(model, spec) as inputs:
            try:
                prepare_from_state_dict(palettizer, inputs, state)
            except RuntimeError as e:  # e.g. a size mismatch of an aliased or edited tensor
                first = str(e).strip().splitlines()
                detail = " ".join(line.strip() for line in first[:3])
                raise ArtifactError(f"{directory / PACKED_NAME}: does not fit "
                                    f"{type(model).__name__}: {detail}") from None
        _check_prepared(model, manifest, manifest_path)
        for t in fake_palettized_tensors(model):
            t.original.copy_(t.fake.hard_assign(t.original))
    model.eval()
    if finalize:
        model = palettizer.finalize(model, backend=ExportBackend.Torch)
    return model


def _check_prepared(model: nn.Module, manifest: Mapping[str, Any], path: Path) -> None:
    """The model prepared from the manifest's config has each entry's bit width and no
    palettized weight the manifest does not list."""
    entries = {e["prefix"]: (name, e) for name, e in manifest["palettized"].items()}
    for t in fake_palettized_tensors(model):
        name, entry = entries.get(t.state_prefix, (t.name, None))
        if entry is None:
            raise ArtifactError(f"{path}: tensor {name}: palettized by the stored config but "
                                "not listed in the manifest")
        if entry["n_bits"] != t.fake.n_bits:
            raise ArtifactError(f"{path}: tensor {name}: n_bits={entry['n_bits']}, the stored "
                                f"config gives {t.fake.n_bits}")


def load_example_inputs(path: str | os.PathLike) -> CallSpec:
    """The example call stored with a packed artifact (``spec.call(model)`` runs it): the
    inputs the export traced, on which the reloaded model equals the palettized one."""
    return _example_inputs(*_read_manifest(path))


def _read_manifest(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    finish_interrupted(directory)  # an export's commit cut short: finish it first
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: not a palettized export directory")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{manifest_path}: unreadable ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path}: not a JSON object")
    if manifest.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{manifest_path}: unsupported format {manifest.get('format')!r}; "
                         f"this version reads {', '.join(READABLE_FORMATS)}")
    return directory, manifest


def _example_inputs(directory: Path, manifest: Mapping[str, Any]) -> CallSpec:
    tensors, _ = load_checked(directory / EXAMPLE_INPUTS_NAME,
                              manifest.get("example_inputs_checksums"))
    if "example_inputs" in manifest:
        return CallSpec.from_storage(manifest["example_inputs"], tensors)
    return CallSpec(tuple(tensors[f"input_{i}"] for i in range(manifest["num_example_inputs"])))


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
