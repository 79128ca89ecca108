"""The budget phase's glue: what ``palettize.budget`` is given (``BudgetScope``), where its
allocation comes from (a restored checkpoint's LUT sizes, else a fresh allocation on rank 0,
broadcast) and the coreai-opt config rebuilt with it. The engine calls ``choose`` then
``configure``, once, before k-means."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn as nn
from coreai_opt.palettization import KMeansPalettizerConfig

from .. import _coreai_compat as compat
from ..accuracy import budget, fitting
from ..core.dist_context import DistContext
from ..export.report import rest_of_model
from ..settings.coreai_config import to_coreai_config
from ..settings.schema import PalettizeSettings

__all__ = ["choose", "configure", "scope"]

log = logging.getLogger(__name__)


def scope(model: nn.Module, settings: PalettizeSettings, tied: Mapping[str, str]
          ) -> budget.BudgetScope:
    """The palettized weights of ``model``, its explicit ``modules`` and the rest's size."""
    tensors = compat.fake_palettized_tensors(model)
    rest_numel, rest_bytes, _ = rest_of_model(model, tensors)
    return budget.BudgetScope(tensors, dict(settings.modules), dict(tied), rest_numel, rest_bytes)


def choose(model: nn.Module, settings: PalettizeSettings, tied: Mapping[str, str],
           dist: DistContext, sensitivities: Mapping[str, torch.Tensor] | None
           ) -> budget.Allocation:
    """The allocation a restored checkpoint holds in its LUT sizes (an HF resume), else a new
    one (rank 0, broadcast), weighted by calibration's ``sensitivities`` when given."""
    s = scope(model, settings, tied)
    restored = budget.allocation_from_state(s, settings.budget)
    if restored is not None:
        return restored
    if sensitivities is None and dist.is_main:
        log.warning(
            "palettize.budget without palettize.calibration: the allocation minimises the weights' "
            "squared error, which can starve small-valued but sensitive weights (on Whisper "
            "tiny.en, 4.0 bits/weight gave 8x the CE of uniform w4, at 2 bits for cross-attention "
            "values); set palettize.calibration (e.g. {samples: 128}) to weight it by sensitivity")
    return budget.apply_budget(s, settings.budget, dist, sensitivities)


def configure(settings: PalettizeSettings, model: nn.Module, allocation: budget.Allocation
              ) -> KMeansPalettizerConfig:
    """``settings.modules`` with the allocation's block after the explicit modules, and the
    coreai-opt config built from them (as attach built it: classes before parametrization,
    fitted layouts for weights the allocation does not name)."""
    settings.modules.update(allocation.modules_block())
    allocated = {m for x in allocation.layers for m in (x.module, *x.aliases)}
    with compat.classes_before_parametrization(model):
        config = to_coreai_config(settings, model)
    return fitting.extend_config(config, model, skip_modules=allocated)
