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
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as P
from coreai_opt.palettization import KMeansPalettizer
from coreai_opt.palettization.kmeans.kmeans_fake_palettize import _KMeansFakePalettize
from coreai_opt.palettization.kmeans.kmeans_support_mixins import _PalettizationSupportMixin
from coreai_opt.palettization.spec import PerGroupedChannelGranularity
from coreai_opt.palettization.spec.fake_palettize import _enable_fake_palett
from torch.overrides import TorchFunctionMode

from .linear_like import experts_transposed

__all__ = [
    "COREAI_INDEX_BITS",
    "EXPORTABLE_EXPERTS_IMPLEMENTATION",
    "KMEANS_ENTRY",
    "ExpertsGroupedChannel",
    "ExpertsLayout",
    "PalettizedTensor",
    "apply_layouts",
    "centroids_shape",
    "cluster_tensors",
    "defer_clustering",
    "deferred",
    "end_deferral",
    "ensure_kmeans_extension",
    "fake_palettized_tensors",
    "finish_clustering",
    "flat_lut_positions",
    "function_name",
    "get_step",
    "insert_parametrizations",
    "is_palettized_state",
    "is_prepared",
    "lut_groups",
    "palettizable_ops",
    "prepare_from_state_dict",
    "record_first_consumers",
    "reshape_expert_luts",
    "resolved_module_configs",
    "set_step",
    "storage_bits",
    "store_assignment",
    "tied_prefixes",
    "traceable_experts",
    "use_exportable_experts",
    "widen_for_coreai",
]

log = logging.getLogger(__name__)

KMEANS_ENTRY = (_KMeansFakePalettize, "_cluster_to_centroids")
"""``(class, method)`` coreai-opt calls once per weight it clusters (tests count the calls)."""


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


def _walk(model: nn.Module, *, remove_duplicate: bool) -> Iterator[PalettizedTensor]:
    """Every (module, attribute) whose parametrization list holds a k-means fake palettizer."""
    for module_name, module in model.named_modules(remove_duplicate=remove_duplicate):
        if not P.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            fake = next((f for f in plist if isinstance(f, _KMeansFakePalettize)), None)
            if fake is not None:
                yield PalettizedTensor(module_name, module, attr, fake)


def fake_palettized_tensors(model: nn.Module) -> list[PalettizedTensor]:
    """Every k-means palettized weight of ``model``, in module order, tied weights once."""
    found: dict[int, PalettizedTensor] = {}
    for tensor in _walk(model, remove_duplicate=True):
        found.setdefault(id(tensor.fake), tensor)
    return list(found.values())


