"""``palettize.distillation``: a dense teacher's logits guide the palettized student.

A KL term between the teacher's and the student's softened output distributions is added to the
training loss, ``loss + weight * T**2 * KL(teacher || student)`` (``T``: ``temperature``). The
teacher is a frozen dense copy of the model as the callback attached to it (the pretrained
weights, before any palettization), or a fine-tuned dense checkpoint (``teacher: <directory>``,
loaded with the model's own ``from_pretrained``). It never joins the student's parameters, state
dict, checkpoints or export.

How the term reaches the loss, with no change to the user's training step: a forward hook on the
model runs the teacher on the same inputs (``no_grad``) whenever the model runs in training mode
with gradients on, then

- an output with a ``loss`` (a Hugging Face ``ModelOutput`` or a mapping): ``loss`` is replaced
  by ``loss + weight * kd`` (what the HF ``Trainer`` logs and backpropagates);
- an output with ``logits`` but no loss, or a plain logits tensor (a Lightning module that
  computes its loss from the logits): the logits are passed through an identity whose backward
  adds ``weight * d kd`` to the gradients, so the loss built from them trains both terms.

Positions the task loss ignores (``labels == -100``, shifted by one for a causal LM) are left out
of the KL; with the Trainer's ``num_items_in_batch`` the KL is summed and divided by it, as the
model's own loss is under gradient accumulation. Memory: one dense copy of the weights in their
dtype (no gradients, no optimizer state); compute: one extra forward per training forward.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.checks import PalettizeConfigError, build_section, choices, section_mapping

__all__ = ["DistillationSettings", "Distiller", "build_distillation", "distillation_loss",
           "teacher_for"]

log = logging.getLogger(__name__)
KEYS = ("weight", "temperature", "teacher")


@dataclass
class DistillationSettings:
    """``palettize.distillation``: any field set turns it on; all null (the Hydra schema's
    node) means off."""

    weight: float | None = None
    """Weight of the KL term added to the task loss (> 0; 1.0 when only ``teacher`` is set)."""
    temperature: float | None = None
    """Softmax temperature of both distributions (> 0; default 1.0)."""
    teacher: str | None = None
    """null: the model as attached (dense); a directory: a dense checkpoint of the same class."""

    def __post_init__(self) -> None:
        self.weight = 1.0 if self.weight is None else self.weight
        self.temperature = 1.0 if self.temperature is None else self.temperature
        for key in ("weight", "temperature"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise PalettizeConfigError(key, f"must be a number > 0, got {value!r}")
            setattr(self, key, float(value))
        if self.teacher is not None:
            self.teacher = os.fspath(self.teacher)
            if not Path(self.teacher).is_dir():
                raise PalettizeConfigError("teacher", f"no such directory: {self.teacher!r} "
                                           "(a dense checkpoint saved with save_pretrained), or "
                                           "null for the model as attached")


def build_distillation(value: Any) -> DistillationSettings | None:
    """``palettize.distillation`` from null, a mapping or ``DistillationSettings`` (None: off).

    Raises:
        PalettizeConfigError: naming ``distillation.<key>`` and the valid keys or values.
    """
    if value is None or isinstance(value, DistillationSettings):
        return value
    section = section_mapping(DistillationSettings, value, "distillation",
                              f"must be null or a mapping (keys: {choices(KEYS)}), e.g. "
                              f"{{weight: 1.0}}, got {value!r}")
    if all(v is None for v in section.values()):
        return None  # the Hydra schema's all-null node
    return build_section(DistillationSettings, section, "distillation")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      mask: torch.Tensor | None = None, num_items: Any = None) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher/T) || softmax(student/T))`` per position (last axis: classes),
    averaged over the positions ``mask`` keeps (or summed and divided by ``num_items``)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_position = (t.exp() * (t - s)).sum(-1) * temperature ** 2
    if mask is not None and mask.shape == per_position.shape:
        per_position = per_position[mask]
    if num_items is not None:
        return per_position.sum() / torch.as_tensor(num_items, device=per_position.device)
    return per_position.mean()


class _AddGradient(torch.autograd.Function):
    """Identity on ``x``; its backward also backpropagates ``extra`` (a scalar loss term)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones((), device=grad.device, dtype=torch.float32)


