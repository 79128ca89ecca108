"""Training strategies for palettized weights: coreai-opt ``TrainingStrategy`` classes that also
carry the plugin's lifecycle hooks.

``palettize.training`` selects one (Hydra, recipes, callback arguments):

- ``frozen``: coreai-opt's default. The weight is rebuilt from fixed centroids and indices; no
  gradient reaches it, only unpalettized parameters adapt. Its hooks are the no-op base.
- ``ste``: straight-through estimator. The forward uses the palettized weight, the backward
  updates the dense weight as if it were not palettized. Every weight is re-assigned to its
  nearest centroid (comparisons with the centroid midpoints) whenever the dense weight or the
  LUT changed since the last forward (once per optimizer step: gradient-accumulation
  micro-batches and no-grad forwards reuse the palettized weight), and every
  ``lut_update_every`` optimizer steps each centroid moves to the mean of the weights assigned to
  it (one Lloyd step; ``0`` keeps the LUT fixed). No indices are stored: checkpoints, the
  report and the export derive them from the current dense weights when they read them.
- ``lut``: trainable centroids, fixed indices. Each centroid's gradient is the sum of the
  gradients of the weights mapped to it (a 1-D gather). Dense weights are frozen. Centroids live
  in a ``trainable_lut`` parameter created before the optimizer and copied into coreai-opt's
  ``centroids`` buffer after every optimizer step.

The engine calls, for each palettized weight, ``hooks(t).prepare_parameters(t)`` (before the
optimizer and DDP), ``after_cluster(t)``, ``before_optimizer_step(t)``,
``after_optimizer_step(t, step)`` and ``finish(t)``
(torchtitan's converter / ``post_optimizer_hook`` shape). A new strategy is one class.
Every strategy keeps the exported model truly palettized: at most ``2**n_bits`` values per LUT.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn as nn
from coreai_opt.palettization.spec import TrainingStrategy, TrainingStrategySpec

from .. import _coreai_compat as compat
from . import sharding
from .checks import TRAINING_STRATEGY_KEYS, PalettizeConfigError

__all__ = [
    "TRAINABLE_LUT",
    "StraightThroughSpec",
    "StraightThroughStrategy",
    "StrategyHooks",
    "TrainableLUTSpec",
    "TrainableLUTStrategy",
    "hooks",
    "lloyd_step",
    "nearest_centroids",
    "spec_class",
    "strategy_state_keys",
    "trains_dense_weight",
]

TRAINABLE_LUT = "trainable_lut"


# --------------------------------------------------------------------------------------------
# LUT math (plain torch)
# --------------------------------------------------------------------------------------------


def nearest_centroids(centroids: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each vector: ``(P, K, D)``, ``(P, N, D)`` -> ``(P, N)``.

    Scalar LUTs compare with the sorted centroids' midpoints (no distance matrix; the sort is
    cached until the centroids change): a batched ``searchsorted``, or on the CPU for at most
    ``COUNT_BELOW_MAX_K`` centroids a count of the midpoints below each value (same result);
    vector LUTs use ``cdist``.
    """
    if centroids.shape[-1] == 1:
        order, midpoints = _sorted_midpoints(centroids, vectors.device)
        values = vectors[..., 0].detach().float().contiguous()
        if vectors.device.type == "cpu" and midpoints.shape[1] < COUNT_BELOW_MAX_K:
            return order.gather(1, _count_below(midpoints, values))
        return order.gather(1, torch.searchsorted(midpoints, values))
    return torch.cdist(vectors.detach().float(), centroids.detach().float().to(vectors.device)
                       ).argmin(dim=-1)


COUNT_BELOW_MAX_K = 16
"""Up to this many centroids per LUT (``n_bits <= 4``), a CPU assignment counts the midpoints
below each value (one comparison pass per midpoint) instead of a binary search: 2-4x faster on
one CPU thread for 4 and 16 centroids, slower from 64 (``benchmarks/RESULTS.md``)."""


