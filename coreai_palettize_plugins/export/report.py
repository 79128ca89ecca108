"""Compression report: per-layer bits per weight, bytes before and after, reconstruction error,
and every weight of a linear-like layer left dense, with the reason."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .._coreai_compat import (
    PalettizedTensor,
    fake_palettized_tensors,
    fitted_layout,
    layout_name,
    storage_bits,
    tied_prefixes,
)
from ..core._utils import unique_by_storage
from .dense_reasons import DenseLayer, check_overrides, dense_weights

if TYPE_CHECKING:
    from ..settings.schema import PalettizeSettings

__all__ = ["CompressionReport", "DenseLayer", "LayerReport", "build_report", "check_overrides",
           "dense_weights", "palettized_bytes", "rest_of_model"]

@dataclass
class LayerReport:
    """One palettized weight. ``palettized_bytes``: its n-bit indices + LUTs (+ per-channel
    scales, LUT qparams) as coreai-opt's ``bits_per_weight`` sizes them, rounded up to whole
    bytes; ``bits_per_weight`` = 8 * ``palettized_bytes`` / ``numel``."""

    name: str
    shape: list[int]
    n_bits: int
    granularity: str
    num_luts: int
    numel: int
    dense_bytes: int
    palettized_bytes: int
    bits_per_weight: float
    sqnr_db: float
    fitted: str | None = None
    """Set when the config's grouping could not take this weight and it got the nearest layout
    that fits (``palettize.fit_layouts``): ``fitted group 12 axis 0 (asked: group 16 axis 0;
    shape ...)``; ``granularity`` is the layout it got."""


@dataclass
class CompressionReport:
    """What palettization did to a model.

    Every size counts the whole model: each parameter and persistent buffer (the state dict),
    tied tensors once, palettization machinery (indices, centroids) only inside the packed size
    of the weight it encodes.

    - ``dense_bytes``: every tensor at its dtype. ``dense_fp16_bytes``: floating-point tensors
      at 2 bytes instead.
    - ``palettized_bytes``: the theoretical floor: each palettized weight at its packed size
      (``LayerReport.palettized_bytes``: n-bit indices + LUTs, + per-channel scales / LUT
      qparams), everything else at its dtype.
    - ``bits_per_weight``: 8 * ``palettized_bytes`` / elements of every parameter and persistent
      buffer. That is coreai-opt's ``coreai_opt.inspection.bits_per_weight`` definition, except
      that non-persistent buffers (never saved or exported; coreai-opt counts them) are left
      out and each palettized weight is rounded up to whole bytes.
    - ``compression_ratio``: ``dense_bytes / palettized_bytes`` (same whole-model accounting).
    - ``layers``: the palettized weights; ``dense_layers``: the weights of linear-like layers
      left dense, each with its ``reason`` (``DenseLayer``).
    """

    layers: list[LayerReport]
    dense_layers: list[DenseLayer]
    bits_per_weight: float
    dense_bytes: int
    dense_fp16_bytes: int
    palettized_bytes: int
    calibration: dict[str, Any] | None = None
    """``palettize.calibration``: source (computed/loaded), samples, batches, seconds, ..."""
    budget: dict[str, Any] | None = None
    """``palettize.budget``'s target and achieved bits per weight, per-layer bits
    (``budget.Allocation.summary``); None without a budget."""

    @property
    def compression_ratio(self) -> float:
        return self.dense_bytes / max(self.palettized_bytes, 1)

    @property
    def fitted(self) -> list[LayerReport]:
        """Palettized weights given a fitted layout (``palettize.fit_layouts``)."""
        return [r for r in self.layers if r.fitted]

    @property
    def skipped(self) -> list[DenseLayer]:
        """Layers the config asked for but coreai-opt could not palettize (their shape)."""
        return [d for d in self.dense_layers if d.kind == "shape"]

    def metrics(self, prefix: str = "palettize/") -> dict[str, float]:
        """Scalars for a trainer's logger (``ExportResult.metrics`` adds the export's)."""
        budget = ({f"{prefix}budget_target_bpw": float(self.budget["target_bits_per_weight"]),
                   f"{prefix}budget_achieved_bpw": float(self.budget["achieved_bits_per_weight"])}
                  if self.budget else {})
        return {**budget,
            f"{prefix}bits_per_weight": float(self.bits_per_weight),
            f"{prefix}compression_ratio": float(self.compression_ratio),
            f"{prefix}palettized_layers": float(len(self.layers)),
            f"{prefix}skipped_layers": float(len(self.skipped)),
            f"{prefix}fitted_layers": float(len(self.fitted)),
            f"{prefix}dense_layers": float(len(self.dense_layers)),
            **({f"{prefix}calibration_seconds": float(self.calibration["seconds"]),
                f"{prefix}calibration_samples": float(self.calibration["samples"])}
               if self.calibration else {}),
        }

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["compression_ratio"] = self.compression_ratio
        return out

    def to_markdown(self, extra: dict[str, Any] | None = None) -> str:
        """The report as Markdown; ``extra`` adds ``- key: value`` lines (the export's checks)."""
        mib = 1024**2
        lines = [
            "# Palettization report",
            "",
            f"- bits per weight: **{self.bits_per_weight:.3f}** (whole model: 8 x palettized "
            "size / elements of every parameter and persistent buffer)",
            f"- dense size: {self.dense_bytes / mib:.3f} MiB "
            f"(fp16: {self.dense_fp16_bytes / mib:.3f} MiB), every parameter and persistent "
            "buffer at its dtype, tied tensors once",
            f"- palettized size (n-bit indices + LUTs of the palettized weights, everything else "
            f"at its dtype): {self.palettized_bytes / mib:.3f} MiB, ratio "
            f"{self.compression_ratio:.2f}x",
        ]
        if self.calibration:
            c = self.calibration
            lines.append(f"- calibration: sensitivities {c['source']} ({c['samples']} samples, "
                         f"{c['batches']} batches, {c['seconds']:.1f} s)")
        if self.budget:
            lines.append(f"- budget: target {self.budget['target_bits_per_weight']} bits/weight, "
                         f"achieved {self.budget['achieved_bits_per_weight']:.4f}")
        for key, value in (extra or {}).items():
            lines.append(f"- {key}: {value}")
        lines += [
            "",
            "| layer | shape | bits | granularity | LUTs | dense bytes | palettized bytes "
            "| bits/weight | SQNR dB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.layers:
            lines.append(
                f"| {r.name} | {tuple(r.shape)} | {r.n_bits} | {r.granularity}"
                f"{' (fitted)' if r.fitted else ''} | {r.num_luts} "
                f"| {r.dense_bytes} | {r.palettized_bytes} | {r.bits_per_weight:.3f} "
                f"| {r.sqnr_db:.2f} |"
            )
        if self.fitted:
            lines += ["", "Fitted layouts (the config's grouping does not divide them; "
                      "palettize.fit_layouts):", ""]
            lines += [f"- {r.name} {tuple(r.shape)}: {r.fitted}" for r in self.fitted]
        if self.dense_layers:
            lines += ["", "Left dense (weights of linear-like layers):", ""]
            lines += [f"- {d.name} {tuple(d.shape)}: {d.reason}" for d in self.dense_layers]
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        """A short summary: the sizes and bits per weight count the whole model."""
        lines = [
            f"palettized {len(self.layers)} weights, {len(self.dense_layers)} left dense; "
            f"{self.bits_per_weight:.3f} bits/weight (whole model); "
            f"{self.dense_bytes / 1024:.1f} KiB -> "
            f"{self.palettized_bytes / 1024:.1f} KiB ({self.compression_ratio:.2f}x)",
        ]
        width = max((len(r.name) for r in self.layers), default=10)
        for r in self.layers:
            lines.append(f"  {r.name:<{width}}  {r.n_bits}-bit {r.granularity:<22} "
                         f"{r.bits_per_weight:6.3f} bpw  SQNR {r.sqnr_db:6.2f} dB"
                         + (f"  {r.fitted}" if r.fitted else ""))
        for d in self.dense_layers:
            lines.append(f"  {d.name:<{width}}  dense: {d.reason}")
        return "\n".join(lines)


def _granularity_name(tensor: PalettizedTensor) -> str:
    return layout_name(tensor.fake.granularity)


def palettized_bytes(tensor: PalettizedTensor) -> int:
    """Storage of one palettized weight, in whole bytes: packed indices + LUTs (+ per-channel
    scales, LUT qparams), as coreai-opt's ``bits_per_weight`` counts them."""
    return math.ceil(storage_bits(tensor) / 8)


@torch.no_grad()
def _sqnr_db(weight: torch.Tensor, palettized: torch.Tensor, chunk: int = 1 << 20) -> float:
    """Signal-to-quantization-noise ratio in dB, accumulated in float64 over chunks of ``chunk``
    elements (no float64 copy of a whole weight)."""
    w_flat, p_flat = weight.detach().reshape(-1), palettized.detach().reshape(-1)
    noise = signal = 0.0
    for start in range(0, w_flat.numel(), chunk):
        w = w_flat[start:start + chunk].double()
        noise += (w - p_flat[start:start + chunk].double()).pow_(2).sum().item()
        signal += w.pow_(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10 * math.log10(max(signal, 1e-300) / noise)


def rest_of_model(model: nn.Module, tensors: list[PalettizedTensor]) -> tuple[int, int, int]:
    """``(elements, bytes, fp16 bytes)`` of everything in the state dict but the palettized
    weights (parameters and persistent buffers, tied tensors once); a palettized weight's state
    (original, indices, centroids) under any of its prefixes counts in its layer only."""
    palettized_prefixes = (*(t.state_prefix for t in tensors), *tied_prefixes(model))
    rest_numel = rest_bytes = rest_fp16 = 0
    state, _ = unique_by_storage(model.state_dict(keep_vars=True))
    for name, t in state.items():
        if name.startswith(palettized_prefixes):
            continue
        rest_numel += t.numel()
        rest_bytes += t.numel() * t.element_size()
        rest_fp16 += t.numel() * (2 if t.is_floating_point() else t.element_size())
    return rest_numel, rest_bytes, rest_fp16


@torch.no_grad()
def build_report(
    model: nn.Module,
    skipped: Mapping[str, str] | None = None,
    *,
    consumers: Mapping[str, str] | None = None,
    settings: PalettizeSettings | None = None,
    module_configs: Mapping[str, tuple[str, Any]] | None = None,
) -> CompressionReport:
    """Report on a prepared model (see ``CompressionReport`` for what each size counts).

    ``skipped``: weights coreai-opt left dense for their shape, with the reason. ``consumers``,
    ``settings``, ``module_configs``: what the engine learned at attach (see ``dense_weights``);
    without them the dense reasons are coarser.
    """
    tensors = fake_palettized_tensors(model)
    layers = []
    for t in tensors:
        original = t.original
        recorded = _recorded_sqnr(t)
        packed = palettized_bytes(t)
        layers.append(LayerReport(
            name=t.name,
            shape=list(original.shape),
            n_bits=t.fake.n_bits,
            granularity=_granularity_name(t),
            num_luts=int(t.fake.centroids.shape[0]) if t.fake.centroids is not None else 0,
            numel=original.numel(),
            dense_bytes=original.numel() * original.element_size(),
            palettized_bytes=packed,
            bits_per_weight=8 * packed / max(original.numel(), 1),
            sqnr_db=(recorded if recorded is not None
                     else _sqnr_db(original, t.fake.hard_assign(original))),
            fitted=fitted.note if (fitted := fitted_layout(t)) is not None else None,
        ))

    rest_numel, rest_bytes, rest_fp16 = rest_of_model(model, tensors)
    numel = sum(r.numel for r in layers) + rest_numel
    packed_bytes = sum(r.palettized_bytes for r in layers) + rest_bytes
    return CompressionReport(
        layers=layers,
        dense_layers=dense_weights(model, skipped, consumers=consumers, settings=settings,
                                   module_configs=module_configs),
        bits_per_weight=8 * packed_bytes / max(numel, 1),
        dense_bytes=sum(r.dense_bytes for r in layers) + rest_bytes,
        dense_fp16_bytes=sum(r.numel * 2 for r in layers) + rest_fp16,
        palettized_bytes=packed_bytes,
    )


def _recorded_sqnr(tensor: PalettizedTensor) -> float | None:
    """The SQNR a compact weight recorded when it dropped its dense weight (``compact.py``)."""
    return getattr(tensor.fake, "compact_sqnr_db", None)
