"""Tiny models and utilities shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from coreai_palettize_plugins._coreai_compat import KMEANS_ENTRY
from coreai_palettize_plugins.engine.distributed import palettized_state_hash

__all__ = ["KMeansCounter", "MixedNet", "TokenDataset", "count_kmeans", "example_image",
           "mixed_net", "palettized_state_hash", "run_python", "tiny_llama"]

REPO = Path(__file__).resolve().parents[1]


class MixedNet(nn.Module):
    """Linear, Conv2d and Conv1d in one model (for the palettize=none contract)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(1, 16, 3, padding=1)
        self.conv1d = nn.Conv1d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 64, 32)
        self.head = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2d(x))                  # (B, 16, 8, 8)
        h = torch.relu(self.conv1d(h.flatten(2)))       # (B, 16, 64)
        return self.head(torch.relu(self.fc(h.flatten(1))))


def mixed_net() -> MixedNet:
    torch.manual_seed(0)
    return MixedNet()


def example_image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def count_kmeans(record: Callable[[object], None], patch: Callable[[object, str, object], None]
                 ) -> None:
    """Call ``record(fake)`` before each coreai-opt k-means run (one per palettized weight);
    ``patch(owner, name, value)`` installs the wrapper (``monkeypatch.setattr`` or ``setattr``)."""
    owner, name = KMEANS_ENTRY
    original = getattr(owner, name)

    def counting(fake, *args, **kwargs):
        record(fake)
        return original(fake, *args, **kwargs)

    patch(owner, name, counting)


class KMeansCounter:
    """Counts coreai-opt k-means runs (one per palettized weight) via monkeypatch."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        count_kmeans(lambda fake: self.calls.append(fake.tensor_fqn), monkeypatch.setattr)


def run_python(*args: str, cwd: Path = REPO, timeout: int = 300,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python *args`` in a subprocess with the test environment; capture output."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def tiny_llama(tied: bool = False, seed: int = 0, intermediate_size: int = 128):
    """A 2-layer LlamaForCausalLM built from config (no hub)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                         max_position_embeddings=128, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


class TokenDataset(torch.utils.data.Dataset):
    """Random-but-fixed token blocks for causal LM training: {input_ids, labels}."""

    def __init__(self, blocks: int = 64, length: int = 32, vocab: int = 256, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab, (blocks, length), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def with_default_training(config_dict: dict, strategy: dict | None = None) -> dict:
    """A coreai-opt ``to_dict()`` with the plugin's default training strategy (``ste``) in every
    weight spec: what ``palettize=<preset>`` gives when ``palettize.training`` is not set. Only
    ``training_strategy_spec`` entries change; every palettization field stays coreai-opt's."""
    strategy = strategy or {"type": "ste", "lut_update_every": 0}

    def walk(node):
        if isinstance(node, dict):
            return {k: (dict(strategy) if k == "training_strategy_spec" and v is not None
                        else walk(v)) for k, v in node.items()}
        return node

    return walk(config_dict)


def lut_hash(model: nn.Module) -> str:
    """sha256 over every LUT (``centroids``) of a prepared model, names included (FSDP2 state
    dicts carry no derived ``ste`` indices, so compare the LUTs alone)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.endswith(".centroids"):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
