"""Every use of coreai-opt internals lives here (pinned to coreai-opt 0.4.x).

coreai-opt's public ``KMeansPalettizer.prepare`` builds the palettized structure *and* runs k-means
in one call, and keeps its PAT step counter private. Training integrations need both split:
build the structure before the model is wrapped and the optimizer exists, then cluster only if
no checkpoint restored the state, on the rank that owns each layer, and restore the step
counter on resume. These helpers do that with the least private surface; tests exercise each.
Upstream request: ``prepare(..., cluster=False)`` + ``cluster()`` and a public step setter.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as P
from coreai_opt.palettization import KMeansPalettizer
from coreai_opt.palettization.kmeans.kmeans_fake_palettize import _KMeansFakePalettize
from coreai_opt.palettization.spec.fake_palettize import _enable_fake_palett

__all__ = [
    "PalettizedTensor",
    "attach_structure",
    "cluster_tensors",
    "fake_palettized_tensors",
    "finish_clustering",
    "set_step",
]


@dataclass
class PalettizedTensor:
    """One palettized weight: ``module.<attr>`` is rebuilt by ``fake`` from ``original``."""

    module_name: str
    module: nn.Module
    attr: str
    fake: _KMeansFakePalettize

    @property
    def name(self) -> str:
        """Fully qualified name of the weight, e.g. ``layers.0.fc.weight``."""
        return f"{self.module_name}.{self.attr}" if self.module_name else self.attr

    @property
    def state_prefix(self) -> str:
        """State-dict prefix of the parametrization, e.g. ``fc.parametrizations.weight.``."""
        base = f"{self.module_name}." if self.module_name else ""
        return f"{base}parametrizations.{self.attr}."

    @property
    def original(self) -> torch.Tensor:
        return self.module.parametrizations[self.attr].original

    @property
    def initialized(self) -> bool:
        """Has centroids that are current (a PAT switch-on invalidates them for re-clustering)."""
        return self.fake.centroids is not None and self.fake._centroids_initialized

    @property
    def has_indices(self) -> bool:
        """Indices present and current (stale ones would be re-derived by nearest centroid),
        or a training strategy that always derives them from the dense weight."""
        if getattr(self.fake._training_strategy, "derives_indices", False):
            return True
        return self.fake.indices is not None and not self.fake._indices_stale


def fake_palettized_tensors(model: nn.Module) -> list[PalettizedTensor]:
    """Every k-means palettized weight of ``model``, in module order, tied weights once."""
    found: list[PalettizedTensor] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not P.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            for fake in plist:
                if isinstance(fake, _KMeansFakePalettize) and id(fake) not in seen:
                    seen.add(id(fake))
                    found.append(PalettizedTensor(module_name, module, attr, fake))
                    break
    return found


def tied_prefixes(model: nn.Module) -> dict[str, str]:
    """``{alias state prefix: source state prefix}`` for weights palettized once but reachable
    under two modules (an ``lm_head`` tied to the input embedding)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if not P.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            if not any(isinstance(f, _KMeansFakePalettize) for f in plist):
                continue
            base = f"{module_name}." if module_name else ""
            prefix = f"{base}parametrizations.{attr}."
            source = first.setdefault(id(plist[0]), prefix)
            if source != prefix:
                aliases[prefix] = source
    return aliases


def attach_structure(
    palettizer: KMeansPalettizer, example_inputs: tuple[Any, ...]
) -> dict[str, str]:
    """Insert the fake-palettize parametrizations without clustering.

    Mirrors ``KMeansPalettizer.prepare(state_dict=...)`` up to the point where it would load a
    state dict. Returns ``{weight name: reason}`` for weights the config asked for but whose shape
    the spec cannot take (coreai-opt drops those and leaves them dense).
    """
    model = palettizer._model
    palettizer._module_config_dict = palettizer._config.build_module_config_dict(model)
    palettizer._handler.prepare(model, example_inputs=example_inputs)
    skipped = {}
    for tensor in fake_palettized_tensors(model):
        if not tensor.fake.check_compatible(tensor.original):
            skipped[tensor.name] = _incompatibility(tensor)
    palettizer._remove_incompatible_fake_palett_modules()
    palettizer._mark_model_as_prepared(model)
    return skipped


def _incompatibility(tensor: PalettizedTensor) -> str:
    fake, shape = tensor.fake, tuple(tensor.original.shape)
    group = getattr(fake.granularity, "group_size", None)
    if group:
        return f"shape {shape} is not divisible into groups of {group} along axis {fake._resolved_axis}"
    return f"shape {shape} is incompatible with cluster_dim={fake.cluster_dim}"


