"""Weight layouts: how coreai-opt groups a weight into LUTs (for the training strategies), and the
layout of fused MoE expert weights (3-D) it has no strategy for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as P
from coreai_opt.palettization import KMeansPalettizer
from coreai_opt.palettization.kmeans.kmeans_fake_palettize import _KMeansFakePalettize
from coreai_opt.palettization.kmeans.kmeans_support_mixins import _PalettizationSupportMixin
from coreai_opt.palettization.spec import PerGroupedChannelGranularity, PerTensorGranularity

from ..core.linear_like import experts_transposed
from .foreign import fold_foreign_parametrizations
from .tensors import PalettizedTensor, meta_like
from .tracing import every_use_palettized

__all__ = [
    "EXPORTABLE_EXPERTS_IMPLEMENTATION", "ExpertsGroupedChannel", "ExpertsLayout",
    "apply_layouts", "assignment_indices", "centroids_shape", "fit_granularity",
    "flat_lut_positions", "layout_name", "lut_groups",
    "prepare_from_state_dict", "reshape_expert_luts", "traceable_experts", "use_exportable_experts",
]


def lut_groups(fake: _KMeansFakePalettize, weight: torch.Tensor) -> list[torch.Tensor]:
    """``weight`` split as ``fake`` clusters it: one ``(N, cluster_dim)`` tensor per LUT."""
    blocks, _ = fake._reshape_and_block(weight)
    return [fake._vectorize_block(block) for block in blocks]


def centroids_shape(tensor: PalettizedTensor) -> tuple[int, int, int]:
    """Shape ``(num_luts, 2**n_bits, cluster_dim)`` k-means will give ``tensor``'s centroids."""
    fake = tensor.fake
    blocks, _ = fake._reshape_and_block(meta_like(tensor.original))
    return len(blocks), 2**fake.n_bits, fake.cluster_dim


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
def assignment_indices(fake: _KMeansFakePalettize, assignment: torch.Tensor, context,
                       weight: torch.Tensor) -> torch.Tensor:
    """A ``(P, N)`` nearest-centroid assignment of ``weight`` as indices in coreai-opt's layout
    (uint8). Scalar LUTs without per-channel scales lay the assignment out directly (kept on its
    device: a copy to the CPU would sync the GPU); other layouts take coreai-opt's own
    nearest-centroid derivation (what it does for stale indices)."""
    if fake.cluster_dim != 1 or fake.enable_per_channel_scale:
        return fake._assign_indices(weight, fake.centroids)
    groups = fake._from_cluster_vectors(assignment.to(torch.uint8).unsqueeze(-1),
                                        *context.block_shape)
    grid = fake._merge_groups(groups, context.axis)
    return fake.reshape_strategy.reshape_to_original(grid, context.axis, context.weight_shape)


class ExpertsLayout(_PalettizationSupportMixin):
    """Reshape strategy for a stack of expert matrices: ``(E, out, in)`` (or ``(E, in, out)``
    when transposed) <-> ``(E * out, in)``. Groups of output rows on that view never straddle
    two experts when ``out`` divides by the group size, so every LUT belongs to one expert.
    Module-level (not nested) so coreai-opt's spawn pool can pickle the fake that holds it."""

    default_axis = 0

    def __init__(self, transposed: bool = False) -> None:
        self.transposed = transposed

    def reshape_for_kmeans(self, weight: torch.Tensor, axis: int) -> torch.Tensor:
        if self.transposed:
            weight = weight.transpose(1, 2)
        return weight.reshape(-1, weight.shape[-1])

    def reshape_to_original(self, clustered_weight: torch.Tensor, axis: int,
                            original_shape: torch.Size) -> torch.Tensor:
        experts, a, b = original_shape
        out, inputs = (b, a) if self.transposed else (a, b)
        weight = clustered_weight.reshape(experts, out, inputs)
        return weight.transpose(1, 2) if self.transposed else weight

    def __repr__(self) -> str:
        return f"ExpertsLayout(transposed={self.transposed})"


class ExpertsGroupedChannel(PerGroupedChannelGranularity):
    """Output-channel groups counted on the ``(E * out, in)`` view of a 3-D expert stack.

    coreai-opt's ``_palettize`` counts LUT blocks on the *original* weight while clustering
    counts them on the reshaped one (kmeans_fake_palettize.py ``_palettize``): for a 3-D weight
    count on the view both ways.
    """

    transposed: bool = False

    def num_blocks_to_cluster(self, weight: torch.Tensor) -> int:
        if weight.dim() == 3:
            out = weight.shape[2] if self.transposed else weight.shape[1]
            weight = torch.empty((weight.shape[0] * out, 0), device="meta")  # the view's shape
        return super().num_blocks_to_cluster(weight)


