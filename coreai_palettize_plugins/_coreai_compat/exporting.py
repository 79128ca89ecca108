"""Adjustments of a throwaway export copy (and its exported program) that coreai-torch needs:
index widths it can store, graph names its LUT matching does not misread."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .tensors import fake_palettized_tensors

__all__ = ["COREAI_INDEX_BITS", "LUT_NAME_MATCH", "avoid_lut_name_match", "widen_for_coreai"]


COREAI_INDEX_BITS = (1, 2, 4, 6, 8)
"""Index widths coreai-torch 0.4 can store in an ``.aimodel`` (3-bit raises ValueError)."""

LUT_NAME_MATCH = "lut"
"""coreai-torch 0.4.3 (``_compression/utils.py``, ``_inject_subbyte_in_lut``) takes the first
argument of a ``lut_to_dense`` node whose *name* contains this as the lookup table. The indices
of a weight under a module named ``convolution`` (ResNet, MobileNet, BEiT ...) match too
("convo-lut-ion"), and the indices are then read as the LUT (``0-bit palettization is not
supported`` for a 1x1 kernel, a palette-count mismatch for 3x3)."""


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


def _lut_arguments(node: torch.fx.Node) -> list[tuple[str, Any]]:
    """``(schema argument name, value)`` of a ``lut_to_dense`` node's positional arguments."""
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    return [(names[i] if i < len(names) else "", a) for i, a in enumerate(node.args)]


def avoid_lut_name_match(program: Any) -> list[str]:
    """Rename, in an exported program, every node passed to a ``lut_to_dense`` op as something
    other than its LUT whose name contains ``LUT_NAME_MATCH`` (``lut`` -> ``lu_t``), so that
    coreai-torch's name match finds the real LUT; the graph signature follows. Returns the old
    names. (Workaround for coreai-torch 0.4.3; names only, the program computes the same.)"""
    graph = program.graph
    specs = {s.arg.name: s for s in program.graph_signature.input_specs
             if hasattr(s.arg, "name")}
    taken = {n.name for n in graph.nodes}
    renamed = []
    for node in list(graph.nodes):
        name = getattr(node.target, "name", None)
        if not (callable(name) and name().endswith("lut_to_dense")):
            continue
        for role, arg in _lut_arguments(node):
            if (not isinstance(arg, torch.fx.Node) or role == "lut"
                    or LUT_NAME_MATCH not in arg.name):
                continue
            new = arg.name.replace(LUT_NAME_MATCH, "lu_t")
            while new in taken:
                new += "_"
            old, spec = arg.name, specs.get(arg.name)
            arg.name = new
            if arg.op == "placeholder":
                arg.target = new
            if spec is not None:
                spec.arg.name = new
            taken.add(new)
            renamed.append(old)
    if renamed:
        graph.lint()
        program.graph_module.recompile()
    return renamed
