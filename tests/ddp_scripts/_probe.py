"""Shared by the 2-process scripts: count k-means runs, inject failures, record per-rank facts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import count_kmeans, palettized_state_hash  # noqa: F401 (for the scripts)

KMEANS_CALLS: list[str] = []


def _record(fake) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if int(os.environ.get("FAIL_ON_RANK", "-1")) == rank:
        raise ValueError(f"injected k-means failure on {fake.tensor_fqn}")
    KMEANS_CALLS.append(fake.tensor_fqn)


count_kmeans(_record, setattr)


def record(out: Path, rank: int, **facts) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rank{rank}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(facts)
    path.write_text(json.dumps(data, indent=1))
