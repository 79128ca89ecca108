"""``coreai_palettize_plugins.lightning``: the old path of
``coreai_palettize_plugins.integrations.lightning`` (the same module object).
"""

# relayout: alias module
import sys

from .integrations import lightning as _module

sys.modules[__name__] = _module
