"""``palettize.budget``: per-layer bit widths chosen for a whole-model bits-per-weight target.

    palettize:
      preset: w4                       # the base: which weights are palettized, their layout
      budget: {bits_per_weight: 3.5, choices: [2, 3, 4, 6, 8], cache: budget_errors.json}

- Which weights: every weight the base config palettizes, embeddings and tied weights included
  (a tied pair is one weight: one choice, an entry for each module holding it), with the layout
  it got (a fitted one, ``fit_layouts``, for weights the base grouping cannot take). Weights the
  base leaves dense stay dense; weights of a module matched by an explicit ``palettize.modules``
  pattern keep that spec (explicit modules win over the budget); fused 3-D expert weights keep
  the base spec. Each fixed weight is listed with its reason, and all count in the total.
- Reachability is checked from the shapes alone before any trial k-means: a target below the
  smallest whole-model bits per weight the choices reach fails at once (``budget_floor``).
- Cost: the whole-model bits per weight exactly as the report (``report.py``, coreai-opt's
  ``bits_per_weight``) counts it: indices + LUTs (+ scales) of each palettized weight in whole
  bytes, every other tensor at its dtype. The allocation never exceeds the target.
- Objective: per layer, ``sum(s * (w - q(w))**2)`` with ``s`` the calibration sensitivities when
  given (``allocate(scope, budget, sensitivities)``; k-means is then sensitivity-weighted too), else the
  plain squared error; ``q`` is coreai-opt's own k-means of that layer at that choice.
- Allocator: exact multiple-choice knapsack (``knapsack.solve``; its docstring says why not greedy).
- ``cache``: a JSON file of every layer's error and bits for every choice, keyed by name, shape,
  dtype, a checksum of the weight (and sensitivities) and the spec: a new target needs no k-means.
- Distributed: rank 0 computes, every rank applies the broadcast allocation.

The phase gets a ``BudgetScope`` (the palettized tensors and what it must know of the rest of the
model), its settings section and the distributed context, and returns an ``Allocation``; the
caller (the engine) adds the allocation's ``modules`` block to its settings and config.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import _coreai_compat as compat
from ..core import sharding
from ..core._utils import is_int
from ..core.checks import (
    VALID_N_BITS,
    PalettizeConfigError,
    build_section,
    choices,
    section_mapping,
)
from ..core.dist_context import DistContext
from .budget_errors import ErrorCache, evaluate, options_for
from .knapsack import solve

__all__ = ["BLOCK_FILE", "Allocation", "BudgetScope", "BudgetSettings", "LayerChoice", "allocate",
           "allocation_from_state", "apply_allocation", "apply_budget", "budget_floor", "check_budget",
           "restore_allocation", "write_block"]

log = logging.getLogger(__name__)

TOLERANCE = 0.05
"""The allocation should land within this many bits per weight under the target."""
BLOCK_FILE = "budget_modules.yaml"
"""Written beside the export: the allocation as a ``palettize.modules`` block."""
_GRANULARITY_WORDS = ("base", "per_tensor")


@dataclass
class BudgetSettings:
    """``palettize.budget``: ``bits_per_weight`` target (whole model), ``choices`` of n_bits,
    ``granularity``: the layouts to choose among (``base``: the base config's, ``per_tensor``,
    or an int group size along the base's axis; default ``[base]``), ``cache``: a JSON path."""

    bits_per_weight: float
    choices: list[int] = field(default_factory=lambda: [2, 3, 4, 6, 8])
    granularity: list[Any] | None = None
    cache: str | None = None

    def __post_init__(self) -> None:
        target = self.bits_per_weight
        if isinstance(target, bool) or not isinstance(target, (int, float)) or target <= 0:
            raise PalettizeConfigError("bits_per_weight",
                                       f"must be a positive number, got {target!r}")
        if not isinstance(self.choices, (list, tuple)) or not self.choices:
            raise PalettizeConfigError("choices", "must be a non-empty list of n_bits; valid: "
                                       f"{choices(VALID_N_BITS)}")
        for n in self.choices:
            if not is_int(n) or n not in VALID_N_BITS:
                raise PalettizeConfigError("choices", f"invalid n_bits {n!r}; valid: "
                                           f"{choices(VALID_N_BITS)}")
        self.choices = sorted({int(n) for n in self.choices})
        if target < self.choices[0]:
            raise PalettizeConfigError("bits_per_weight", f"{target} is below the smallest "
                                       f"choice ({self.choices[0]} bits); valid: "
                                       f"{self.choices[0]} to {self.choices[-1]}")
        if target > self.choices[-1]:
            raise PalettizeConfigError("bits_per_weight", f"{target} is above the largest "
                                       f"choice ({self.choices[-1]} bits); valid: "
                                       f"{self.choices[0]} to {self.choices[-1]}")
        layouts = ["base"] if self.granularity is None else self.granularity
        if not isinstance(layouts, (list, tuple)) or not layouts:
            raise PalettizeConfigError("granularity", "must be a non-empty list; valid entries: "
                                       f"{choices(_GRANULARITY_WORDS)} or a group size (int)")
        for g in layouts:
            if not (g in _GRANULARITY_WORDS or (is_int(g) and g > 0)):
                raise PalettizeConfigError("granularity", f"invalid entry {g!r}; valid: "
                                           f"{choices(_GRANULARITY_WORDS)} or a group size "
                                           "(positive int)")
        self.granularity = None if self.granularity is None else list(layouts)
        if self.cache is not None:
            self.cache = os.fspath(self.cache)


def check_budget(value: Any) -> BudgetSettings | None:
    """``palettize.budget`` from null, a mapping or ``BudgetSettings``; errors name the key."""
    if value is None or isinstance(value, BudgetSettings):
        return value
    section = section_mapping(BudgetSettings, value, "budget", "must be null or a mapping such "
                              "as {bits_per_weight: 3.5, choices: [2, 3, 4, 6, 8]}")
    if "bits_per_weight" not in section:
        raise PalettizeConfigError("budget.bits_per_weight", "required (the whole-model target)")
    return build_section(BudgetSettings, dict(section), "budget")


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


@dataclass
class LayerChoice:
    """One weight's chosen spec; ``bits``: its storage (whole bytes, in bits)."""

    name: str
    module: str
    numel: int
    n_bits: int
    group_size: int | None
    axis: int | None
    bits: int
    error: float | None
    """``sum(s * (w - q(w))**2)`` of this choice (None: read back from a checkpoint)."""
    aliases: list[str] = field(default_factory=list)
    """Other modules holding the same (tied) weight: they get the same spec."""

    @property
    def layout(self) -> str:
        """The report's words (``group 16 axis 0``, ``per-tensor``)."""
        return f"group {self.group_size} axis {self.axis}" if self.group_size else "per-tensor"

    def spec(self) -> dict[str, Any]:
        """The ``palettize.modules`` value for this module."""
        if self.group_size is None:
            return {"n_bits": self.n_bits, "granularity": "per_tensor"}
        return {"n_bits": self.n_bits, "granularity": "per_grouped_channel",
                "group_size": self.group_size, "axis": self.axis}


@dataclass
class Allocation:
    """A budget's result. ``achieved`` counts the whole model like ``report().bits_per_weight``.
    ``fixed``: palettized weights the budget did not choose for, with the reason."""

    target: float
    achieved: float
    layers: list[LayerChoice]
    fixed: dict[str, str]
    total_error: float | None
    seconds: float = 0.0
    kmeans_runs: int = 0
    explicit_modules: dict[str, Any] = field(default_factory=dict)
    """The settings' own ``modules`` (they win over the budget), first in ``to_yaml``."""

    def modules_block(self) -> dict[str, dict[str, Any]]:
        """``{escaped module name: spec}``, a ``palettize.modules`` override block."""
        return {re.escape(module): layer.spec() for layer in self.layers
                for module in (layer.module, *layer.aliases)}

    def to_yaml(self) -> str:
        """A YAML file with ``modules:`` (the explicit modules first, they win over the budget)
        to put under a recipe's or Hydra config's ``palettize`` section."""
        import yaml

        header = (f"# palettize.budget: {self.target} bits/weight target, {self.achieved:.4f} "
                  "achieved (whole model, LUTs included).\n# Use as palettize.modules "
                  "(with the same preset) to reproduce this allocation without the budget.\n")
        block = {**self.explicit_modules, **self.modules_block()}
        return header + yaml.safe_dump({"modules": block}, sort_keys=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Allocation:
        values = dict(data)
        values["layers"] = [LayerChoice(**layer) for layer in values["layers"]]
        return cls(**values)

    def summary(self) -> dict[str, Any]:
        """The report's ``budget`` entry."""
        return {"target_bits_per_weight": self.target, "achieved_bits_per_weight": self.achieved,
                "layers": {layer.name: layer.n_bits for layer in self.layers},
                "fixed": dict(self.fixed), "total_error": self.total_error,
                "seconds": self.seconds, "kmeans_runs": self.kmeans_runs}

    def to_text(self) -> str:
        width = max((len(n) for n in [*(x.name for x in self.layers), *self.fixed]), default=10)
        lines = [f"budget {self.target} bits/weight: achieved {self.achieved:.4f} (whole model, "
                 f"LUTs included); {len(self.layers)} weights allocated, {len(self.fixed)} fixed"]
        for x in self.layers:
            lines.append(f"  {x.name:<{width}}  {x.n_bits}-bit {x.layout:<14} "
                         f"{x.bits / max(x.numel, 1):6.3f} bpw  error "
                         + ("(from checkpoint)" if x.error is None else f"{x.error:.4g}"))
        lines += [f"  {name:<{width}}  fixed: {reason}" for name, reason in self.fixed.items()]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Allocation
# --------------------------------------------------------------------------------------------


@dataclass
class BudgetScope:
    """What the budget reads: the palettized weights and the rest of the model's storage.

    ``modules``: the explicit ``palettize.modules`` (they win over the budget); ``tied``: tied
    weight prefixes (alias -> source; they keep the base spec); ``rest_numel``/``rest_bytes``:
    the elements and bytes of every tensor that is not a palettized weight (``report``).
    """

    tensors: list[compat.PalettizedTensor]
    modules: Mapping[str, Any]
    tied: Mapping[str, str]
    rest_numel: int
    rest_bytes: int

    @property
    def numel(self) -> int:
        return self.rest_numel + sum(t.original.numel() for t in self.tensors)


def _owners(scope: BudgetScope, t: compat.PalettizedTensor) -> list[str]:
    """The modules holding ``t`` (a tied weight: each), ``t.module_name`` first."""
    aliases = [a for a, source in scope.tied.items() if source == t.state_prefix]
    names = [a[: -len(f"parametrizations.{t.attr}.")].removesuffix(".") for a in aliases]
    return list(dict.fromkeys([t.module_name, *names]))


def _fixed_reason(scope: BudgetScope, t: compat.PalettizedTensor, owners: list[str]
                  ) -> str | None:
    pattern = next((p for p in reversed(list(scope.modules))
                    if any(re.fullmatch(p, o) for o in owners)), None)
    if pattern is not None:
        return (f"keeps the palettize.modules.{pattern} spec (explicit modules win over the "
                "budget)")
    if isinstance(t.fake.granularity, compat.ExpertsGroupedChannel):
        return "fused experts weight (keeps the base spec)"
    return None


def _plan(scope: BudgetScope, budget: BudgetSettings
          ) -> tuple[list[tuple[Any, list[str], list]], dict[str, str], int]:
    """Shapes only, no k-means: ``(items, fixed, fixed bits)``; an item is ``(weight, owners,
    [(n_bits, group_size, axis, bits)])`` with every compatible choice."""
    fixed_bits, fixed, items = 8 * scope.rest_bytes, {}, []
    for t in scope.tensors:
        owners = _owners(scope, t)
        reason = _fixed_reason(scope, t, owners)
        if reason is None:
            costs = [(n, size, axis, 8 * math.ceil(bits / 8))
                     for n, size, axis in options_for(t, budget.choices, budget.granularity)
                     for bits in [compat.trial_bits(t.fake, t.original, n,
                                                    compat.granularity_for(size, axis))]
                     if bits is not None]
            if costs:
                items.append((t, owners, costs))
                continue
            reason = "no choice fits its shape (keeps the base spec)"
        fixed[t.name] = reason
        fixed_bits += 8 * math.ceil(compat.storage_bits(t) / 8)
    return items, fixed, fixed_bits


def _unreachable(budget: BudgetSettings, lowest: float) -> PalettizeConfigError:
    return PalettizeConfigError(
        "budget.bits_per_weight", f"{budget.bits_per_weight} is below the smallest "
        f"whole-model bits per weight the choices {budget.choices} reach on this model "
        f"({lowest:.4f}, LUTs and dense tensors included); valid: {math.ceil(lowest * 100) / 100}"
        " or more")


def budget_floor(scope: BudgetScope, budget: Any) -> float:
    """The smallest whole-model bits per weight ``budget``'s choices reach on ``scope``, from
    the shapes alone (no k-means)."""
    items, _, fixed_bits = _plan(scope, check_budget(budget))
    return (fixed_bits + sum(min(c[3] for c in costs) for _, _, costs in items)) / scope.numel


def allocate(scope: BudgetScope, budget: Any,
             sensitivities: Mapping[str, torch.Tensor] | None = None,
             dist: DistContext | None = None) -> Allocation:
    """The allocation for ``budget`` (``palettize.budget``) on the attached, not yet clustered
    weights of ``scope`` (this process only; ``apply_budget`` is the distributed entry point).

    ``sensitivities``: ``{weight name: tensor shaped like the weight}`` (``calibration``).
    ``dist``: the weights are FSDP2 shards (and the sensitivities too): every rank calls it and
    evaluates its share of the weights, each gathered whole to its owner
    (``_evaluate_sharded``); every rank returns the same allocation.

    Raises:
        PalettizeConfigError: the target is below the smallest whole-model bpw the choices reach.
    """
    budget = check_budget(budget)
    start = time.perf_counter()
    cache = ErrorCache(budget.cache)
    sens = dict(sensitivities or {})
    numel = scope.numel
    plan, fixed, fixed_bits = _plan(scope, budget)
    lowest = (fixed_bits + sum(min(c[3] for c in costs) for _, _, costs in plan)) / numel
    if math.floor(budget.bits_per_weight * numel) < lowest * numel:
        raise _unreachable(budget, lowest)  # before any trial k-means: shapes decide it
    compat.ensure_kmeans_extension()
    if dist is None:
        evaluated, runs = [], 0
        for t, _, costs in plan:
            options, n = evaluate(t, [c[:3] for c in costs], sens.get(t.name), cache)
            runs += n
            evaluated.append(options)
    else:
        evaluated, runs = _evaluate_sharded(plan, sens, cache, dist)
    items = [(t, owners, sorted(options, key=lambda o: (o[3], o[0])))
             for (t, owners, _), options in zip(plan, evaluated)]
    if dist is None or dist.is_main:
        cache.save()

    budget_bits = math.floor(budget.bits_per_weight * numel) - fixed_bits
    costs = [[o[3] for o in options] for _, _, options in items]
    errors = [[o[4] for o in options] for _, _, options in items]
    picked = solve(costs, errors, budget_bits)
    if picked is None:  # the knapsack's cost buckets round up: the floor may just miss
        raise _unreachable(budget, (fixed_bits + sum(min(c) for c in costs)) / numel)
    layers = [LayerChoice(t.name, t.module_name, t.original.numel(), o[0], o[1], o[2], o[3], o[4],
                          owners[1:])
              for (t, owners, options), c in zip(items, picked) for o in [options[c]]]
    achieved = (fixed_bits + sum(x.bits for x in layers)) / numel
    result = Allocation(target=float(budget.bits_per_weight), achieved=achieved, layers=layers,
                        fixed=fixed, total_error=sum(x.error for x in layers),
                        seconds=time.perf_counter() - start, kmeans_runs=runs,
                        explicit_modules=dict(scope.modules))
    highest = (fixed_bits + sum(max(c) for c in costs)) / numel
    if achieved < budget.bits_per_weight - TOLERANCE and (dist is None or dist.is_main):
        warnings.warn(f"palettize.budget: achieved {achieved:.4f} bits/weight, more than "
                      f"{TOLERANCE} under the target {budget.bits_per_weight}"
                      + (f" (every allocated weight at its largest choice gives {highest:.4f})"
                         if highest <= budget.bits_per_weight else
                         " (the choices' steps are too coarse for this model)"), stacklevel=2)
    return result


def _evaluate_sharded(plan: list[tuple[Any, list[str], list]],
                      sens: Mapping[str, torch.Tensor], cache: ErrorCache, dist: DistContext
                      ) -> tuple[list[list], int]:
    """FSDP2: each weight (and its sensitivities) is gathered whole to one owner rank, one at a
    time (greedy by size: each rank holds about 1/world of the weights whole at the peak), the
    owners run the trial k-means of their share, and every rank receives every weight's options;
    rank 0's cache gets the new entries."""
    owners = sharding.plan_owners([t.original.numel() for t, _, _ in plan], dist.world_size,
                                  "sharded")
    mine = []
    for i, ((t, _, _), owner) in enumerate(zip(plan, owners)):
        weight = sharding.full_rows(t.original.detach())
        shard = sens.get(t.name)
        whole = (sharding.gather_rows(shard, t.original.shape[0])
                 if shard is not None and sharding.is_sharded(t.original) else shard)
        if owner == dist.rank:
            mine.append((i, weight, whole))
        del weight, whole
    found, runs = {}, 0
    for i, weight, whole in mine:
        t, _, costs = plan[i]
        found[i], n = evaluate(t, [c[:3] for c in costs], whole, cache, weight=weight)
        runs += n
    mine.clear()
    names = {plan[i][0].name for i in found}
    new = {k: v for k, v in cache.entries.items() if v.get("name") in names} if runs else {}
    evaluated: dict[int, list] = {}
    total = 0
    for options, n, entries in dist.all_gather_object((found, runs, new)):
        evaluated.update(options)
        total += n
        if dist.is_main and n:
            cache.entries.update(entries)
            cache.dirty = True
    return [evaluated[i] for i in range(len(plan))], total


def apply_allocation(tensors: list[compat.PalettizedTensor], allocation: Allocation
                     ) -> dict[str, dict[str, Any]]:
    """Switch the attached weights to the allocation. Returns its ``modules`` block: the caller
    adds it after the explicit modules and rebuilds the coreai-opt config with it."""
    by_name = {t.name: t for t in tensors}
    missing = [x.name for x in allocation.layers if x.name not in by_name]
    if missing:
        raise RuntimeError(f"palettize.budget: the allocation names weights this model does not "
                           f"palettize: {', '.join(missing[:5])}")
    for x in allocation.layers:
        compat.respec_tensor(by_name[x.name], x.n_bits,
                             compat.granularity_for(x.group_size, x.axis))
    return allocation.modules_block()


def restore_allocation(tensors: list[compat.PalettizedTensor], budget: Any,
                       saved: Mapping[str, Any]) -> Allocation:
    """A checkpoint's allocation, applied to ``tensors`` without k-means (resume).

    Raises:
        PalettizeConfigError: this run's ``palettize.budget`` target differs from the saved one.
    """
    allocation = Allocation.from_dict(saved)
    if budget is None or float(budget["bits_per_weight"]) != allocation.target:
        raise PalettizeConfigError("budget", f"the checkpoint was palettized with a "
                                   f"{allocation.target} bits/weight budget; resume with the same "
                                   "palettize.budget")
    apply_allocation(tensors, allocation)
    return allocation


def allocation_from_state(scope: BudgetScope, budget: Any) -> Allocation | None:
    """The allocation a restored checkpoint holds, read from its LUT sizes (no k-means), applied;
    None when nothing was restored. Each weight's choice is the budget option with as many LUT
    entries and LUTs as its restored centroids.

    Raises:
        PalettizeConfigError: the restored allocation exceeds this run's target, or a weight's
            LUTs match no option of this run's budget.
    """
    tensors = scope.tensors
    if not any(t.initialized for t in tensors):  # (an FSDP2 placeholder LUT is not restored)
        return None
    budget = check_budget(budget)
    layers, fixed = [], {}
    for t in tensors:
        owners = _owners(scope, t)
        reason = _fixed_reason(scope, t, owners)
        if reason is not None or not t.initialized:  # missing state: ensure_clustered says
            fixed[t.name] = reason or "no restored state"
            continue
        entries, luts = t.fake.centroids.shape[1], t.fake.centroids.shape[0]
        match = next(((n, size, axis)
                      for n, size, axis in options_for(t, budget.choices, budget.granularity)
                      if 2 ** n == entries and compat.lut_count(
                          t.fake, t.original, compat.granularity_for(size, axis)) == luts), None)
        if match is None:
            raise PalettizeConfigError("budget", f"the checkpoint's {t.name} has {luts} LUTs of "
                                       f"{entries} entries, no choice of this budget; resume with "
                                       "the same palettize.budget")
        compat.respec(t.fake, match[0], compat.granularity_for(match[1], match[2]))
        bits = 8 * math.ceil(compat.storage_bits(t) / 8)
        layers.append(LayerChoice(t.name, t.module_name, t.original.numel(), *match, bits, None,
                                  owners[1:]))
    total = 8 * scope.rest_bytes + sum(8 * math.ceil(compat.storage_bits(t) / 8) for t in tensors)
    allocation = Allocation(target=float(budget.bits_per_weight), achieved=total / scope.numel,
                            layers=layers, fixed=fixed, total_error=None,
                            explicit_modules=dict(scope.modules))
    if allocation.achieved > allocation.target:
        raise PalettizeConfigError("budget", f"the checkpoint holds {allocation.achieved:.4f} "
                                   f"bits/weight, above this run's target {allocation.target}; "
                                   "resume with the same palettize.budget")
    apply_allocation(tensors, allocation)
    return allocation


def write_block(allocation: Allocation, extra_files: Any = None) -> Any:
    """An export ``extra_files`` callable that also writes ``budget_modules.yaml``."""
    def write(directory: Path) -> None:
        (Path(directory) / BLOCK_FILE).write_text(allocation.to_yaml())
        if extra_files is not None:
            extra_files(directory)

    return write


def apply_budget(scope: BudgetScope, budget: Any, dist: DistContext,
                 sensitivities: Mapping[str, torch.Tensor] | None = None) -> Allocation:
    """Rank 0 allocates, every rank applies the same allocation to ``scope.tensors`` (a failure
    stops all ranks)."""
    plain = None
    sharded = any(sharding.is_sharded(t.original) for t in scope.tensors)  # (even on 1 rank)
    with dist.agree("palettize budget"):
        if sharded:  # FSDP2: every rank evaluates its share of the weights
            allocation = allocate(scope, budget, sensitivities, dist)
            plain = allocation.to_dict() if dist.is_main else None
        elif dist.is_main:
            plain = allocate(scope, budget, sensitivities).to_dict()
    allocation = Allocation.from_dict(dist.broadcast_object(plain))
    apply_allocation(scope.tensors, allocation)
    log.info("palettize: budget %.3f bits/weight -> %.4f achieved (%d k-means runs, %.1f s)",
             allocation.target, allocation.achieved, allocation.kmeans_runs, allocation.seconds)
    return allocation
