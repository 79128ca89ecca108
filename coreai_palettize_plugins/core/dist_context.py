"""``DistContext``: what a phase (calibration, budget, k-means, export) knows of the other ranks.

A phase never reads ``torch.distributed`` globals nor the engine: it gets a ``DistContext`` with
the rank, the world size and the few collectives it needs (``broadcast_object``, ``broadcast``,
``all_reduce``, ``agree``, ``barrier``) over one process group. ``DistContext.current()`` is the
default group (single process, DDP); a sharded run (FSDP2) builds one with its own ``group`` and
``mesh`` (the ``DeviceMesh`` the weights are sharded over), and the same phases run unchanged:
a phase that can work on shards reads ``mesh``, the others see a plain data-parallel group.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ._utils import one_line

__all__ = ["DistContext"]


_on_main_calls = itertools.count()
"""Calls of ``DistContext.on_main`` in this process: every rank makes the same calls in the same
order, so the n-th call's store key is the same on every rank."""


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and collectives of one process group (``None``: the default group).

    Attributes:
        rank: this process's rank in ``group``.
        world_size: the number of ranks in ``group``.
        group: the process group of the phases' collectives (``None``: the default group).
        mesh: the ``DeviceMesh`` the model is sharded over (FSDP2), ``None`` when every rank
            holds whole weights (single process, DDP).
    """

    rank: int = 0
    world_size: int = 1
    group: Any = None
    mesh: Any = None

    @classmethod
    def current(cls, group: Any = None, mesh: Any = None) -> DistContext:
        """The context of ``group`` (default: the default process group, if initialized)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(mesh=mesh)
        return cls(dist.get_rank(group), dist.get_world_size(group), group, mesh)

    @property
    def active(self) -> bool:
        """More than one rank: the collectives communicate."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """Where tensors travel: the current CUDA device under NCCL, else the CPU."""
        if self.active and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier(self.group)

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        """``value`` from rank ``src`` on every rank (small metadata only)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        return box[0]

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order."""
        if not self.active:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int = 0) -> list[torch.Tensor]:
        """Rank ``src``'s ``tensors`` on every rank (same shapes and dtypes everywhere; one async
        broadcast each through ``device()``). Returns them on their own devices."""
        if not self.active:
            return list(tensors)
        device = self.device()
        moved = [t.to(device) for t in tensors]
        works = [dist.broadcast(t, src=self._global(src), group=self.group, async_op=True)
                 for t in moved]
        for work in works:
            work.wait()
        return [m.to(t.device) for m, t in zip(moved, tensors)]

    def all_reduce(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The sum of each tensor over the ranks (one async all-reduce each). Returns them on
        their own devices."""
        if not self.active:
            return list(tensors)
        device = self.device()
        moved = [t.to(device) for t in tensors]
        works = [dist.all_reduce(t, group=self.group, async_op=True) for t in moved]
        for work in works:
            work.wait()
        return [m.to(t.device) for m, t in zip(moved, tensors)]

    @contextlib.contextmanager
    def agree(self, what: str) -> Iterator[None]:
        """Run the block on every rank; if it failed anywhere, raise everywhere.

        The failing rank re-raises its own exception; the others raise a ``RuntimeError`` naming
        the rank and the original error. With one rank this is a no-op wrapper.
        """
        error: BaseException | None = None
        try:
            yield
        except Exception as e:
            error = e
        if self.active:
            messages = self.all_gather_object(
                None if error is None else one_line(error, causes=True))
            failed = [(r, m) for r, m in enumerate(messages) if m is not None]
            if error is None and failed:
                failed_rank, failed_message = failed[0]
                raise RuntimeError(
                    f"palettize: {what} failed on rank {failed_rank}: {failed_message}")
        if error is not None:
            raise error

    def on_main(self, step: Callable[[], Any], *, what: str, poll_s: float = 0.2) -> Any:
        """``step()`` on rank 0; the other ranks wait for it without a deadline, polling the
        default store (not a barrier bounded by the process group's timeout), so a step longer
        than that timeout (a long export) is never cut short. A failure on rank 0 is raised on
        every rank; if rank 0 dies, the store (or the launcher) ends the wait. Returns
        ``step()``'s value on rank 0 and None on the others."""
        if not self.active:
            return step()
        store = dist.distributed_c10d._get_default_store()
        key = f"palettize/on_main/{what}/{next(_on_main_calls)}"
        if self.is_main:
            outcome = "interrupted"
            try:
                value = step()
                outcome = "ok"
                return value
            except BaseException as e:
                outcome = one_line(e)
                raise
            finally:
                store.set(key, outcome)
        while not store.check([key]):
            time.sleep(poll_s)
        outcome = store.get(key).decode()
        if outcome != "ok":
            raise RuntimeError(f"palettize: {what} failed on rank 0: {outcome}")
        return None

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)
