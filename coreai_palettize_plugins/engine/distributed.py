"""Who runs k-means under ``torch.distributed``, and how the result reaches every rank.

- ``rank0``: rank 0 clusters every palettized weight; the other ranks receive.
- ``sharded`` (default): weights are spread over ranks by size (greedy bin packing, largest
  first onto the least-loaded rank); each rank clusters its share and broadcasts it.

Results travel as tensors, never pickled: each owner packs the state of its fake-palettize modules
(uint8 indices, LUTs, scales) into one byte buffer that every rank broadcasts asynchronously into
pre-allocated storage; all ranks wait once, then load it like a checkpoint. Only small metadata
(shapes, dtypes, error messages) goes through ``all_gather_object``. Every rank ends bit-identical
to a single-process run (scalar k-means is deterministic). A failure on any rank is shared at a
consensus point, so every rank raises promptly instead of waiting in a collective.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist

from .. import _coreai_compat as compat
from ..core._utils import dtype_from_name, dtype_name
from ..core.checks import PalettizeConfigError
from ..core.dist_context import DistContext
from ..core.sharding import comm_device, plan_owners
from ..core.strategies import trains_dense_weight

if TYPE_CHECKING:
    from ..settings.schema import PalettizeSettings

__all__ = [
    "ClusterStats",
    "agree",
    "barrier",
    "broadcast_object",
    "check_fsdp2",
    "check_parallelism",
    "cluster",
    "palettized_state_hash",
    "plan_owners",
    "rank",
    "world_size",
]

log = logging.getLogger(__name__)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class ClusterStats:
    """What one ``cluster`` call did on this rank."""

    mode: str
    world_size: int
    clustered_here: list[str]
    owners: dict[str, int]
    broadcast_bytes: int = 0
    palettized_elements: int = 0

    @property
    def bytes_per_weight(self) -> float:
        """Bytes broadcast per palettized weight element (indices + LUT share)."""
        return self.broadcast_bytes / max(self.palettized_elements, 1)


def palettized_state_hash(model: torch.nn.Module) -> str:
    """sha256 over every LUT (``centroids``) and index tensor of a prepared model, names
    included: equal on every rank (and to a single-process run) after ``cluster``."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.endswith((".centroids", ".indices", ".packed_indices")):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


UNSUPPORTED_PARALLELISM = ("fsdp", "deepspeed")
SUPPORTED = "palettize.training=ste (the default), without compact/adapters/distillation"


def check_parallelism(settings: PalettizeSettings, kind: str, *, what: str,
                      find_unused: bool | None = None, fix: str = "") -> bool:
    """The parallelism rules, for adapters that only detect the setup.

    ``kind``: ``"single"``, ``"ddp"``, ``"fsdp"``, ``"deepspeed"`` or ``"model_parallel"``;
    ``what`` names it in the message; ``find_unused`` is DDP's ``find_unused_parameters``
    (None: not set); ``fix`` says how to set it. Returns True when DDP must run with
    ``find_unused_parameters=True`` (a warm-up schedule turns weights' gradients off).

    Raises:
        PalettizeConfigError: a setup that cannot work, with the fix.
    """
    if kind in UNSUPPORTED_PARALLELISM:
        raise PalettizeConfigError(
            "", f"{what} is not supported (FSDP1 and DeepSpeed ZeRO shard or ignore the "
            "palettization state); use FSDP2 (Lightning ModelParallelStrategy, HF "
            "fsdp_config={'version': 2}, or fully_shard after Palettization.prepare) or DDP, "
            "see README 'Distributed'")
    if kind == "model_parallel":
        check_fsdp2(settings, what)
    needs = (kind == "ddp" and settings.start_step > 0
             and not trains_dense_weight(settings.training_strategy))
    if needs and find_unused is False:
        raise PalettizeConfigError(
            "schedule.start_step", "palettized weights stop getting gradients when "
            f"palettization switches on, which DDP rejects without find_unused_parameters; {fix}")
    return needs


