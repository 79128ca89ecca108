"""Weights under another parametrization (``torch.nn.utils.parametrizations.weight_norm``,
``spectral_norm``, a user's own): folded into a plain weight so they can be palettized.

coreai-opt leaves such a weight dense without saying so: the module's class has become
``ParametrizedConv1d`` (its type configs match class names) and the weight is no plain
Parameter. Wav2Vec2 and HuBERT's positional convolution is one (``weight_norm``). Folding keeps the
weight's current value (``remove_parametrizations(leave_parametrized=True)``); from then on the
weight itself trains, as every palettized weight does. Every path that builds the palettized
structure (training, the export copy, ``load_palettized``) folds first, so their state dicts
agree.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as P
from coreai_opt.palettization.spec.fake_palettize import _FakePalettizeImplBase

__all__ = ["fold_foreign_parametrizations"]

log = logging.getLogger(__name__)

_LINEAR_LIKE = (nn.Linear, nn.modules.conv._ConvNd)


def _foreign(module: nn.Module) -> str | None:
    """The parametrizations on ``module.weight`` when none of them is a palettization and the
    weight is the module's only parametrized tensor."""
    if not P.is_parametrized(module, "weight") or len(module.parametrizations) != 1:
        return None
    chain = list(module.parametrizations["weight"])
    if any(isinstance(p, _FakePalettizeImplBase) for p in chain):
        return None
    return " + ".join(type(p).__name__ for p in chain)


@torch.no_grad()
def _fold(module: nn.Module) -> None:
    """``remove_parametrizations(leave_parametrized=True)`` for this instance only: torch's own
    deletes the ``weight`` property from the generated class, which copies of the model (the
    export's skeleton) share, so it is done here without touching the class."""
    chain = module.parametrizations["weight"]
    value = chain()                                    # the weight as the chain computes it
    requires_grad = any(p.requires_grad for p in chain.parameters())
    del module._modules["parametrizations"]
    module.__class__ = module.__class__.__bases__[0]   # the class before parametrization
    module.register_parameter("weight", nn.Parameter(value.detach().clone(), requires_grad))


def fold_foreign_parametrizations(model: nn.Module, *, announce: bool = True) -> dict[str, str]:
    """Fold every non-palettization parametrization of a Linear/conv weight into the weight;
    returns ``{weight name: what was folded}`` (logged once when ``announce``)."""
    folded = {}
    for name, module in model.named_modules():
        kind = _foreign(module) if isinstance(module, _LINEAR_LIKE) else None
        if kind is None:
            continue
        _fold(module)
        folded[f"{name}.weight" if name else "weight"] = kind
    if folded and announce:
        log.warning("palettize: folded %d weight parametrization(s) into plain weights so they "
                    "can be palettized (the weight trains directly from here on): %s",
                    len(folded), ", ".join(f"{k} ({v})" for k, v in folded.items()))
    return folded
