"""Palettized weights whose indices are never stored (issue #10): the training strategy derives
them from the dense weight whenever something reads them.

A strategy that trains the dense weight (``ste``) re-assigns it after every optimizer step, so a
stored index buffer (1 byte per weight, +25 % of an fp32 model) would only ever hold the previous
step's assignment. ``derive_indices_on_read`` makes a fake hold no ``indices`` buffer:

- its eval forward (``hard_assign``, also what the report and the packed artifact call) asks the
  strategy for the palettized weight instead of gathering stored indices;
- ``state_dict()`` (checkpoints, export, the report) still has ``<prefix>.indices``, derived
  from the current dense weight when it is saved; a loaded ``indices`` entry is dropped again
  after ``load_state_dict``.

The strategy provides ``palettized(fake, weight)`` and ``derive_indices(fake, weight)``.
"""

from __future__ import annotations

import weakref

import torch
from coreai_opt.palettization.kmeans.kmeans_fake_palettize import _KMeansFakePalettize

from .tensors import PalettizedTensor

__all__ = ["DerivedIndicesFakePalettize", "derive_indices_on_read", "drop_indices",
           "forget_derived"]

_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""fake -> (stamp, weak reference to its last derived indices): kept outside the module, so
pickling and copying a model never meet a weak reference."""


class DerivedIndicesFakePalettize(_KMeansFakePalettize):
    """A k-means fake palettizer without an ``indices`` buffer: its training strategy derives the
    assignment from the dense weight (module-level, so pickling and ``deepcopy`` keep it)."""

    def hard_assign(self, weight: torch.Tensor) -> torch.Tensor:
        return self._training_strategy.palettized(self, weight)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """``<prefix>indices`` derived from the dense weight, which the parametrization list
        saved just before (``<list prefix>original``; absent when the fake's own state is
        saved alone, e.g. for the DDP broadcast, where every rank derives them itself; or
        sharded by FSDP2: its checkpoints and gathered state go without them)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        owner, _, position = prefix[:-1].rpartition(".")
        weight = destination.get(f"{owner}.original" if owner else "original")
        if (position == "0" and weight is not None and self.centroids is not None
                and type(weight).__name__ != "DTensor"):
            destination[prefix + "indices"] = _derived(self, weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        drop_indices(self)

    def _initialize(self, weight: torch.Tensor) -> None:
        super()._initialize(weight)            # k-means also returns the indices: not kept
        drop_indices(self)


def drop_indices(fake: _KMeansFakePalettize) -> None:
    """Free ``fake``'s stored indices; coreai-opt then treats them as stale (not saved)."""
    fake.indices = None
    fake._indices_stale = True


def forget_derived(fake: _KMeansFakePalettize) -> None:
    """Forget the last derived indices (the dense weight changes; fused optimizers do not bump
    its version counter)."""
    _LAST.pop(fake, None)


def derive_indices_on_read(t: PalettizedTensor) -> None:
    """Make ``t`` store no indices from now on (idempotent; tied aliases share the fake)."""
    if type(t.fake) is _KMeansFakePalettize:
        t.fake.__class__ = DerivedIndicesFakePalettize
    drop_indices(t.fake)


def _derived(fake: DerivedIndicesFakePalettize, weight: torch.Tensor) -> torch.Tensor:
    """The indices of ``weight``; the same tensor again while it is alive and nothing changed,
    so a tied alias's key holds the same tensor (stored once)."""
    base = weight._base if weight._base is not None else weight
    stamp = (base._version, weight.data_ptr(), id(fake.centroids), fake.centroids._version)
    last = _LAST.get(fake)
    if last is not None and last[0] == stamp:
        tensor = last[1]()
        if tensor is not None:
            return tensor
    with torch.no_grad():
        tensor = fake._training_strategy.derive_indices(fake, weight.detach())
    _LAST[fake] = (stamp, weakref.ref(tensor))
    return tensor
