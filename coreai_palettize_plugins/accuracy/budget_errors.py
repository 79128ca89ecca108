"""The budget's per-layer errors: every choice of each weight clustered once with coreai-opt's
k-means, cached in JSON keyed by name, shape, dtype, a checksum of the weight (and sensitivities)
and the spec, so a new target costs no k-means."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import _coreai_compat as compat
from . import calibration

__all__ = ["CACHE_VERSION", "ErrorCache", "evaluate", "options_for"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def _digest(tensor: torch.Tensor | None) -> str:
    if tensor is None:
        return "-"
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()


def _layer_key(t: compat.PalettizedTensor, weight: torch.Tensor,
               sensitivities: torch.Tensor | None) -> str:
    fake = t.fake
    spec = [fake.cluster_dim, str(getattr(fake.lut_qspec, "dtype", None)),
            fake.enable_per_channel_scale, type(fake.reshape_strategy).__name__]
    parts = [t.name, list(weight.shape), str(weight.dtype), _digest(weight),
             _digest(sensitivities), spec]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()


def options_for(t: compat.PalettizedTensor, choices: Sequence[int],
                granularity: Sequence[str | int] | None
                ) -> list[tuple[int, int | None, int | None]]:
    """``(n_bits, group_size or None, axis)`` per choice of ``palettize.budget`` (its ``choices``
    and ``granularity``) for this weight, cheapest layout first."""
    base = t.fake.granularity
    base_size, axis = getattr(base, "group_size", None), getattr(base, "axis", None)
    layouts: list[tuple[int | None, int | None]] = []
    for g in granularity or ["base"]:
        layout = ((base_size, axis if base_size else None) if g == "base" else
                  (None, None) if g == "per_tensor" else (int(g), axis or 0))
        if layout not in layouts:
            layouts.append(layout)
    return [(n, size, ax) for n in choices for size, ax in layouts]


def _option_key(n_bits: int, group_size: int | None, axis: int | None) -> str:
    return f"{n_bits}:{'pt' if group_size is None else f'g{group_size}a{axis}'}"


class ErrorCache:
    """``{layer key: {option key: [error, bits or null]}}`` in a JSON file (or in memory)."""

    def __init__(self, path: str | None) -> None:
        self.path, self.entries, self.dirty = path, {}, False
        if path and Path(path).is_file():
            try:
                data = json.loads(Path(path).read_text())
                if data.get("version") == CACHE_VERSION:
                    self.entries = data["layers"]
                else:
                    log.warning("palettize.budget.cache: %s has another version; recomputing", path)
            except (OSError, ValueError, KeyError, AttributeError) as e:
                warnings.warn(f"palettize.budget.cache: cannot read {path} ({e}); recomputing",
                              stacklevel=3)

    def save(self) -> None:
        if not (self.path and self.dirty):
            return
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "layers": self.entries}))
        tmp.replace(target)


def evaluate(t: compat.PalettizedTensor, options, sensitivities: torch.Tensor | None,
             cache: ErrorCache, weight: torch.Tensor | None = None
             ) -> tuple[list[tuple[int, int | None, int | None, int, float]], int]:
    """``[(n_bits, group_size, axis, bits, error)]`` for the compatible options; k-means runs.
    ``weight``: the whole weight when ``t.original`` is one shard of it (FSDP2)."""
    weight = (t.original if weight is None else weight).detach().cpu()  # coreai-opt: on the CPU
    entry = cache.entries.setdefault(_layer_key(t, weight, sensitivities), {"name": t.name})
    # k-means gets the sensitivities as calibration gives them to coreai-opt (zeros raised: a
    # cluster of zero-weight values would get a 0/0 centroid); the objective keeps them raw.
    kmeans_weights = None if sensitivities is None else calibration.kmeans_weights(sensitivities)
    runs, out = 0, []
    for n, size, axis in options:
        key = _option_key(n, size, axis)
        if key not in entry:
            result = compat.trial_palettize(t.fake, weight, n, compat.granularity_for(size, axis),
                                            kmeans_weights)
            runs += 1
            if result is None:
                entry[key] = None
            else:
                quantized, bits = result
                diff = (weight.double() - quantized.double()).pow(2)
                if sensitivities is not None:
                    diff = diff * sensitivities.to("cpu", torch.float64)
                entry[key] = [float(diff.sum()), bits]
            cache.dirty = True
        if entry[key] is not None:
            error, bits = entry[key]
            out.append((n, size, axis, 8 * math.ceil(bits / 8), error))
    return out, runs