def _expert_parametrizations(model: nn.Module) -> Iterator[tuple[str, bool, Any]]:
    """``(weight name, transposed, parametrization list)`` of every parametrized weight of a
    fused-experts module."""
    for module_name, module in model.named_modules():
        transposed = experts_transposed(module)
        if transposed is None or not P.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            yield (f"{module_name}.{attr}" if module_name else attr), transposed, plist


def apply_layouts(model: nn.Module) -> list[str]:
    """Give every fake-palettized 3-D weight of a fused-experts module the per-expert layout
    (``ExpertsLayout`` + ``ExpertsGroupedChannel``; a per-tensor spec becomes one LUT per
    expert). Call after the structure is inserted and before incompatible fakes are removed
    (which would otherwise drop them: their expert axis is cut into groups). Returns the names
    of the weights it set."""
    names = []
    for name, transposed, plist in _expert_parametrizations(model):
        fake = next((f for f in plist if isinstance(f, _KMeansFakePalettize)), None)
        shape = plist.original.shape
        if fake is None or len(shape) != 3 or isinstance(fake.granularity, ExpertsGroupedChannel):
            continue
        granularity = fake.granularity
        out = shape[2] if transposed else shape[1]
        if isinstance(granularity, PerGroupedChannelGranularity):
            if granularity.axis not in (0, None):
                continue  # left as coreai-opt built it (incompatible, reported as skipped)
            group = granularity.group_size
        else:
            group = out  # per-tensor: one LUT per expert matrix
        fake.reshape_strategy = ExpertsLayout(transposed)
        fake.granularity = ExpertsGroupedChannel(axis=0, group_size=group, transposed=transposed)
        names.append(name)
    return names


def layout_name(granularity: Any) -> str:
    """``group 16 axis 0`` or ``per-tensor`` (the report's words for a granularity)."""
    size = getattr(granularity, "group_size", None)
    return f"group {size} axis {granularity.axis}" if size else "per-tensor"


def fit_granularity(fake: _KMeansFakePalettize, weight: torch.Tensor) -> tuple[Any, Any] | None:
    """The layout nearest ``fake``'s grouped-channel spec that ``weight``'s shape takes, for a
    weight the spec's group size does not divide: ``(granularity for the fake, granularity for
    the config)`` (they differ for fused experts, whose config spec ``apply_layouts`` converts),
    or None when nothing fits (a per-tensor spec, or a ``cluster_dim`` no layout takes).

    Candidates: the largest group size below the spec's that divides the channels (same axis,
    same bits), and per-tensor. Of the two, the one whose rows per LUT are nearer the spec's
    group size (by ratio) wins: 51864 rows at g16 -> g12; 40 -> g10; 17 or 34 -> per-tensor
    (one LUT of 17 rows is nearer 16 than 17 LUTs of one row); a group as large as the whole
    axis is written per-tensor. Only the shape is read (a meta copy)."""
    spec = fake.granularity
    if not isinstance(spec, PerGroupedChannelGranularity):
        return None
    meta = meta_like(weight)

    def luts(candidate: Any) -> int | None:
        fake.granularity = candidate
        try:
            return len(fake._reshape_and_block(meta)[0]) if fake.check_compatible(meta) else None
        finally:
            fake.granularity = spec

    experts = isinstance(spec, ExpertsGroupedChannel)
    group = next(((d, n) for d in range(spec.group_size - 1, 0, -1)
                  for n in [luts(spec.model_copy(update={"group_size": d}))] if n), None)
    per_tensor = None if experts or luts(PerTensorGranularity()) is None else PerTensorGranularity()
    if group is not None:
        size, count = group
        rows = size * count
        if per_tensor is None or (count > 1 and rows * size >= spec.group_size ** 2):
            fitted = spec.model_copy(update={"group_size": size})
            config = (PerGroupedChannelGranularity(axis=0, group_size=size) if experts
                      else fitted)
            return fitted, config
    return (per_tensor, per_tensor) if per_tensor is not None else None