STALE_LOCK_SECONDS = 300


def ensure_kmeans_extension() -> None:
    """Build (or load) coreai-opt's JIT k-means extension, clearing a stale build lock first.

    torch < 2.14 waits forever on a ``lock`` file left by a killed build. A real build of this
    one-file extension takes about a second, so a lock older than ``STALE_LOCK_SECONDS`` is stale.
    """
    import logging
    import os
    import time

    from coreai_opt.deps._kmeans1d import core
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory("_core", verbose=False), "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        age = None
    if age is not None and age > STALE_LOCK_SECONDS:
        logging.getLogger("coreai_palettize_plugins").warning(
            "removing a stale torch extension build lock (%.0f s old): %s", age, lock)
        with contextlib.suppress(OSError):
            os.remove(lock)
    core._dll()


def cluster_tensors(palettizer: KMeansPalettizer, tensors: list[PalettizedTensor]) -> None:
    """Run k-means for ``tensors`` in this process (coreai-opt's ``num_workers`` pool if > 1)."""
    if not tensors:
        return
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
    palettizer._remove_disabled_fake_palett_modules(model)
    model.apply(_enable_fake_palett)


def set_step(palettizer: KMeansPalettizer, step: int) -> None:
    """Set the PAT step counter (private in coreai-opt) and apply the schedule if training."""
    palettizer._step_count = int(step)
    if palettizer._lifecycle.value == "training":
        palettizer._apply_schedule()


COREAI_INDEX_BITS = (1, 2, 4, 6, 8)
"""Index widths coreai-torch 0.4 can store in an ``.aimodel`` (3-bit raises ValueError)."""


@torch.no_grad()
def widen_for_coreai(model: nn.Module) -> list[str]:
    """Re-express LUTs whose width coreai-torch cannot store with the next supported width.

    A 3-bit LUT becomes a 4-bit LUT whose extra entries repeat the last centroid; indices are
    unchanged (all < 8), so the model's outputs are identical. Only for a throwaway export copy.
    Returns the names of the widened weights.
    """
    widened = []
    for t in fake_palettized_tensors(model):
        fake = t.fake
        if fake.n_bits in COREAI_INDEX_BITS or fake.centroids is None:
            continue
        bits = min(b for b in COREAI_INDEX_BITS if b > fake.n_bits)
        centroids = fake.centroids
        pad = centroids[:, -1:].expand(-1, 2**bits - centroids.shape[1], -1)
        fake.centroids = torch.cat([centroids, pad], dim=1).contiguous()
        fake.n_bits = bits
        widened.append(t.name)
    return widened


def get_step(palettizer: KMeansPalettizer) -> int:
    return int(palettizer._step_count)


# --------------------------------------------------------------------------------------------
# Layout helpers for the training strategies (mirror KMeansFakePalettize._palettize, 0.4.x).
# --------------------------------------------------------------------------------------------


def centroids_shape(tensor: PalettizedTensor) -> tuple[int, int, int]:
    """Shape ``(num_luts, 2**n_bits, cluster_dim)`` k-means will give ``tensor``'s centroids."""
    fake = tensor.fake
    blocks, _ = fake._reshape_and_block(tensor.original.detach().to("meta"))
    return len(blocks), 2**fake.n_bits, fake.cluster_dim


