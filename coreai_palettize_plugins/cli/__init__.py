"""The ``coreai-palettize`` command: finetune, show, inspect, report, recipes, budget.

``coreai_palettize_plugins.cli`` was a module: its names are re-exported from ``main``.
"""

from .main import main

__all__ = [
    "main",
]
