"""Adjustments of a throwaway export copy that coreai-torch needs (index widths it can store)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .tensors import fake_palettized_tensors

__all__ = ["COREAI_INDEX_BITS", "widen_for_coreai"]


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
