"""``palettize.adapters``: LoRA accuracy-recovery adapters (peft) on a palettized, frozen base.

Order: the engine builds the palettized structure (k-means later, or a checkpoint's state), then
``attach`` injects peft's LoRA with ``peft.inject_adapter_in_model``: in place, so the user's
LightningModule / HF model stays the object the Trainer holds, and before the optimizer exists
(Lightning: ``setup``, before ``configure_optimizers``; HF: ``on_init_end``, before ``train()``
builds the optimizer). peft leaves only the adapters trainable (``bias: none``: every other
parameter, embeddings and norms included, gets ``requires_grad=False``). A model the user wrapped
as a ``PeftModel`` already works too: its ``base_layer`` weights are palettized (the adapter
layers are excluded from the coreai-opt config) and the adapters stay dense.

Export (``AdapterExport``, used by ``export.export_palettized``): the packed artifact holds the
palettized base alone (keys without ``.base_layer``); the adapters go beside it in peft's format
(``adapter_config.json``, ``adapter_model.safetensors``), so
``PeftModel.from_pretrained(load_palettized(dir), dir)`` works; the ``.aimodel`` runs the base
plus the unmerged fp16 LoRA branch. With ``merge: true`` the adapters are folded into the
palettized weights instead (indices re-assigned to the nearest centroid, LUTs optionally
re-fitted) and the error this introduces is reported.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .. import _coreai_compat as compat
from ..core._utils import is_int
from ..core.checks import PalettizeConfigError, build_section, choices, section_mapping

__all__ = ["ADAPTER_TYPES", "AdapterExport", "AdapterSettings", "LoraAttachment", "attach",
           "build_adapter_settings", "check_adapter_training", "exclude_adapter_layers",
           "lora_layers"]

ADAPTER_TYPES = ("lora",)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."
"""Key prefix of peft's saved adapters (a ``PeftModel``'s view of the base model)."""
ADAPTER_LAYER_PATTERN = r"(.*\.)?lora_(A|B)(\..+)?"
"""Module names of peft's LoRA sub-layers: never palettized (``exclude_adapter_layers``)."""


