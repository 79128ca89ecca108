"""Feeding coreai-opt's weighted k-means the plugin's own sensitivities.

coreai-opt 0.4 weights each weight element in its 1-D k-means by ``fake.sensitivities`` (what
``prepare(sensitivity_path=...)`` and ``calibration_mode`` set; a public property of the private
``_KMeansFakePalettize``). Setting it marks the centroids for re-clustering, which is what a fresh
fake needs; clearing it afterwards must not (the property setter would), hence ``_sensitivities``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .tensors import PalettizedTensor

__all__ = ["clear_kmeans_sensitivities", "kmeans_sensitivities", "set_kmeans_sensitivities"]


def set_kmeans_sensitivities(tensors: list[PalettizedTensor],
                             weights: Mapping[str, torch.Tensor]) -> None:
    """Weighted k-means for ``tensors`` from ``weights[t.name]`` (same shape as the weight)."""
    for t in tensors:
        t.fake.sensitivities = weights[t.name]


def clear_kmeans_sensitivities(tensors: list[PalettizedTensor]) -> None:
    """Drop the sensitivities (memory) without invalidating the centroids k-means just made."""
    for t in tensors:
        t.fake._sensitivities = None


def kmeans_sensitivities(t: PalettizedTensor) -> torch.Tensor | None:
    """The sensitivities ``t``'s k-means uses (None: plain k-means)."""
    return t.fake._sensitivities
