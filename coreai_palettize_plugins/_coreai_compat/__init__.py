"""Every use of coreai-opt internals lives here (pinned to coreai-opt 0.4.x).

coreai-opt's public ``KMeansPalettizer.prepare`` builds the palettized structure *and* runs k-means
in one call, and keeps its PAT step counter private. Training integrations need both split:
build the structure before the model is wrapped and the optimizer exists, then cluster only if
no checkpoint restored the state, on the rank that owns each layer, and restore the step
counter on resume. These helpers do that with the least private surface; tests exercise each.
Upstream request: ``prepare(..., cluster=False)`` + ``cluster()`` and a public step setter.
"""

from .compact import (
    CACHE_ENV,
    CompactKMeansFakePalettize,
    compact_support,
    drop_emptied_optimizer_state,
    is_compact,
    make_compact,
    pack_bits,
    storage_width,
    unpack_bits,
)
from .derived import DerivedIndicesFakePalettize, derive_indices_on_read, drop_indices, forget_derived
from .exporting import COREAI_INDEX_BITS, LUT_NAME_MATCH, avoid_lut_name_match, widen_for_coreai
from .kmeans import STALE_LOCK_SECONDS, cluster_tensors, ensure_kmeans_extension, finish_clustering
from .layouts import (
    EXPORTABLE_EXPERTS_IMPLEMENTATION,
    ExpertsGroupedChannel,
    ExpertsLayout,
    apply_layouts,
    assignment_indices,
    centroids_shape,
    fit_granularity,
    flat_lut_positions,
    layout_name,
    lut_groups,
    prepare_from_state_dict,
    reshape_expert_luts,
    traceable_experts,
    use_exportable_experts,
)
from .sensitivities import (
    clear_kmeans_sensitivities,
    kmeans_sensitivities,
    set_kmeans_sensitivities,
)
from .structure import (
    FittedLayout,
    classes_before_parametrization,
    fitted_layout,
    insert_parametrizations,
    resolve_module_configs,
)
from .tensors import (
    KMEANS_ENTRY,
    PalettizedTensor,
    defer_clustering,
    deferred,
    end_deferral,
    fake_palettized_tensors,
    get_step,
    is_palettized_state,
    is_prepared,
    palettized_prefixes,
    set_step,
    tied_prefixes,
)
from .tracing import (
    consumer_op,
    every_use_palettized,
    function_name,
    palettizable_ops,
    record_first_consumers,
    resolved_module_configs,
    storage_bits,
    watch_weight_uses,
)
from .trial import granularity_for, lut_count, respec, respec_tensor, trial_bits, trial_palettize

__all__ = [
    "CACHE_ENV",
    "COREAI_INDEX_BITS",
    "EXPORTABLE_EXPERTS_IMPLEMENTATION",
    "KMEANS_ENTRY",
    "LUT_NAME_MATCH",
    "STALE_LOCK_SECONDS",
    "CompactKMeansFakePalettize",
    "DerivedIndicesFakePalettize",
    "ExpertsGroupedChannel",
    "ExpertsLayout",
    "FittedLayout",
    "PalettizedTensor",
    "apply_layouts",
    "assignment_indices",
    "avoid_lut_name_match",
    "centroids_shape",
    "classes_before_parametrization",
    "clear_kmeans_sensitivities",
    "cluster_tensors",
    "compact_support",
    "consumer_op",
    "defer_clustering",
    "deferred",
    "derive_indices_on_read",
    "drop_emptied_optimizer_state",
    "drop_indices",
    "end_deferral",
    "ensure_kmeans_extension",
    "every_use_palettized",
    "fake_palettized_tensors",
    "finish_clustering",
    "fit_granularity",
    "fitted_layout",
    "flat_lut_positions",
    "forget_derived",
    "function_name",
    "get_step",
    "granularity_for",
    "insert_parametrizations",
    "is_compact",
    "is_palettized_state",
    "is_prepared",
    "kmeans_sensitivities",
    "layout_name",
    "lut_count",
    "lut_groups",
    "make_compact",
    "pack_bits",
    "palettizable_ops",
    "palettized_prefixes",
    "prepare_from_state_dict",
    "record_first_consumers",
    "reshape_expert_luts",
    "resolve_module_configs",
    "resolved_module_configs",
    "respec",
    "respec_tensor",
    "set_kmeans_sensitivities",
    "set_step",
    "storage_bits",
    "storage_width",
    "tied_prefixes",
    "traceable_experts",
    "trial_bits",
    "trial_palettize",
    "unpack_bits",
    "use_exportable_experts",
    "watch_weight_uses",
    "widen_for_coreai",
]