@dataclass
class AdapterSettings:
    """``palettize.adapters``: ``{type: lora, r, alpha, dropout, target, merge, refit_luts}``.

    ``target``: module-name suffixes (peft's ``target_modules``), each must name palettized
    linear layers. ``merge``: fold the adapters into the palettized weights at export instead of
    exporting them beside the base. ``refit_luts``: with ``merge``, Lloyd steps re-fit each
    merged layer's LUT before its indices are re-assigned.
    """

    type: str = "lora"
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    merge: bool = False
    refit_luts: bool = False

    def __post_init__(self) -> None:
        if self.type not in ADAPTER_TYPES:
            raise PalettizeConfigError("type", f"unknown adapter type {self.type!r}; valid: "
                                       f"{choices(ADAPTER_TYPES)}")
        if not is_int(self.r) or self.r < 1:
            raise PalettizeConfigError("r", f"must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or self.alpha <= 0:
            raise PalettizeConfigError("alpha", f"must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            raise PalettizeConfigError("dropout", f"must be a number in [0, 1), got {self.dropout!r}")
        target = [self.target] if isinstance(self.target, str) else self.target
        if (not isinstance(target, (list, tuple)) or not target
                or not all(isinstance(t, str) and t for t in target)):
            raise PalettizeConfigError("target", "must be a non-empty list of module-name suffixes "
                                       f"(e.g. {list(DEFAULT_TARGETS[:2])}), got {self.target!r}")
        self.target = list(target)
        for key in ("merge", "refit_luts"):
            if not isinstance(getattr(self, key), bool):
                raise PalettizeConfigError(key, f"must be true or false, got {getattr(self, key)!r}")
        if self.refit_luts and not self.merge:
            raise PalettizeConfigError("refit_luts", "re-fits the LUTs of merged weights: it needs "
                                       "merge: true")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def build_adapter_settings(value: Any) -> AdapterSettings | None:
    """``palettize.adapters`` from null, a mapping or ``AdapterSettings``.

    Raises:
        PalettizeConfigError: naming ``adapters.<key>`` and the valid choices.
    """
    if value is None or isinstance(value, AdapterSettings):
        return value
    section = section_mapping(AdapterSettings, value, "adapters", f"must be null or a mapping "
                              f"({{type: lora, r: 16, ...}}), got {value!r}")
    return build_section(AdapterSettings, section, "adapters")


def check_adapter_training(adapters: AdapterSettings | None, strategy: str) -> None:
    """Adapters train on a frozen base: ``ste``/``lut`` would train the base too."""
    if adapters is not None and strategy != "frozen":
        raise PalettizeConfigError(
            "training", f"{strategy!r} trains the palettized base, but palettize.adapters trains "
            "LoRA adapters on a frozen base; valid with adapters: 'frozen'")


# --------------------------------------------------------------------------------------------
# Training: injection and guards
# --------------------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers of ``model`` by module name (empty without peft or adapters)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def exclude_adapter_layers(config: Any, model: nn.Module) -> Any:
    """A model that already holds LoRA layers (a user's ``PeftModel``): their ``lora_A``/``lora_B``
    sub-layers stay dense (a coreai-opt module-name config of None); the base layers palettize."""
    if lora_layers(model):
        config.set_module_name(ADAPTER_LAYER_PATTERN, None)
    return config


@dataclass
class LoraAttachment:
    """The LoRA adapters of an attached model: peft's config and how names map to the base."""

    peft_config: Any
    prefix: str
    """The user model's names under the base model's (``base_model.model.`` for a PeftModel)."""
    injected: bool
    """True when ``palettize.adapters`` injected them (False: the user's ``PeftModel``)."""
    layers: list[str]

    def trainable_parameters(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)


def attach(model: nn.Module, settings: AdapterSettings | None, strategy: str,
           palettized: list[compat.PalettizedTensor]) -> LoraAttachment | None:
    """After the palettized structure exists, before any optimizer: inject the adapters
    (``settings``), or adopt those of a user's ``PeftModel``; guard peft's ``merge``.

    Raises:
        PalettizeConfigError: a target naming no palettized linear layer, adapters on a model that
            already has some, a training strategy that trains the base, a LoRA variant the export
            cannot carry (DoRA, several adapters).
    """
    existing = lora_layers(model)
    if not existing and settings is None:
        return None
    check_adapter_training(settings, strategy)
    if existing:
        if settings is not None:
            raise PalettizeConfigError("adapters", f"{type(model).__name__} already carries LoRA "
                                       "layers (a PeftModel); leave palettize.adapters null")
        if strategy != "frozen":
            raise PalettizeConfigError("training", f"{strategy!r} trains the palettized base under "
                                       "the user's LoRA adapters; valid with a PeftModel: 'frozen'")
        attachment = _adopt(model, existing)
    else:
        attachment = _inject(model, settings, palettized)
    _guard_merges(model)
    return attachment


def resume_hint(attachment: LoraAttachment | None) -> str:
    """Why a Hugging Face checkpoint of a user's ``PeftModel`` cannot restore the palettized
    base: ``Trainer`` saves a ``PeftModel``'s adapters only (``PeftModel.save_pretrained``)."""
    if attachment is None or attachment.injected or not attachment.prefix:
        return ""
    return ("; transformers' Trainer saves only the adapters of a PeftModel, so its checkpoints "
            "cannot restore the palettized base: pass the plain model with palettize.adapters "
            "(the adapters are then injected in place and checkpointed with the base)")


def _adopt(model: nn.Module, layers: dict[str, nn.Module]) -> LoraAttachment:
    configs = getattr(model, "peft_config", None) or {}
    names = {name for m in layers.values() for name in m.lora_A}
    if len(configs) != 1 or len(names) != 1:
        raise PalettizeConfigError("adapters", f"the model carries {len(names)} LoRA adapter(s) "
                                   f"and {len(configs)} peft config(s); one of each is supported")
    config = next(iter(configs.values()))
    _check_variant(config)
    from peft import PeftModel

    prefix = PEFT_PREFIX if isinstance(model, PeftModel) else ""
    return LoraAttachment(config, prefix, injected=False, layers=sorted(layers))


def _check_variant(config: Any) -> None:
    if getattr(config, "use_dora", False):
        raise PalettizeConfigError("adapters", "DoRA adapters are not supported on a palettized "
                                   "base (the magnitude vector needs the dense weight norm)")


def _inject(model: nn.Module, settings: AdapterSettings,
            palettized: list[compat.PalettizedTensor]) -> LoraAttachment:
    from peft import LoraConfig, inject_adapter_in_model

    modules = dict(model.named_modules())
    linear = sorted({t.module_name for t in palettized
                     if isinstance(modules.get(t.module_name), nn.Linear)})
    for target in settings.target:
        if not any(n == target or n.endswith("." + target) for n in linear):
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise PalettizeConfigError("adapters.target", f"{target!r} matches no palettized linear "
                                       f"layer of {type(model).__name__}; valid: {choices(suffixes)}")
    targets = [n for n in linear if any(n == t or n.endswith("." + t) for t in settings.target)]
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none")
    # Exact names: a suffix could also reach a layer left dense (peft matches any Linear).
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    config.target_modules = sorted(set(settings.target))  # what the saved config tells peft
    return LoraAttachment(config, "", injected=True, layers=targets)


def _guard_merges(model: nn.Module) -> None:
    """peft's ``merge()`` adds to ``base_layer.weight.data``: on a palettized (parametrized)
    weight that is a freshly computed tensor, so the write would be lost silently. Raise."""
    for name, layer in lora_layers(model).items():
        if parametrize.is_parametrized(layer.get_base_layer()):
            object.__setattr__(layer, "merge", _refuse_merge(name))


def _refuse_merge(name: str) -> Callable[..., None]:
    def merge(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"palettize: cannot merge the LoRA adapter of {name} into its palettized base weight "
            "(peft writes base_layer.weight.data, a tensor computed from the LUT and indices, so the "
            "merge would be lost); export with palettize.adapters.merge: true, which re-assigns "
            "the indices to the merged weights, or merge into load_palettized(dir) + the adapters")

    return merge


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _base_key(key: str, prefix: str) -> str:
    return key[len(prefix):].replace(".base_layer.", ".") if key.startswith(prefix) else key


def _is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


class AdapterExport:
    """How ``export_palettized`` handles a model with adapters (see the module docstring)."""

    def __init__(self, attachment: LoraAttachment, merge: bool = False, refit_luts: bool = False):
        self.attachment = attachment
        self.merge = merge
        self.refit_luts = refit_luts
        self.adapter_state: dict[str, torch.Tensor] = {}
        self.summary: dict[str, Any] = {}

    # -- state and model of the base

    def base_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The base model's state (no ``.base_layer``, no prefix); the adapters' (peft keys:
        ``base_model.model.<layer>.lora_A.weight``) are kept for ``after_pack``/``before_pack``."""
        prefix, base = self.attachment.prefix, {}
        for key, value in state.items():
            if _is_adapter_key(key):
                name = _base_key(key, prefix).replace(f".{ADAPTER_NAME}.", ".")
                self.adapter_state[PEFT_PREFIX + name] = value
            elif key.startswith(prefix):
                base[_base_key(key, prefix)] = value
        return base

    def base_factory(self, factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        """``factory`` without the LoRA layers a user's ``PeftModel`` copy has."""
        def build() -> nn.Module:
            model = factory()
            for name, layer in lora_layers(model).items():
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child,
                        layer.get_base_layer())
            from peft import PeftModel

            return model.get_base_model() if isinstance(model, PeftModel) else model

        return build

    # -- the two hooks of export_palettized

    def before_pack(self, base: nn.Module) -> None:
        """With ``merge``: fold the adapters into the palettized weights of ``base``."""
        if self.merge:
            self.summary = merge_into_palettized(base, self.adapter_state,
                                                 self.attachment.peft_config.lora_alpha,
                                                 refit_luts=self.refit_luts)

    def after_pack(self, base: nn.Module, directory: Path) -> None:
        """Without ``merge``: write the peft files; put the fp16 LoRA branch on ``base`` (the
        ``.aimodel`` traces it unmerged)."""
        if self.merge:
            return
        write_peft_adapters(directory, self.attachment.peft_config, self.adapter_state)
        add_lora_branch(base, self.attachment.peft_config, self.adapter_state, torch.float16)

    def extra(self, base_bytes: int | None) -> dict[str, Any]:
        """``report.json`` keys: both sizes and, merged, the error the merge introduced."""
        params = sum(v.numel() for v in self.adapter_state.values())
        out = {"adapters_params": params, "adapters_fp16_bytes": 2 * params,
               "adapters_layers": len(self.attachment.layers),
               "adapters_merged": self.merge}
        if base_bytes is not None:  # the report counts the adapters at their training dtype
            out["base_palettized_bytes"] = base_bytes - sum(
                v.numel() * v.element_size() for v in self.adapter_state.values())
        out.update(self.summary)
        return out


def write_peft_adapters(directory: Path, config: Any, adapter_state: Mapping[str, torch.Tensor]
                        ) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (fp32, as trained) in peft's format."""
    from safetensors.torch import save_file

    config = dataclasses.replace(config)
    config.base_model_name_or_path = None
    config.inference_mode = True
    config.save_pretrained(str(directory))
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter_state.items()},
              str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    meta = json.loads((directory / "adapter_config.json").read_text())
    if meta.get("peft_type") != "LORA":  # pragma: no cover - peft changed its format
        raise RuntimeError("peft wrote an unexpected adapter_config.json")