class Distiller:
    """The teacher and the forward hook on ``model`` that adds its term to the training loss.

    The teacher is taken by ``teacher_for`` before the palettized structure is inserted (the
    default teacher is a copy of the dense model); the hook is registered after it, and only
    acts while ``active()`` (the engine's training mode: not during calibration) and the model
    trains with gradients on (not in evaluation).
    ``check_used()`` after the first optimizer step raises when no training forward produced
    logits the term could use (nothing silent).
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, settings: DistillationSettings,
                 active: Callable[[], bool] = lambda: True) -> None:
        self.settings, self.teacher, self.active = settings, teacher, active
        self.used = 0
        self.last: float | None = None
        """The last KL term (before ``weight``)."""
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)
        params = list(teacher.parameters())
        log.info("palettize: distillation from %s (%.1f MiB of %s weights), weight %g, "
                 "temperature %g", settings.teacher or "the dense model as attached",
                 sum(p.numel() * p.element_size() for p in params) / 2**20,
                 params[0].dtype if params else "no", settings.weight, settings.temperature)

    def __deepcopy__(self, memo: dict) -> Distiller:
        """Shared, not copied, when the model is deep-copied (an EMA copy keeps no teacher)."""
        return self

    def remove(self) -> None:
        """Unhook the model and drop the teacher (the end of training)."""
        self._handle.remove()
        self.teacher = None

    def check_used(self) -> None:
        if not self.used:
            raise RuntimeError(
                "palettize.distillation: no training forward of the palettized model returned "
                "logits (a ModelOutput or mapping with 'logits', or a logits tensor): the term "
                "cannot be added; remove palettize.distillation for this model")

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        training = module.training and torch.is_grad_enabled()
        if self.teacher is None or not training or not self.active():
            return None
        logits = _logits(output)
        if logits is None:
            return None
        device = logits.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            teacher_logits = _logits(self.teacher(*args, **kwargs))
        if teacher_logits is None or teacher_logits.shape != logits.shape:
            raise RuntimeError(
                f"palettize.distillation: the teacher's logits "
                f"{None if teacher_logits is None else tuple(teacher_logits.shape)} do not match "
                f"the model's {tuple(logits.shape)}; the teacher must be the same architecture")
        mask = _label_mask(module, kwargs.get("labels"), logits)
        kd = distillation_loss(logits, teacher_logits, self.settings.temperature, mask,
                               kwargs.get("num_items_in_batch"))
        self.used += 1
        self.last = float(kd.detach())
        term = self.settings.weight * kd
        if isinstance(output, Mapping) and output.get("loss") is not None:
            output["loss"] = output["loss"] + term.to(output["loss"].dtype)
            return output
        injected = _AddGradient.apply(logits, term)
        if isinstance(output, torch.Tensor):
            return injected
        output["logits"] = injected
        return output


def teacher_for(model: nn.Module, settings: DistillationSettings) -> nn.Module:
    """The frozen dense teacher: a copy of ``model`` as it is now (call before palettizing it),
    or ``settings.teacher`` loaded with the model class's ``from_pretrained``, in the model's
    dtype. It is not a submodule of ``model``: no state dict, checkpoint or export holds it.

    Raises:
        PalettizeConfigError: ``distillation.teacher`` set for a model without ``from_pretrained``.
    """
    return _load_teacher(model, settings).eval().requires_grad_(False)


def _load_teacher(model: nn.Module, settings: DistillationSettings) -> nn.Module:
    if settings.teacher is None:
        return copy.deepcopy(model)
    loader = getattr(type(model), "from_pretrained", None)
    if loader is None:
        raise PalettizeConfigError(
            "distillation.teacher", f"{type(model).__name__} has no from_pretrained to load "
            f"{settings.teacher!r}; use teacher: null (the model as attached)")
    teacher = loader(settings.teacher)
    dtype = next(model.parameters()).dtype
    return teacher.to(dtype)


def _logits(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, Mapping):
        value = output.get("logits")
        return value if isinstance(value, torch.Tensor) else None
    return None


def _label_mask(model: nn.Module, labels: Any, logits: torch.Tensor) -> torch.Tensor | None:
    """Positions whose label the task loss uses: shifted by one for a Hugging Face causal LM
    (``loss_type == "ForCausalLM"``: logit ``i`` predicts label ``i + 1``), aligned otherwise
    (seq2seq, masked LM, classification); None without labels of the logits' shape."""
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:-1]:
        return None
    if getattr(model, "loss_type", None) != "ForCausalLM":
        return labels != -100
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[..., :-1] = labels[..., 1:] != -100
    return mask
