"""The calibration phase (``palettize.calibration``; the mechanics are in ``calibration.py``):
where the batches come from, computing or loading the sensitivities on every rank, handing them
to coreai-opt's weighted k-means, and the stats for the report.

``calibrate(tensors, settings, model=, data=, dist=)`` gets the palettized tensors, its settings
section, the loss/data callable and the distributed context, and returns the stats (and the raw
sensitivities when a budget wants them); it never sees the engine."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .. import _coreai_compat as compat
from ..core import sharding
from ..core.checks import PalettizeConfigError
from ..core.dist_context import DistContext
from . import calibration as core
from .calibration import CalibrationData, CalibrationStats

if TYPE_CHECKING:
    from .calibration import CalibrationSettings

__all__ = ["CalibrationData", "CalibrationStats", "calibrate", "plan_batches", "release"]

log = logging.getLogger("coreai_palettize_plugins.accuracy.calibration")

def _map_style(data: CalibrationData) -> bool:
    ds = data.dataset
    return (ds is not None and data.collate_fn is not None and bool(data.batch_size)
            and not isinstance(ds, torch.utils.data.IterableDataset)
            and hasattr(ds, "__getitem__") and hasattr(ds, "__len__"))


def plan_batches(data: CalibrationData, settings: CalibrationSettings, rank: int, world: int
                 ) -> tuple[list[tuple[int, Any]] | Iterator[tuple[int, Any]], int, str]:
    """This rank's ``(global batch index, batch)`` pairs, their number, and a description."""
    if _map_style(data):
        size = int(data.batch_size)
        wanted = settings.samples if settings.samples is not None else settings.batches * size
        available = len(data.dataset)
        n = min(wanted, available)
        if n < wanted and rank == 0:
            log.warning("palettize.calibration: the train dataset has %d samples, fewer than the "
                        "%d asked for; calibrating on all of them", available, wanted)
        starts = list(range(0, n, size))[rank::world]
        index = {s: i for i, s in enumerate(range(0, n, size))}

        def mine() -> Iterator[tuple[int, Any]]:
            for s in starts:
                yield index[s], data.collate_fn([data.dataset[j] for j in range(s, min(s + size, n))])

        how = (f"the first {n} samples of the train dataset in order, batches of {size}"
               + (f", batch b on rank b % {world}" if world > 1 else ""))
        return mine(), len(starts), how
    if data.loader is None:
        raise PalettizeConfigError("calibration", "no training data to calibrate with")
    quota = settings.samples if settings.samples is not None else settings.batches
    share = len(range(rank, quota, world))

    def streamed() -> Iterator[tuple[int, Any]]:
        seen = 0
        for i, batch in enumerate(iter(data.loader)):
            if seen >= share:
                return
            yield i, batch
            seen += core._batch_size(batch) if settings.samples is not None else 1

    unit = "samples" if settings.samples is not None else "batches"
    return streamed(), (share if unit == "batches" else None), (
        f"the first {share} {unit} of a new iterator of the train dataloader on each rank "
        "(not an indexable dataset)")


def calibrate(tensors: list[compat.PalettizedTensor], settings: CalibrationSettings, *,
              model: nn.Module, data: Callable[[], CalibrationData] | None, dist: DistContext,
              keep_raw: bool = False
              ) -> tuple[CalibrationStats, dict[str, torch.Tensor] | None]:
    """Sensitivities for ``tensors`` (computed with ``data``'s loss on ``model``, or loaded from
    ``settings.path``), set as the weights of coreai-opt's k-means; identical on every rank of
    ``dist``. Call right before k-means (clustering is deferred meanwhile, so the forward uses
    the dense weights). Returns the stats, and with ``keep_raw`` the raw (not normalized)
    sensitivities per weight name (the budget's objective), else ``None``."""
    started = time.perf_counter()
    path = settings.path
    exists = dist.broadcast_object(bool(path) and Path(path).is_file())
    sharded = any(sharding.is_sharded(t.original) for t in tensors)  # FSDP2: this rank's rows
    if exists:
        sens, meta = (_load_shards if sharded else _load_everywhere)(path, tensors, dist)
        stats = CalibrationStats("loaded", int(meta.get("samples", 0)), int(meta.get("batches", 0)),
                                 0.0, len(tensors), dist.world_size, path,
                                 str(meta.get("data", "")))
    else:
        sens, stats = _compute_everywhere(model, data, tensors, settings, dist, sharded)
    raw = {t.name: sens[t.name] for t in tensors} if keep_raw else None
    bounds = core.kmeans_weight_bounds(sens, dist) if sharded else {}
    compat.set_kmeans_sensitivities(
        tensors, {t.name: core.kmeans_weights(sens.pop(t.name), *bounds.get(t.name, (None, None)))
                  for t in tensors})
    stats.seconds = time.perf_counter() - started
    if dist.is_main:
        if stats.source == "loaded":
            log.info("palettize: calibration: loaded the sensitivities of %d weights from %s "
                     "(not computed)", len(tensors), path)
        else:
            log.info("palettize: calibration: computed the sensitivities of %d weights from %d "
                     "samples (%d batches) in %.1f s%s", len(tensors), stats.samples,
                     stats.batches, stats.seconds, f"; saved to {path}" if path else "")
    return stats, raw


