"""Compression report: per-layer bits per weight, bytes before and after, reconstruction error."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from ._coreai_compat import PalettizedTensor, fake_palettized_tensors
from ._utils import unique_by_storage
from .checks import MODULE_TYPE_ALIASES, resolve_module_type

__all__ = ["CompressionReport", "DenseLayer", "LayerReport", "build_report", "palettized_bytes"]

# Module types whose weights coreai-opt can palettize; anything else with a weight is expected dense.
_PALETTIZABLE_TYPES = tuple(resolve_module_type(alias, alias) for alias in MODULE_TYPE_ALIASES)


@dataclass
class LayerReport:
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


@dataclass
class DenseLayer:
    name: str
    shape: list[int]
    reason: str


@dataclass
class CompressionReport:
    """What palettization did to a model. ``palettized_bytes`` is the theoretical floor:
    n-bit indices + LUTs (+ scales) + every other tensor at its own dtype."""

    layers: list[LayerReport]
    dense_layers: list[DenseLayer]
    bits_per_weight: float
    dense_bytes: int
    dense_fp16_bytes: int
    palettized_bytes: int

    @property
    def compression_ratio(self) -> float:
        return self.dense_bytes / max(self.palettized_bytes, 1)

    @property
    def skipped(self) -> list[DenseLayer]:
        """Layers the config asked for but coreai-opt could not palettize."""
        return [d for d in self.dense_layers if d.reason.startswith("skipped")]

    def metrics(self, prefix: str = "palettize/") -> dict[str, float]:
        """Scalars for a trainer's logger (``ExportResult.metrics`` adds the export's)."""
        return {
            f"{prefix}bits_per_weight": float(self.bits_per_weight),
            f"{prefix}compression_ratio": float(self.compression_ratio),
            f"{prefix}palettized_layers": float(len(self.layers)),
            f"{prefix}skipped_layers": float(len(self.skipped)),
            f"{prefix}dense_layers": float(len(self.dense_layers)),
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
            f"- bits per weight (coreai-opt, whole model): **{self.bits_per_weight:.3f}**",
            f"- dense size: {self.dense_bytes / mib:.3f} MiB "
            f"(fp16: {self.dense_fp16_bytes / mib:.3f} MiB)",
            f"- palettized size (n-bit indices + LUTs + dense rest): "
            f"{self.palettized_bytes / mib:.3f} MiB, ratio {self.compression_ratio:.2f}x",
        ]
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
                f"| {r.name} | {tuple(r.shape)} | {r.n_bits} | {r.granularity} | {r.num_luts} "
                f"| {r.dense_bytes} | {r.palettized_bytes} | {r.bits_per_weight:.3f} "
                f"| {r.sqnr_db:.2f} |"
            )
        if self.dense_layers:
            lines += ["", "Left dense:", ""]
            lines += [f"- {d.name} {tuple(d.shape)}: {d.reason}" for d in self.dense_layers]
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        lines = [
            f"palettized {len(self.layers)} weights, {len(self.dense_layers)} left dense; "
            f"{self.bits_per_weight:.3f} bits/weight; {self.dense_bytes / 1024:.1f} KiB -> "
            f"{self.palettized_bytes / 1024:.1f} KiB ({self.compression_ratio:.2f}x)",
        ]
        width = max((len(r.name) for r in self.layers), default=10)
        for r in self.layers:
            lines.append(f"  {r.name:<{width}}  {r.n_bits}-bit {r.granularity:<22} "
                         f"{r.bits_per_weight:6.3f} bpw  SQNR {r.sqnr_db:6.2f} dB")
        for d in self.dense_layers:
            lines.append(f"  {d.name:<{width}}  dense: {d.reason}")
        return "\n".join(lines)


def _granularity_name(tensor: PalettizedTensor) -> str:
    g = tensor.fake.granularity
    size = getattr(g, "group_size", None)
    return f"group {size} axis {g.axis}" if size else "per-tensor"


def palettized_bytes(tensor: PalettizedTensor) -> int:
    """Storage of one palettized weight: packed indices + LUT (+ per-channel scale)."""
    fake = tensor.fake
    n_indices = tensor.original.numel() // fake.cluster_dim
    total = math.ceil(n_indices * fake.n_bits / 8)
    for buf in (fake.centroids, fake.per_channel_scale):
        if buf is not None:
            total += buf.numel() * buf.element_size()
    return total


@torch.no_grad()
def _sqnr_db(weight: torch.Tensor, palettized: torch.Tensor) -> float:
    w = weight.detach().double()
    noise = (w - palettized.detach().double()).pow(2).sum().item()
    signal = w.pow(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10 * math.log10(max(signal, 1e-300) / noise)


@torch.no_grad()
def build_report(model: nn.Module, skipped: dict[str, str] | None = None) -> CompressionReport:
    """Report on a prepared model. ``skipped``: weights coreai-opt left dense, with the reason."""
    from coreai_opt.inspection import bits_per_weight

    skipped = skipped or {}
    tensors = fake_palettized_tensors(model)
    layers = []
    palettized_prefixes = tuple(t.state_prefix for t in tensors)
    for t in tensors:
        original = t.original
        quantized = t.fake.hard_assign(original)
        dense_bytes = original.numel() * original.element_size()
        packed = palettized_bytes(t)
        layers.append(LayerReport(
            name=t.name,
            shape=list(original.shape),
            n_bits=t.fake.n_bits,
            granularity=_granularity_name(t),
            num_luts=int(t.fake.centroids.shape[0]) if t.fake.centroids is not None else 0,
            numel=original.numel(),
            dense_bytes=dense_bytes,
            palettized_bytes=packed,
            bits_per_weight=8 * packed / max(original.numel(), 1),
            sqnr_db=_sqnr_db(original, quantized),
        ))

    rest_bytes = rest_fp16 = 0
    state, _ = unique_by_storage(model.state_dict(keep_vars=True))
    for name, t in state.items():
        if name.startswith(palettized_prefixes) or "parametrizations." in name:
            continue
        rest_bytes += t.numel() * t.element_size()
        rest_fp16 += t.numel() * (2 if t.is_floating_point() else t.element_size())

    palettized_names = {t.name for t in tensors}
    dense_layers = []
    for module_name, module in model.named_modules():
        if not isinstance(module, _PALETTIZABLE_TYPES):
            continue
        for attr in ("weight", "in_proj_weight"):
            name = f"{module_name}.{attr}" if module_name else attr
            if name in palettized_names or parametrize.is_parametrized(module, attr):
                continue  # (reading a parametrized weight would run its training forward)
            weight = getattr(module, attr, None)
            if not isinstance(weight, torch.Tensor):
                continue
            if name in skipped:
                reason = f"skipped by coreai-opt: {skipped[name]}"
            elif isinstance(module, nn.Embedding):
                reason = "embeddings are palettized only with overrides.embedding or modules.<name>"
            else:
                reason = "excluded by the config (or not run by the example inputs)"
            dense_layers.append(DenseLayer(name, list(weight.shape), reason))

    dense_bytes = sum(r.dense_bytes for r in layers) + rest_bytes
    return CompressionReport(
        layers=layers,
        dense_layers=dense_layers,
        bits_per_weight=float(bits_per_weight(model).bpw),
        dense_bytes=dense_bytes,
        dense_fp16_bytes=sum(r.numel * 2 for r in layers) + rest_fp16,
        palettized_bytes=sum(r.palettized_bytes for r in layers) + rest_bytes,
    )
