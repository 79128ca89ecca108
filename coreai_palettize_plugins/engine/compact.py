"""The compact base (``palettize.compact``, default true): palettized weights that do not train
densely (``frozen``, ``lut``) drop their dense weight once clustered and keep only their indices
packed to n bits, their LUTs and per-channel scales; each forward rebuilds the weight from those,
in the model's dtype (``_coreai_compat/compact.py``).

When: right after k-means (and the distributed broadcast), after a restore without k-means, and,
with a PAT warm-up (``schedule.start_step``), once palettization turned on and the weight was
clustered from its warmed-up values. A checkpoint that holds compact weights makes them compact
while it loads.

State-dict keys of a compact weight ``<p> = <module>.parametrizations.<attr>.``:
``<p>original`` (an empty tensor), ``<p>0.packed_indices`` (uint8, n-bit little-endian stream,
the bit order of the packed artifact), ``<p>0.centroids``, ``<p>0.fake_palett_enabled``
(``<p>0.per_channel_scale``, ``<p>0.trainable_lut`` when present); no ``<p>0.indices``.
A dense checkpoint (older runs, ``compact: false``) still loads into a compact run (its indices
are packed, its dense weight ignored); a compact checkpoint loaded into a ``compact: false`` run
raises ``PalettizeConfigError`` naming ``palettize.compact``. The export rebuilds the dense keys.

The report's SQNR of a compact weight is the one measured when it became compact (for ``lut``:
against the LUT of that moment; the dense weight is gone afterwards).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .. import _coreai_compat as compat
from ..core import strategies
from ..core.checks import PalettizeConfigError

__all__ = ["CompactBase", "compact_state_bytes"]

SQNR_ATTR = "compact_sqnr_db"


_HOOKED: list[Any] = []


def _hook_optimizers() -> None:
    """Once per process: optimizers drop their state of weights that became compact."""
    if not _HOOKED:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOKED.append(register_optimizer_step_post_hook(compat.drop_emptied_optimizer_state))


class CompactBase:
    """Makes one model's eligible palettized weights compact (see the module docstring).

    ``enabled``: ``palettize.compact``. The caller (the engine) calls ``update(started)`` after
    every change of the palettized state (``started``: the schedule has switched on)."""

    def __deepcopy__(self, memo: dict) -> CompactBase:
        """Shared, not copied: a deep copy of the model (EMA, SWA) keeps its load hooks."""
        return self

    def __init__(self, model: nn.Module, tensors: list[compat.PalettizedTensor],
                 enabled: bool) -> None:
        _hook_optimizers()
        self.model = model
        self.enabled = bool(enabled)
        self.lists: dict[int, list[nn.Module]] = {}
        self._fake_of: dict[int, Any] = {}  # id(parametrization list) -> its fake palettizer
        self.unsupported: dict[str, str] = {}
        for _prefix, t in compat.palettized_prefixes(model):
            plist = t.module.parametrizations[t.attr]
            self.lists.setdefault(id(t.fake), []).append(plist)
            plist.register_load_state_dict_pre_hook(self._load_pre_hook)
            self._fake_of[id(plist)] = t.fake
        self.candidates: list[compat.PalettizedTensor] = []
        for t in tensors:
            if strategies.hooks(t).trains_dense_weight:
                continue
            reason = compat.compact_support(t.fake, t.original.shape)
            if reason is None:
                self.candidates.append(t)
            else:
                self.unsupported[t.name] = reason
        self._eligible = {id(t.fake) for t in self.candidates}
        if self.enabled and self.unsupported:
            warnings.warn(
                f"palettize.compact: {len(self.unsupported)} weight(s) keep their dense weight:\n"
                + "\n".join(f"  {n}: {r}" for n, r in self.unsupported.items()),
                stacklevel=3)

    # ------------------------------------------------------------------ lifecycle

    def update(self, started: bool) -> list[str]:
        """Make every weight compact that is clustered, palettizing at the current step
        (``started``: the schedule's start step is reached) and not compact yet. Returns their
        names."""
        if not self.enabled:
            return []
        done = []
        for t in self.candidates:
            fake = t.fake
            if (compat.is_compact(fake) or not started or not t.initialized
                    or not t.has_indices or not bool(fake.fake_palett_enabled[0])
                    or compat.deferred([t])):
                continue
            self._make_compact(t)
            done.append(t.name)
        return done

    @torch.no_grad()
    def _make_compact(self, t: compat.PalettizedTensor) -> None:
        from ..export.report import _sqnr_db

        original = t.parameter.detach()  # keeps the dense values alive until the SQNR is taken
        compat.make_compact(t.fake, self.lists[id(t.fake)], train_lut=_train_lut(t.fake))
        # From the compact rebuild (one weight-sized tensor in the LUT's dtype), not coreai-opt's
        # hard_assign (which adds an int64 index per weight): prepare's peak memory stays low.
        setattr(t.fake, SQNR_ATTR, _sqnr_db(original, t.fake.rebuild()))

    def _load_pre_hook(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                       *args: Any) -> None:
        """Per parametrization list: a compact checkpoint makes the weight compact before its
        state loads; a dense one loads into a compact weight without its dense tensor."""
        fake = self._fake_of.get(id(module))
        if fake is None:  # a deep copy of the model (EMA, SWA): its own fake, already as it is
            fake = next((f for f in module if compat.is_compact(f)), None)
            if fake is None:
                return
        key = prefix + "original"
        value = state_dict.get(key)
        if compat.is_compact(fake):
            if isinstance(value, torch.Tensor) and value.numel():
                state_dict[key] = value.new_empty(0)  # a dense checkpoint: frozen, not needed
            return
        emptied = isinstance(value, torch.Tensor) and value.numel() == 0
        if prefix + "0.packed_indices" not in state_dict and not emptied:
            return
        if not self.enabled or id(fake) not in self._eligible:
            raise PalettizeConfigError(
                "compact", f"the checkpoint holds {prefix}0.packed_indices (a compact palettized "
                "weight, no dense weight); load it with palettize.compact=true and "
                "training frozen or lut")
        compat.make_compact(fake, self.lists[id(fake)], train_lut=_train_lut(fake))

    # ------------------------------------------------------------------ export

    @torch.no_grad()
    def dense_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with every compact weight in coreai-opt's dense layout (``original`` = the
        palettized weight, unpacked ``indices``): what a fresh prepared copy loads."""
        out = dict(state)
        for prefix, t in compat.palettized_prefixes(self.model):
            if not compat.is_compact(t.fake) or prefix + "0.packed_indices" not in out:
                continue
            del out[prefix + "0.packed_indices"]
            out[prefix + "original"] = t.fake.rebuild().detach()
            out[prefix + "0.indices"] = t.fake.indices
        return out


def _train_lut(fake: Any) -> str | None:
    return strategies.TRAINABLE_LUT if hasattr(fake, strategies.TRAINABLE_LUT) else None


def compact_state_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor is None or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total
