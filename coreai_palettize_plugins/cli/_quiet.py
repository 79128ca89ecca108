"""Drop two known, harmless log lines that importing coreai-opt (via torchao) prints on CPU builds.

torchao warns that its CUDA kernels (``_C_mxfp8``, ``_C_cutlass_90a``) cannot load, and torch's
pytree registry warns about torchao's Enum registrations. Neither affects palettization; on a
user's terminal they bury the plugin's own messages (a one-line config error most of all).
Installed by the applications (``coreai-palettize``, ``examples/train.py``), never on import.
"""

from __future__ import annotations

import logging


class _DropKnownNoise(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(fragment in message for fragment in self.fragments)


def install() -> None:
    logging.getLogger("torchao").addFilter(_DropKnownNoise("Failed to load"))
    logging.getLogger("torch.utils._pytree").addFilter(
        _DropKnownNoise("is an Enum subclass and is now natively supported"))
