"""Dry run of a palettization config: which weights it palettizes, with which spec, and the
projected size, for a model built on the meta device (no weights are allocated, no k-means runs).

    coreai-palettize inspect tiny-llama-offline preset=w3 modules.lm_head=w8
    coreai-palettize inspect path/to/hf_model_dir --json
    coreai-palettize inspect my_package.models:build_model overrides.linear=w8

The palettized structure is inserted exactly as training inserts it (``Palettization.attach``:
coreai-opt resolves every module's config and traces one forward pass, here on meta tensors), so
what is shown palettized is what training palettizes; layers whose shape the spec cannot take are
shown dense with coreai-opt's reason. Projected bytes of a palettized weight:
``ceil(numel / cluster_dim * n_bits / 8)`` indices + ``num_luts * 2**n_bits * cluster_dim`` LUT
entries (the weight's dtype, or ``lut_dtype``, whose per-LUT fp32 scales count too) + per-channel
scales; every other tensor counts at its own dtype.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from .._coreai_compat import fitted_layout, type_before_parametrization
from ..core._utils import one_line
from ..engine.lifecycle import Palettization
from ..integrations._synthetic import synthetic_candidates
from ..settings.schema import PalettizeConfigError
from .inspection_targets import InspectError, load_target, torch_dtype_of

__all__ = ["InspectError", "Inspection", "LayerPlan", "inspect_model", "inspect_target",
           "load_target", "palettize_settings"]

_PALETTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                 nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding, nn.MultiheadAttention)
_WEIGHT_ATTRS = ("weight", "in_proj_weight")
_LUT_SCALE_BYTES = 4  # coreai-opt stores one fp32 scale per quantized LUT
_TEXT_TOKENS = 8      # sequence length of the example input of a language model


@dataclass
class LayerPlan:
    """One weight of the model: its palettization spec (or why it stays dense) and its bytes."""

    name: str
    type: str
    shape: list[int]
    dtype: str
    palettized: bool
    dense_bytes: int
    projected_bytes: int
    n_bits: int | None = None
    granularity: str | None = None
    group_size: int | None = None
    axis: int | None = None
    cluster_dim: int | None = None
    num_luts: int | None = None
    lut_dtype: str | None = None
    per_channel_scale: bool = False
    reason: str = ""
    tied_to: str | None = None
    fitted: str | None = None
    """Set when the config's grouping cannot take this weight and it gets the nearest layout
    that fits (``palettize.fit_layouts``); the spec shows that layout."""

    @property
    def spec(self) -> str:
        if not self.palettized:
            return "dense"
        layout = (f"g{self.group_size} axis {self.axis}" if self.group_size else "per-tensor")
        vector = f" dim {self.cluster_dim}" if (self.cluster_dim or 1) > 1 else ""
        scale = " +scale" if self.per_channel_scale else ""
        return f"{self.n_bits}-bit {layout}{vector} LUT {self.lut_dtype}{scale}"


@dataclass
class Inspection:
    """The dry run's result: per-weight plans and whole-model totals."""

    target: str
    model: str
    dtype: str
    settings: dict[str, Any]
    layers: list[LayerPlan]
    num_weights: int
    dense_bytes: int
    fp16_bytes: int
    projected_bytes: int
    other_bytes: int
    bits_per_weight: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio_vs_fp16(self) -> float:
        return self.fp16_bytes / max(self.projected_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for row, layer in zip(out["layers"], self.layers):
            row["spec"] = layer.spec
        out["ratio_vs_fp16"] = self.ratio_vs_fp16
        out["palettized_weights"] = sum(p.palettized and not p.tied_to for p in self.layers)
        out["dense_weights"] = sum(not (p.palettized or p.tied_to) for p in self.layers)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_text(self) -> str:
        headers = ("layer", "type", "shape", "spec", "bytes", "note")
        rows = [(layer.name, layer.type, "x".join(map(str, layer.shape)), layer.spec,
                 _size(layer.projected_bytes),
                 f"tied to {layer.tied_to}" if layer.tied_to else layer.fitted or layer.reason)
                for layer in self.layers]
        rows.append(("(other tensors)", "", "", "dense", _size(self.other_bytes),
                     "biases, norms, buffers at their own dtype"))
        widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(5)]
        lines = [f"{self.model} ({self.target}), {self.dtype}, built on the meta device; "
                 f"palettize: {_describe(self.settings)}", ""]
        for row in [headers, *rows]:
            lines.append("  ".join(str(c).ljust(w) if i != 4 else str(c).rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths)))
                         + f"  {row[5]}".rstrip())
        palettized = sum(layer.palettized and not layer.tied_to for layer in self.layers)
        tied = sum(bool(layer.tied_to) for layer in self.layers)
        dense = sum(not (layer.palettized or layer.tied_to) for layer in self.layers)
        lines += ["", f"{palettized} weights palettized"
                  + (f" (+{tied} tied)" if tied else "") + f", {dense} dense; "
                  f"{self.num_weights:,} parameters; {self.bits_per_weight:.3f} bits/weight "
                  "(coreai-opt bits_per_weight)",
                  f"size: {_size(self.dense_bytes)} {self.dtype} | {_size(self.fp16_bytes)} fp16 "
                  f"-> {_size(self.projected_bytes)} palettized ({self.ratio_vs_fp16:.2f}x smaller "
                  "than fp16)"]
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _describe(settings: Mapping[str, Any]) -> str:
    def show(value: Any) -> str:
        return "null" if value is None else str(value)

    parts = [f"preset={settings.get('preset')}"] if settings.get("config_file") is None else [
        f"config_file={settings['config_file']}"]
    parts += [f"overrides.{k}={show(v)}" for k, v in (settings.get("overrides") or {}).items()
              if v != "inherit"]
    parts += [f"modules.{k}={show(v)}" for k, v in (settings.get("modules") or {}).items()]
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# The dry run
# --------------------------------------------------------------------------------------------


