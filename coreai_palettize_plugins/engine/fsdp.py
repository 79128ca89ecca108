"""FSDP2 (``torch.distributed.fsdp.fully_shard``): k-means on sharded weights, restore targets,
export on rank 0.

The palettized structure goes in before ``fully_shard`` (Lightning: ``setup``, before the
module's ``configure_model`` shards it; the engine API: ``prepare`` -> ``fully_shard``). FSDP2 then
shards each dense weight (``parametrizations.<attr>.original``, a ``DTensor`` with ``Shard(0)``)
and replicates the fake-palettize buffers: the LUTs (``centroids``) are full on every rank.

k-means on sharded weights (``cluster``):

- **local**: when a weight's LUT groups lie along dim 0 (``per_grouped_channel``, axis 0, scalar
  LUTs), each rank clusters the groups that start on its shard, a group straddling the boundary
  completed with the next rank's first rows (one all-gather for every weight's heads, and one
  for every weight's LUT rows). No weight is gathered, and the k-means time divides by the
  number of ranks. Calibration's sensitivities (sharded like the weight) travel the same way.
- **gather**: otherwise one weight at a time is all-gathered (``full_tensor``), its owner (greedy
  bin packing, as ``sharding.plan_owners``) keeps it, clusters it, and broadcasts the state.

Both end bit-identical to a single-process run (scalar k-means is deterministic, per group).
``frozen``/``lut`` and LoRA adapters cluster before sharding instead (their packed state is
built from whole weights), which ``check_supported`` enforces.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn
from coreai_opt.palettization.kmeans.palettizer import _calculate_centroids_for_module

from .. import _coreai_compat as compat
from ..core import sharding
from ..core.checks import PalettizeConfigError
from ..core.dist_context import DistContext
from ..core.sharding import is_sharded
from . import distributed
from .distributed import check_fsdp2 as check_supported

if TYPE_CHECKING:
    from ..export.writer import ExportResult

__all__ = [
    "check_placements",
    "check_supported",
    "cluster",
    "export_on_main",
    "is_sharded",
    "placeholder_centroids",
    "replicated_state_bytes",
]

log = logging.getLogger(__name__)



def model_is_sharded(model: nn.Module) -> bool:
    """Any parameter of ``model`` is a ``DTensor`` (``fully_shard`` was applied)."""
    return any(is_sharded(p) for p in model.parameters())


def check_placements(model: nn.Module) -> None:
    """Palettized weights must be sharded FSDP2's way (``Shard(0)`` on each mesh dimension, or
    replicated): tensor parallelism would hand the fake-palettize modules a ``DTensor``.

    Raises:
        PalettizeConfigError: naming the first weight sharded otherwise.
    """
    from torch.distributed.tensor import Replicate, Shard

    for t in compat.fake_palettized_tensors(model):
        weight = t.original
        if is_sharded(weight) and any(p not in (Shard(0), Replicate()) for p in weight.placements):
            raise PalettizeConfigError(
                "", f"{t.name} is sharded as {tuple(weight.placements)}: tensor parallelism is "
                "not supported; shard with fully_shard only (FSDP2, Shard(0)), or train with DDP")


def placeholder_centroids(tensors: Sequence[compat.PalettizedTensor]) -> None:
    """Give every weight without centroids a zero LUT of its final shape, still marked
    uninitialized, so a sharded checkpoint (DCP loads only keys the model already has) restores
    them; k-means overwrites them when nothing was restored."""
    from .._coreai_compat.layouts import centroids_shape

    for t in tensors:
        if t.fake.centroids is None:
            compat.set_placeholder(t.fake, centroids_shape(t), t.original.dtype,
                                   t.original.device)


def forget_placeholders(tensors: Sequence[compat.PalettizedTensor]) -> list[str]:
    """Placeholder LUTs that a state-dict load marked clustered (coreai-opt marks every loaded
    LUT so), e.g. accelerate broadcasting rank 0's state at wrap time: uninitialized again, so
    k-means runs. Only all-zero LUTs are placeholders (k-means gives zeros only for an all-zero
    weight, which it then clusters again to the same zeros). Returns their names."""
    forgotten = []
    for t in tensors:
        centroids = t.fake.centroids
        if centroids is not None and t.fake._centroids_initialized and not centroids.any():
            t.fake._centroids_initialized = False
            forgotten.append(t.name)
    return forgotten


# ---------------------------------------------------------------- models built on the meta device


def on_meta(model: nn.Module) -> bool:
    """Some parameter of ``model`` is on the meta device (built there, not materialized yet)."""
    return any(p.is_meta for p in model.parameters())


def reinit_after_materialize(model: nn.Module, tensors: Sequence[compat.PalettizedTensor]) -> None:
    """A model attached on the meta device, then materialized (``to_empty``) and loaded: its
    palettization flags hold uninitialized memory; give them their construction values
    (palettization on, observer off) and mark every LUT for k-means.

    Raises:
        PalettizeConfigError: some parameter is still on the meta device.
    """
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise PalettizeConfigError(
            "", f"{len(meta)} parameter(s) still on the meta device (e.g. {meta[0]}) at k-means: "
            "materialize the model (model.to_empty(device=...)) and load its weights "
            "(engine.map_dense_state_dict(state_dict) names them for the palettized structure) "
            "before ensure_clustered")
    for t in tensors:
        t.fake.fake_palett_enabled.fill_(1)
        t.fake.observer_enabled.fill_(0)
        if t.fake.centroids is not None:
            t.fake._centroids_initialized = False


def map_dense_state_dict(tensors: Sequence[compat.PalettizedTensor],
                         state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with each palettized weight's dense key (``<module>.weight``) renamed to
    the structure's parameter (``<module>.parametrizations.weight.original``), plus the
    structure's own flags at their initial values, so a strict load finds every key."""
    renames = {t.name: f"{t.state_prefix}original" for t in tensors}
    mapped = {renames.get(key, key): value for key, value in state_dict.items()}
    for t in tensors:
        if renames[t.name] in mapped:
            mapped.setdefault(f"{t.state_prefix}0.fake_palett_enabled",
                              torch.ones(1, dtype=torch.uint8))
    return mapped


