"""A compact coreai-opt k-means fake palettizer: no dense weight, indices packed to n bits.

``make_compact`` turns a clustered ``_KMeansFakePalettize`` into ``CompactKMeansFakePalettize``
in place (its class is swapped; centroids, scales, schedule flags and training strategy stay):
the uint8 ``indices`` buffer becomes ``packed_indices`` (the little-endian bit stream of the
packed-v2 artifact, ``artifact.pack_indices``, over the k-means 2-D view of the weight) and the
dense ``original`` Parameter of every parametrization holding the fake is emptied (same
Parameter object, so optimizers and DDP that hold it keep a valid, zero-element tensor).

The forward ignores the dense input and rebuilds the weight from the LUTs: the packed bytes
index a per-LUT table of every byte's ``8 / width`` values (``256 x 8/width`` entries per LUT),
so one ``index_select`` rebuilds the weight, in the LUT's dtype, without unpacking. A trainable
LUT (``lut`` strategy) gets its gradient through ``_ByteTableGather``, which saves only the
resident packed indices for the backward.

Widths: 1, 2, 4 and 8 bits pack whole indices per byte; 3-bit indices are held at 4 bits and
5-7-bit ones at 8 (``storage_width``). Supported: scalar LUTs (``cluster_dim == 1``), per-tensor
or per-grouped-channel, with or without per-channel scales, no LUT quantization, no sparsity.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn
from coreai_opt.palettization.kmeans.kmeans_fake_palettize import _KMeansFakePalettize
from coreai_opt.palettization.spec import PerGroupedChannelGranularity
from coreai_opt.palettization.spec.fake_palettize import _FakePalettizeImplBase

from .tensors import meta_like

__all__ = ["CACHE_ENV", "CompactKMeansFakePalettize", "compact_support",
           "drop_emptied_optimizer_state", "is_compact", "make_compact",
           "pack_bits", "storage_width", "unpack_bits"]

PACKED = "packed_indices"


def storage_width(n_bits: int) -> int:
    """Bits each index occupies while training: ``n_bits`` when whole indices fill a byte."""
    return next(w for w in (1, 2, 4, 8) if w >= n_bits)


def pack_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 values (< 2**width) -> bytes holding ``8 // width`` of them, lowest bits first (the
    bit order of ``artifact.pack_indices``); the last byte is zero-padded. Runs on any device."""
    flat = values.reshape(-1).to(torch.uint8)
    if width == 8:
        return flat.clone()
    per_byte = 8 // width
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, per_byte)
    out = groups[:, 0].clone()
    for j in range(1, per_byte):
        out |= groups[:, j] << (j * width)
    return out


