"""The palettized weights of a prepared model: the view over coreai-opt's parametrizations, tied
aliases, deferring k-means until the plugin clusters, and the PAT step counter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as P
from coreai_opt.palettization import KMeansPalettizer
from coreai_opt.palettization.kmeans.kmeans_fake_palettize import _KMeansFakePalettize

from ..core.sharding import is_sharded

__all__ = [
    "KMEANS_ENTRY", "PalettizedTensor", "defer_clustering", "deferred", "end_deferral",
    "fake_palettized_tensors", "get_step", "is_palettized_state", "is_prepared",
    "palettized_prefixes", "set_step",
    "tied_prefixes",
]




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
        """The dense weight; for a compact weight (``compact.py``), a zero-storage stand-in with
        its shape, dtype and device."""
        if getattr(self.fake, "dense_placeholder", None) is not None:
            return self.fake.dense_placeholder()
        return self.module.parametrizations[self.attr].original

    @property
    def parameter(self) -> torch.Tensor:
        """The registered ``original`` Parameter (empty once the weight is compact)."""
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
        packed = getattr(self.fake, "packed_indices", None)
        if packed is not None:  # compact: the packed indices (never stale)
            return packed.numel() > 0
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


def palettized_prefixes(model: nn.Module) -> list[tuple[str, PalettizedTensor]]:
    """``(state prefix, tensor)`` of every palettized weight under every name (tied aliases
    included)."""
    return [(t.state_prefix, t) for t in _walk(model, remove_duplicate=False)]


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


def is_prepared(model: nn.Module) -> bool:
    """Whether coreai-opt already prepared ``model``."""
    return bool(KMeansPalettizer._is_model_prepared(model))


def is_palettized_state(state_dict: Any) -> bool:
    """Whether a model state dict holds coreai-opt palettized state (LUTs of a fake palettizer,
    ``<module>.parametrizations.<attr>.<i>.centroids``), i.e. was saved from a prepared model."""
    return any(isinstance(k, str) and k.endswith(".centroids")
               and (k.startswith("parametrizations.") or ".parametrizations." in k)
               for k in state_dict)


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


def set_step(palettizer: KMeansPalettizer, step: int) -> None:
    """Set the PAT step counter (private in coreai-opt) and apply the schedule if training."""
    palettizer._step_count = int(step)
    if palettizer._lifecycle.value == "training":
        palettizer._apply_schedule()


def get_step(palettizer: KMeansPalettizer) -> int:
    return int(palettizer._step_count)


def meta_like(weight: torch.Tensor) -> torch.Tensor:
    """A meta copy of ``weight`` for shape-only work; of the global shape for an FSDP2
    ``DTensor`` (its own meta copy would dispatch every op through DTensor's sharding
    propagation: ~40 ms per weight)."""
    if is_sharded(weight):
        return torch.empty(tuple(weight.shape), dtype=weight.dtype, device="meta")
    return weight.detach().to("meta")


def is_placeholder(fake: _KMeansFakePalettize) -> bool:
    """A zero LUT not clustered yet (FSDP2: a sharded checkpoint restores only into keys the
    model has, so each weight gets one before k-means)."""
    return fake.centroids is not None and not fake._centroids_initialized


def set_placeholder(fake: _KMeansFakePalettize, shape: Any, dtype: torch.dtype,
                    device: torch.device) -> None:
    """Give ``fake`` a placeholder LUT of ``shape`` (zeros, marked not clustered)."""
    fake.centroids = torch.zeros(tuple(shape), dtype=dtype, device=device)
    fake._centroids_initialized = False