# ---------------------------------------------------------------- k-means on shards


def _group_rows(t: compat.PalettizedTensor, weight: Any) -> list[tuple[int, int]] | None:
    """Each rank's ``[start, end)`` rows of whole LUT groups: the groups that start on its dim-0
    shard, completed by the first rows of the next rank's shard when a group straddles the
    boundary. None when the weight cannot be clustered on its shards (groups not along dim 0,
    scales, sensitivities, a 2-D mesh, or a straddle longer than the next shard)."""
    from torch.distributed.tensor import Shard

    fake = t.fake
    group = fake._axis0_group_size()
    if (group is None or fake.cluster_dim != 1 or fake.enable_per_channel_scale
            or weight.device_mesh.ndim != 1
            or weight.device_mesh.size() != distributed.world_size()
            or tuple(weight.placements) != (Shard(0),) or weight.shape[0] % group):
        return None
    ranges = sharding.row_ranges(weight.shape[0], weight.device_mesh.size())
    starts = [-(-start // group) * group for start, _ in ranges]  # first group starting here
    if any(first > end for first, (_, end) in zip(starts, ranges)):
        return None  # a shard shorter than the tail of the group straddling into it
    return [(first, -(-end // group) * group if end > first else first)
            for first, (_, end) in zip(starts, ranges)]


def _rows_of_groups(items: list[tuple[torch.Tensor, int, list[tuple[int, int]]]]
                    ) -> list[torch.Tensor]:
    """This rank's rows of each ``(local shard, rows, plan)``: its shard without the head it
    lends the previous rank, plus the head of the next rank's shard. One all-gather carries
    every tensor's heads (every rank calls it), so the k-means that follows runs without a
    sync."""
    if not items:
        return []
    world, me = distributed.world_size(), distributed.rank()
    device = sharding.comm_device()
    layout, slabs = [], []
    for local, total_rows, plan in items:
        ranges = sharding.row_ranges(total_rows, world)
        heads = [first - start for (start, _), (first, _) in zip(ranges, plan)]
        row_bytes = math.prod(local.shape[1:]) * local.element_size()
        slab = torch.zeros(max(heads) * row_bytes, dtype=torch.uint8)
        if heads[me]:
            slab[:heads[me] * row_bytes] = local[:heads[me]].contiguous().reshape(-1).view(
                torch.uint8)
        layout.append((local, heads, row_bytes, slab.numel()))
        slabs.append(slab)
    mine = torch.cat(slabs).to(device)
    if mine.numel() == 0:  # every shard is group-aligned: nothing to exchange
        return [local for local, *_ in layout]
    pieces = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(pieces, mine)
    following = pieces[me + 1].cpu() if me + 1 < world else None
    rows, offset = [], 0
    for local, heads, row_bytes, size in layout:
        tail_rows = heads[me + 1] if following is not None else 0
        if tail_rows:
            tail = (following[offset:offset + tail_rows * row_bytes].clone()
                    .view(local.dtype).reshape(tail_rows, *local.shape[1:]))
            rows.append(torch.cat([local[heads[me]:], tail.to(local.device)]))
        else:
            rows.append(local[heads[me]:])
        offset += size
    return rows


def _cluster_one(fake: Any, weight: torch.Tensor, sensitivities: torch.Tensor | None = None
                 ) -> None:
    """coreai-opt's per-weight k-means (as its sequential path), on ``weight`` (some rows of
    the weight, or all of it), weighted by ``sensitivities`` of the same rows when calibrated."""
    shard = fake._sensitivities  # this rank's rows (calibration under FSDP2): kept for re-clustering
    fake._sensitivities = sensitivities
    fake.disable_fake_palett()
    try:
        _calculate_centroids_for_module((fake, weight))
    finally:
        fake.enable_fake_palett()
        fake._sensitivities = shard


def cluster(palettizer: Any, tensors: list[compat.PalettizedTensor], mode: str
            ) -> distributed.ClusterStats:
    """k-means for ``tensors`` whose weights FSDP2 sharded; every rank ends with the full LUTs."""
    world, me = distributed.world_size(), distributed.rank()
    weights = [t.original.detach() for t in tensors]
    plans = [_group_rows(t, w) if is_sharded(w) else None for t, w in zip(tensors, weights)]
    local = [plan is not None for plan in plans]
    compat.end_deferral(tensors)
    compat.ensure_kmeans_extension()
    with distributed.agree("k-means (local shards)"), distributed._progress_on_rank_zero():
        planned = [(t, w, plan) for t, w, plan in zip(tensors, weights, plans) if plan is not None]
        weighted = [(t, w, plan) for t, w, plan in planned if t.fake._sensitivities is not None]
        rows_of = _rows_of_groups([(w.to_local(), w.shape[0], plan) for _, w, plan in planned]
                                  + [(t.fake._sensitivities, w.shape[0], plan)
                                     for t, w, plan in weighted])
        sens_of = dict(zip((t.name for t, _, _ in weighted), rows_of[len(planned):]))
        for (t, _, _), rows in zip(planned, rows_of):
            if rows.shape[0]:
                _cluster_one(t.fake, rows, sens_of.get(t.name))
    sparse = _any_rank([bool(here and t.fake._sparsity_mask is not None)
                        for t, here in zip(tensors, local)])
    local = [here and not s for here, s in zip(local, sparse)]
    _gather_luts([(t, plan) for t, here, plan in zip(tensors, local, plans) if here])
    rest = [i for i, here in enumerate(local) if not here]
    owners = distributed.plan_owners([weights[i].numel() for i in rest], world, mode)
    stats = distributed.ClusterStats(
        mode=f"fsdp2 ({sum(local)} local, {len(rest)} gathered)", world_size=world,
        clustered_here=[t.name for t, here in zip(tensors, local) if here],
        owners={tensors[i].name: o for i, o in zip(rest, owners)},
        palettized_elements=sum(w.numel() for w in weights))
    mine: list[tuple[compat.PalettizedTensor, torch.Tensor, torch.Tensor | None]] = []
    for i, owner in zip(rest, owners):  # one weight at a time; only its owner keeps it
        weight, shard = weights[i], tensors[i].fake._sensitivities
        full = weight.full_tensor() if is_sharded(weight) else weight
        sens = (sharding.gather_rows(shard, weight.shape[0])
                if shard is not None and is_sharded(weight) else shard)
        if owner == me:
            mine.append((tensors[i], full, sens))
        del full, sens
    with distributed.agree("k-means (gathered weights)"), distributed._progress_on_rank_zero():
        for t, full, sens in mine:
            _reset_sparsity(t.fake)
            _cluster_one(t.fake, full, sens)
            stats.clustered_here.append(t.name)
    mine.clear()
    if world > 1 and rest:
        stats.broadcast_bytes = distributed._broadcast_results([tensors[i] for i in rest], owners)
    return stats


def _any_rank(flags: list[bool]) -> list[bool]:
    """Per position: true on any rank."""
    if not flags:
        return flags
    (summed,) = DistContext.current().all_reduce([torch.tensor(flags, dtype=torch.int32)])
    return [bool(v) for v in summed.tolist()]


def _reset_sparsity(fake: Any) -> None:
    """Sparsity is detected per tensor: forget what a shard showed (the forward re-detects on
    the unsharded weight)."""
    fake._sparsity_mask = None
    fake._sparsity_detected = False


def _gather_luts(items: list[tuple[compat.PalettizedTensor, list[tuple[int, int]]]]) -> None:
    """All-gather the LUT rows each rank clustered for its groups (``plan``) into each full LUT
    (rank order is row order), then load it as a restored LUT (indices re-derived from it).
    One all-gather carries every weight's rows (float64: exact for every float dtype)."""
    from .._coreai_compat.layouts import centroids_shape

    if not items:
        return
    me = distributed.rank()
    layout, mine = [], []
    for t, plan in items:
        shape = centroids_shape(t)
        group = t.fake._axis0_group_size()
        counts = [(end - start) // group for start, end in plan]
        row = math.prod(shape[1:])
        block = torch.zeros(max(counts) * row, dtype=torch.float64)
        if counts[me]:
            block[:counts[me] * row] = t.fake.centroids.detach().reshape(-1).cpu().double()
        layout.append((t, shape, counts, row, block.numel()))
        mine.append(block)
    device = sharding.comm_device()
    flat = torch.cat(mine).to(device)
    pieces = [torch.empty_like(flat) for _ in range(distributed.world_size())]
    dist.all_gather(pieces, flat)
    pieces = [piece.cpu() for piece in pieces]
    offset = 0
    for t, shape, counts, row, size in layout:
        weight = t.original.detach()
        full = torch.cat([piece[offset:offset + n * row] for piece, n in zip(pieces, counts)])
        offset += size
        _reset_sparsity(t.fake)
        t.fake.indices = None
        state = t.fake.state_dict()
        state["centroids"] = full.reshape(shape).to(weight.dtype).to(weight.device)
        state.pop("indices", None)
        t.fake.load_state_dict(state, strict=False)


# ---------------------------------------------------------------- export and state


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict on rank 0 (CPU, one tensor gathered at a time); ``{}`` on
    the other ranks. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def export_on_main(engine: Any, directory: Any, **kwargs: Any) -> ExportResult | None:
    """Export a sharded model: every rank gathers the full state to rank 0 (CPU, one tensor at a
    time), which rebuilds the palettized model from it (no k-means) and exports it like a single
    process. Returns the result on rank 0."""
    from ..export import phase as export_step

    state = _full_state_dict(engine.model)
    return export_step.on_main(
        engine.dist, lambda: _unsharded_engine(engine, state).export(directory, **kwargs))


def report(engine: Any) -> Any:
    """The compression report of a sharded model, as a single process would build it: rank 0
    gathers the full state and builds it on an unsharded copy; every rank gets it."""
    state = _full_state_dict(engine.model)
    built = _unsharded_engine(engine, state).report() if distributed.rank() == 0 else None
    del state
    return distributed.broadcast_object(built)


def _unsharded_engine(engine: Any, state: dict[str, torch.Tensor]) -> Any:
    """A process-local engine over a fresh copy of the model loaded from ``state``."""
    import warnings

    from ..export import phase as export_step

    copy = type(engine)(engine.settings, model_factory=engine._model_factory)
    copy._skeleton = engine._skeleton
    copy.dist_context = DistContext()  # this rank alone: no collectives
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # attach's warnings were given once already
        fresh = export_step.new_model(engine._model_factory, engine._skeleton, None)
        copy.prepare(fresh, engine.example_inputs, state_dict=state)
    copy.calibration_stats = engine.calibration_stats
    return copy


def replicated_state_bytes(model: nn.Module) -> int:
    """Bytes of palettization state FSDP2 replicates on every rank (LUTs and other buffers of
    the fake-palettize modules)."""
    return sum(b.numel() * b.element_size() for t in compat.fake_palettized_tensors(model)
               for b in t.fake.buffers())


def attach_before_sharding(engine: Any, model: nn.Module, attach: Callable[[], None]) -> None:
    """Lightning ``ModelParallelStrategy``: build the palettized structure before the module's
    ``configure_model`` shards it, with zero LUTs a sharded checkpoint can restore into.

    Raises:
        PalettizeConfigError: the module has no weights yet (built inside ``configure_model``)
            or they are on the meta device.
    """
    if any(p.is_meta for p in model.parameters()) or not any(True for _ in model.parameters()):
        raise PalettizeConfigError(
            "", f"{type(model).__name__} has no materialized weights before configure_model: "
            "under the ModelParallelStrategy build the layers in __init__ (configure_model "
            "should only apply fully_shard), or use the engine API (prepare, then fully_shard)")
    attach()
    placeholder_centroids(engine.tensors())


def shape_placeholders_like(tensors: Sequence[compat.PalettizedTensor], checkpoint: Any,
                            prefix: str) -> list[str]:
    """Before a sharded (DCP) checkpoint loads: each placeholder LUT takes the shape the
    checkpoint saved (a ``palettize.budget`` allocation changes them; DCP loads only into
    tensors of the saved shape). ``prefix``: the checkpoint's key prefix of the palettized
    model. Returns the weights reshaped; a file (not a DCP directory) is left as it is."""
    from pathlib import Path

    path = Path(checkpoint)
    if not path.is_dir():
        return []
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    reshaped = []
    for t in tensors:
        fake = t.fake
        if not compat.is_placeholder(fake):
            continue
        meta = saved.get(f"{prefix}{t.state_prefix}0.centroids")
        size = tuple(getattr(meta, "size", ()) or ())
        if size and size != tuple(fake.centroids.shape):
            compat.set_placeholder(fake, size, meta.properties.dtype, fake.centroids.device)
            reshaped.append(t.name)
    return reshaped
