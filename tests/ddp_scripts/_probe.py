"""Shared by the 2-process scripts: count k-means runs, inject failures, record per-rank facts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from coreai_opt.palettization.kmeans.kmeans_fake_palettize import _KMeansFakePalettize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import palettized_state_hash

KMEANS_CALLS: list[str] = []
_original = _KMeansFakePalettize._cluster_to_centroids


def _counting(fake, *args, **kwargs):
    if int(os.environ.get("FAIL_ON_RANK", "-1")) == dist.get_rank():
        raise ValueError(f"injected k-means failure on {fake.tensor_fqn}")
    KMEANS_CALLS.append(fake.tensor_fqn)
    return _original(fake, *args, **kwargs)


_KMeansFakePalettize._cluster_to_centroids = _counting


def record(out: Path, rank: int, **facts) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rank{rank}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(facts)
    path.write_text(json.dumps(data, indent=1))


def state_hash(model) -> str:
    return palettized_state_hash(model)