def _compute_everywhere(model: nn.Module, provider: Callable[[], CalibrationData] | None,
                        tensors: list[compat.PalettizedTensor], settings: CalibrationSettings,
                        dist: DistContext, sharded: bool = False
                        ) -> tuple[dict[str, torch.Tensor], CalibrationStats]:
    # Deferred fakes forward the dense Parameter itself (no lazy k-means); the caller's
    # end_deferral / k-means follows.
    compat.defer_clustering(tensors)
    if provider is None:
        raise PalettizeConfigError("calibration", "no training data to calibrate with: use the "
                                   "Lightning or HF callback, or set engine.calibration_data")
    params = {t.name: t.original for t in tensors}
    with dist.agree("palettize.calibration"):
        data = provider()
        batches, total, how = plan_batches(data, settings, dist.rank, dist.world_size)
        progress = core._progress(total, settings.show_progress and dist.is_main)
        with core._calibration_mode(model, params), progress:
            if sharded:  # FSDP2: the sums of this rank's rows, over every rank's batches
                sums, n_batches, n_samples = core._accumulate_sharded(
                    tensors, data.loss, batches, lambda: _pad_batch(data), dist,
                    progress)
            else:
                sums, n_batches, n_samples = core._accumulate(params, data.loss, batches,
                                                              progress)
    if sharded:
        (counts,) = dist.all_reduce([torch.tensor([n_batches, n_samples], dtype=torch.float64)])
        n_batches, n_samples = int(counts[0].item()), int(counts[1].item())
    else:
        n_batches, n_samples = core._all_reduce(sums, n_batches, n_samples, dist)
    if n_batches == 0:
        raise PalettizeConfigError("calibration", "the train data gave no batch to calibrate on")
    sens = core._means(sums, n_batches)
    if settings.path:
        full = _gather_on_main(tensors, sens, dist) if sharded else sens
        with dist.agree("palettize.calibration save"):
            if dist.is_main:
                core.save_sensitivities(settings.path, full, batches=n_batches, samples=n_samples,
                                        data=how)
        del full
    return sens, CalibrationStats("computed", n_samples, n_batches, 0.0, len(tensors),
                                  dist.world_size, settings.path, how)


def _pad_batch(data: CalibrationData) -> tuple[int, Any]:
    """A batch for a rank that ran out while others calibrate on (FSDP2: every rank must run as
    many forwards); its loss counts zero. The plan's first batch (a new loader iterator's)."""
    if _map_style(data):
        size = min(int(data.batch_size), len(data.dataset))
        return 0, data.collate_fn([data.dataset[j] for j in range(size)])
    if data.loader is None:
        raise PalettizeConfigError("calibration", "no training data to calibrate with")
    return 0, next(iter(data.loader))


def _gather_on_main(tensors: list[compat.PalettizedTensor], shards: dict[str, torch.Tensor],
                    dist: DistContext) -> dict[str, torch.Tensor]:
    """The full sensitivities on rank 0 (``calibration.path``; one weight gathered at a time, the
    file holds them all), ``{}`` elsewhere."""
    full = {}
    for t in tensors:
        whole = (sharding.gather_rows(shards[t.name], t.original.shape[0]).cpu()
                 if sharding.is_sharded(t.original) else shards[t.name])
        if dist.is_main:
            full[t.name] = whole
        del whole
    return full


def _load_shards(path: str, tensors: list[compat.PalettizedTensor], dist: DistContext
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FSDP2: every rank reads its rows of each weight from the memory-mapped file."""
    out: tuple[dict[str, torch.Tensor], dict[str, Any]] = ({}, {})
    with dist.agree("palettize.calibration load"):
        out = core.load_sensitivities(path, tensors, rows=_shard_rows)
    return out


def _shard_rows(t: compat.PalettizedTensor) -> tuple[int, int]:
    rows = t.original.shape[0]
    return sharding.local_rows(rows) if sharding.is_sharded(t.original) else (0, rows)


def _load_everywhere(path: str, tensors: list[compat.PalettizedTensor], dist: DistContext
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Rank 0 reads the file; every rank receives the identical tensors."""
    sens: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    with dist.agree("palettize.calibration load"):
        if dist.is_main:
            sens, meta = core.load_sensitivities(path, tensors)
    if dist.active:
        meta = dist.broadcast_object(meta)
        buffers = [sens[t.name] if t.name in sens else torch.empty(tuple(t.original.shape))
                   for t in tensors]
        sens = {t.name: b.cpu() for t, b in zip(tensors, dist.broadcast(buffers))}
    return sens, meta


def release(tensors: list[compat.PalettizedTensor], *, reclusters: bool) -> None:
    """After k-means: drop the sensitivities, unless a warm-up schedule will re-cluster at
    switch-on (``reclusters``: coreai-opt then uses them again, from the same fit-start
    calibration)."""
    if not reclusters:
        compat.clear_kmeans_sensitivities(tensors)
