"""One weight clustered on its own with coreai-opt's k-means at another spec (the budget's trial
runs), and switching an attached, not yet clustered weight to another spec."""

from __future__ import annotations

import torch
from coreai_opt.inspection._bpw_utils import tensor_storage_bits
from coreai_opt.palettization.kmeans.kmeans_fake_palettize import _KMeansFakePalettize
from coreai_opt.palettization.spec import PerGroupedChannelGranularity, PerTensorGranularity

from .tensors import PalettizedTensor, is_placeholder, meta_like, set_placeholder

__all__ = ["granularity_for", "lut_count", "respec", "respec_tensor", "trial_bits",
           "trial_palettize"]


def granularity_for(group_size: int | None, axis: int | None):
    """coreai-opt granularity: per-tensor (``group_size`` None) or grouped channels."""
    if group_size is None:
        return PerTensorGranularity()
    return PerGroupedChannelGranularity(axis=axis if axis is not None else 0,
                                        group_size=group_size)


def trial_palettize(template: _KMeansFakePalettize, weight: torch.Tensor, n_bits: int,
                    granularity, sensitivities: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, int] | None:
    """``(q(weight), storage bits)`` for ``weight`` palettized like ``template`` but with
    ``n_bits`` and ``granularity``: a new fake palettizer runs coreai-opt's own k-means
    (``_cluster_to_centroids``, sensitivity-weighted when given) and nearest-centroid assignment;
    the bits are what ``coreai_opt.inspection.bits_per_weight`` counts (indices + LUTs + scales).
    None when the shape is incompatible with ``granularity``."""
    fake = _new_fake(template, n_bits, granularity, sensitivities)
    weight = weight.detach()
    if not fake.check_compatible(weight):
        return None
    with torch.no_grad():
        fake._initialize(weight)
        quantized = fake.hard_assign(weight)
    return quantized, int(tensor_storage_bits(weight, fake))


def trial_bits(template: _KMeansFakePalettize, weight: torch.Tensor, n_bits: int,
               granularity) -> int | None:
    """The storage bits ``trial_palettize`` would report for this choice, from the shapes alone
    (no k-means, no data read: a meta copy); None when the shape is incompatible."""
    fake = _new_fake(template, n_bits, granularity, None)
    meta = meta_like(weight)
    if not fake.check_compatible(meta):
        return None
    return int(tensor_storage_bits(meta, fake))


def lut_count(template: _KMeansFakePalettize, weight: torch.Tensor, granularity) -> int | None:
    """How many LUTs ``weight`` gets with ``granularity`` (None: incompatible shape); no data
    is read (the blocks are cut from a meta copy, as coreai-opt's ``check_compatible`` does)."""
    fake = _new_fake(template, template.n_bits, granularity, None)
    if not fake.check_compatible(weight):
        return None
    blocks, _ = fake._reshape_and_block(meta_like(weight))
    return len(blocks)


def _new_fake(template: _KMeansFakePalettize, n_bits: int, granularity,
              sensitivities: torch.Tensor | None) -> _KMeansFakePalettize:
    fake = _KMeansFakePalettize(
        n_bits=n_bits, lut_qspec=template.lut_qspec, granularity=granularity,
        cluster_dim=template.cluster_dim,
        enable_per_channel_scale=template.enable_per_channel_scale,
        sensitivities=sensitivities,
        enable_fast_kmeans_mode=template.enable_fast_kmeans_mode,
        rounding_precision=template.rounding_precision,
        vector_kmeans_config=template.vector_kmeans_config.model_dump(),
        sparsity_detection_threshold=template.sparsity_detection_threshold)
    fake.reshape_strategy = template.reshape_strategy  # the op's reshape (stateless mixin)
    fake.tensor_fqn = template.tensor_fqn
    return fake


def respec(fake: _KMeansFakePalettize, n_bits: int, granularity) -> None:
    """Switch a weight to ``n_bits`` / ``granularity`` before k-means (coreai-opt reads both only
    when it clusters), or to the spec of the centroids a checkpoint restored (resume)."""
    centroids = fake.centroids
    if centroids is not None and centroids.dim() >= 2 and centroids.shape[1] != 2 ** n_bits:
        raise RuntimeError(f"{fake.tensor_fqn}: holds {centroids.shape[1]}-entry LUTs; cannot "
                           f"switch it to {n_bits} bits")
    fake.n_bits = int(n_bits)
    fake.granularity = granularity


def respec_tensor(tensor: PalettizedTensor, n_bits: int, granularity) -> None:
    """``respec`` a weight; a placeholder LUT it holds (zeros not clustered yet, that a sharded
    checkpoint can restore into: FSDP2) takes the new spec's shape."""
    from .layouts import centroids_shape

    fake = tensor.fake
    placeholder = is_placeholder(fake)
    if placeholder:
        fake.centroids = None
    respec(fake, n_bits, granularity)
    if placeholder:
        set_placeholder(fake, centroids_shape(tensor), tensor.original.dtype,
                        tensor.original.device)