def _adapter_weights(adapter_state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor,
                                                                                   torch.Tensor]]:
    """``{base layer name: (A, B)}`` from peft-format keys."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in adapter_state:
        if key.endswith(".lora_A.weight"):
            layer = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
            out[layer] = (adapter_state[key], adapter_state[f"{PEFT_PREFIX}{layer}.lora_B.weight"])
    return out


def add_lora_branch(base: nn.Module, config: Any, adapter_state: Mapping[str, torch.Tensor],
                    dtype: torch.dtype) -> None:
    """Inject peft's LoRA layers into ``base`` and load the adapters at ``dtype`` (unmerged:
    ``base(x) + B(A(x)) * scale``); merging is guarded as in training."""
    from peft import inject_adapter_in_model

    config = dataclasses.replace(config, inference_mode=True, lora_dropout=0.0)
    config.target_modules = sorted(_adapter_weights(adapter_state))
    inject_adapter_in_model(config, base, adapter_name=ADAPTER_NAME)
    layers = lora_layers(base)
    for name, (a, b) in _adapter_weights(adapter_state).items():
        layer = layers[name]
        layer.lora_A[ADAPTER_NAME].weight.data = a.detach().to(dtype).clone()
        layer.lora_B[ADAPTER_NAME].weight.data = b.detach().to(dtype).clone()
    _guard_merges(base)


@torch.no_grad()
def merge_into_palettized(base: nn.Module, adapter_state: Mapping[str, torch.Tensor],
                          alpha: float, refit_luts: bool = False, lloyd_steps: int = 5
                          ) -> dict[str, float]:
    """Fold ``W + scale * B @ A`` into each adapted palettized weight of ``base``: the palettized
    weight (read through the module, so no dense master weight is needed) plus the LoRA delta,
    re-assigned to the nearest centroid (after ``lloyd_steps`` re-fits of the LUT with
    ``refit_luts``). Returns the error: ``merge_rel_error`` = ||merged - palettized(merged)|| /
    ||delta|| over all layers (0: the merge is exact; 1: as lossy as dropping the adapters)."""
    from ..core.strategies import derive_indices, lloyd_step

    tensors = {t.module_name: t for t in compat.fake_palettized_tensors(base)}
    err = delta_norm = 0.0
    for name, (a, b) in _adapter_weights(adapter_state).items():
        t = tensors[name]
        module = base.get_submodule(name)
        r = a.shape[0]
        delta = (b.float() @ a.float()) * (alpha / r)
        merged = module.weight.detach().float() + delta.to(module.weight.device)
        merged = merged.to(module.weight.dtype)
        if refit_luts:
            vectors, _ = t.fake.vectorize(merged)
            for _ in range(lloyd_steps):
                lloyd_step(t.fake.centroids, vectors)
        if not compat.is_compact(t.fake):  # a dense master weight (the compact base has none)
            t.original.copy_(merged)
        # Indices of the merged weight, stored in the fake's own layout (packed when compact).
        t.fake.indices = derive_indices(t.fake, merged).to(t.fake.centroids.device)
        t.fake._indices_stale = False
        err += float((module.weight.detach().float() - merged.float()).pow(2).sum())
        delta_norm += float(delta.pow(2).sum())
    rel = (err / delta_norm) ** 0.5 if delta_norm > 0 else 0.0
    return {"merge_rel_error": round(rel, 6), "merge_refit_luts": refit_luts}
