"""Inserting coreai-opt's palettized structure into a model without running k-means."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch.nn as nn
import torch.nn.utils.parametrize as P
from coreai_opt.palettization import KMeansPalettizer, KMeansPalettizerConfig

from .foreign import fold_foreign_parametrizations
from .layouts import apply_layouts, fit_granularity, layout_name, traceable_experts
from .tensors import PalettizedTensor, fake_palettized_tensors
from .tracing import every_use_palettized

__all__ = ["FittedLayout", "classes_before_parametrization", "fitted_layout",
           "insert_parametrizations", "resolve_module_configs"]

_FITTED = "_plugin_fitted_layout"


@dataclass(frozen=True)
class FittedLayout:
    """A weight the config's grouping could not take, given the nearest layout that fits.

    ``spec_layout``: what the config asked for (``group 16 axis 0``); ``layout``: what it got;
    ``config_granularity``: the coreai-opt granularity a config needs to rebuild it; ``reason``:
    coreai-opt's incompatibility."""

    spec_layout: str
    layout: str
    config_granularity: Any
    reason: str

    @property
    def note(self) -> str:
        return f"fitted {self.layout} (asked: {self.spec_layout}; {self.reason})"


def insert_parametrizations(
    palettizer: KMeansPalettizer, example_inputs: tuple[Any, ...], *, fit_layouts: bool = False
) -> dict[str, str]:
    """Insert the fake-palettize parametrizations without clustering.

    Mirrors ``KMeansPalettizer.prepare(state_dict=...)`` up to the point where it would load a
    state dict. Returns ``{weight name: reason}`` for weights the config asked for but whose shape
    the spec cannot take (coreai-opt drops those and leaves them dense). With ``fit_layouts``,
    such a weight gets the nearest layout that fits instead (``fit_granularity``), marked on its
    fake (``fitted_layout``), and is not returned.
    """
    model = palettizer._model
    fold_foreign_parametrizations(model)
    palettizer._module_config_dict = palettizer._config.build_module_config_dict(model)
    with traceable_experts(model), every_use_palettized(palettizer, model):
        palettizer._handler.prepare(model, example_inputs=example_inputs)
    apply_layouts(model)
    skipped = {}
    for tensor in fake_palettized_tensors(model):
        if tensor.fake.check_compatible(tensor.original):
            continue
        reason = _incompatibility(tensor)
        fitted = fit_granularity(tensor.fake, tensor.original) if fit_layouts else None
        if fitted is None:
            skipped[tensor.name] = reason
            continue
        spec_layout = layout_name(tensor.fake.granularity)
        tensor.fake.granularity = fitted[0]
        setattr(tensor.fake, _FITTED, FittedLayout(spec_layout, layout_name(fitted[0]),
                                                    fitted[1], reason))
    palettizer._remove_incompatible_fake_palett_modules()
    palettizer._mark_model_as_prepared(model)
    return skipped


def fitted_layout(tensor: PalettizedTensor) -> FittedLayout | None:
    """The fitted layout ``insert_parametrizations`` gave this weight (None: the config's own)."""
    return getattr(tensor.fake, _FITTED, None)


def resolve_module_configs(config: KMeansPalettizerConfig, model: nn.Module) -> dict[str, Any]:
    """``{module name: module config}`` as coreai-opt resolves ``config`` on ``model`` (name >
    type > global), also on a prepared model: a parametrized module matches the type entries of
    its class before parametrization (coreai-opt compares the exact class name)."""
    with classes_before_parametrization(model):
        levels = config.build_module_config_dict(model)
    resolved: dict[str, Any] = {}
    for level in levels.values():
        for name, module_config in level.items():
            resolved.setdefault(name, module_config)
    return resolved


def type_before_parametrization(module: nn.Module) -> type:
    """The module's class before ``register_parametrization`` (torch's
    ``type_before_parametrizations`` takes the first base class, which is ``FSDPModule`` once
    FSDP2's ``fully_shard`` has wrapped the parametrized module itself, e.g. accelerate's
    lm_head group)."""
    for cls in type(module).__mro__:
        base = cls.__bases__[0] if cls.__bases__ else None
        if base is not None and cls.__name__ == f"Parametrized{base.__name__}":
            return base
    return P.type_before_parametrizations(module)


@contextlib.contextmanager
def classes_before_parametrization(model: nn.Module) -> Iterator[None]:
    """Within the block, every parametrized module of ``model`` has its class from before
    parametrization (for code that matches module classes exactly); not reentrant."""
    swapped = [(m, type(m)) for m in model.modules() if P.is_parametrized(m)]
    try:
        for module, _ in swapped:
            module.__class__ = type_before_parametrization(module)
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


def _incompatibility(tensor: PalettizedTensor) -> str:
    fake, shape = tensor.fake, tuple(tensor.original.shape)
    group = getattr(fake.granularity, "group_size", None)
    if group:
        return f"shape {shape} is not divisible into groups of {group} along axis {fake._resolved_axis}"
    return f"shape {shape} is incompatible with cluster_dim={fake.cluster_dim}"
