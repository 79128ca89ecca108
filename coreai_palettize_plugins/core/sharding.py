"""Tensors FSDP2 shards along dim 0 (``DTensor`` with ``Shard(0)``): which rows a rank holds, and
the row-wise collectives the features need on them (a full copy, a sum of per-rank full tensors
scattered back to the shards), one tensor at a time. No feature here knows the engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["full_rows", "gather_rows", "is_sharded", "local_rows", "plan_owners",
           "reduce_scatter_rows", "row_ranges"]


def _dtensor() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def is_sharded(tensor: Any) -> bool:
    """A ``DTensor`` (a parameter FSDP2 sharded)."""
    dtensor = _dtensor()
    return dtensor is not None and isinstance(tensor, dtensor)


def row_ranges(rows: int, world: int) -> list[tuple[int, int]]:
    """Each rank's ``[start, end)`` rows under ``Shard(0)`` (``torch.chunk`` sizes)."""
    chunk = -(-rows // world)
    return [(min(r * chunk, rows), min((r + 1) * chunk, rows)) for r in range(world)]


def local_rows(rows: int) -> tuple[int, int]:
    """This rank's ``[start, end)`` of ``rows`` under ``Shard(0)`` on the default group."""
    return row_ranges(rows, dist.get_world_size())[dist.get_rank()]


def comm_device() -> torch.device:
    """Where the default group's collectives run (CUDA for NCCL, else the CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _padded(local: torch.Tensor, chunk: int) -> torch.Tensor:
    if local.shape[0] == chunk:
        return local.contiguous()
    out = torch.zeros((chunk, *local.shape[1:]), dtype=local.dtype, device=local.device)
    out[:local.shape[0]] = local
    return out


def gather_rows(local: torch.Tensor, rows: int) -> torch.Tensor:
    """The full tensor of ``rows`` rows whose ``Shard(0)`` pieces the ranks hold (``local``:
    this rank's), on every rank. Every rank calls it."""
    world = dist.get_world_size()
    chunk = -(-rows // world)
    device = comm_device()
    mine = _padded(local.to(device), chunk)
    out = torch.empty((chunk * world, *local.shape[1:]), dtype=local.dtype, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine)
    return out[:rows].to(local.device)


def full_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's full value (``full_tensor``), a plain tensor as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def reduce_scatter_rows(full: torch.Tensor) -> torch.Tensor:
    """This rank's ``Shard(0)`` rows of the sum over ranks of ``full`` (every rank passes its
    own full-shaped tensor and calls it)."""
    world = dist.get_world_size()
    rows = full.shape[0]
    chunk = -(-rows // world)
    device = comm_device()
    padded = torch.zeros((chunk * world, *full.shape[1:]), dtype=full.dtype, device=device)
    padded[:rows] = full
    out = torch.empty((chunk, *full.shape[1:]), dtype=full.dtype, device=device)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, padded)
    start, end = row_ranges(rows, world)[dist.get_rank()]
    return out[:end - start].to(full.device)


def plan_owners(sizes: Sequence[int], world: int, mode: str) -> list[int]:
    """Owner rank of each weight: all 0 for ``rank0``; greedy bin packing by size for
    ``sharded`` (deterministic: ties go to the lower index and the lower rank)."""
    if mode == "rank0" or world <= 1:
        return [0] * len(sizes)
    loads = [0] * world
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner = min(range(world), key=lambda r: (loads[r], r))
        owners[index] = owner
        loads[owner] += sizes[index]
    return owners