def tied_prefixes(model: nn.Module) -> dict[str, str]:
    """``{alias state prefix: source state prefix}`` for weights palettized once but reachable
    under two modules (an ``lm_head`` tied to the input embedding)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for tensor in _walk(model, remove_duplicate=False):
        source = first.setdefault(id(tensor.fake), tensor.state_prefix)
        if source != tensor.state_prefix:
            aliases[tensor.state_prefix] = source
    return aliases


def insert_parametrizations(
    palettizer: KMeansPalettizer, example_inputs: tuple[Any, ...]
) -> dict[str, str]:
    """Insert the fake-palettize parametrizations without clustering.

    Mirrors ``KMeansPalettizer.prepare(state_dict=...)`` up to the point where it would load a
    state dict. Returns ``{weight name: reason}`` for weights the config asked for but whose shape
    the spec cannot take (coreai-opt drops those and leaves them dense).
    """
    model = palettizer._model
    palettizer._module_config_dict = palettizer._config.build_module_config_dict(model)
    with traceable_experts(model):
        palettizer._handler.prepare(model, example_inputs=example_inputs)
    apply_layouts(model)
    skipped = {}
    for tensor in fake_palettized_tensors(model):
        if not tensor.fake.check_compatible(tensor.original):
            skipped[tensor.name] = _incompatibility(tensor)
    palettizer._remove_incompatible_fake_palett_modules()
    palettizer._mark_model_as_prepared(model)
    return skipped


def is_prepared(model: nn.Module) -> bool:
    """Whether coreai-opt already prepared ``model``."""
    return bool(KMeansPalettizer._is_model_prepared(model))


def is_palettized_state(state_dict: Any) -> bool:
    """Whether a model state dict holds coreai-opt palettized state (LUTs of a fake palettizer,
    ``<module>.parametrizations.<attr>.<i>.centroids``), i.e. was saved from a prepared model."""
    return any(isinstance(k, str) and k.endswith(".centroids")
               and (k.startswith("parametrizations.") or ".parametrizations." in k)
               for k in state_dict)


def _incompatibility(tensor: PalettizedTensor) -> str:
    fake, shape = tensor.fake, tuple(tensor.original.shape)
    group = getattr(fake.granularity, "group_size", None)
    if group:
        return f"shape {shape} is not divisible into groups of {group} along axis {fake._resolved_axis}"
    return f"shape {shape} is incompatible with cluster_dim={fake.cluster_dim}"


_DEFERRED = "_plugin_deferred"


def defer_clustering(tensors: list[PalettizedTensor]) -> None:
    """Until ``end_deferral``: reading a palettized weight returns its dense ``original``
    Parameter itself, and nothing runs k-means.

    coreai-opt 0.4's fake-palettize forward runs k-means (``ensure_initialized``) *before* it
    honours ``fake_palett_enabled``, so after the structure exists any read of ``module.weight``
    (a param-group builder, a summary, a tie helper) would cluster that weight lazily, on every
    rank. ``_disabled`` is the one flag its forward checks first. The plugin's own marker keeps
    ``end_deferral`` from re-enabling a fake coreai-opt disabled (incompatible shape). Call after
    ``insert_parametrizations`` (which removes disabled fakes).
    """
    for t in tensors:
        if not t.fake._disabled:
            t.fake._disabled = True
            setattr(t.fake, _DEFERRED, True)


def end_deferral(tensors: list[PalettizedTensor]) -> None:
    """Undo ``defer_clustering``: before k-means, restore verification and ``finish_clustering``
    (which *removes* disabled fakes). Idempotent."""
    for t in tensors:
        _end_deferral(t.fake)


def _end_deferral(fake: _KMeansFakePalettize) -> None:
    if getattr(fake, _DEFERRED, False):
        fake._disabled = False
        setattr(fake, _DEFERRED, False)


def deferred(tensors: list[PalettizedTensor]) -> list[str]:
    """Names of ``tensors`` whose clustering is still deferred."""
    return [t.name for t in tensors if getattr(t.fake, _DEFERRED, False)]


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


def lut_groups(fake: _KMeansFakePalettize, weight: torch.Tensor) -> list[torch.Tensor]:
    """``weight`` split as ``fake`` clusters it: one ``(N, cluster_dim)`` tensor per LUT."""
    blocks, _ = fake._reshape_and_block(weight)
    return [fake._vectorize_block(block) for block in blocks]


def centroids_shape(tensor: PalettizedTensor) -> tuple[int, int, int]:
    """Shape ``(num_luts, 2**n_bits, cluster_dim)`` k-means will give ``tensor``'s centroids."""
    fake = tensor.fake
    blocks, _ = fake._reshape_and_block(tensor.original.detach().to("meta"))
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


# --------------------------------------------------------------------------------------------
# What the tracing forward saw: why a weight stayed dense (the report's ``dense_layers``).
# --------------------------------------------------------------------------------------------

_METADATA_READS = frozenset({
    "dim", "ndimension", "size", "numel", "nelement", "stride", "element_size", "data_ptr",
    "get_device", "is_floating_point", "is_complex", "is_contiguous", "storage_offset",
})
"""Tensor methods that read metadata only: not a "consumer" of a weight (nor are properties
such as ``.shape``/``.dtype``/``.device``, whose ``__get__`` also reaches torch function modes)."""


def function_name(func: Any) -> str | None:
    """``torch.addmm``, ``torch.nn.functional.linear``, ``torch.Tensor.transpose``; None for a
    property read or a metadata method (they do not consume the values)."""
    from torch.overrides import resolve_name

    name = resolve_name(func) or getattr(func, "__qualname__", None) or repr(func)
    if name.endswith(".__get__") or name.rsplit(".", 1)[-1] in _METADATA_READS:
        return None
    return name


class _FirstConsumers(TorchFunctionMode):
    """Records, while ``active``, the first torch function each watched parameter is passed to
    (positionally, by keyword or inside a list/tuple argument)."""

    def __init__(self, watched: set[int]) -> None:
        super().__init__()
        self.watched = watched
        self.first: dict[int, str] = {}
        self.active = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            for value in (*args, *kwargs.values()):
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    key = id(item)
                    if key in self.watched and key not in self.first:
                        name = function_name(func)
                        if name is not None:
                            self.first[key] = name
        return func(*args, **kwargs)