def agree(what: str) -> contextlib.AbstractContextManager[None]:
    """``DistContext.agree`` on the default group: a failure on any rank raises on every rank."""
    return DistContext.current().agree(what)


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` from rank ``src`` on every rank (small metadata only)."""
    return DistContext.current().broadcast_object(value, src)


BEFORE_SHARDING = ("cluster before sharding instead: Palettization.prepare(model, ...), then "
                   "fully_shard (the compact base's packed indices and LUTs are replicated on "
                   "every rank)")


def check_fsdp2(settings: PalettizeSettings, what: str, *, clustered_before: bool = False
                ) -> None:
    """The settings FSDP2 runs with; anything else fails before training with the fix.

    ``clustered_before``: k-means (and the compact base, the adapters) ran before ``fully_shard``
    (the engine API's ``prepare``): ``frozen``/``lut`` and LoRA adapters then train with their
    packed state replicated on every rank. The callbacks cluster after sharding.

    Raises:
        PalettizeConfigError: naming the key and the supported path.
    """
    tail = f"is not supported under {what} (FSDP2); supported: {SUPPORTED}, or train with DDP"
    if settings.distillation is not None:
        raise PalettizeConfigError("distillation", f"(a dense teacher per rank) {tail}")
    if clustered_before:
        return
    if settings.adapters is not None:
        raise PalettizeConfigError("adapters", f"(LoRA on the compact base) {tail}; or "
                                   f"{BEFORE_SHARDING}")
    if settings.training_strategy != "ste":
        raise PalettizeConfigError(
            "training", f"{settings.training_strategy!r} {tail} (k-means on the shards keeps "
            f"no weight-shaped index state); or {BEFORE_SHARDING}")


@contextlib.contextmanager
def _progress_on_rank_zero() -> Iterator[None]:
    """coreai-opt draws a tqdm bar while clustering: silence it on ranks other than 0."""
    if rank() == 0:
        yield
        return
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous


def cluster(palettizer, tensors: list[compat.PalettizedTensor], mode: str) -> ClusterStats:
    """k-means for ``tensors`` (those without centroids), once across all ranks."""
    world = world_size()
    owners = plan_owners([t.original.numel() for t in tensors], world, mode)
    me = rank()
    mine = [t for t, owner in zip(tensors, owners) if owner == me]
    stats = ClusterStats(mode=mode, world_size=world, clustered_here=[t.name for t in mine],
                         owners={t.name: o for t, o in zip(tensors, owners)},
                         palettized_elements=sum(t.original.numel() for t in tensors))
    with agree("k-means"), _progress_on_rank_zero():
        compat.cluster_tensors(palettizer, mine)
    if world > 1:
        stats.broadcast_bytes = _broadcast_results(tensors, owners)
    return stats


class _Shipment(NamedTuple):
    """One owner's buffer in flight: which weights, each tensor's byte size, the async work."""

    owner: int
    names: list[str]
    sizes: list[list[int]]
    buffer: torch.Tensor
    work: Any


def _broadcast_results(tensors: list[compat.PalettizedTensor], owners: list[int]) -> int:
    """Every owner sends its tensors' fake-palettize state to every rank in one buffer."""
    me = rank()
    local_meta = {
        t.name: [(key, tuple(v.shape), dtype_name(v.dtype)) for key, v in t.fake.state_dict().items()]
        for t, owner in zip(tensors, owners) if owner == me
    }
    all_meta: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(all_meta, local_meta)
    device = comm_device()
    by_name = {t.name: t for t in tensors}
    shipments: list[_Shipment] = []
    for owner, meta in enumerate(all_meta):
        if not meta:
            continue
        names = list(meta)
        sizes = [[_nbytes(shape, dtype) for _, shape, dtype in meta[name]] for name in names]
        if owner == me:
            parts = [v.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
                     for name in names for v in by_name[name].fake.state_dict().values()]
            buffer = torch.cat(parts).to(device) if parts else torch.empty(0, dtype=torch.uint8)
        else:
            buffer = torch.empty(sum(map(sum, sizes)), dtype=torch.uint8, device=device)
        work = dist.broadcast(buffer, src=owner, async_op=True)
        shipments.append(_Shipment(owner, names, sizes, buffer, work))
    for shipment in shipments:
        shipment.work.wait()
    for shipment in shipments:
        if shipment.owner != me:
            _unpack(shipment, all_meta[shipment.owner], by_name)
    return sum(s.buffer.numel() for s in shipments)


def _unpack(shipment: _Shipment, meta: dict[str, Any],
            by_name: dict[str, compat.PalettizedTensor]) -> None:
    data = shipment.buffer.cpu()
    offset = 0
    for name, name_sizes in zip(shipment.names, shipment.sizes):
        state = {}
        for (key, shape, dtype), nbytes in zip(meta[name], name_sizes):
            chunk = data[offset:offset + nbytes].clone()  # own, aligned storage per tensor
            state[key] = chunk.view(dtype_from_name(dtype)).reshape(shape)
            offset += nbytes
        # CPU tensors: coreai-opt moves LUTs to the module's device and keeps indices on CPU.
        by_name[name].fake.load_state_dict(state)


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * dtype_from_name(dtype).itemsize
