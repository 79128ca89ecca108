"""``palettize.fit_layouts``: weights the config's grouping cannot take get the nearest layout that
fits instead of staying dense, expressed in coreai-opt's own terms.

A weight whose channels the spec's group size does not divide (MobileNetV3's 72-channel convs at
w4's groups of 16, Whisper's 51864-row tied embedding/output projection) is skipped by
coreai-opt. With ``fit_layouts: true`` (the default) the structure insertion gives it the nearest
layout that fits (``_coreai_compat.fit_granularity``: the largest smaller group size dividing its
channels, else per-tensor; same bits), and ``extend_config`` adds a per-module-name
``ModuleKMeansPalettizerConfig`` for each module that holds it (a copy of the module's resolved
config with that weight's spec re-laid out). Every re-prepare of the config (the export copy, the
``.aimodel``, ``load_palettized``, plain coreai-opt given the saved YAML) then builds the same
layout, and weights the config's grouping takes keep its exact spec. ``fit_layouts: false`` is
coreai-opt's behaviour: such weights stay dense, with the reason.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping
from typing import Any

import torch.nn as nn
from coreai_opt.palettization import KMeansPalettizerConfig

from .. import _coreai_compat as compat

__all__ = ["extend_config", "fitted_weights", "log_fitted"]

log = logging.getLogger(__name__)

_SPEC_FIELDS = ("op_state_spec", "module_state_spec")


def fitted_weights(model: nn.Module) -> list[tuple[compat.PalettizedTensor, compat.FittedLayout]]:
    """``(weight, fitted layout)`` of every palettized weight given a fitted layout (tied: once)."""
    return [(t, f) for t in compat.fake_palettized_tensors(model)
            for f in [compat.fitted_layout(t)] if f is not None]


def _relayout(specs: Mapping[str, Any] | None, attr: str, granularity: Any) -> dict | None:
    """``specs`` with ``attr``'s spec (its own key, else ``*``) given ``granularity``; None when
    ``specs`` has no spec for ``attr``."""
    specs = dict(specs or {})
    key = attr if attr in specs else "*" if "*" in specs else None
    if key is None or specs[key] is None:
        return None
    specs[attr] = specs[key].model_copy(update={"granularity": granularity})
    return specs


def _fitted_module_config(module_config: Any, attr: str, granularity: Any) -> Any | None:
    """A copy of ``module_config`` whose spec for ``attr`` has ``granularity``, in every place a
    spec for it can live (op/module state specs, per-op-type and per-op-name configs)."""
    if module_config is None:
        return None
    update: dict[str, Any] = {}
    for field in _SPEC_FIELDS:
        specs = _relayout(getattr(module_config, field, None), attr, granularity)
        if specs is not None:
            update[field] = specs
    for table_name in ("op_type_config", "op_name_config"):
        table = dict(getattr(module_config, table_name, None) or {})
        changed = False
        for key, op_config in table.items():
            specs = _relayout(getattr(op_config, "op_state_spec", None), attr, granularity)
            if specs is not None:
                table[key], changed = op_config.model_copy(update={"op_state_spec": specs}), True
        if changed:
            update[table_name] = table
    return module_config.model_copy(update=update) if update else None


def _model_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if "parametrizations" not in n.split(".")}


def extend_config(config: KMeansPalettizerConfig, model: nn.Module,
                  skip_modules: Collection[str] = ()) -> KMeansPalettizerConfig:
    """``config`` (modified and returned) with a ``set_module_name`` entry per module holding a
    fitted weight of the prepared ``model`` (tied aliases: each owner), except ``skip_modules``
    (e.g. the budget's own entries). A module's submodules that hold weights keep the config
    they resolved to (an entry each, after their parent's: a name entry is inherited)."""
    fitted = fitted_weights(model)
    if not fitted:
        return config
    resolved = compat.resolve_module_configs(config, model)
    modules = _model_modules(model)
    owners: dict[str, list[tuple[str, Any]]] = {}
    by_fake = {id(t.fake): f for t, f in fitted}
    for _, alias in compat.palettized_prefixes(model):
        layout = by_fake.get(id(alias.fake))
        if layout is not None and alias.module_name not in skip_modules:
            owners.setdefault(alias.module_name, []).append((alias.attr, layout))
    entries: dict[str, Any] = {}
    for owner, weights in owners.items():
        module_config = resolved.get(owner)
        for attr, layout in weights:
            module_config = _fitted_module_config(module_config, attr, layout.config_granularity
                                                  ) or module_config
        if module_config is None or module_config is resolved.get(owner):
            continue
        entries[owner] = module_config
        prefix = f"{owner}." if owner else ""
        for name, module in modules.items():
            if name.startswith(prefix) and name != owner and name not in owners and (
                    any(True for _ in module.parameters(recurse=False))
                    or hasattr(module, "parametrizations")):
                entries.setdefault(name, resolved.get(name))
    for name in sorted(entries, key=lambda n: (n.count(".") + bool(n), n)):  # parents first
        config.set_module_name(re.escape(name), entries[name])
    return config


def log_fitted(model: nn.Module) -> None:
    """One log line naming every fitted weight and its layout (nothing when none)."""
    fitted = fitted_weights(model)
    if fitted:
        log.warning("palettize: %d weight(s) do not fit the config's grouping and got the nearest "
                    "layout that fits (palettize.fit_layouts; report().layers[*].fitted):\n%s",
                    len(fitted), "\n".join(f"  {t.name} {tuple(t.original.shape)}: {f.note}"
                                           for t, f in fitted))
