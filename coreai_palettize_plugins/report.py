"""Compression report: per-layer bits per weight, bytes before and after, reconstruction error,
and every weight of a linear-like layer left dense, with the reason."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from ._coreai_compat import (
    PalettizedTensor,
    fake_palettized_tensors,
    palettizable_ops,
    storage_bits,
    tied_prefixes,
)
from ._utils import unique_by_storage
from .checks import INHERIT, MODULE_TYPE_ALIASES, PalettizeConfigError, resolve_module_type

if TYPE_CHECKING:
    from .settings import PalettizeSettings

__all__ = ["CompressionReport", "DenseLayer", "LayerReport", "build_report", "check_overrides",
           "dense_weights", "palettized_bytes"]

# Module types whose weights coreai-opt can palettize (the ``overrides`` aliases).
_PALETTIZABLE_TYPES = tuple(resolve_module_type(alias, alias) for alias in MODULE_TYPE_ALIASES)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

SILENT_KINDS = ("config", "embedding")
"""``DenseLayer.kind`` values the attach warning leaves out: the user's own config chose them."""


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


@dataclass
class DenseLayer:
    """A weight of a linear-like layer (``nn.Linear``, convolutions, HF ``Conv1D``,
    ``nn.MultiheadAttention``'s projections, fused 3-D expert weights, embeddings, or anything
    an op coreai-opt palettizes consumed) left dense.

    ``kind`` (the ``reason``'s category): ``shape`` (coreai-opt skipped it: its shape does
    not fit the spec), ``config`` (``overrides.<type>``/``modules.<regex>`` = null, preset
    ``none``), ``embedding`` (embeddings need ``overrides.embedding`` or ``modules.<name>``),
    ``op`` (its first consumer is a torch function coreai-opt does not palettize, e.g.
    ``torch.addmm``), ``state_spec`` (a palettizable op consumed it as an argument the config's
    ``op_state_spec`` does not name), ``not_run`` (the tracing forward did not use it), ``other``.
    """

    name: str
    shape: list[int]
    reason: str
    kind: str = "other"

    @property
    def warned(self) -> bool:
        """Named in the attach warning (everything the config did not choose itself)."""
        return self.kind not in SILENT_KINDS


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

    @property
    def compression_ratio(self) -> float:
        return self.dense_bytes / max(self.palettized_bytes, 1)

    @property
    def skipped(self) -> list[DenseLayer]:
        """Layers the config asked for but coreai-opt could not palettize (their shape)."""
        return [d for d in self.dense_layers if d.kind == "shape"]

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
            f"- bits per weight: **{self.bits_per_weight:.3f}** (whole model: 8 x palettized "
            "size / elements of every parameter and persistent buffer)",
            f"- dense size: {self.dense_bytes / mib:.3f} MiB "
            f"(fp16: {self.dense_fp16_bytes / mib:.3f} MiB), every parameter and persistent "
            "buffer at its dtype, tied tensors once",
            f"- palettized size (n-bit indices + LUTs of the palettized weights, everything else "
            f"at its dtype): {self.palettized_bytes / mib:.3f} MiB, ratio "
            f"{self.compression_ratio:.2f}x",
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
                         f"{r.bits_per_weight:6.3f} bpw  SQNR {r.sqnr_db:6.2f} dB")
        for d in self.dense_layers:
            lines.append(f"  {d.name:<{width}}  dense: {d.reason}")
        return "\n".join(lines)


def _granularity_name(tensor: PalettizedTensor) -> str:
    g = tensor.fake.granularity
    size = getattr(g, "group_size", None)
    return f"group {size} axis {g.axis}" if size else "per-tensor"


def palettized_bytes(tensor: PalettizedTensor) -> int:
    """Storage of one palettized weight, in whole bytes: packed indices + LUTs (+ per-channel
    scales, LUT qparams), as coreai-opt's ``bits_per_weight`` counts them."""
    return math.ceil(storage_bits(tensor) / 8)


@torch.no_grad()
def _sqnr_db(weight: torch.Tensor, palettized: torch.Tensor) -> float:
    w = weight.detach().double()
    noise = (w - palettized.detach().double()).pow(2).sum().item()
    signal = w.pow(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10 * math.log10(max(signal, 1e-300) / noise)


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
        quantized = t.fake.hard_assign(original)
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
            sqnr_db=_sqnr_db(original, quantized),
        ))

    # Everything else in the state dict (parameters and persistent buffers), tied tensors once;
    # a palettized weight's state (original, indices, centroids) under any of its prefixes is
    # counted in its layer only.
    palettized_prefixes = (*(t.state_prefix for t in tensors), *tied_prefixes(model))
    rest_numel = rest_bytes = rest_fp16 = 0
    state, _ = unique_by_storage(model.state_dict(keep_vars=True))
    for name, t in state.items():
        if name.startswith(palettized_prefixes):
            continue
        rest_numel += t.numel()
        rest_bytes += t.numel() * t.element_size()
        rest_fp16 += t.numel() * (2 if t.is_floating_point() else t.element_size())

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


