"""What ``load_palettized`` verifies before it builds anything: per-tensor checksums (recorded
in the manifest at export), packed index streams of exactly ``ceil(numel * n_bits / 8)`` bytes,
indices below ``2**n_bits``, LUT shapes that match the layout, finite LUTs, and aliases that point
at a stored tensor. Every error names the file and the tensor.

Checksums: ``sha256`` of each tensor's bytes (dtype and shape included), chosen over ``crc32``:
it also catches a deliberate edit, and costs ~0.6 GB/s on one core against the artifact's read.
Artifacts written before the checksums (0.1/0.2) still load, with one warning. The manifest's
structural fields need no digest of their own: an edited ``n_bits`` changes the exact packed length
(and the LUT shape), an added alias either shadows a stored tensor or names a missing one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.integrity import IntegrityError, tensor_digest

__all__ = ["ArtifactError", "check_aliases", "checksums", "load_checked", "verify_palettized"]


class ArtifactError(IntegrityError, ValueError):
    """A packed artifact that is damaged, truncated or does not match its manifest."""


def checksums(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{name: "sha256:<hex>"}`` for the manifest."""
    return {name: tensor_digest(t) for name, t in sorted(tensors.items())}


def load_checked(path: Path, expected: Mapping[str, str] | None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file, each tensor checked against ``expected``
    checksums (none: not checked).

    Raises:
        ArtifactError: unreadable or truncated file, a missing, extra or changed tensor.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except Exception as e:  # safetensors raises its own SafetensorError for damaged headers
        raise ArtifactError(f"{path}: unreadable ({type(e).__name__}: {e}); the artifact is "
                            "damaged or truncated") from None
    if expected is not None:
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            which = missing[0] if missing else extra[0]
            what = "missing" if missing else "not in the manifest"
            raise ArtifactError(f"{path}: tensor {which} is {what} ({len(missing)} missing, "
                                f"{len(extra)} unlisted)")
        for name, tensor in tensors.items():
            if tensor_digest(tensor) != expected[name]:
                raise ArtifactError(f"{path}: tensor {name} fails its checksum (the manifest "
                                    "records another sha256): the file is damaged")
    return tensors, metadata


_WARNED: set[str] = set()


def verify_palettized(directory: Path, manifest: Mapping[str, Any], manifest_path: Path,
                      packed_path: Path) -> dict[str, torch.Tensor]:
    """Read and verify the packed tensor file against the manifest. Returns its tensors."""
    recorded = manifest.get("checksums")
    if recorded is None and str(directory) not in _WARNED:
        _WARNED.add(str(directory))
        warnings.warn(f"{manifest_path}: written before per-tensor checksums; its tensors are "
                      "checked for structure only (re-export to add them)", stacklevel=3)
    stored, _ = load_checked(packed_path, recorded)
    _check_entries(manifest, manifest_path, stored)
    return stored


def _check_entries(manifest: Mapping[str, Any], path: Path,
                   stored: Mapping[str, torch.Tensor]) -> None:
    entries = manifest.get("palettized")
    if not isinstance(entries, Mapping):
        raise ArtifactError(f"{path}: no 'palettized' mapping")
    for name, entry in entries.items():
        def fail(problem: str, name: str = name) -> ArtifactError:
            return ArtifactError(f"{path}: tensor {name}: {problem}")

        try:
            prefix, n_bits = str(entry["prefix"]), entry["n_bits"]
            shape, indices_shape = list(entry["shape"]), list(entry["indices_shape"])
            cluster_dim = int(entry.get("cluster_dim", 1))
        except (KeyError, TypeError, ValueError) as e:
            raise fail(f"incomplete entry ({e})") from None
        if not isinstance(n_bits, int) or not 1 <= n_bits <= 8:
            raise fail(f"n_bits={n_bits!r} (1..8)")
        numel = math.prod(indices_shape)
        if numel * cluster_dim != math.prod(shape):
            raise fail(f"indices_shape {indices_shape} x cluster_dim {cluster_dim} does not "
                       f"cover shape {shape}")
        packed = stored.get(f"{prefix}0.indices")
        centroids = stored.get(f"{prefix}0.centroids")
        if packed is None or centroids is None:
            raise fail(f"{prefix}0.{'indices' if packed is None else 'centroids'} is not stored")
        expected = -(-numel * n_bits // 8)
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
            raise fail(f"packed indices hold {packed.numel()} bytes ({packed.dtype}); "
                       f"{numel} indices at n_bits={n_bits} need exactly {expected}")
        if centroids.dim() != 3 or centroids.shape[1:] != (2 ** n_bits, cluster_dim):
            raise fail(f"LUT shape {tuple(centroids.shape)} does not match n_bits={n_bits}, "
                       f"cluster_dim={cluster_dim} (expected (num_luts, {2 ** n_bits}, "
                       f"{cluster_dim}))")
        if centroids.is_floating_point() and not bool(torch.isfinite(centroids).all()):
            raise fail("LUT holds non-finite values")


def check_aliases(manifest: Mapping[str, Any], path: Path,
                  state: Mapping[str, torch.Tensor]) -> None:
    """Each alias names a tensor that is not stored itself and whose target is (``state``: the
    stored tensors with the dense placeholders and unpacked indices the loader adds)."""
    aliases = manifest.get("aliases") or {}
    if not isinstance(aliases, Mapping):
        raise ArtifactError(f"{path}: 'aliases' is not a mapping")
    for alias, target in aliases.items():
        if alias in state:
            raise ArtifactError(f"{path}: tensor {alias}: both stored and an alias of {target}")
        if target not in state:
            raise ArtifactError(f"{path}: tensor {alias}: alias of {target}, which is not stored")

