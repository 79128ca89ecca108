"""Small helpers with one rule each, shared by the modules of the package."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .sharding import is_sharded

__all__ = ["dtype_from_name", "dtype_name", "is_int", "one_line", "to_device", "unique_by_storage"]


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` moved to ``device`` if it is a tensor, else unchanged."""
    return value.to(device) if isinstance(value, torch.Tensor) else value


def is_int(value: Any) -> bool:
    """A plain integer (``True``/``False`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def one_line(error: BaseException, *, causes: bool = False) -> str:
    """``Type: first line of the message``; with ``causes``, the chain of causes joined by
    `` <- `` (coreai-opt and transformers wrap the error that names the problem)."""
    parts = []
    current: BaseException | None = error
    while current is not None and len(parts) < 4:
        lines = [line.strip() for line in str(current).strip().splitlines() if line.strip()]
        parts.append(f"{type(current).__name__}: {lines[0]}" if lines else type(current).__name__)
        current = current.__cause__ if causes else None
    return " <- ".join(parts)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float16"`` or ``"torch.float16"`` -> ``torch.float16``."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def _storage_identity(t: torch.Tensor) -> tuple:
    if is_sharded(t):  # FSDP2: a tied pair is one object
        return ("sharded", id(t))
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()), t.dtype)


def unique_by_storage(state: Mapping[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors that are views of the same memory (tied weights) once: returns
    ``({key: tensor} for the first key of each, {alias key: first key})``."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for key, tensor in state.items():
        if tensor.numel() and not tensor.is_meta:
            identity = _storage_identity(tensor)
            if identity in first:
                aliases[key] = first[identity]
                continue
            first[identity] = key
        unique[key] = tensor
    return unique, aliases
