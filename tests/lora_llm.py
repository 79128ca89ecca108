"""A LightningModule around ``helpers.tiny_llama`` for the adapter tests (also the DDP script)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from helpers import TokenDataset, tiny_llama


class TinyLlamaModule(pl.LightningModule):
    """Causal-LM training of a tiny Llama; ``configure_optimizers`` takes every parameter, as
    most user modules do (frozen ones get no gradient, so AdamW skips them)."""

    def __init__(self, tied: bool = True, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = tiny_llama(tied)
        self.lr = lr
        self.example_input_array = {"input_ids": torch.randint(0, 256, (1, 16))}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def training_step(self, batch, batch_idx):
        return self.model(**batch, use_cache=False).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(TokenDataset(blocks=32, length=16), batch_size=8)