def unpack_bits(packed: torch.Tensor, width: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``numel`` uint8 values."""
    if width == 8:
        return packed[:numel].clone()
    shifts = torch.arange(0, 8, width, device=packed.device, dtype=torch.uint8)
    values = (packed.unsqueeze(1) >> shifts) & ((1 << width) - 1)
    return values.reshape(-1)[:numel].contiguous()


_CODES: dict[tuple[int, int, str], torch.Tensor] = {}


def _byte_codes(width: int, num_clusters: int, device: torch.device) -> torch.Tensor:
    """``(256 * 8/width,)`` int64: the LUT entry of each value slot of each byte (codes past
    the LUT, from a 3-bit index held at 4 bits, never occur and read its last entry)."""
    key = (width, num_clusters, str(device))
    codes = _CODES.get(key)
    if codes is None:
        shifts = torch.arange(0, 8, width, device=device)
        codes = (torch.arange(256, device=device).unsqueeze(1) >> shifts) & ((1 << width) - 1)
        codes = codes.clamp(max=num_clusters - 1).reshape(-1)
        _CODES[key] = codes
    return codes


def _byte_table(lut: torch.Tensor, width: int) -> torch.Tensor:
    """``(P, K)`` LUTs -> ``(P * 256, 8/width)``: the values each byte stands for."""
    codes = _byte_codes(width, lut.shape[1], lut.device)
    return lut.index_select(1, codes).reshape(lut.shape[0] * 256, 8 // width)


def _byte_positions(packed: torch.Tensor, layout: tuple[Any, ...]) -> torch.Tensor:
    """Row of the byte table for each packed byte (int32): the byte plus 256 x its LUT."""
    axis, num_luts, rows, _cols = layout
    if axis == 0:
        grid = packed.view(num_luts, -1).int()
        offsets = torch.arange(num_luts, device=packed.device, dtype=torch.int32) * 256
        return (grid + offsets.unsqueeze(1)).reshape(-1)
    grid = packed.view(rows, num_luts, -1).int()
    offsets = torch.arange(num_luts, device=packed.device, dtype=torch.int32) * 256
    return (grid + offsets.view(1, -1, 1)).reshape(-1)


def _gather(table: torch.Tensor, packed: torch.Tensor, layout: tuple[Any, ...]) -> torch.Tensor:
    _, _, rows, cols = layout
    values = table.index_select(0, _byte_positions(packed, layout)).reshape(-1)
    return values[:rows * cols].view(rows, cols)


class _ByteTableGather(torch.autograd.Function):
    """The 2-D (k-means view) weight from ``(P, K)`` LUTs and packed indices; the LUTs get the
    sum of the gradients of the weights mapped to each entry. Saves only the packed indices."""

    @staticmethod
    def forward(ctx, lut: torch.Tensor, packed: torch.Tensor, width: int, layout: tuple):
        ctx.save_for_backward(packed)
        ctx.width, ctx.layout, ctx.lut_shape = width, layout, lut.shape
        return _gather(_byte_table(lut.detach(), width), packed, layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (packed,) = ctx.saved_tensors
        width, layout, (num_luts, num_clusters) = ctx.width, ctx.layout, ctx.lut_shape
        per_byte = 8 // width
        positions = _byte_positions(packed, layout)
        flat = grad.reshape(-1)
        pad = positions.numel() * per_byte - flat.numel()
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        table_grad = grad.new_zeros(num_luts * 256, per_byte)
        table_grad.index_add_(0, positions, flat.view(-1, per_byte))
        codes = _byte_codes(width, num_clusters, grad.device)
        lut_grad = grad.new_zeros(num_luts, num_clusters)
        lut_grad.index_add_(1, codes, table_grad.view(num_luts, -1))
        return lut_grad, None, None, None


def compact_support(fake: _KMeansFakePalettize, shape: torch.Size) -> str | None:
    """Why ``fake`` cannot be made compact (None: it can)."""
    if fake.cluster_dim != 1:
        return f"vector palettization (cluster_dim={fake.cluster_dim})"
    if fake.lut_qspec is not None:
        return "LUT quantization (lut_dtype)"
    if fake.sparsity_detection_threshold is not None:
        return "sparsity detection"
    if isinstance(fake.granularity, PerGroupedChannelGranularity) and fake._resolved_axis not in (0, 1):
        return f"grouped channels on axis {fake._resolved_axis}"
    return None


def _layout(fake: _KMeansFakePalettize, shape: torch.Size, num_luts: int, width: int):
    """``(axis, num_luts, rows, cols)`` of the k-means 2-D view, and the index width that keeps
    every byte inside one LUT (``width``, else 8)."""
    rows, cols = fake.reshape_strategy.reshape_for_kmeans(torch.empty(shape, device="meta"),
                                                          fake._resolved_axis).shape
    grouped = isinstance(fake.granularity, PerGroupedChannelGranularity)
    axis = fake._resolved_axis if grouped and num_luts > 1 else 0
    per_byte = 8 // width
    if axis == 0:
        aligned = num_luts == 1 or (rows * cols // num_luts) % per_byte == 0
    else:
        aligned = cols % num_luts == 0 and (cols // num_luts) % per_byte == 0
    return (axis, num_luts, rows, cols), (width if aligned else 8)


CACHE_ENV = "COREAI_PALETTIZE_COMPACT_CACHE"
"""``1`` keeps each rebuilt frozen weight until its LUT changes (a dense-sized tensor per weight:
faster forwards, none of the memory saving); default ``0``, rebuilt on every forward."""


def _cache_enabled() -> bool:
    return os.environ.get(CACHE_ENV, "0") == "1"


def is_compact(fake: Any) -> bool:
    return isinstance(fake, CompactKMeansFakePalettize)


class CompactKMeansFakePalettize(_KMeansFakePalettize):
    """A clustered k-means fake palettizer holding packed indices instead of a dense weight."""

    compact_width: int
    compact_layout: tuple
    dense_shape: torch.Size
    dense_dtype: torch.dtype
    train_lut: str | None
    """Attribute of the trainable LUT the training forward gathers from (``lut`` strategy)."""

    @property
    def indices(self) -> torch.Tensor:
        """The unpacked uint8 indices in coreai-opt's layout (on the packed indices' device)."""
        _axis, _, rows, cols = self.compact_layout
        grid = unpack_bits(self.packed_indices, self.compact_width, rows * cols).view(rows, cols)
        return self.reshape_strategy.reshape_to_original(grid, self._resolved_axis,
                                                         self.dense_shape)

    @indices.setter
    def indices(self, value: torch.Tensor | None) -> None:
        if value is None:
            raise RuntimeError(f"{self.tensor_fqn}: a compact palettized weight cannot drop "
                               "its indices")
        grid = self.reshape_strategy.reshape_for_kmeans(value, self._resolved_axis)
        self.packed_indices = pack_bits(grid.contiguous(), self.compact_width).to(
            self.centroids.device)

    def dense_placeholder(self) -> torch.Tensor:
        """A zero-storage stand-in with the dense weight's shape, dtype and device."""
        dtype = self.centroids.dtype if self.centroids is not None else self.dense_dtype
        return torch.zeros((), dtype=dtype, device=self.packed_indices.device).expand(
            self.dense_shape)

    def rebuild(self, lut: torch.Tensor | None = None) -> torch.Tensor:
        """The palettized weight, in the LUT's dtype (differentiable w.r.t. ``lut``)."""
        lut = self.centroids if lut is None else lut
        flat = lut.reshape(lut.shape[0], lut.shape[1])
        packed = self.packed_indices.to(flat.device)
        if flat.requires_grad and torch.is_grad_enabled():
            grid = _ByteTableGather.apply(flat, packed, self.compact_width, self.compact_layout)
        else:
            grid = _gather(_byte_table(flat.detach(), self.compact_width), packed,
                           self.compact_layout)
        weight = self.reshape_strategy.reshape_to_original(grid, self._resolved_axis,
                                                           self.dense_shape)
        if self.enable_per_channel_scale:
            weight = self._unscale_by_per_channel_scale(weight)
        return weight

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.training and self.train_lut is not None:
            return self.rebuild(getattr(self, self.train_lut))
        if not _cache_enabled():
            return self.rebuild()
        key = (self.centroids, self.centroids._version, self.packed_indices._version,
               None if self.per_channel_scale is None else self.per_channel_scale._version)
        cached = self.__dict__.get("_compact_cache")
        if cached is None or cached[0][0] is not key[0] or cached[0][1:] != key[1:]:
            with torch.no_grad():
                cached = (key, self.rebuild())
            self.__dict__["_compact_cache"] = cached
        return cached[1]

    def hard_assign(self, weight: torch.Tensor) -> torch.Tensor:
        return self.rebuild()

    def ensure_initialized(self, tensor: torch.Tensor) -> None:
        pass

    def _invalidate(self) -> None:
        raise RuntimeError(f"{self.tensor_fqn}: a compact palettized weight has no dense weight "
                           "to re-cluster (set palettize.compact=false to keep it)")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Loads compact state (``packed_indices``) or dense state (``indices``, packed here)."""
        packed = state_dict.pop(prefix + PACKED, None)
        dense = state_dict.pop(prefix + "indices", None)
        _FakePalettizeImplBase._load_from_state_dict(self, state_dict, prefix, local_metadata,
                                                     strict, missing_keys, unexpected_keys,
                                                     error_msgs)
        device = self.fake_palett_enabled.device
        if packed is not None:
            self.packed_indices = packed.to(device, torch.uint8)
        elif dense is not None:
            self.indices = dense
        if (packed is not None or dense is not None) and prefix + PACKED in missing_keys:
            missing_keys.remove(prefix + PACKED)
        self._centroids_initialized = self.centroids is not None


def make_compact(fake: _KMeansFakePalettize, parametrizations: list[nn.Module],
                 train_lut: str | None = None,
                 indices: torch.Tensor | None = None) -> None:
    """Make a clustered ``fake`` compact in place; empty the dense ``original`` of each of
    ``parametrizations`` (the lists that hold it: a tied weight has two). ``indices`` (dense
    uint8, coreai-opt layout) default to the fake's own; a fake restored from compact state
    passes ``None`` and gets its packed indices from ``load_state_dict``."""
    original = parametrizations[0].original
    shape, dtype = original.shape, original.dtype
    num_luts = fake.centroids.shape[0] if fake.centroids is not None else None
    if num_luts is None:
        blocks, _ = fake._reshape_and_block(meta_like(original))
        num_luts = len(blocks)
    layout, width = _layout(fake, shape, num_luts, storage_width(fake.n_bits))
    if indices is None and fake.indices is not None and not fake._indices_stale:
        indices = fake.indices
    device = fake.centroids.device if fake.centroids is not None else original.device
    fake.__class__ = CompactKMeansFakePalettize
    fake._buffers.pop("indices", None)
    fake.compact_width, fake.compact_layout = width, layout
    fake.dense_shape, fake.dense_dtype, fake.train_lut = shape, dtype, train_lut
    fake.register_buffer(PACKED, torch.zeros(0, dtype=torch.uint8, device=device))
    if indices is not None:
        fake.indices = indices
    fake._indices_stale = False
    for plist in parametrizations:
        param = plist.original
        param.grad = None  # requires_grad stays: optimizer groups must match across resumes
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        param._plugin_emptied = True
    global _EMPTIED_PENDING
    _EMPTIED_PENDING = True


_EMPTIED_PENDING = False


def drop_emptied_optimizer_state(optimizer: torch.optim.Optimizer, *args: Any) -> None:
    """Optimizer step post-hook: free the state (AdamW moments) an optimizer still holds for
    dense weights that became compact (after a PAT warm-up, or loaded from a checkpoint)."""
    global _EMPTIED_PENDING
    if not _EMPTIED_PENDING:
        return
    for param in list(optimizer.state):
        if getattr(param, "_plugin_emptied", False) and optimizer.state[param]:
            optimizer.state[param] = {}
    _EMPTIED_PENDING = False
