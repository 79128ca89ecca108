"""Export of a palettized model: Core AI ``.aimodel``, the packed PyTorch artifact (``artifact.py``)
and a report.

The export owns only its own files in its directory (``_export_files``): they are staged inside
it, fsync-ed and renamed into place, and ``palettize_export.json`` lists them, so a failed export
never damages an earlier one or anything else there. Each format is produced independently: if
one fails (say ``torch.export`` cannot trace the model), the error names the format and its
cause, the other formats are still written and the failed one's earlier files are kept. The
``.aimodel`` conversion runs in a forked child (``_isolated``): an abort inside coreai-torch
fails that format, not the training process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from coreai_opt import ExportBackend
from coreai_opt.palettization import KMeansPalettizer, KMeansPalettizerConfig

from .._coreai_compat import (
    avoid_lut_name_match,
    prepare_from_state_dict,
    reshape_expert_luts,
    use_exportable_experts,
    widen_for_coreai,
)
from ..core._inputs import CallSpec, as_call_spec, constants_bound, keyword_call
from ..core._modelcopy import max_abs_diff, model_outputs, tensor_leaves, tracing_forward
from ..core._utils import one_line
from ._files import StagedExport, check_export_dir, staged_export
from ._isolated import describe, run_isolated
from .artifact import (
    EXAMPLE_INPUTS_NAME,
    MANIFEST_NAME,
    PACKED_NAME,
    load_palettized,
    pack_indices,
    unpack_indices,
    write_packed,
)
from .report import CompressionReport

__all__ = [
    "AIMODEL_NAME",
    "MANIFEST_NAME",
    "PACKED_NAME",
    "ExportError",
    "ExportResult",
    "atomic_directory",
    "check_export_dir",
    "export_palettized",
    "load_palettized",
    "pack_indices",
    "unpack_indices",
]

log = logging.getLogger(__name__)

AIMODEL_NAME = "model.aimodel"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


class ExportError(RuntimeError):
    """One or more export formats could not be produced."""


@dataclass
class ExportResult:
    """What an export wrote: the formats written (``{format: path}``), the formats that failed
    (``{format: one-line cause}``), the report, and the export's own checks and sizes."""

    directory: Path
    written: dict[str, Path] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    report: CompressionReport | None = None
    artifact_bytes: dict[str, int] = field(default_factory=dict)
    rebuilt_max_abs_diff: float | None = None
    """Max abs output difference between the trained model and the copy rebuilt for export."""
    coreai_graph_max_abs_diff: float | None = None
    """Max abs output difference between that copy and the graph handed to coreai-torch."""
    adapters: dict[str, Any] = field(default_factory=dict)
    """LoRA adapters (``adapters.AdapterExport.extra``): sizes, and a merge's error."""
    kept: dict[str, Path] = field(default_factory=dict)
    """Formats that failed whose earlier file was kept in the directory (``{format: path}``)."""

    def extra(self) -> dict[str, Any]:
        """The export's checks and sizes as flat keys (``report.json``'s ``extra`` section)."""
        out: dict[str, Any] = {}
        if self.rebuilt_max_abs_diff is not None:
            out["rebuilt_model_max_abs_diff"] = self.rebuilt_max_abs_diff
        if self.coreai_graph_max_abs_diff is not None:
            out["coreai_graph_max_abs_diff"] = self.coreai_graph_max_abs_diff
        out.update(self.adapters)
        out.update({f"{fmt}_artifact_bytes": size for fmt, size in self.artifact_bytes.items()})
        if "coreai" in self.artifact_bytes and self.report is not None:
            out["coreai_vs_floor"] = round(self.artifact_bytes["coreai"]
                                           / self.report.palettized_bytes, 4)
        out.update({f"{fmt}_error": error for fmt, error in self.errors.items()})
        out.update({f"{fmt}_kept_previous": str(path) for fmt, path in self.kept.items()})
        return out

    def metrics(self, prefix: str = "palettize/") -> dict[str, float]:
        """The report's metrics plus the export's numeric checks and sizes."""
        metrics = self.report.metrics(prefix) if self.report is not None else {}
        metrics.update({f"{prefix}{k}": float(v) for k, v in self.extra().items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return metrics

    def report_dict(self) -> dict[str, Any]:
        """``report.json``: the compression report plus ``extra``."""
        return {**(self.report.to_dict() if self.report is not None else {}),
                "extra": self.extra()}


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------


def atomic_directory(final: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """Yield a staging directory whose files replace ``final``'s files of the same names if the
    block succeeds (other files in ``final`` are kept; see ``_export_files``)."""
    @contextlib.contextmanager
    def staged() -> Iterator[Path]:
        with staged_export(final) as stage:
            yield stage.path

    return staged()


FORMAT_FILES = {"torch": (PACKED_NAME, MANIFEST_NAME, EXAMPLE_INPUTS_NAME),
                "coreai": (AIMODEL_NAME,)}
"""The files of each format: a format that fails keeps the previous export's files."""


# --------------------------------------------------------------------------------------------
# Fresh copy, packed artifact, Core AI
# --------------------------------------------------------------------------------------------


def rebuild_prepared(
    factory: Callable[[], nn.Module],
    config: KMeansPalettizerConfig,
    example_inputs: Any,
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[nn.Module, KMeansPalettizer]:
    """A new prepared model loaded from ``state_dict`` (no k-means): coreai-opt's public path,
    with the plugin's layouts (fused MoE experts) re-applied.

    Finalizing a ``deepcopy`` of a prepared model would break the original (the copy shares its
    generated parametrization class), so export always works on a model rebuilt like this.
    ``example_inputs``: a ``CallSpec`` (or what ``as_call_spec`` takes).
    """
    fresh = factory()
    spec = as_call_spec(example_inputs, fresh)
    palettizer = KMeansPalettizer(fresh, config)
    with tracing_forward(fresh), keyword_call(fresh, spec) as inputs:
        prepare_from_state_dict(palettizer, inputs, dict(state_dict))
    fresh.eval()
    return fresh, palettizer


def write_aimodel(
    model: nn.Module,
    palettizer: KMeansPalettizer,
    example_inputs: Any,
    path: Path,
) -> float:
    """Finalize for Core AI, ``torch.export``, convert and save. Returns the graph's max abs
    difference to the model's eager outputs (the graph handed to the converter).

    ``model`` must be a fresh prepared copy: finalizing frees its dense weights. The graph's
    inputs are the spec's tensors, named after the forward's parameters (keyword inputs by
    their keys); its constants (``use_cache=False``) are bound, not inputs. Fused MoE experts
    are switched to transformers' ``batched_mm`` implementation (the one coreai-torch
    converts), and their 3-D LUTs reshaped after finalize (coreai-opt 0.4 shapes them wrong).
    """
    import coreai_torch

    if use_exportable_experts(model):
        log.info("fused MoE experts go into the .aimodel with transformers' batched_mm "
                 "experts implementation (the default grouped_mm has no coreai-torch lowering)")
    spec = as_call_spec(example_inputs, model)
    expected = model_outputs(model, spec)
    widened = widen_for_coreai(model)
    if widened:
        log.info("coreai-torch stores no 3-bit indices: %d weight(s) go into the .aimodel with "
                 "4-bit indices and a padded LUT (same values): %s", len(widened),
                 ", ".join(widened))
    finalized = palettizer.finalize(model, backend=ExportBackend.CoreAI).eval()
    reshape_expert_luts(finalized)
    try:
        program, spec = _export_program(finalized, spec)
    except Exception as e:
        raise RuntimeError(f"torch.export could not trace {type(model).__name__}: "
                           f"{one_line(e)}") from e
    program = program.run_decompositions(coreai_torch.get_decomp_table())
    renamed = avoid_lut_name_match(program)  # coreai-torch 0.4.3 reads "convolution" as a LUT
    if renamed:
        log.debug("palettize export: renamed %d graph input(s) whose name contains 'lut'",
                  len(renamed))
    with torch.no_grad():
        graph_outputs = [t.detach().float().cpu() for t in
                         tensor_leaves(program.module()(*spec.args, **spec.traced_kwargs))]
    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    converter.add_exported_program(program, input_names=_input_names(program, spec, model))
    converter.to_coreai().save_asset(path)
    return max_abs_diff(expected, graph_outputs)


def _export_program(model: nn.Module, spec: CallSpec) -> tuple[Any, CallSpec]:
    """``torch.export`` of ``model`` on the spec's traced inputs (constants bound by a hook).
    Keyword inputs the graph does not use are dropped (exported again without them), so the
    ``.aimodel`` asks only for inputs it reads. Returns the program and the spec it took."""
    def export(spec: CallSpec) -> Any:
        with torch.no_grad(), constants_bound(model, spec):
            return torch.export.export(model, spec.args, kwargs=spec.traced_kwargs)

    program = export(spec)
    dead = _dead_keyword_inputs(program, spec)
    if dead:
        log.info("palettize export: the traced graph does not use %s; the .aimodel does not "
                 "take %s", ", ".join(dead), "it" if len(dead) == 1 else "them")
        spec = CallSpec(spec.args, {k: v for k, v in spec.kwargs.items() if k not in dead})
        program = export(spec)
    return program, spec


def _user_inputs(program: Any) -> list[Any]:
    from torch.export.graph_signature import InputKind, TensorArgument

    return [s.arg for s in program.graph_signature.input_specs
            if s.kind == InputKind.USER_INPUT and isinstance(s.arg, TensorArgument)]


def _dead_keyword_inputs(program: Any, spec: CallSpec) -> list[str]:
    """Top-level keyword inputs whose every tensor is a placeholder without users."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    args = _user_inputs(program)
    leaves = spec.tensor_items()
    if len(args) != len(leaves):
        return []
    used: dict[str, bool] = {}
    for (path, _), arg in zip(leaves, args):
        if path[0] == 1:
            node = placeholders.get(arg.name)
            used[path[1]] = used.get(path[1], False) or node is None or bool(node.users)
    return [k for k, u in used.items() if not u]


def _input_names(program: Any, spec: CallSpec, model: nn.Module) -> list[str] | None:
    """The spec's input names when they match the graph's user inputs one to one, else None
    (the converter then keeps torch.export's placeholder names)."""
    names = spec.input_names(model)
    return names if len(names) == len(_user_inputs(program)) else None


def export_palettized(
    model: nn.Module,
    *,
    config: KMeansPalettizerConfig,
    example_inputs: Any,
    directory: str | os.PathLike,
    factory: Callable[[], nn.Module],
    formats: Sequence[str] = ("coreai", "torch"),
    report: CompressionReport | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
    extra_files: Callable[[Path], None] | None = None,
    strict: bool = False,
    adapters: Any = None,
) -> ExportResult:
    """Export a prepared model to ``directory``.

    ``factory`` builds a new, unprepared instance of the model's architecture (any weights): the
    export loads ``model``'s state into it, so the live model is never modified.
    ``extra_files(tmp_dir)`` may add files (an HF config, a tokenizer) before the rename.
    ``example_inputs``: a ``CallSpec``, a tensor, a tuple (positional) or a mapping (keywords).
    Only the export's own files in ``directory`` are replaced (staged, fsync-ed, then renamed
    into place; see ``_export_files``); everything else there is kept. With ``strict``, a format
    that fails raises ``ExportError`` before anything is replaced; without it, the failed
    format's earlier files are kept (``ExportResult.kept``) and the others are written.
    ``adapters`` (an ``adapters.AdapterExport``): the base is rebuilt and packed without the
    LoRA layers, which are then merged into it or written beside it and traced unmerged.
    """
    directory = Path(directory)
    result = ExportResult(directory=directory, report=report)
    example_inputs = as_call_spec(example_inputs, model).detached_cpu()
    state = {k: v.detach().cpu()
             for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
    expected = model_outputs(model, example_inputs)
    if adapters is not None:
        state, factory = adapters.base_state(state), adapters.base_factory(factory)

    with staged_export(directory) as stage:
        tmp = stage.path
        fresh, palettizer = rebuild_prepared(factory, config, example_inputs, state)
        if adapters is not None:
            adapters.before_pack(fresh)
        if "torch" in formats:
            try:
                write_packed(fresh, config, example_inputs, tmp, metadata)
                result.written["torch"] = tmp / PACKED_NAME
            except Exception as e:
                _drop_format(tmp, "torch")
                result.errors["torch"] = one_line(e)
        if adapters is not None:
            adapters.after_pack(fresh, tmp)
            result.adapters = adapters.extra(report.palettized_bytes if report else None)
        result.rebuilt_max_abs_diff = max_abs_diff(expected, model_outputs(fresh, example_inputs))
        if result.adapters.get("adapters_merged"):  # the error the merge introduced
            result.adapters["merge_max_abs_diff"] = result.rebuilt_max_abs_diff
        # fp16 adapters (unmerged) round the LoRA branch; a merge re-assigns indices.
        if result.rebuilt_max_abs_diff > (1e-4 if adapters is None else 1e-2):
            log.warning("The model rebuilt for export differs from the trained one by %.3g "
                        "(max abs output difference%s)", result.rebuilt_max_abs_diff,
                        "; the adapters were merged" if result.adapters.get("adapters_merged")
                        else "")
        if extra_files is not None:
            extra_files(tmp)
        if "coreai" in formats:
            try:  # in a child process: an LLVM abort must not take the training process down
                result.coreai_graph_max_abs_diff = run_isolated(
                    functools.partial(write_aimodel, fresh, palettizer, example_inputs,
                                      tmp / AIMODEL_NAME),
                    what="the Core AI (.aimodel) conversion")
                result.written["coreai"] = tmp / AIMODEL_NAME
            except Exception as e:
                _drop_format(tmp, "coreai")
                result.errors["coreai"] = describe(e)
        del fresh
        _settle_failures(stage, result, strict)
        result.artifact_bytes = {fmt: _disk_bytes(path) for fmt, path in result.written.items()}
        if report is not None and stage.commit_enabled:
            (tmp / REPORT_JSON).write_text(json.dumps(result.report_dict(), indent=2) + "\n")
            (tmp / REPORT_MD).write_text(report.to_markdown(result.extra()))
            from .plots import try_write_report_png  # matplotlib is optional: logged if missing

            try_write_report_png(result.report_dict(), tmp / "report.png")
    result.written = {fmt: directory / p.relative_to(tmp) for fmt, p in result.written.items()}
    return result


def _drop_format(staging: Path, fmt: str) -> None:
    """Remove what a failed format left in the staging area (it must not be committed)."""
    for name in FORMAT_FILES[fmt]:
        path = staging / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _settle_failures(stage: StagedExport, result: ExportResult, strict: bool) -> None:
    """Before anything is replaced: raise (``strict``), or keep each failed format's earlier
    files (named in a warning and in ``result.kept``); with no format written, replace nothing."""
    if not result.errors:
        stage.formats = {fmt: {"status": "written"} for fmt in result.written}
        return
    causes = "; ".join(f"{fmt}: {err}" for fmt, err in result.errors.items())
    if strict:
        raise ExportError(f"{causes} (strict export: nothing in {result.directory} was replaced)")
    for fmt, error in result.errors.items():
        previous = stage.previous_file(FORMAT_FILES[fmt][0])
        if previous is not None:
            stage.keep.update(FORMAT_FILES[fmt])
            result.kept[fmt] = previous
        log.error("palettize export: format %r could not be written: %s; %s", fmt, error,
                  f"the earlier {previous.name} in {result.directory} is kept (it is not this "
                  "run's model)" if previous is not None
                  else f"{result.directory} holds no {FORMAT_FILES[fmt][0]}")
    stage.formats = {**{fmt: {"status": "written"} for fmt in result.written},
                     **{fmt: {"status": "failed", "error": err, "kept_previous": fmt in result.kept}
                        for fmt, err in result.errors.items()}}
    if not result.written:
        stage.commit_enabled = False
        log.error("palettize export: no format could be written; nothing in %s was replaced",
                  result.directory)


def _disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
