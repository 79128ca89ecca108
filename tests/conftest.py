"""Shared fixtures. Everything is tiny, local and CPU-only."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# A fresh torch-extension build dir per test session: a lock left by a killed build elsewhere
# cannot hang coreai-opt's k-means JIT build here. Set before coreai_opt is imported.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="torch_extensions_"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import coreai_palettize_plugins.settings  # noqa: F401  (registers the palettize/base schema)

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collection_modifyitems(config, items):
    """``nightly`` tests (the architecture matrix's long tail) run with PALETTIZE_NIGHTLY=1."""
    if os.environ.get("PALETTIZE_NIGHTLY") == "1":
        return
    skip = pytest.mark.skip(reason="nightly: set PALETTIZE_NIGHTLY=1")
    for item in items:
        if "nightly" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _threads_and_seed():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield


@pytest.fixture
def compose_config(tmp_path):
    """compose(overrides) -> DictConfig of the real conf/ tree (output_dir in tmp_path)."""
    from hydra import compose, initialize_config_dir

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=[*overrides, f"output_dir={tmp_path / 'run'}"])

    return _compose