def palettize_settings(base: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``base`` (a ``palettize`` mapping) with dotlist ``overrides`` applied
    (``preset=w3 overrides.linear=w8 modules.lm_head=w8``; a ``palettize.`` prefix is allowed)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    items = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip("+"):
            raise InspectError(f"override {item!r}: expected key=value (e.g. preset=w3 or "
                               "overrides.linear=w8)")
        items.append(item.lstrip("+").removeprefix("palettize."))
    try:
        merged = OmegaConf.merge(OmegaConf.create(dict(base)), OmegaConf.from_dotlist(items))
        return OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise InspectError(f"overrides: {one_line(e)}") from None


def _example_inputs(model: nn.Module, dtype: torch.dtype | None,
                    input_shape: Sequence[int] | None) -> tuple[Any, ...] | dict[str, Any]:
    """Small CPU zeros shaped like the model's input (the engine moves them to the model's
    device, here meta, for the traced forward)."""
    def zeros_like(x: Any) -> Any:
        return torch.zeros(x.shape, dtype=x.dtype) if isinstance(x, torch.Tensor) else x

    if input_shape:
        return (torch.zeros(*input_shape, dtype=dtype or torch.float32),)
    array = getattr(model, "example_input_array", None)
    if isinstance(array, torch.Tensor):
        return (zeros_like(array),)
    if isinstance(array, (tuple, list)):
        return tuple(zeros_like(x) for x in array)
    main_input = getattr(model, "main_input_name", None)
    if main_input == "input_ids":
        return (torch.zeros(1, _TEXT_TOKENS, dtype=torch.long),)
    dummy = getattr(model, "dummy_inputs", None) if main_input else None
    if isinstance(dummy, Mapping) and isinstance(dummy.get(main_input), torch.Tensor):
        return (zeros_like(dummy[main_input][:1]),)
    candidates = synthetic_candidates(model)  # sized by the config, as the HF callback does
    if candidates:  # the most complete: e.g. Whisper's input_features and decoder_input_ids
        return candidates[0]
    raise InspectError(f"inspect: cannot tell what input {type(model).__name__} takes; pass "
                       "--input-shape (e.g. 1,3,224,224) or give the model an "
                       "example_input_array")


def inspect_model(
    factory: Callable[[], nn.Module],
    settings: Mapping[str, Any],
    *,
    dtype: Any = None,
    input_shape: Sequence[int] | None = None,
    target: str = "model",
) -> Inspection:
    """Build ``factory()`` on the meta device, insert the palettized structure ``settings``
    describe (no k-means) and account for every weight."""
    engine = Palettization(dict(settings))  # validates: PalettizeConfigError names the key
    torch_dtype = torch_dtype_of(dtype, "--dtype")
    try:
        with torch.device("meta"):
            model = factory()
    except Exception as e:
        raise InspectError(f"inspect: building {target} on the meta device failed "
                           f"({one_line(e)})") from None
    if not isinstance(model, nn.Module):
        raise InspectError(f"inspect: {target} returned a {type(model).__name__}, not a "
                           "torch.nn.Module")
    if torch_dtype is not None:
        model.to(torch_dtype)
    inputs = _example_inputs(model, torch_dtype, input_shape)
    try:
        with warnings.catch_warnings():  # skipped layers are reported in the table instead
            warnings.simplefilter("ignore")
            engine.attach(model, inputs)
    except PalettizeConfigError:
        raise
    except Exception as e:
        raise InspectError(f"inspect: {type(model).__name__}'s forward could not run on the "
                           f"meta device ({one_line(e)})") from None
    return _account(model, engine, target)


def _account(model: nn.Module, engine: Palettization, target: str) -> Inspection:
    from coreai_opt.inspection import bits_per_weight

    tensors = {id(t.original): t for t in engine.tensors()}
    configs = _resolved_configs(engine, model)
    layers: list[LayerPlan] = []
    seen: dict[int, str] = {}
    for module_name, module in model.named_modules():
        weights: list[tuple[str, torch.Tensor]] = []
        if parametrize.is_parametrized(module):
            weights += [(attr, plist.original) for attr, plist in module.parametrizations.items()]
        weights += [(attr, module._parameters[attr]) for attr in _WEIGHT_ATTRS
                    if module._parameters.get(attr) is not None]
        for attr, weight in weights:
            name = f"{module_name}.{attr}" if module_name else attr
            if id(weight) not in tensors and not (isinstance(module, _PALETTIZABLE)
                                                  or weight.dim() >= 2):
                continue  # 1-D weights (norms) count among the other tensors
            tied_to = seen.setdefault(id(weight), name)
            plan = _plan(name, module, weight, tensors.get(id(weight)))
            if tied_to != name:
                plan.tied_to, plan.projected_bytes, plan.dense_bytes = tied_to, 0, 0
            elif not plan.palettized:
                plan.reason = _dense_reason(name, module, module_name, engine, configs)
            layers.append(plan)

    dense = fp16 = projected = other = numel = 0
    counted: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in counted or (".parametrizations." in f".{key}" and id(t) not in tensors):
            continue  # palettization buffers; tied tensors once
        counted.add(id(t))
        numel += t.numel()
        dense += t.numel() * t.element_size()
        fp16 += t.numel() * (2 if t.is_floating_point() else t.element_size())
        if id(t) in tensors:
            continue
        if id(t) in seen:
            projected += t.numel() * t.element_size()
        else:
            other += t.numel() * t.element_size()
    projected += other + sum(layer.projected_bytes for layer in layers if layer.palettized)
    dtype = next((str(p.dtype).removeprefix("torch.") for p in model.parameters()
                  if p.is_floating_point()), "float32")
    return Inspection(
        target=target, model=type(model).__name__, dtype=dtype,
        settings=engine.settings.to_dict(),
        layers=layers, num_weights=numel, dense_bytes=dense, fp16_bytes=fp16,
        projected_bytes=projected, other_bytes=other,
        bits_per_weight=float(bits_per_weight(model).bpw),
    )


def _plan(name: str, module: nn.Module, weight: torch.Tensor, tensor: Any) -> LayerPlan:
    dense_bytes = weight.numel() * weight.element_size()
    plan = LayerPlan(name=name, type=_type_name(module), shape=list(weight.shape),
                     dtype=str(weight.dtype).removeprefix("torch."), palettized=tensor is not None,
                     dense_bytes=dense_bytes, projected_bytes=dense_bytes)
    if tensor is None:
        return plan
    fake = tensor.fake
    granularity = fake.granularity
    group_size = getattr(granularity, "group_size", None)
    num_luts = int(granularity.num_blocks_to_cluster(weight))
    lut_qspec = fake.lut_qspec
    lut_bytes = (lut_qspec.dtype.itemsize if lut_qspec is not None else weight.element_size())
    projected = math.ceil(weight.numel() // fake.cluster_dim * fake.n_bits / 8)
    projected += num_luts * 2**fake.n_bits * fake.cluster_dim * lut_bytes
    if lut_qspec is not None:
        projected += num_luts * _LUT_SCALE_BYTES
    if fake.enable_per_channel_scale:
        projected += weight.shape[0] * weight.element_size()
    plan.n_bits, plan.cluster_dim, plan.num_luts = fake.n_bits, fake.cluster_dim, num_luts
    plan.granularity = "per_grouped_channel" if group_size else "per_tensor"
    plan.group_size = group_size
    plan.axis = getattr(granularity, "axis", None) if group_size else None
    plan.lut_dtype = str(lut_qspec.dtype if lut_qspec is not None else weight.dtype
                         ).removeprefix("torch.")
    plan.per_channel_scale = bool(fake.enable_per_channel_scale)
    plan.projected_bytes = projected
    fitted = fitted_layout(tensor)
    plan.fitted = fitted.note if fitted is not None else None
    return plan


def _type_name(module: nn.Module) -> str:
    return type_before_parametrization(module).__name__


def _resolved_configs(engine: Palettization, model: nn.Module) -> dict[str, Any]:
    """Module name -> the coreai-opt module config that applies to it (None: left dense)."""
    resolved: dict[str, Any] = {}
    for level in engine.config.build_module_config_dict(model).values():  # name > type > global
        for name, config in level.items():
            resolved.setdefault(name, config)
    return resolved


def _enables_palettization(config: Any) -> bool:
    """Whether a coreai-opt module config palettizes anything (``null`` in the settings becomes
    a config whose specs are all None)."""
    if config is None:
        return False
    specs = [*(config.op_state_spec or {}).values(), *(config.module_state_spec or {}).values()]
    return any(spec is not None for spec in specs) or bool(config.op_type_config
                                                           or config.op_name_config)


def _dense_reason(name: str, module: nn.Module, module_name: str, engine: Palettization,
                  configs: Mapping[str, Any]) -> str:
    if name in engine.skipped:
        return f"skipped: {engine.skipped[name]}"
    if not _enables_palettization(configs.get(module_name)):
        return "excluded by the config"
    if not isinstance(module, _PALETTIZABLE):
        return f"not a palettizable layer type ({_type_name(module)})"
    if isinstance(module, nn.Embedding):
        return "embeddings are palettized only with overrides.embedding or modules.<name>"
    return "not reached by the example forward (coreai-opt palettizes only the ops it sees run)"


def inspect_target(target: str, overrides: Sequence[str] = (), *, dtype: str | None = None,
                   input_shape: Sequence[int] | None = None) -> Inspection:
    """The dry run behind ``coreai-palettize inspect``: load ``target``, apply ``overrides`` to
    its ``palettize`` settings (a recipe's own section, else ``preset: w4``), inspect."""
    factory, model_dtype, base, label = load_target(os.fspath(target))
    settings = palettize_settings(base or {"preset": "w4"}, overrides)
    return inspect_model(factory, settings, dtype=dtype or model_dtype, input_shape=input_shape,
                         target=label)
