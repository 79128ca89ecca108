"""Offline demo task: a small CNN on scikit-learn's bundled 8x8 digits (no download)."""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset

__all__ = ["DigitsCNN", "DigitsDataModule", "EpochSeededSampler", "accuracy", "load_digits_tensors"]


def load_digits_tensors(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) from ``sklearn.datasets.load_digits``: 1437 / 360 images, stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y)

    def to_dataset(features, labels) -> TensorDataset:
        images = torch.tensor(features, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        return TensorDataset(images, torch.tensor(labels, dtype=torch.long))

    return to_dataset(x_train, y_train), to_dataset(x_test, y_test)


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``(seed, epoch)``; Lightning calls ``set_epoch``.

    The order of every epoch is then a function of the epoch alone, so a run resumed from a
    checkpoint sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class DigitsDataModule(pl.LightningDataModule):
    """Digits train/test split; the test split doubles as validation set."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.test_set = load_digits_tensors(self.seed)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(len(self.train_set), self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


class DigitsCNN(pl.LightningModule):
    """conv(1->c1)-conv(c1->c2)-linear(c2*64->hidden)-linear(hidden->10)."""

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 64, lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c2 * 64, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=stage == "train")
        if stage != "train":
            self.log(f"{stage}_acc", (logits.argmax(-1) == y).float().mean())
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch[0] if isinstance(batch, (list, tuple)) else batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` (eval mode; the mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(-1).cpu() == y).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)