def nearest_centroids(centroids: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each vector: ``(P, K, D)``, ``(P, N, D)`` -> ``(P, N)``.

    Scalar LUTs use a batched ``searchsorted`` on the sorted centroids' midpoints (no distance
    matrix; the sort is cached until the centroids change); vector LUTs use ``cdist``.
    """
    if centroids.shape[-1] == 1:
        order, midpoints = _sorted_midpoints(centroids, vectors.device)
        position = torch.searchsorted(midpoints, vectors[..., 0].detach().float().contiguous())
        return order.gather(1, position)
    return torch.cdist(vectors.detach().float(), centroids.detach().float().to(vectors.device)
                       ).argmin(dim=-1)


def _sorted_midpoints(centroids: torch.Tensor, device: torch.device):
    """(sort order, midpoints) of each LUT, cached on the centroids tensor itself until it
    changes in place (its ``_version``) or a new tensor replaces it."""
    stamp = (centroids._version, device)
    cached = getattr(centroids, "_plugin_midpoints", None)
    if cached is None or cached[0] != stamp:
        ordered, order = centroids.detach()[..., 0].float().to(device).sort(dim=1)
        cached = (stamp, order, ((ordered[:, 1:] + ordered[:, :-1]) / 2).contiguous())
        centroids._plugin_midpoints = cached
    return cached[1], cached[2]


def gather_centroids(centroids: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """``(P, K, D)`` centroids picked by a ``(P, N)`` assignment -> ``(P, N, D)`` vectors."""
    centroids = centroids.to(assignment.device)
    index = assignment.unsqueeze(-1).expand(-1, -1, centroids.shape[-1])
    return centroids.gather(1, index)


@torch.no_grad()
def lloyd_step(centroids: torch.Tensor, vectors: torch.Tensor) -> None:
    """Move each centroid (in place) to the mean of the vectors nearest to it."""
    assignment = nearest_centroids(centroids, vectors)
    dim = centroids.shape[-1]
    sums = torch.zeros(centroids.shape, dtype=torch.float32, device=vectors.device)
    sums.scatter_add_(1, assignment.unsqueeze(-1).expand(-1, -1, dim), vectors.float())
    counts = torch.zeros(centroids.shape[:2], dtype=torch.float32, device=vectors.device)
    counts.scatter_add_(1, assignment, torch.ones_like(assignment, dtype=torch.float32))
    means = sums / counts.clamp(min=1).unsqueeze(-1)
    updated = torch.where(counts.unsqueeze(-1) > 0, means, centroids.float().to(vectors.device))
    centroids.copy_(updated.to(centroids.dtype))


def flat_lut_positions(fake: _KMeansFakePalettize, weight: torch.Tensor):
    """``(positions, context)``: for the weight's vectorized layout, the position of each value
    in the flattened ``(P, K, D)`` LUT, so ``lut.reshape(-1)[positions]`` equals what coreai-opt's
    ``_palettize`` gathers. Cached until the indices change."""
    from coreai_opt.palettization.kmeans.kmeans_fake_palettize import _WeightVectorization
    from coreai_opt.palettization.spec import PerGroupedChannelGranularity

    indices = fake.indices
    key = (indices.data_ptr(), indices._version, tuple(weight.shape), weight.device, weight.dtype)
    cached = getattr(fake, "_plugin_lut_positions", None)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    axis, dim = fake._resolved_axis, fake.cluster_dim
    grid = fake.reshape_strategy.reshape_for_kmeans(indices, axis)
    if isinstance(fake.granularity, PerGroupedChannelGranularity):
        group = fake.granularity.group_size
        blocks = fake.granularity.num_blocks_to_cluster(weight)
        if axis == 0:
            groups = grid.reshape(blocks, group // dim, -1)
        else:
            groups = grid.reshape(grid.shape[0], blocks, group).permute(1, 0, 2)
    else:
        groups = grid.unsqueeze(0)
    num_luts, rows, cols = groups.shape
    per_lut = (groups.transpose(1, 2) if dim > 1 else groups).reshape(num_luts, -1).long()
    per_lut = per_lut.to(weight.device)  # indices may sit on the CPU (coreai-opt) or the GPU
    per_lut = per_lut + torch.arange(num_luts, device=weight.device).unsqueeze(1) * (2**fake.n_bits)
    positions = (per_lut.unsqueeze(-1) * dim + torch.arange(dim, device=weight.device)).reshape(-1)
    context = _WeightVectorization(axis, torch.Size((rows * dim, cols)), weight.shape, weight.dtype)
    fake._plugin_lut_positions = (key, positions, context)
    return positions, context


@torch.no_grad()
def store_assignment(fake: _KMeansFakePalettize, assignment: torch.Tensor, context) -> bool:
    """Write a ``(P, N)`` nearest-centroid assignment as the module's indices (uint8).

    Only for scalar LUTs without per-channel scales, whose index layout is the weight layout;
    returns False otherwise (the caller marks the indices stale for coreai-opt to re-derive).
    """
    if fake.cluster_dim != 1 or fake.enable_per_channel_scale:
        return False
    groups = fake._from_cluster_vectors(assignment.to(torch.uint8).unsqueeze(-1),
                                        *context.block_shape)
    grid = fake._merge_groups(groups, context.axis)
    layout = fake.reshape_strategy.reshape_to_original(grid, context.axis, context.weight_shape)
    # Kept on the compute device: a copy to the CPU here would sync the GPU every forward.
    fake.indices = layout
    fake._indices_stale = False
    return True
