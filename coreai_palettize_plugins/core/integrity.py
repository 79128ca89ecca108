"""Integrity checks of what the plugin reads and trains: the palettized state a checkpoint
restores (shapes against the config before it loads; finite LUTs and dense weights, indices below
``2**n_bits`` after), weights before k-means, LUTs after each optimizer step, and the small record
a Hugging Face checkpoint carries (``palettize_state.json``: config, step, LUT checksums).

Every error names the weight (or tensor) and where it came from; nothing is re-clustered or
trained on silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import _coreai_compat as compat
from .checks import PalettizeConfigError
from .dist_context import DistContext

__all__ = ["CHECKPOINT_RECORD", "IntegrityError", "check_luts_finite", "check_restored",
           "check_weights_finite", "loaded_from", "read_record", "state_checksums",
           "tensor_digest", "verify_checksums", "verify_record", "watch_loads", "write_record"]

log = logging.getLogger(__name__)

CHECKPOINT_RECORD = "palettize_state.json"
"""Written by the HF callback into each ``checkpoint-N/`` directory."""
RECORD_FORMAT = "coreai-palettize-plugins/checkpoint-v1"
_LOADED_FROM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LUT_ATTRS = ("centroids", "trainable_lut", "per_channel_scale")


class IntegrityError(RuntimeError):
    """Damaged or non-finite data: a checkpoint, a weight, a LUT or an artifact."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """``sha256:<hex>`` of a tensor's bytes (C order, CPU), dtype and shape included."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return "sha256:" + digest.hexdigest()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 ``DTensor`` (each rank checks what it holds), else itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One device sync per device for all of them."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in map(_local, tensors):
        if t.numel() and t.is_floating_point():
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def _nonfinite(tensor: torch.Tensor) -> str:
    t = _local(tensor).detach()
    return (f"{int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} Inf "
            f"of {t.numel()} values")


def _recorded(t: compat.PalettizedTensor) -> dict[str, torch.Tensor]:
    """What the HF record checksums: the LUTs and the (packed) indices of a palettized weight."""
    found = _luts(t)
    for attr in ("packed_indices", "indices") if compat.is_compact(t.fake) else ("indices",):
        value = t.fake._buffers.get(attr)
        if isinstance(value, torch.Tensor) and value.numel():
            found[attr] = value
            break
    return found


def _luts(t: compat.PalettizedTensor) -> dict[str, torch.Tensor]:
    found = {}
    for attr in _LUT_ATTRS:
        value = getattr(t.fake, attr, None)
        if isinstance(value, torch.Tensor) and value.numel():
            found[attr] = value
    return found


# ---------------------------------------------------------------------- weights and LUTs

def check_weights_finite(tensors: list[compat.PalettizedTensor],
                         dist: DistContext | None = None) -> None:
    """Before k-means: every dense weight is finite, on every rank (a NaN clusters into a NaN
    LUT entry and zeroes most of its group; an Inf becomes a LUT entry).

    Raises:
        IntegrityError: naming the weight(s), on every rank (the others name the failing one).
    """
    with (dist or DistContext.current()).agree("the weight check before k-means"):
        dense = [t.original for t in tensors]
        if _all_finite(dense):
            return
        bad = [f"{t.name} ({_nonfinite(t.original)})" for t in tensors
               if t.original.numel() and not bool(torch.isfinite(_local(t.original)).all())]
        raise IntegrityError(
            f"palettize: non-finite values in {len(bad)} weight(s) before k-means: "
            f"{'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; fix the model or the "
            "checkpoint it came from (a NaN would be clustered into its LUT)")