# --------------------------------------------------------------------------------------------
# Dense weights and their reasons
# --------------------------------------------------------------------------------------------


def dense_weights(
    model: nn.Module,
    skipped: Mapping[str, str] | None = None,
    *,
    consumers: Mapping[str, str] | None = None,
    settings: PalettizeSettings | None = None,
    module_configs: Mapping[str, tuple[str, Any]] | None = None,
) -> list[DenseLayer]:
    """Every weight of a linear-like layer of a prepared ``model`` that is not palettized,
    with the reason, in module order (a tied weight once).

    Linear-like: ``nn.Linear``, convolutions, HF ``Conv1D``, ``nn.MultiheadAttention``'s
    projection weights, 3-D float parameters of fused-experts modules, embeddings, and any
    >= 2-D parameter coreai-opt considered (``skipped``) or a palettizable op consumed.

    Args:
        skipped: ``{name: reason}`` coreai-opt dropped for their shape.
        consumers: ``{parameter name: first torch function that consumed it}`` recorded in
            the tracing forward (``_coreai_compat.record_first_consumers``).
        settings: the settings, to name the ``overrides``/``modules`` entry that excluded one.
        module_configs: ``{module name: (level, config)}`` coreai-opt resolved
            (``_coreai_compat.resolved_module_configs``).
    """
    why = _Reasons(model, skipped, consumers, settings, module_configs)
    palettized = {id(t.original) for t in fake_palettized_tensors(model)}
    dense: list[DenseLayer] = []
    seen: set[int] = set()
    for module_name, module in why.modules.items():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen or id(param) in palettized:
                continue
            seen.add(id(param))
            name = _join(module_name, attr)
            if not why.linear_like(module, attr, param, name):
                continue
            kind, reason = why(module_name, module, attr, name)
            dense.append(DenseLayer(name, list(param.shape), reason, kind))
    return dense


def check_overrides(
    model: nn.Module,
    settings: PalettizeSettings,
    skipped: Mapping[str, str] | None = None,
    *,
    consumers: Mapping[str, str] | None = None,
    module_configs: Mapping[str, tuple[str, Any]] | None = None,
) -> None:
    """After attach: every ``overrides.<type>`` and ``modules.<regex>`` that asks for a spec
    must palettize at least one weight of the modules it matches (``null`` opts out and is not
    checked; an override matching no module is not an error here).

    Raises:
        PalettizeConfigError: ``palettize.overrides.<type>: matches <n> module(s) (<names>)
            but palettizes none of their weights (<reason>)``.
    """
    why = _Reasons(model, skipped, consumers, settings, module_configs)
    for type_key, value in settings.overrides.items():
        if value in (INHERIT, None, "none"):
            continue
        cls = resolve_module_type(type_key, f"overrides.{type_key}")
        matched = [n for n, m in why.modules.items() if type(m) is cls and why.level(n, "type")]
        why.require_palettized(f"overrides.{type_key}", matched)
    for pattern, value in settings.modules.items():
        if value in (None, "none"):
            continue
        matched = [n for n in why.modules if re.fullmatch(pattern, n) and why.level(n, "name")]
        why.require_palettized(f"modules.{pattern}", matched)


