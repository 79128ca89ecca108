"""An export directory's compression report, for people: the table and ``report.png`` (per-layer
bits per weight and SQNR, model size before and after), read from ``report.json``.

    coreai-palettize report outputs/.../palettized        # prints the table, writes report.png

matplotlib is optional (``pip install 'coreai-palettize-plugins[plot]'``); without it the table
is still printed and the export still succeeds, with a one-line note instead of the figure.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["REPORT_PNG", "MatplotlibMissing", "ReportError", "format_report", "plot_report",
           "read_report", "try_write_report_png"]

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
INSTALL_HINT = "pip install 'coreai-palettize-plugins[plot]'"


class ReportError(ValueError):
    """No readable report.json where one was expected. The message is one line."""


class MatplotlibMissing(ImportError):
    """matplotlib is not installed."""


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """``report.json`` of an export directory (or the file itself) as a dict."""
    path = Path(path)
    file = path / REPORT_JSON if path.is_dir() else path
    if not file.is_file():
        raise ReportError(f"report: no {REPORT_JSON} in {path} (an export directory written "
                          "by the callbacks or `coreai-palettize finetune` is expected)")
    try:
        report = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"report: {file} is not readable JSON ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("layers"), list):
        raise ReportError(f"report: {file} has no 'layers' list; is it a palettization report?")
    return report


def _size(n: float) -> str:
    for unit, scale in (("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _shape(shape: Any) -> str:
    return "x".join(str(s) for s in shape) if isinstance(shape, list) else str(shape)


def format_report(report: Mapping[str, Any]) -> str:
    """The per-layer table of a report, with the whole-model summary first."""
    layers, dense = report.get("layers", []), report.get("dense_layers", [])
    ratio = report.get("compression_ratio") or (
        report.get("dense_bytes", 0) / max(report.get("palettized_bytes", 1), 1))
    lines = [f"palettized {len(layers)} weights, {len(dense)} left dense; "
             f"{report.get('bits_per_weight', float('nan')):.3f} bits/weight; "
             f"{_size(report.get('dense_bytes', 0))} -> {_size(report.get('palettized_bytes', 0))}"
             f" ({ratio:.2f}x)", ""]
    budget = report.get("budget")
    if budget:  # palettize.budget: per-layer bits chosen for a whole-model target
        lines[-1:-1] = [f"budget: target {budget.get('target_bits_per_weight')} bits/weight, "
                        f"achieved {budget.get('achieved_bits_per_weight', float('nan')):.4f}"]
    headers = ("layer", "shape", "bits", "granularity", "bits/weight", "SQNR dB", "dense",
               "palettized")
    rows = [(r.get("name", "?"), _shape(r.get("shape")), str(r.get("n_bits", "")),
             str(r.get("granularity", "")), f"{r.get('bits_per_weight', float('nan')):.3f}",
             f"{r.get('sqnr_db', float('nan')):.2f}", _size(r.get("dense_bytes", 0)),
             _size(r.get("palettized_bytes", 0))) for r in layers]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        lines.append("  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
    for d in dense:
        lines.append(f"  {d.get('name')} {_shape(d.get('shape'))}: dense, {d.get('reason')}")
    artifacts = {k.removesuffix("_artifact_bytes"): v
                 for k, v in (report.get("extra") or {}).items() if k.endswith("_artifact_bytes")}
    if artifacts:
        lines += ["", "artifacts: " + ", ".join(f"{k} {_size(v)}" for k, v in artifacts.items())]
    return "\n".join(lines)


def _finite(value: Any, cap: float) -> float:
    value = float(value) if isinstance(value, (int, float)) else math.nan
    return cap if math.isinf(value) else value


def plot_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``report.png``: bits per weight and SQNR per layer, model size before and after.

    Raises ``MatplotlibMissing`` without matplotlib. Uses matplotlib's object API (no pyplot,
    no global backend change), so it is safe inside a training process.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing(f"report.png needs matplotlib: {INSTALL_HINT}") from None

    layers = report.get("layers", [])
    names = [str(r.get("name", "?")).removesuffix(".weight") for r in layers]
    bpw = [_finite(r.get("bits_per_weight"), math.nan) for r in layers]
    sqnr_values = [_finite(r.get("sqnr_db"), math.nan) for r in layers]
    finite = [v for v in sqnr_values if not math.isnan(v)]
    sqnr = [_finite(r.get("sqnr_db"), max(finite, default=0) + 10) for r in layers]

    figure = Figure(figsize=(10, 6.5), dpi=100, layout="constrained")
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 2))
    x = list(range(len(layers)))
    bits = top.bar(x, bpw, color="#4c72b0", label="bits per weight")
    if len(layers) <= 40:
        top.bar_label(bits, labels=[f"{r.get('n_bits', '?')}-bit" for r in layers],
                      label_type="center", color="white", fontsize=8)
    top.set_ylabel("bits per weight (indices + LUT)")
    top.set_xlim(-0.6, max(len(layers) - 0.4, 0.6))
    if len(layers) <= 40:
        top.set_xticks(x, names, rotation=45 if len(layers) > 6 else 0, ha="right"
                       if len(layers) > 6 else "center", fontsize=8)
    else:
        top.set_xlabel(f"{len(layers)} palettized weights, in model order")
    twin = top.twinx()
    twin.plot(x, sqnr, "o-", color="#dd8452", label="SQNR")
    twin.set_ylabel("SQNR dB (palettized vs dense weight)")
    handles = top.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    top.legend(handles, ["bits per weight", "SQNR dB"], loc="upper left", fontsize=8)
    top.set_title(f"{len(layers)} weights palettized, "
                  f"{report.get('bits_per_weight', math.nan):.2f} bits/weight for the whole model")

    extra = report.get("extra") or {}
    sizes = [("dense (as trained)", report.get("dense_bytes", 0)),
             ("dense fp16", report.get("dense_fp16_bytes", 0)),
             ("palettized\n(indices+LUTs+rest)", report.get("palettized_bytes", 0))]
    sizes += [(f"{fmt} artifact", extra[f"{fmt}_artifact_bytes"]) for fmt in ("coreai", "torch")
              if isinstance(extra.get(f"{fmt}_artifact_bytes"), (int, float))]
    colors = ["#8c8c8c", "#b0b0b0", "#c44e52"] + ["#55a868"] * (len(sizes) - 3)
    mib = 1024**2
    bars = bottom.barh([label for label, _ in sizes][::-1], [v / mib for _, v in sizes][::-1],
                       color=colors[::-1])
    bottom.bar_label(bars, labels=[_size(v) for _, v in sizes][::-1], padding=3, fontsize=8)
    bottom.set_xlabel("MiB")
    bottom.set_title("model size")
    bottom.margins(x=0.15)
    path = Path(path)
    figure.savefig(path)
    return path


def try_write_report_png(report: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """``plot_report`` for the end-of-training export: never raises; a missing matplotlib or a
    plotting error is logged and the export goes on."""
    try:
        return plot_report(report, path)
    except MatplotlibMissing:
        log.info("palettize export: %s not written: matplotlib is not installed (%s)",
                 REPORT_PNG, INSTALL_HINT)
    except Exception as e:
        log.warning("palettize export: %s could not be drawn: %s: %s", REPORT_PNG,
                    type(e).__name__, e)
    return None
