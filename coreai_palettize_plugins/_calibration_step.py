"""The engine's calibration step (``palettize.calibration``; see ``calibration.py``): where the
batches come from, computing or loading the sensitivities on every rank, handing them to
coreai-opt's weighted k-means, and the stats for the report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from . import _coreai_compat as compat
from . import calibration as core
from . import distributed
from .checks import PalettizeConfigError

if TYPE_CHECKING:
    from .calibration import CalibrationSettings
    from .engine import Palettization

__all__ = ["CalibrationData", "CalibrationStats", "calibrate", "plan_batches", "release"]

log = logging.getLogger("coreai_palettize_plugins.calibration")

@dataclass
class CalibrationData:
    """What an adapter hands the engine: the loss and where the training data is.

    ``loss(batch, batch_index)``: the model's own training loss of one collated batch (moved to
    the device by the adapter). ``dataset`` + ``collate_fn`` + ``batch_size``: the deterministic
    plan (see the module docstring); else ``loader`` is iterated (a new iterator).
    """

    loss: Callable[[Any, int], torch.Tensor]
    loader: Iterable[Any] | None = None
    dataset: Any = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    batch_size: int | None = None

    @classmethod
    def from_loader(cls, loss: Callable[[Any, int], torch.Tensor], loader: Any,
                    batch_size: int | None = None) -> CalibrationData:
        """From a torch ``DataLoader`` (its dataset, collate_fn, batch size) or any iterable."""
        return cls(loss=loss, loader=loader, dataset=getattr(loader, "dataset", None),
                   collate_fn=getattr(loader, "collate_fn", None),
                   batch_size=batch_size or getattr(loader, "batch_size", None))


@dataclass
class CalibrationStats:
    """What calibration did (``report.calibration``, ``report.json``)."""

    source: str            # "computed" or "loaded"
    samples: int
    batches: int
    seconds: float
    weights: int
    world_size: int
    path: str | None = None
    data: str = ""         # how the batches were chosen

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def calibrate(engine: Palettization, tensors: list[compat.PalettizedTensor]) -> CalibrationStats:
    """Sensitivities for ``tensors`` (computed, or loaded from ``calibration.path``), set as the
    weights of coreai-opt's k-means. Identical on every rank. Call right before k-means
    (clustering is deferred meanwhile, so the forward uses the dense weights)."""
    settings = engine.settings.calibration
    assert settings is not None
    started = time.perf_counter()
    path = settings.path
    exists = distributed.broadcast_object(bool(path) and Path(path).is_file())
    if exists:
        sens, meta = _load_everywhere(path, tensors)
        stats = CalibrationStats("loaded", int(meta.get("samples", 0)), int(meta.get("batches", 0)),
                                 0.0, len(tensors), distributed.world_size(), path,
                                 str(meta.get("data", "")))
    else:
        sens, stats = _compute_everywhere(engine, tensors, settings)
    if engine.settings.budget is not None:   # raw (not per-weight normalized): budget objective
        engine.sensitivities = {t.name: sens[t.name] for t in tensors}
    compat.set_kmeans_sensitivities(tensors, {t.name: core.kmeans_weights(sens.pop(t.name))
                                              for t in tensors})
    stats.seconds = time.perf_counter() - started
    if distributed.rank() == 0:
        if stats.source == "loaded":
            log.info("palettize: calibration: loaded the sensitivities of %d weights from %s "
                     "(not computed)", len(tensors), path)
        else:
            log.info("palettize: calibration: computed the sensitivities of %d weights from %d "
                     "samples (%d batches) in %.1f s%s", len(tensors), stats.samples,
                     stats.batches, stats.seconds, f"; saved to {path}" if path else "")
    return stats


def _compute_everywhere(engine: Palettization, tensors: list[compat.PalettizedTensor],
                        settings: CalibrationSettings
                        ) -> tuple[dict[str, torch.Tensor], CalibrationStats]:
    # Deferred fakes forward the dense Parameter itself (no lazy k-means); the caller's
    # end_deferral / k-means follows.
    compat.defer_clustering(tensors)
    provider = engine.calibration_data
    if provider is None:
        raise PalettizeConfigError("calibration", "no training data to calibrate with: use the "
                                   "Lightning or HF callback, or set engine.calibration_data")
    params = {t.name: t.original for t in tensors}
    with distributed.agree("palettize.calibration"):
        data = provider()
        batches, total, how = plan_batches(data, settings, distributed.rank(),
                                           distributed.world_size())
        progress = core._progress(total, settings.show_progress)
        with core._calibration_mode(engine.model, params), progress:
            sums, n_batches, n_samples = core._accumulate(params, data.loss, batches, progress)
    n_batches, n_samples = core._all_reduce(sums, n_batches, n_samples)
    if n_batches == 0:
        raise PalettizeConfigError("calibration", "the train data gave no batch to calibrate on")
    sens = core._means(sums, n_batches)
    if settings.path:
        with distributed.agree("palettize.calibration save"):
            if distributed.rank() == 0:
                core.save_sensitivities(settings.path, sens, batches=n_batches, samples=n_samples,
                                   data=how)
    return sens, CalibrationStats("computed", n_samples, n_batches, 0.0, len(tensors),
                                  distributed.world_size(), settings.path, how)


def _load_everywhere(path: str, tensors: list[compat.PalettizedTensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Rank 0 reads the file; every rank receives the identical tensors."""
    sens: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    with distributed.agree("palettize.calibration load"):
        if distributed.rank() == 0:
            sens, meta = core.load_sensitivities(path, tensors)
    if distributed.world_size() > 1:
        meta = distributed.broadcast_object(meta)
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        buffers = {t.name: (sens[t.name] if t.name in sens
                            else torch.empty(tuple(t.original.shape))).to(device) for t in tensors}
        works = [dist.broadcast(b, src=0, async_op=True) for b in buffers.values()]
        for work in works:
            work.wait()
        sens = {k: v.cpu() for k, v in buffers.items()}
    return sens, meta


def release(engine: Palettization, tensors: list[compat.PalettizedTensor]) -> None:
    """After k-means: drop the sensitivities, unless a warm-up schedule will re-cluster at
    switch-on (coreai-opt then uses them again, from the same fit-start calibration)."""
    if engine.settings.start_step == 0:
        compat.clear_kmeans_sensitivities(tensors)