@contextlib.contextmanager
def record_first_consumers(model: nn.Module) -> Iterator[dict[str, str]]:
    """Around ``insert_parametrizations``: ``{parameter name: first torch function that consumed
    it}`` during coreai-opt's own tracing forward (no extra forward), filled when the block
    exits; a tied parameter under each of its names. A parameter the forward never used is
    absent.

    The recording ``TorchFunctionMode`` is entered before coreai-opt pushes its own, so it sits
    outside it and sees each call as coreai-opt passes it on; it records only while the root
    module's forward runs (not coreai-opt's registration work after it).
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    mode = _FirstConsumers(set(names))

    def start(*_: Any) -> None:
        mode.active = True

    def stop(*_: Any) -> None:
        mode.active = False

    hooks = [model.register_forward_pre_hook(start, prepend=True),
             model.register_forward_hook(stop, always_call=True)]
    found: dict[str, str] = {}
    try:
        with mode:
            yield found
    finally:
        for hook in hooks:
            hook.remove()
        for key, func in mode.first.items():
            found.update(dict.fromkeys(names[key], func))


def palettizable_ops() -> frozenset[str]:
    """Names (as ``function_name`` gives them) of the torch functions coreai-opt's k-means
    palettizer processes with an ``op_state_spec`` (F.linear, convs, MHA forward in 0.4)."""
    from coreai_opt.palettization.kmeans.supported_ops_registry import (
        _KMeansPalettizerSupportedOpsRegistry,
    )

    ops = _KMeansPalettizerSupportedOpsRegistry.get_supported_ops()
    return frozenset(n for n in map(function_name, ops) if n is not None)


def resolved_module_configs(palettizer: KMeansPalettizer) -> dict[str, tuple[str, Any]]:
    """``{module name: (level, config)}`` as coreai-opt resolved them for the prepared model:
    level ``"name"``, ``"type"`` or ``"global"`` (the config's ``set_module_name``,
    ``set_module_type`` or ``global_config``), config a ``ModuleKMeansPalettizerConfig`` (a
    ``None`` entry is stored as one whose specs are all None) or None."""
    from coreai_opt._utils.config_utils import ConfigLevel

    levels = {ConfigLevel.MODULE_NAME: "name", ConfigLevel.MODULE_TYPE: "type",
              ConfigLevel.GLOBAL: "global"}
    resolved: dict[str, tuple[str, Any]] = {}
    for level in ConfigLevel.priority_order():
        for name, config in palettizer._module_config_dict.get(level, {}).items():
            resolved.setdefault(name, (levels[level], config))
    return resolved


def storage_bits(tensor: PalettizedTensor) -> int:
    """coreai-opt's storage cost of one palettized weight, in bits (what
    ``coreai_opt.inspection.bits_per_weight`` sums): n-bit indices, the LUTs at their dtype
    (or ``lut_qspec`` width plus one scale/zero-point per LUT), per-channel scales."""
    from coreai_opt.inspection._bpw_utils import tensor_storage_bits

    return int(tensor_storage_bits(tensor.original, tensor.fake))

# Fused MoE experts: a layout coreai-opt 0.4 lacks (3-D weights, per-expert LUT groups).
# --------------------------------------------------------------------------------------------


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


def apply_layouts(model: nn.Module) -> list[str]:
    """Give every fake-palettized 3-D weight of a fused-experts module the per-expert layout
    (``ExpertsLayout`` + ``ExpertsGroupedChannel``; a per-tensor spec becomes one LUT per
    expert). Call after the structure is inserted and before incompatible fakes are removed
    (which would otherwise drop them: their expert axis is cut into groups). Returns the names
    of the weights it set."""
    names = []
    for module_name, module in model.named_modules():
        transposed = experts_transposed(module)
        if transposed is None or not P.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
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
            names.append(f"{module_name}.{attr}" if module_name else attr)
    return names


def prepare_from_state_dict(palettizer: KMeansPalettizer, example_inputs: tuple[Any, ...],
                            state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """coreai-opt's public ``prepare(example_inputs, state_dict=...)`` (no k-means) with the
    plugin's layouts applied right after the structure is inserted, as ``insert_parametrizations``
    does: the way every re-prepare (export copy, ``load_palettized``) must run."""
    handler = palettizer._handler
    insert = handler.prepare

    def insert_then_layout(model, *args, **kwargs):
        with traceable_experts(model):
            prepared = insert(model, *args, **kwargs)
        apply_layouts(model)
        return prepared

    handler.prepare = insert_then_layout  # an instance attribute shadows the method
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
    for module_name, module in model.named_modules():
        transposed = experts_transposed(module)
        if transposed is None or not P.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            for par in plist:
                lut, indices = getattr(par, "lut", None), getattr(par, "indices", None)
                if (not isinstance(lut, torch.Tensor) or not isinstance(indices, torch.Tensor)
                        or indices.dim() != 3 or lut.dim() != 5 or lut.shape[1:3] != (1, 1)):
                    continue
                experts, groups = indices.shape[0], lut.shape[0]
                per_expert = lut.reshape(experts, groups // experts, *lut.shape[-2:])
                par.lut = per_expert.unsqueeze(1 if transposed else 2).contiguous()
                names.append(f"{module_name}.{attr}" if module_name else attr)
    return names
