"""Training strategies for palettized weights, registered with coreai-opt's ``TrainingStrategySpec``.

``palettize.training`` selects one (Hydra, recipes, callback arguments):

- ``frozen``: coreai-opt's default. The weight is rebuilt from fixed centroids and indices; no
  gradient reaches it, only unpalettized parameters adapt.
- ``ste``: straight-through estimator. The forward uses the palettized weight, the backward
  updates the dense weight as if it were not palettized. Each forward re-assigns every weight to
  its nearest centroid (a batched ``searchsorted`` on centroid midpoints), and every
  ``lut_update_every`` optimizer steps each centroid moves to the mean of the weights assigned to
  it (one Lloyd step; ``0`` keeps the LUT fixed). After the last step, indices are re-derived
  from the final weights, so the export matches the trained weights.
- ``lut``: trainable centroids, fixed indices. Each centroid's gradient is the sum of the
  gradients of the weights mapped to it (a 1-D gather). Dense weights are frozen. Centroids live
  in a ``trainable_lut`` parameter created before the optimizer and copied into coreai-opt's
  ``centroids`` buffer after every optimizer step.

Every strategy keeps the exported model truly palettized: at most ``2**n_bits`` values per LUT.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn as nn
from coreai_opt.palettization.spec import TrainingStrategy, TrainingStrategySpec

from . import _coreai_compat as compat
from .settings import TRAINING_STRATEGIES

__all__ = [
    "StraightThroughSpec",
    "StraightThroughStrategy",
    "TrainableLUTSpec",
    "TrainableLUTStrategy",
    "after_cluster",
    "after_optimizer_step",
    "prepare_parameters",
    "strategy_state_keys",
    "training_finished",
]

log = logging.getLogger("coreai_palettize_plugins")
TRAINABLE_LUT = "trainable_lut"


class _StraightThrough(torch.autograd.Function):
    """Returns the palettized weight exactly; passes the gradient to the dense weight unchanged
    (``w + (q - w).detach()`` would round, so training and eval outputs would differ)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, palettized: torch.Tensor) -> torch.Tensor:
        return palettized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class StraightThroughStrategy(TrainingStrategy):
    """Forward: nearest-centroid palettized weight. Backward: identity to the dense weight."""

    derives_indices = True  # indices are re-derived from the dense weight, never restored

    def __init__(self, lut_update_every: int = 0) -> None:
        self.lut_update_every = lut_update_every

    def train_forward(self, module, weight: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(weight, assign_nearest(module, weight))


@torch.no_grad()
def assign_nearest(module, weight: torch.Tensor) -> torch.Tensor:
    """Re-assign every weight to its nearest centroid; return the palettized weight. The exact
    assignment becomes the module's indices, so eval and export use the same one."""
    vectors, context = module.vectorize(weight.detach())
    assignment = compat.nearest_centroids(module.centroids, vectors)
    palettized = module.devectorize(compat.gather_centroids(module.centroids, assignment), context)
    if not compat.store_assignment(module, assignment, context):
        module._indices_stale = True  # coreai-opt re-derives them from the current weight
    return palettized


class TrainableLUTStrategy(TrainingStrategy):
    """Forward: the weight gathered from the trainable centroids through fixed indices."""

    derives_indices = False

    def train_forward(self, module, weight: torch.Tensor) -> torch.Tensor:
        lut = getattr(module, TRAINABLE_LUT)
        flat, context = compat.flat_lut_positions(module, weight)
        vectors = lut.reshape(-1).index_select(0, flat).reshape(lut.shape[0], -1, lut.shape[2])
        return module.devectorize(vectors.to(weight.dtype), context)


def _register(key: str, spec_cls: type[TrainingStrategySpec]) -> type[TrainingStrategySpec]:
    """Register once: a module re-import must not silently replace (and break) the entry."""
    existing = TrainingStrategySpec.REGISTRY.get(key)
    if existing is None:
        TrainingStrategySpec.register(key)(spec_cls)
        return spec_cls
    if (existing.__module__, existing.__qualname__) != (spec_cls.__module__, spec_cls.__qualname__):
        raise RuntimeError(f"coreai-opt training strategy {key!r} is already registered by "
                           f"{existing.__module__}.{existing.__qualname__}")
    return existing


class StraightThroughSpec(TrainingStrategySpec):
    """``training_strategy_spec: {type: ste, lut_update_every: N}``."""

    lut_update_every: int = 0
    _strategy_cls = StraightThroughStrategy


class TrainableLUTSpec(TrainingStrategySpec):
    """``training_strategy_spec: {type: lut}``."""

    _strategy_cls = TrainableLUTStrategy


StraightThroughSpec = _register("ste", StraightThroughSpec)  # type: ignore[misc]
TrainableLUTSpec = _register("lut", TrainableLUTSpec)  # type: ignore[misc]
TRAINING_STRATEGIES.update({"ste": "ste", "lut": "lut"})

Kind = Literal["frozen", "ste", "lut"]


def _strategy(tensor: compat.PalettizedTensor) -> TrainingStrategy:
    return tensor.fake._training_strategy


def prepare_parameters(tensors: list[compat.PalettizedTensor]) -> None:
    """Before the optimizer exists: trainable LUT parameters for ``lut`` weights, and dense
    weights that get no gradient frozen (so DDP's reducer does not wait for them)."""
    for t in tensors:
        strategy = _strategy(t)
        if isinstance(strategy, TrainableLUTStrategy):
            _check_supported(t, "lut")
            if not hasattr(t.fake, TRAINABLE_LUT):
                shape = compat.centroids_shape(t)
                t.fake.register_parameter(TRAINABLE_LUT, nn.Parameter(
                    torch.zeros(shape, dtype=t.original.dtype, device=t.original.device)))
        elif isinstance(strategy, StraightThroughStrategy):
            _check_supported(t, "ste")


def _check_supported(t: compat.PalettizedTensor, name: str) -> None:
    from .settings import PalettizeConfigError

    if t.fake.lut_qspec is not None or t.fake.sparsity_detection_threshold is not None:
        raise PalettizeConfigError(
            f"palettize.training: {name!r} does not support lut_dtype or sparsity "
            f"({t.name}); use training=frozen for those layers")


@torch.no_grad()
def after_cluster(tensors: list[compat.PalettizedTensor]) -> None:
    """k-means (re)set the centroids: start the trainable LUT from them."""
    for t in tensors:
        lut = getattr(t.fake, TRAINABLE_LUT, None)
        if lut is not None and t.fake.centroids is not None:
            lut.copy_(t.fake.centroids)


@torch.no_grad()
def after_optimizer_step(tensors: list[compat.PalettizedTensor], step: int) -> None:
    """Trainable LUT -> coreai-opt centroids; scheduled Lloyd updates of STE LUTs."""
    for t in tensors:
        strategy = _strategy(t)
        lut = getattr(t.fake, TRAINABLE_LUT, None)
        if lut is not None and t.fake.centroids is not None:
            t.fake.centroids.copy_(lut)
        elif (isinstance(strategy, StraightThroughStrategy) and strategy.lut_update_every
              and step > 0 and step % strategy.lut_update_every == 0
              and t.fake.centroids is not None and bool(t.fake.fake_palett_enabled[0])):
            vectors, _ = t.fake.vectorize(t.original.detach())
            compat.lloyd_step(t.fake.centroids, vectors)


def training_finished(tensors: list[compat.PalettizedTensor]) -> None:
    """After the last optimizer step: final LUT sync; STE indices follow the final weights."""
    after_optimizer_step(tensors, step=0)
    for t in tensors:
        if isinstance(_strategy(t), StraightThroughStrategy) and t.fake.centroids is not None:
            assign_nearest(t.fake, t.original)


def strategy_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys the strategies add (not part of a coreai-opt prepared model)."""
    return [k for k in model.state_dict() if k.endswith(f".{TRAINABLE_LUT}")]
