"""Running coreai-opt's k-means for a chosen subset of weights (in process or in its spawn pool), and
finishing prepare.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from coreai_opt.palettization import KMeansPalettizer
from coreai_opt.palettization.kmeans.kmeans_fake_palettize import _KMeansFakePalettize
from coreai_opt.palettization.spec.fake_palettize import _enable_fake_palett

from .tensors import PalettizedTensor, _end_deferral, end_deferral

__all__ = ["STALE_LOCK_SECONDS", "cluster_tensors", "ensure_kmeans_extension", "finish_clustering"]

log = logging.getLogger(__name__)


STALE_LOCK_SECONDS = 300


def ensure_kmeans_extension() -> None:
    """Build (or load) coreai-opt's JIT k-means extension, clearing a stale build lock first.

    torch < 2.14 waits forever on a ``lock`` file left by a killed build. A real build of this
    one-file extension takes about a second, so a lock older than ``STALE_LOCK_SECONDS`` is stale.
    """
    from coreai_opt.deps._kmeans1d import core
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory("_core", verbose=False), "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        age = None
    if age is not None and age > STALE_LOCK_SECONDS:
        log.warning(
            "removing a stale torch extension build lock (%.0f s old): %s", age, lock)
        with contextlib.suppress(OSError):
            os.remove(lock)
    core._dll()


def cluster_tensors(palettizer: KMeansPalettizer, tensors: list[PalettizedTensor]) -> None:
    """Run k-means for ``tensors`` in this process (coreai-opt's ``num_workers`` pool if > 1)."""
    if not tensors:
        return
    end_deferral(tensors)  # a deferred fake would return at once and be taken as disabled
    ensure_kmeans_extension()
    wanted = {id(t.fake) for t in tensors}
    infos = [i for i in palettizer._collect_fake_palett_info(to_cpu=False)
             if id(i.fp_module) in wanted]
    for info in infos:
        info.fp_module.disable_fake_palett()
    if palettizer._num_workers <= 1:
        palettizer._calculate_centroids_sequential(infos)
    else:
        _calculate_in_pool(palettizer, infos)
    for info in infos:
        info.fp_module.enable_fake_palett()


def _calculate_in_pool(palettizer: KMeansPalettizer, infos: list) -> None:
    """coreai-opt's spawn pool over a subset of layers (``_calculate_centroids`` takes all)."""
    import torch.multiprocessing as mp
    from coreai_opt.palettization.kmeans.palettizer import _calculate_centroids_for_module

    workers = min(palettizer._num_workers, len(infos))
    with mp.get_context("spawn").Pool(processes=workers) as pool:
        results = pool.map(_calculate_centroids_for_module,
                           [(i.fp_module, i.weight.cpu()) for i in infos])
    palettizer._apply_centroid_results(infos, results)


def finish_clustering(palettizer: KMeansPalettizer) -> None:
    """Drop layers k-means disabled and turn fake palettization on (end of ``prepare``)."""
    model = palettizer._model
    for module in model.modules():  # a deferred fake is not a disabled one: keep it
        if isinstance(module, _KMeansFakePalettize):
            _end_deferral(module)
    palettizer._remove_disabled_fake_palett_modules(model)
    model.apply(_enable_fake_palett)