def _join(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def _show(value: Any) -> str:
    return "null" if value is None else str(value) if isinstance(value, str) else "{...}"


def _is_hf_conv1d(module: nn.Module) -> bool:
    return any(c.__name__ == "Conv1D" and c.__module__ == "transformers.pytorch_utils"
               for c in type(module).__mro__)


def _is_experts(module: nn.Module) -> bool:
    """A fused mixture-of-experts module (transformers' ``@use_experts_implementation`` sets
    ``is_transposed``; otherwise the class name says so)."""
    return hasattr(module, "is_transposed") or "expert" in type(module).__name__.lower()


def _specs(config: Any, field: str) -> dict[str, Any]:
    return {k: v for k, v in (getattr(config, field, None) or {}).items() if v is not None}


def _enabled(config: Any) -> bool:
    """A coreai-opt module config that palettizes something (``None`` entries become configs
    whose specs are all None)."""
    return config is not None and any(
        _specs(config, f) for f in ("op_state_spec", "module_state_spec", "op_type_config",
                                    "op_name_config"))


class _Reasons:
    """Why a parameter of a prepared model is dense: ``self(module_name, module, attr, name)``
    -> ``(kind, reason)`` (see ``DenseLayer``)."""

    def __init__(self, model: nn.Module, skipped: Mapping[str, str] | None,
                 consumers: Mapping[str, str] | None, settings: PalettizeSettings | None,
                 module_configs: Mapping[str, tuple[str, Any]] | None) -> None:
        # The model's own modules; coreai-opt's parametrization machinery is not the model's.
        self.modules = {n: m for n, m in model.named_modules()
                        if "parametrizations" not in n.split(".")}
        self.skipped = dict(skipped or {})
        self.consumers = consumers
        self.settings = settings
        self.configs = module_configs
        self.ops = palettizable_ops()

    # ------------------------------------------------------------ which weights

    def linear_like(self, module: nn.Module, attr: str, param: torch.Tensor, name: str) -> bool:
        if name in self.skipped:
            return True
        if not param.is_floating_point() or param.dim() < 2:
            return False
        if isinstance(module, nn.MultiheadAttention):
            return attr in _MHA_WEIGHTS
        if isinstance(module, _PALETTIZABLE_TYPES) or _is_hf_conv1d(module):
            return attr == "weight"
        if param.dim() == 3 and param.shape[0] > 1 and _is_experts(module):
            return True
        return self.consumers is not None and self.consumers.get(name) in self.ops

    # ------------------------------------------------------------ why

    def level(self, module_name: str, wanted: str) -> bool:
        """Whether coreai-opt resolved ``module_name``'s config at level ``wanted`` (True when
        the resolution is unknown)."""
        if self.configs is None:
            return True
        entry = self.configs.get(module_name)
        return entry is not None and entry[0] == wanted

    def __call__(self, module_name: str, module: nn.Module, attr: str, name: str
                 ) -> tuple[str, str]:
        if name in self.skipped:
            return "shape", f"skipped by coreai-opt: {self.skipped[name]}"
        level, config = (self.configs.get(module_name, ("global", None))
                         if self.configs is not None else (None, None))
        if self.configs is not None and not _enabled(config):
            return "config", self._excluded_by(module_name, level)
        module_spec = attr in _specs(config, "module_state_spec")
        if isinstance(module, nn.Embedding) and not module_spec:
            return "embedding", ("embeddings are palettized only with overrides.embedding or "
                                 "modules.<name>")
        if self.consumers is None:
            return "other", "not palettized by the config (or not run by the example inputs)"
        func = self.consumers.get(name)
        if func is None:
            return "not_run", "not used by the tracing forward (not run by the example inputs)"
        if module_spec:
            return "other", f"consumed by {func}; coreai-opt left it dense"
        if func not in self.ops:
            return "op", f"consumed by {func}, not an op coreai-opt palettizes"
        keys = sorted(_specs(config, "op_state_spec"))
        if attr not in keys and "*" not in keys:
            return "state_spec", (f"consumed by {func}, whose {attr} the config's op_state_spec "
                                  f"does not name (it names {', '.join(keys) or 'nothing'})")
        return "other", f"consumed by {func}; coreai-opt left it dense"

    def _excluded_by(self, module_name: str, level: str | None) -> str:
        """The setting that resolved ``module_name`` to "dense", as coreai-opt picks it: the
        last defined entry of the winning level that matches the module or an ancestor."""
        settings = self.settings
        if settings is None:
            return "excluded by the config"
        parts = module_name.split(".") if module_name else []
        chain = [".".join(parts[:i]) for i in range(len(parts), -1, -1)]
        if level == "name":
            for pattern in reversed(list(settings.modules)):
                if any(re.fullmatch(pattern, n) for n in chain):
                    value = settings.modules[pattern]
                    if value in (None, "none"):
                        return f"excluded by palettize.modules.{pattern}={_show(value)}"
                    break
            return "excluded by a module_name entry of the coreai-opt config"
        if level == "type":
            types = {type(self.modules[n]) for n in chain if n in self.modules}
            for type_key in reversed(list(settings.overrides)):
                value = settings.overrides[type_key]
                if value == INHERIT:
                    continue
                if resolve_module_type(type_key, f"overrides.{type_key}") in types:
                    if value in (None, "none"):
                        return f"excluded by palettize.overrides.{type_key}={_show(value)}"
                    break
            return "excluded by a module_type entry of the coreai-opt config"
        if settings.base_config is None and not settings.config_file:
            return (f"excluded by palettize.preset={_show(settings.preset)} (no override or "
                    "module pattern palettizes it)")
        return "excluded by the coreai-opt config (its global_config is null)"

    # ------------------------------------------------------------ overrides

    def _subtree(self, roots: list[str]) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.modules.items():
            if any(not r or name == r or name.startswith(r + ".") for r in roots):
                yield name, module

    def require_palettized(self, key: str, matched: list[str]) -> None:
        if not matched:
            return
        subtree = list(self._subtree(matched))
        if any(parametrize.is_parametrized(m) for _, m in subtree):
            return
        params = [(n, m, attr, p) for n, m in subtree
                  for attr, p in m.named_parameters(recurse=False) if p.is_floating_point()]
        weights = [x for x in params if x[3].dim() >= 2] or params
        reasons = list(dict.fromkeys(self(n, m, attr, _join(n, attr))[1]
                                     for n, m, attr, _ in weights))
        reason = ("; ".join(reasons[:2]) + ("; ..." if len(reasons) > 2 else "")
                  if reasons else "they have no floating-point weights")
        names = ", ".join(matched[:3]) + (", ..." if len(matched) > 3 else "")
        raise PalettizeConfigError(key, f"matches {len(matched)} module(s) ({names}) but "
                                   f"palettizes none of their weights ({reason})")
