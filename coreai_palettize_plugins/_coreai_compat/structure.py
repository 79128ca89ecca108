"""Inserting coreai-opt's palettized structure into a model without running k-means."""

from __future__ import annotations

from typing import Any

from coreai_opt.palettization import KMeansPalettizer

from .layouts import apply_layouts, traceable_experts
from .tensors import PalettizedTensor, fake_palettized_tensors
from .tracing import every_use_palettized

__all__ = ["insert_parametrizations"]


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
    with traceable_experts(model), every_use_palettized(palettizer, model):
        palettizer._handler.prepare(model, example_inputs=example_inputs)
    apply_layouts(model)
    skipped = {}
    for tensor in fake_palettized_tensors(model):
        if not tensor.fake.check_compatible(tensor.original):
            skipped[tensor.name] = _incompatibility(tensor)
    palettizer._remove_incompatible_fake_palett_modules()
    palettizer._mark_model_as_prepared(model)
    return skipped


def _incompatibility(tensor: PalettizedTensor) -> str:
    fake, shape = tensor.fake, tuple(tensor.original.shape)
    group = getattr(fake.granularity, "group_size", None)
    if group:
        return f"shape {shape} is not divisible into groups of {group} along axis {fake._resolved_axis}"
    return f"shape {shape} is incompatible with cluster_dim={fake.cluster_dim}"
