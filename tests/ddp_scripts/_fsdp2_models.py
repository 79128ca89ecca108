"""What the FSDP2 scripts and ``test_fsdp2.py`` share (no side effects on import)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.distributed.fsdp import fully_shard

from coreai_palettize_plugins.accuracy.calibration import CalibrationData

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import tiny_llama

ENGINE_MODULES = {"lm_head": "w8"}  # per-tensor: gathered to an owner; the w4 layers: local


def global_batch() -> torch.Tensor:
    """The engine script's global batch (2 sequences: one per rank)."""
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def calibration_set(n: int = 8) -> list[torch.Tensor]:
    """Token sequences to calibrate on (one sample each)."""
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 256, (16,), generator=g) for _ in range(n)]


def calibration_data(model: torch.nn.Module) -> CalibrationData:
    """What an adapter would hand the engine for ``palettize.calibration`` (map-style: batch b
    of 1 on rank b % world)."""
    def loss(batch: torch.Tensor, index: int) -> torch.Tensor:
        return model(input_ids=batch, labels=batch).loss

    return CalibrationData(loss=loss, dataset=calibration_set(), collate_fn=torch.stack,
                           batch_size=1)


def accuracy_settings(samples: int, path: str | None, bits: float) -> dict:
    """``palettize.calibration`` / ``budget`` keys of the engine runs (none when 0)."""
    settings: dict = {}
    if samples:
        settings["calibration"] = {"samples": samples, "path": path, "show_progress": False}
    if bits:
        settings["budget"] = {"bits_per_weight": bits, "choices": [2, 4, 8]}
    return settings


class TinyLlamaModule(pl.LightningModule):
    """A tiny Llama whose ``configure_model`` shards every decoder layer, then the root."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.model = tiny_llama()

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