def _count_below(midpoints: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``searchsorted(midpoints, values)`` (left) for a few midpoints per row: the number of
    midpoints strictly below each value, accumulated in uint8."""
    position = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
    below = torch.empty(values.shape, dtype=torch.bool, device=values.device)
    for k in range(midpoints.shape[1]):
        position += torch.gt(values, midpoints[:, k:k + 1], out=below).view(torch.uint8)
    return position.long()


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
    if centroids.shape[-1] == 1:                   # scalar LUTs: a 2-D gather is 5x faster
        return centroids[..., 0].gather(1, assignment).unsqueeze(-1)
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


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


class StrategyHooks:
    """The plugin's lifecycle hooks of a strategy; the base (``frozen``) does nothing."""

    trains_dense_weight = False
    """Whether the dense weight gets a gradient (else it is frozen before DDP)."""

    def prepare_parameters(self, t: compat.PalettizedTensor) -> None:
        """Before the optimizer exists: create the strategy's parameters, check support."""

    def after_cluster(self, t: compat.PalettizedTensor) -> None:
        """k-means (re)set ``t``'s centroids."""

    def before_optimizer_step(self, t: compat.PalettizedTensor) -> None:
        """After the last backward, before the optimizer step."""

    def after_optimizer_step(self, t: compat.PalettizedTensor, step: int) -> None:
        """After optimizer step ``step``."""

    def finish(self, t: compat.PalettizedTensor) -> None:
        """After the last optimizer step: leave indices and LUTs as the export should see them."""


FROZEN = StrategyHooks()


def hooks(t: compat.PalettizedTensor) -> StrategyHooks:
    """The hooks of the strategy ``t`` trains with (``frozen``'s for coreai-opt's own)."""
    strategy = t.fake._training_strategy
    return strategy if isinstance(strategy, StrategyHooks) else FROZEN


def _check_supported(t: compat.PalettizedTensor, name: str) -> None:
    if t.fake.lut_qspec is not None or t.fake.sparsity_detection_threshold is not None:
        raise PalettizeConfigError("training", f"{name!r} does not support lut_dtype or sparsity "
                                   f"({t.name}); use training=frozen for those layers")


class _StraightThrough(torch.autograd.Function):
    """Returns the palettized weight exactly; passes the gradient to the dense weight unchanged
    (``w + (q - w).detach()`` would round, so training and eval outputs would differ)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, palettized: torch.Tensor) -> torch.Tensor:
        return palettized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


CACHE_ENV = "COREAI_PALETTIZE_STE_CACHE"
"""Set to ``0`` to re-assign on every forward (the uncached path, for benchmarks)."""

_CACHE_ATTR = "_plugin_ste_cache"
_EVAL_ATTR = "_plugin_ste_eval"
_LIVE = "_plugin_ste_training"  # set by a training forward, cleared by ``finish``


def _cache_key(module, weight: torch.Tensor) -> tuple:
    """What the palettized weight depends on (besides the optimizer step, which drops the cache:
    fused optimizers do not bump version counters). Tensors are compared by identity (the cache holds
    them, so a freed tensor's address cannot be reused by another); version counters bump on
    in-place updates (optimizer steps, Lloyd steps, ``load_state_dict``); ``data_ptr`` catches a
    ``.data`` swap. A view shares its base's version counter, so the base is the key."""
    base = weight._base if weight._base is not None else weight
    centroids = module.centroids
    return (base, base._version, weight.data_ptr(), weight.shape, weight.stride(), weight.dtype,
            weight.device, centroids, centroids._version)


def _same_key(a: tuple, b: tuple) -> bool:
    return (a[0] is b[0] and a[7] is b[7]
            and all(x == y for i, (x, y) in enumerate(zip(a, b)) if i not in (0, 7)))


def cached_assign_nearest(module, weight: torch.Tensor) -> torch.Tensor:
    """``assign_nearest`` once per dense-weight change: between optimizer steps (the
    micro-batches of gradient accumulation, forwards without gradient) the palettized weight
    is reused. The cached tensor is built under ``no_grad``, so it holds no autograd graph; the
    straight-through function takes it as a constant. The optimizer step drops it."""
    key = _cache_key(module, weight)
    cached = getattr(module, _CACHE_ATTR, None)
    if (cached is not None and _same_key(cached[0], key)
            and cached[1]._version == cached[2]):                  # output not written in place
        return cached[1]
    with torch.inference_mode(False):    # an inference tensor could not train later: build a
        palettized = assign_nearest(module, weight)          # normal one (Lightning validation)
    module.__dict__[_CACHE_ATTR] = (key, palettized, palettized._version)
    return palettized


@torch.no_grad()
def eval_palettized(module, weight: torch.Tensor) -> torch.Tensor:
    """The palettized weight outside training (after ``finish``, or never trained): the
    nearest-centroid assignment is kept as one byte per weight until the dense weight or the LUT
    changes, and each forward only gathers the LUT (no re-assignment per forward; 0.25x an fp32
    weight held instead of a palettized copy)."""
    key = _cache_key(module, weight)
    cached = module.__dict__.get(_EVAL_ATTR)
    if cached is None or not _same_key(cached[0], key):
        with torch.inference_mode(False):
            vectors, context = module.vectorize(weight.detach())
            assignment = nearest_centroids(module.centroids, vectors)
            if module.centroids.shape[1] <= 256:
                assignment = assignment.to(torch.uint8)
        cached = (key, assignment, context)
        module.__dict__[_EVAL_ATTR] = cached
    _, assignment, context = cached
    return module.devectorize(gather_centroids(module.centroids, assignment.long()), context)


def drop_cache(module) -> None:
    """Free the cached palettized weight and assignment; forget the last derived indices."""
    module.__dict__.pop(_CACHE_ATTR, None)
    module.__dict__.pop(_EVAL_ATTR, None)
    compat.forget_derived(module)


def _cache_enabled() -> bool:
    return os.environ.get(CACHE_ENV, "1") != "0"


@torch.no_grad()
def assign_nearest(module, weight: torch.Tensor) -> torch.Tensor:
    """Re-assign every weight to its nearest centroid; return the palettized weight. Nothing is
    stored: ``derive_indices`` gives the same assignment as indices when they are read."""
    vectors, context = module.vectorize(weight.detach())
    assignment = nearest_centroids(module.centroids, vectors)
    return module.devectorize(gather_centroids(module.centroids, assignment), context)


@torch.no_grad()
def derive_indices(module, weight: torch.Tensor) -> torch.Tensor:
    """The indices of ``weight`` in coreai-opt's layout: the assignment ``assign_nearest`` uses
    (scalar LUTs without per-channel scales), else coreai-opt's own nearest-centroid
    derivation (as for its stale indices)."""
    vectors, context = module.vectorize(weight.detach())
    return compat.assignment_indices(module, nearest_centroids(module.centroids, vectors),
                                     context, weight)


class StraightThroughStrategy(StrategyHooks, TrainingStrategy):
    """Forward: nearest-centroid palettized weight. Backward: identity to the dense weight.

    Stores no indices: the eval forward reuses the training forward's palettized weight, and
    ``state_dict()`` derives the indices from the dense weight (``compat.derive_indices_on_read``).
    """

    derives_indices = True  # indices are re-derived from the dense weight, never restored
    trains_dense_weight = True

    def __init__(self, lut_update_every: int = 0) -> None:
        self.lut_update_every = lut_update_every

    def palettized(self, module, weight: torch.Tensor) -> torch.Tensor:
        """The palettized weight without a gradient path (eval forward, report, export). While
        training it is cached like the training forward's; otherwise the assignment is cached
        (``eval_palettized``) until the weight changes."""
        if not _cache_enabled():
            return assign_nearest(module, weight)
        if module.__dict__.get(_LIVE, False):
            with torch.no_grad():
                return cached_assign_nearest(module, weight)
        return eval_palettized(module, weight)

    def train_forward(self, module, weight: torch.Tensor) -> torch.Tensor:
        module.__dict__[_LIVE] = True
        assign = cached_assign_nearest if _cache_enabled() else assign_nearest
        return _StraightThrough.apply(weight, assign(module, weight))

    derive_indices = staticmethod(derive_indices)

    def prepare_parameters(self, t: compat.PalettizedTensor) -> None:
        _check_supported(t, "ste")
        compat.derive_indices_on_read(t)

    def after_cluster(self, t: compat.PalettizedTensor) -> None:
        compat.drop_indices(t.fake)        # k-means' own assignment: derived from here on

    def before_optimizer_step(self, t: compat.PalettizedTensor) -> None:
        drop_cache(t.fake)   # the step changes the weights: free the palettized copy first

    @torch.no_grad()
    def after_optimizer_step(self, t: compat.PalettizedTensor, step: int) -> None:
        fake = t.fake
        # Fused optimizers (torch's fused AdamW, transformers' default) update parameters without
        # bumping their version counter: the optimizer step itself ends the cached assignment.
        drop_cache(fake)
        if (self.lut_update_every and step > 0 and step % self.lut_update_every == 0
                and fake.centroids is not None and bool(fake.fake_palett_enabled[0])):
            vectors, _ = fake.vectorize(t.original.detach())
            lloyd_step(fake.centroids, vectors)

    def finish(self, t: compat.PalettizedTensor) -> None:
        drop_cache(t.fake)   # the export derives the indices from the final weights
        t.fake.__dict__.pop(_LIVE, None)


class TrainableLUTStrategy(StrategyHooks, TrainingStrategy):
    """Forward: the weight gathered from the trainable centroids through fixed indices."""

    derives_indices = False

    def train_forward(self, module, weight: torch.Tensor) -> torch.Tensor:
        lut = getattr(module, TRAINABLE_LUT)
        flat, context = compat.flat_lut_positions(module, weight)
        vectors = lut.reshape(-1).index_select(0, flat).reshape(lut.shape[0], -1, lut.shape[2])
        return module.devectorize(vectors.to(weight.dtype), context)

    def prepare_parameters(self, t: compat.PalettizedTensor) -> None:
        _check_supported(t, "lut")
        if not hasattr(t.fake, TRAINABLE_LUT):
            t.fake.register_parameter(TRAINABLE_LUT, nn.Parameter(torch.zeros(
                compat.centroids_shape(t), dtype=t.original.dtype, device=t.original.device)))

    @torch.no_grad()
    def after_cluster(self, t: compat.PalettizedTensor) -> None:
        if t.fake.centroids is not None:
            getattr(t.fake, TRAINABLE_LUT).copy_(t.fake.centroids)

    @torch.no_grad()
    def after_optimizer_step(self, t: compat.PalettizedTensor, step: int) -> None:
        if t.fake.centroids is not None:  # FSDP2 shards the LUT Parameter: every rank gathers it
            t.fake.centroids.copy_(sharding.full_rows(getattr(t.fake, TRAINABLE_LUT)))

    def finish(self, t: compat.PalettizedTensor) -> None:
        self.after_optimizer_step(t, step=0)


# --------------------------------------------------------------------------------------------
# Registration with coreai-opt
# --------------------------------------------------------------------------------------------


def _register(key: str) -> Callable[[type[TrainingStrategySpec]], type[TrainingStrategySpec]]:
    """Register a spec class once: a module re-import must not silently replace (and break)
    the entry; a different class under the same key is an error."""

    def register(spec_cls: type[TrainingStrategySpec]) -> type[TrainingStrategySpec]:
        existing = TrainingStrategySpec.REGISTRY.get(key)
        if existing is None:
            TrainingStrategySpec.register(key)(spec_cls)
            return spec_cls
        if (existing.__module__, existing.__qualname__) != (spec_cls.__module__,
                                                            spec_cls.__qualname__):
            raise RuntimeError(f"coreai-opt training strategy {key!r} is already registered by "
                               f"{existing.__module__}.{existing.__qualname__}")
        return existing

    return register


@_register("ste")
class StraightThroughSpec(TrainingStrategySpec):
    """``training_strategy_spec: {type: ste, lut_update_every: N}``."""

    lut_update_every: int = 0
    _strategy_cls = StraightThroughStrategy


@_register("lut")
class TrainableLUTSpec(TrainingStrategySpec):
    """``training_strategy_spec: {type: lut}``."""

    _strategy_cls = TrainableLUTStrategy


def spec_class(name: str) -> type[TrainingStrategySpec] | None:
    """The coreai-opt spec class of ``palettize.training`` name ``name`` (None for ``frozen``)."""
    return None if name == "frozen" else TrainingStrategySpec.REGISTRY[TRAINING_STRATEGY_KEYS[name]]


def trains_dense_weight(name: str) -> bool:
    """Whether palettized weights of ``palettize.training`` name ``name`` get a dense gradient."""
    return {"ste": StraightThroughStrategy, "lut": TrainableLUTStrategy}.get(
        name, StrategyHooks).trains_dense_weight


def strategy_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys the strategies add (not part of a coreai-opt prepared model)."""
    return [k for k in model.state_dict() if k.endswith(f".{TRAINABLE_LUT}")]