def prepare_from_state_dict(palettizer: KMeansPalettizer, example_inputs: tuple[Any, ...],
                            state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """coreai-opt's public ``prepare(example_inputs, state_dict=...)`` (no k-means) with the
    plugin's layouts applied right after the structure is inserted, as ``insert_parametrizations``
    does: the way every re-prepare (export copy, ``load_palettized``) must run."""
    handler = palettizer._handler
    insert = handler.prepare

    def insert_then_layout(model, *args, **kwargs):
        with traceable_experts(model), every_use_palettized(palettizer, model):
            prepared = insert(model, *args, **kwargs)
        apply_layouts(model)
        return prepared

    handler.prepare = insert_then_layout  # an instance attribute shadows the method
    fold_foreign_parametrizations(palettizer._model, announce=False)  # as the trained model was
    try:
        return palettizer.prepare(example_inputs, state_dict=state_dict)
    finally:
        del handler.prepare


EXPORTABLE_EXPERTS_IMPLEMENTATION = "batched_mm"
"""The transformers experts implementation coreai-torch 0.4 converts: the default ``grouped_mm``
traces to ``aten.histc``/``aten.sort``/``aten.empty_permuted`` (no lowering) and ``eager`` is
data-dependent for ``torch.export``. It is also the one whose expert-weight reads coreai-opt's
tracing forward sees: ``grouped_mm`` hands a transposed stack (GPT-OSS) straight to the
``transformers::grouped_mm_fallback`` custom op, which its ``TorchFunctionMode`` never sees."""


def _experts_implementations(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """``(transformers model, its experts implementation)`` of every model holding experts."""
    if not any(experts_transposed(m) is not None for m in model.modules()):
        return []
    return [(m, m.config._experts_implementation) for m in model.modules()
            if hasattr(m, "set_experts_implementation")
            and hasattr(getattr(m, "config", None), "_experts_implementation")]


@contextlib.contextmanager
def traceable_experts(model: nn.Module) -> Iterator[None]:
    """During coreai-opt's structure-inserting forward: fused experts on ``batched_mm`` (its
    weight reads are ``__getitem__`` calls coreai-opt intercepts), then back as they were."""
    before = _experts_implementations(model)
    for module, implementation in before:
        if implementation != EXPORTABLE_EXPERTS_IMPLEMENTATION:
            module.set_experts_implementation(EXPORTABLE_EXPERTS_IMPLEMENTATION)
    try:
        yield
    finally:
        for module, implementation in reversed(before):
            if implementation != EXPORTABLE_EXPERTS_IMPLEMENTATION:
                module.set_experts_implementation(implementation)


def use_exportable_experts(model: nn.Module) -> bool:
    """Switch an export copy's fused experts to ``batched_mm``. The copy gets its own config
    objects first, so a model factory sharing a config with the trained model leaves the
    trained model's implementation alone. Returns whether anything was switched."""
    import copy

    from transformers import PretrainedConfig

    if not any(experts_transposed(m) is not None for m in model.modules()):
        return False
    memo: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            module.config = copy.deepcopy(config, memo)  # one memo: shared sub-configs stay shared
    switched = False
    for module, implementation in _experts_implementations(model):
        if implementation != EXPORTABLE_EXPERTS_IMPLEMENTATION:
            module.set_experts_implementation(EXPORTABLE_EXPERTS_IMPLEMENTATION)
            switched = True
    return switched


def reshape_expert_luts(model: nn.Module) -> list[str]:
    """After ``finalize(backend=CoreAI)``: spread the LUT of each 3-D expert weight over its
    expert and output axes. coreai-opt expands an N-D LUT ``(G, K, D)`` to ``(G, 1, 1, K, D)``
    (groups on axis 0 = experts), which ``coreai.lut_to_dense`` rejects; the right shape is
    ``(E, G/E, 1, K, D)``, or ``(E, 1, G/E, K, D)`` for a transposed ``(E, in, out)`` stack.
    Returns the names of the reshaped weights."""
    names = []
    for name, transposed, plist in _expert_parametrizations(model):
        for par in plist:
            lut, indices = getattr(par, "lut", None), getattr(par, "indices", None)
            if (not isinstance(lut, torch.Tensor) or not isinstance(indices, torch.Tensor)
                    or indices.dim() != 3 or lut.dim() != 5 or lut.shape[1:3] != (1, 1)):
                continue
            experts, groups = indices.shape[0], lut.shape[0]
            per_expert = lut.reshape(experts, groups // experts, *lut.shape[-2:])
            par.lut = per_expert.unsqueeze(1 if transposed else 2).contiguous()
            names.append(name)
    return names
