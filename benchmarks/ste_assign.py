"""Nearest-centroid assignment of scalar LUTs on one CPU thread: a batched ``searchsorted`` on
the sorted midpoints vs counting the midpoints below each value (``strategies._count_below``).

    python benchmarks/ste_assign.py

Both formulations run side by side in one process (interleaved, 15 repetitions, median) on
w4-shaped groups (``P`` LUTs of ``N`` weights: groups of 16 rows of a 256- or 4096-row matrix
with 256 columns) for 4, 16 and 64 centroids, after checking that they agree exactly.
"""

# ruff: noqa: B023  (each arm runs inside its own loop iteration)
from __future__ import annotations

import statistics
import time

import torch

from coreai_palettize_plugins.core.strategies import _count_below, _sorted_midpoints


def main() -> None:
    torch.set_num_threads(1)
    print("| LUTs x weights | centroids | searchsorted (ms) | count below (ms) | speed-up |")
    print("|---|---|---|---|---|")
    for groups, size in [(16, 4096), (64, 4096), (256, 4096)]:
        for clusters in (4, 16, 64):
            centroids, values = torch.randn(groups, clusters, 1), torch.randn(groups, size)
            order, midpoints = _sorted_midpoints(centroids, values.device)
            arms = {"searchsorted": lambda: torch.searchsorted(midpoints, values),
                    "count": lambda: _count_below(midpoints, values)}
            assert torch.equal(arms["searchsorted"](), arms["count"]())
            times: dict[str, list[float]] = {name: [] for name in arms}
            for _ in range(15):
                for name, run in arms.items():
                    start = time.perf_counter()
                    order.gather(1, run())
                    times[name].append(time.perf_counter() - start)
            search, count = (statistics.median(times[n]) * 1e3 for n in arms)
            print(f"| {groups} x {size} | {clusters} | {search:.2f} | {count:.2f} | "
                  f"{search / count:.2f}x |")


if __name__ == "__main__":
    main()
