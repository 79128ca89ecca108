"""The report and export phases: what the engine hands ``build_report`` and ``export_palettized``.

Each function gets the attached model and the results of the earlier phases (the calibration
stats, the budget's allocation, the compact base, the adapters) and returns data (a
``CompressionReport``, an ``ExportResult``); none sees the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import _coreai_compat as compat
from ..accuracy import adapters
from ..accuracy.budget import Allocation, write_block
from ..accuracy.calibration import CalibrationStats
from ..core import strategies
from ..core._modelcopy import materialize
from ..core.dist_context import DistContext
from ..engine.compact import CompactBase
from .report import CompressionReport, build_report
from .writer import ExportResult, check_export_dir, export_palettized

__all__ = ["adapter_export", "check_dir", "export", "fold_shortcuts", "new_model", "on_main",
           "report", "require_clustered"]

log = logging.getLogger("coreai_palettize_plugins.engine")


def fold_shortcuts(fields: dict[str, Any], directory: str | Path | None,
                   formats: Sequence[str] | None) -> None:
    """The engine's ``export_dir``/``export_formats`` shortcuts into ``fields["export"]``."""
    export = dict(fields.pop("export", None) or {})
    if directory is not None:
        export["dir"] = str(directory)
    if formats is not None:
        export["formats"] = list(formats)
    if export:
        fields["export"] = export


def require_clustered(tensors: list[compat.PalettizedTensor]) -> None:
    """Report and export read the palettized weights: never while clustering is deferred
    (ending the deferral here would run k-means lazily on whichever rank reads first)."""
    pending = compat.deferred(tensors)
    if pending:
        raise RuntimeError(
            f"palettize: {len(pending)} weight(s) are not clustered yet ({pending[0]}, ...): "
            "call ensure_clustered() (or cluster()) before report() or export()")


def report(model: nn.Module, trace: Mapping[str, Any], calibration: CalibrationStats | None,
           allocation: Allocation | None) -> CompressionReport:
    """The compression report, with the calibration's and the budget's sections.
    ``trace``: what attach learned (``skipped``, ``consumers``, ``settings``,
    ``module_configs``)."""
    result = build_report(model, **trace)
    if calibration is not None:
        result.calibration = calibration.to_dict()
    if allocation is not None:
        result.budget = allocation.summary()
    return result


def new_model(factory: Callable[[], nn.Module] | None, skeleton: nn.Module | None,
              configure: Callable[[nn.Module], None] | None) -> nn.Module:
    """A new, unprepared instance of the model's architecture (for export): from the user's
    ``factory`` (the global RNG untouched), else from the meta ``skeleton`` taken at attach."""
    if factory is not None:
        with torch.random.fork_rng(devices=[]):
            model = factory()
    elif skeleton is not None:
        model = materialize(skeleton)
    else:
        raise RuntimeError("attach() a model first")
    if configure is not None:
        configure(model)
    return model


def adapter_export(attachment: adapters.LoraAttachment | None,
                   chosen: adapters.AdapterSettings | None) -> adapters.AdapterExport | None:
    """How the export treats the LoRA adapters (``palettize.adapters``: merge, refit LUTs)."""
    if attachment is None:
        return None
    return adapters.AdapterExport(attachment, merge=bool(chosen and chosen.merge),
                                  refit_luts=bool(chosen and chosen.refit_luts))


def export(model: nn.Module, directory: str | Path, *, compact: CompactBase,
           allocation: Allocation | None, extra_files: Callable[[Path], None] | None,
           **kwargs: Any) -> ExportResult:
    """``export_palettized`` of the model's state without the strategies' training state, in
    coreai-opt's dense layout (compact weights rebuilt), plus ``budget_modules.yaml`` with a
    budget. ``kwargs``: the other arguments of ``export_palettized``."""
    extra = set(strategies.strategy_state_keys(model))
    if allocation is not None:  # + budget_modules.yaml, the allocation as modules:
        extra_files = write_block(allocation, extra_files)
    state = compact.dense_state_dict(
        {k: v for k, v in model.state_dict().items() if k not in extra})
    result = export_palettized(model, directory=directory, state_dict=state,
                               extra_files=extra_files, **kwargs)
    log.info("palettize: exported %s to %s", ", ".join(result.written) or "nothing",
             result.directory)
    return result



def on_main(dist: DistContext, export_fn: Callable[[], ExportResult]) -> ExportResult | None:
    """``export_fn()`` on rank 0 only; the other ranks wait for it without a deadline (through
    the store, not a barrier bounded by the process group's timeout: a long export is never
    cut short by its own job). A failure on rank 0 is raised on every rank."""
    return dist.on_main(export_fn, what="export")


def check_dir(dist: DistContext, directory: str | Path) -> None:
    """Refuse a bad export directory before training, on rank 0 (whose file system the export
    writes); a failure is raised on every rank. Nothing is created."""
    with dist.agree("the palettize.export.dir check"):
        if dist.is_main:
            check_export_dir(directory)