def check_luts_finite(tensors: list[compat.PalettizedTensor], step: int) -> None:
    """After an optimizer step: every LUT (and trainable LUT, per-channel scale) is finite.
    Cheap: LUTs are small, one device sync in all; dense weights are not scanned.

    Raises:
        IntegrityError: naming the weight and the LUT.
    """
    luts = [(t, attr, v) for t in tensors for attr, v in _luts(t).items()]
    if _all_finite([v for _, _, v in luts]):
        return
    bad = [f"{t.name} ({attr}: {_nonfinite(v)})" for t, attr, v in luts
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    raise IntegrityError(
        f"palettize: non-finite LUT after optimizer step {step}: {'; '.join(bad[:5])}"
        f"{' ...' if len(bad) > 5 else ''}; training diverged (lower the learning rate, or use "
        "gradient clipping)")


# ---------------------------------------------------------------------- checkpoint restore

def watch_loads(model: nn.Module, tensors: Callable[[], list[compat.PalettizedTensor]],
                config_yaml: Callable[[], str], *, budget: bool) -> None:
    """A root load pre-hook on ``model``: a checkpoint's LUTs must have the shapes this config
    gives (before torch copies them: a w4 checkpoint would otherwise load into a w2 run
    silently, or fail with an unrelated shape error later). In a Hugging Face
    ``Trainer._load_from_checkpoint`` it also verifies the checkpoint's record first.
    ``tensors``/``config_yaml`` are read at load time; with a ``budget`` the LUT sizes are the
    restored allocation's, so only the record is read."""

    def pre_hook(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if not compat.is_palettized_state(state_dict):
            return
        directory = _hf_checkpoint_directory()
        if directory is not None:
            _LOADED_FROM[model] = directory
            verify_record(directory, tensors(), config_yaml(), config=not budget)
        if not budget:  # the allocation is read from the restored LUT sizes otherwise
            _check_lut_shapes(tensors(), state_dict, prefix)
        else:
            _shape_placeholders(tensors(), state_dict, prefix)

    model.register_load_state_dict_pre_hook(pre_hook)


def _shape_placeholders(tensors: list[compat.PalettizedTensor], state_dict: Mapping[str, Any],
                        prefix: str) -> None:
    """With a budget, a placeholder LUT (zeros not clustered yet, that FSDP2 checkpoints load
    into) takes the shape of the LUT being loaded: the checkpoint's allocation."""
    for t in tensors:
        fake = t.fake
        value = state_dict.get(f"{prefix}{t.state_prefix}0.centroids")
        if (isinstance(value, torch.Tensor) and compat.is_placeholder(fake)
                and value.shape != fake.centroids.shape):
            compat.set_placeholder(fake, value.shape, fake.centroids.dtype, fake.centroids.device)


def loaded_from(model: nn.Module) -> str | None:
    """The HF checkpoint directory ``model`` was last loaded from (``watch_loads``)."""
    return _LOADED_FROM.get(model)


def _check_lut_shapes(tensors: list[compat.PalettizedTensor], state_dict: Mapping[str, Any],
                      prefix: str) -> None:
    for t in tensors:
        value = state_dict.get(f"{prefix}{t.state_prefix}0.centroids")
        if not isinstance(value, torch.Tensor):
            continue
        expected = compat.centroids_shape(t)
        if tuple(value.shape) != tuple(expected):
            raise PalettizeConfigError(
                "", f"the checkpoint was palettized with a different config than this run's: "
                f"LUTs of {t.name} have shape {tuple(value.shape)}, this config gives "
                f"{tuple(expected)} (n_bits={t.fake.n_bits}); resume with the same palettize "
                "settings")


def check_restored(tensors: list[compat.PalettizedTensor], model: nn.Module,
                   source: str = "the checkpoint") -> None:
    """After a restore: LUTs finite, indices (or packed indices) below ``2**n_bits`` and of the
    weight's size, every restored dense weight finite.

    Raises:
        IntegrityError: naming the tensor (a damaged checkpoint), before any training step.
    """
    problems: list[str] = []
    for t in tensors:
        for attr, value in _luts(t).items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                problems.append(f"{t.state_prefix}0.{attr} ({_nonfinite(value)})")
        problems += _index_problems(t)
    params = [(n, p) for n, p in model.named_parameters() if p.numel()]
    if not _all_finite([p for _, p in params]):
        problems += [f"{n} ({_nonfinite(p)})" for n, p in params
                     if p.is_floating_point() and not bool(torch.isfinite(_local(p)).all())]
    if problems:
        raise IntegrityError(
            f"palettize: {source} is damaged: {'; '.join(problems[:5])}"
            f"{' ...' if len(problems) > 5 else ''}; resume from an intact checkpoint")


def _index_problems(t: compat.PalettizedTensor) -> list[str]:
    fake, limit = t.fake, 2 ** t.fake.n_bits
    if compat.is_compact(fake):
        rows, cols = fake.compact_layout[2:]
        width, packed = fake.compact_width, fake.packed_indices
        expected = -(-rows * cols * width // 8)
        key = f"{t.state_prefix}0.packed_indices"
        if packed.numel() != expected:
            return [f"{key} (holds {packed.numel()} bytes, {t.name} needs {expected})"]
        if width > fake.n_bits:  # e.g. 3-bit indices held at 4 bits: 8..15 are invalid
            high = int(compat.unpack_bits(packed, width, rows * cols).max())
            if high >= limit:
                return [f"{key} (index {high} >= 2**n_bits = {limit})"]
        return []
    indices = getattr(fake, "indices", None)
    if not isinstance(indices, torch.Tensor) or not indices.numel():
        return []  # derived from the dense weight (ste)
    key = f"{t.state_prefix}0.indices"
    if indices.numel() != t.original.numel():
        return [f"{key} (holds {indices.numel()} indices, {t.name} has {t.original.numel()})"]
    high = int(indices.max())
    return [f"{key} (index {high} >= 2**n_bits = {limit})"] if high >= limit else []


# ---------------------------------------------------------------------- the HF record

def write_record(directory: str | Path, step: int, tensors: list[compat.PalettizedTensor],
                 config_yaml: str, *, budget: bool) -> Path:
    """``palettize_state.json`` in a checkpoint directory: the resolved config (``config_yaml``,
    as Lightning's callback state holds it), the PAT step and a checksum of every LUT and index
    tensor."""
    record = {"format": RECORD_FORMAT, "step": int(step), "config": config_yaml,
              "budget": budget, "luts": state_checksums(tensors)}
    path = Path(directory) / CHECKPOINT_RECORD
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_record(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / CHECKPOINT_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path}: unreadable ({e}); the checkpoint is damaged") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise IntegrityError(f"{path}: not a palettize checkpoint record (format "
                             f"{record.get('format') if isinstance(record, dict) else None!r})")
    return record


_WARNED: set[str] = set()


def verify_record(directory: str | Path, tensors: list[compat.PalettizedTensor],
                  config_yaml: str, *, config: bool = True, luts: bool = False,
                  step: int | None = None) -> bool:
    """Compare a checkpoint's record with this run (``config_yaml``, the restored ``tensors``):
    its ``config`` (before the load; with a
    ``palettize.budget``, after it, once the allocation is known), the restored ``luts`` against
    their checksums and the ``step`` (after the load). Returns False, with one warning per
    directory, for a checkpoint without a record (an older version wrote it).

    Raises:
        PalettizeConfigError: the checkpoint was palettized with another config.
        IntegrityError: a restored LUT differs from the one the checkpoint recorded.
    """
    record = read_record(directory)
    if record is None:
        if str(directory) not in _WARNED:
            _WARNED.add(str(directory))
            log.warning("palettize: %s has no %s (written by an older version): its palettize "
                        "config cannot be verified", directory, CHECKPOINT_RECORD)
        return False
    ours = config_yaml
    if config and record.get("config") != ours:
        raise PalettizeConfigError("", f"the checkpoint {directory} was palettized with a "
                                   f"different config than this run's "
                                   f"({_first_difference(str(record.get('config')), ours)}); "
                                   "resume with the same palettize settings")
    if step is not None and record.get("step") != step:
        raise IntegrityError(f"palettize: {Path(directory) / CHECKPOINT_RECORD} records step "
                             f"{record.get('step')}, the checkpoint's trainer state step {step}: "
                             "the directory mixes two saves")
    if luts:
        verify_checksums(tensors, record.get("luts", {}), f"the checkpoint {directory}")
    return True


def state_checksums(tensors: list[compat.PalettizedTensor]) -> dict[str, str]:
    """sha256 of every LUT and (packed) index tensor, by state-dict key: what a checkpoint
    records (HF: ``palettize_state.json``; Lightning: the callback state)."""
    return {f"{t.state_prefix}0.{attr}": tensor_digest(v)
            for t in tensors for attr, v in _recorded(t).items()}


def verify_checksums(tensors: list[compat.PalettizedTensor], recorded: Mapping[str, str],
                     source: str) -> None:
    """The restored LUTs and indices against ``state_checksums`` taken when they were saved.

    Raises:
        IntegrityError: naming the first tensor that differs.
    """
    restored = {f"{t.state_prefix}0.{attr}": v
                for t in tensors for attr, v in _recorded(t).items()}
    for key, digest in sorted(recorded.items()):
        value = restored.get(key)
        if value is not None and tensor_digest(value) != digest:
            raise IntegrityError(f"palettize: {source} is damaged: {key} differs from the "
                                 "checksum recorded when it was saved")


def _first_difference(saved: str, ours: str) -> str:
    for a, b in zip(saved.splitlines(), ours.splitlines()):
        if a != b:
            return f"checkpoint {a.strip()!r}, this run {b.strip()!r}"
    return "the configs differ in length"


def _hf_checkpoint_directory() -> str | None:
    """The directory ``transformers.Trainer._load_from_checkpoint`` is loading, if the current
    load runs inside it (transformers-private frame local ``resume_from_checkpoint``; tested
    against transformers 5.x). None elsewhere (Lightning, ``prepare(state_dict=...)``)."""
    frame = sys._getframe(1)
    for _ in range(40):
        if frame is None:
            return None
        if frame.f_code.co_name == "_load_from_checkpoint":
            path = frame.f_locals.get("resume_from_checkpoint")
            owner = type(frame.f_locals.get("self")).__mro__
            if isinstance(path, str) and any(c.__name__ == "Trainer" for c in owner):
                return path
        frame = frame.f_back
    return None
