"""Palettized weights whose indices are never stored (issue #10): the training strategy derives
them from the dense weight whenever something reads them.

A strategy that trains the dense weight (``ste``) re-assigns it after every optimizer step, so a
stored index buffer (1 byte per weight, +25 % of an fp32 model) would only ever hold the previous
step's assignment. ``derive_indices_on_read`` makes a fake hold no ``indices`` buffer:

- its eval forward (``hard_assign``, also what the report and the packed artifact call) asks the
  strategy for the palettized weight instead of gathering stored indices;
- ``state_dict()`` (checkpoints, export, the report, the DDP broadcast of a clustered fake) still
  has ``<prefix>.indices``: a post-hook on the parametrized module derives them from the current
  dense weight; a loaded ``indices`` entry is dropped again after ``load_state_dict``.

The strategy provides ``palettized(fake, weight)`` and ``derive_indices(fake, weight)``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn as nn
from coreai_opt.palettization.kmeans.kmeans_fake_palettize import _KMeansFakePalettize

from .tensors import PalettizedTensor

__all__ = ["DerivedIndicesFakePalettize", "derive_indices_on_read", "drop_indices",
           "forget_derived"]

_LAST = "_plugin_last_derived"


class DerivedIndicesFakePalettize(_KMeansFakePalettize):
    """A k-means fake palettizer without an ``indices`` buffer: its training strategy derives the
    assignment from the dense weight (module-level, so pickling and ``deepcopy`` keep it)."""

    def hard_assign(self, weight: torch.Tensor) -> torch.Tensor:
        return self._training_strategy.palettized(self, weight)

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
    fake.__dict__.pop(_LAST, None)


def derive_indices_on_read(t: PalettizedTensor) -> None:
    """Make ``t`` store no indices from now on (idempotent). The state-dict hook sits on the
    parametrization list, which tied aliases share, so every alias's key gets the indices."""
    fake = t.fake
    if type(fake) is _KMeansFakePalettize:
        fake.__class__ = DerivedIndicesFakePalettize
    drop_indices(fake)
    plist = t.module.parametrizations[t.attr]
    if not any(hook is _add_derived_indices for hook in plist._state_dict_hooks.values()):
        plist._register_state_dict_hook(_add_derived_indices)


def _add_derived_indices(plist: nn.Module, state_dict: dict[str, Any], prefix: str,
                         local_metadata: Any) -> None:
    """State-dict post-hook of a ``ParametrizationList``: ``<prefix><i>.indices`` derived from
    the current dense weight for each fake that stores none."""
    value = plist.original
    for i, fake in enumerate(plist):
        if isinstance(fake, DerivedIndicesFakePalettize):
            key = f"{prefix}{i}.indices"
            if fake.centroids is not None and key not in state_dict:
                state_dict[key] = _derived(fake, value)
            return
        with torch.no_grad():
            value = fake(value)


def _derived(fake: DerivedIndicesFakePalettize, weight: torch.Tensor) -> torch.Tensor:
    """The indices of ``weight``; the same tensor again while it is alive and nothing changed,
    so a tied alias's key holds the same tensor (stored once)."""
    base = weight._base if weight._base is not None else weight
    stamp = (base._version, weight.data_ptr(), id(fake.centroids), fake.centroids._version)
    last = fake.__dict__.get(_LAST)
    if last is not None and last[0] == stamp:
        tensor = last[1]()
        if tensor is not None:
            return tensor
    with torch.no_grad():
        tensor = fake._training_strategy.derive_indices(fake, weight.detach())
    fake.__dict__[_LAST] = (stamp, weakref.ref(tensor))
    return tensor
