"""The export: ``.aimodel``, the packed artifact, the compression report and its plots.

``coreai_palettize_plugins.export`` was a module: its names are re-exported from ``writer``.
"""

from .writer import (
    AIMODEL_NAME,
    MANIFEST_NAME,
    PACKED_NAME,
    ExportError,
    ExportResult,
    atomic_directory,
    check_export_dir,
    export_palettized,
    load_palettized,
    pack_indices,
    unpack_indices,
)

__all__ = [
    "AIMODEL_NAME",
    "MANIFEST_NAME",
    "PACKED_NAME",
    "ExportError",
    "ExportResult",
    "atomic_directory",
    "check_export_dir",
    "export_palettized",
    "load_palettized",
    "pack_indices",
    "unpack_indices",
]
