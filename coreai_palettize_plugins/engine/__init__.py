"""``Palettization``: the lifecycle that orchestrates the phases (attach, k-means across ranks,
compact base, checkpoints).

``coreai_palettize_plugins.engine`` was a module: its names are re-exported from ``lifecycle``.
"""

from .lifecycle import CallSpec, Palettization, PalettizationWarning, as_example_inputs

__all__ = [
    "CallSpec",
    "Palettization",
    "PalettizationWarning",
    "as_example_inputs",
]
