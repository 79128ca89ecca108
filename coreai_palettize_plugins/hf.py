"""``coreai_palettize_plugins.hf``: the old path of ``coreai_palettize_plugins.integrations.hf``
(the same module object).
"""

# relayout: alias module
import sys

from .integrations import hf as _module

sys.modules[__name__] = _module
