"""``coreai_palettize_plugins.calibration``: the old path of
``coreai_palettize_plugins.accuracy.calibration`` (the same module object).
"""

# relayout: alias module
import sys

from .accuracy import calibration as _module

sys.modules[__name__] = _module
