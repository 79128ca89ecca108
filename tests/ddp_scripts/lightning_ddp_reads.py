"""2-process Lightning DDP (gloo): a LightningModule whose ``setup`` reads every weight and whose
``configure_optimizers`` builds weight-decay groups from ``m.weight``, both after the callback
attached and before it clusters. Facts per rank as JSON (k-means calls at each point)."""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn as nn
from _probe import KMEANS_CALLS, record
from lightning_ddp import Probe

from coreai_palettize_plugins import _coreai_compat as compat
from coreai_palettize_plugins.demo.digits import DigitsCNN, DigitsDataModule
from coreai_palettize_plugins.lightning import PalettizationCallback


class ReadsWeights(DigitsCNN):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def _rank(self) -> int:
        return self.trainer.global_rank

    def setup(self, stage: str) -> None:
        weights = {n: m.weight for n, m in self.named_modules() if hasattr(m, "weight")}
        dense = all(weights[t.module_name] is t.original
                    for t in compat.fake_palettized_tensors(self))
        record(self.out, self._rank(), kmeans_in_setup=list(KMEANS_CALLS), setup_reads_dense=dense)

    def configure_optimizers(self):
        decay = [m.weight for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        chosen = {id(p) for p in decay}
        rest = [p for p in self.parameters() if id(p) not in chosen]
        originals = [t.original for t in compat.fake_palettized_tensors(self)]
        record(self.out, self._rank(), kmeans_in_configure_optimizers=list(KMEANS_CALLS),
               decay_holds_originals=all(any(p is q for q in decay) for p in originals))
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                  {"params": rest, "weight_decay": 0.0}], lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", default="sharded")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = ReadsWeights(args.out)
    callback = PalettizationCallback("w4", overrides={"linear": "w8"}, distributed=args.mode,
                                     export_formats=())
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=4,
        limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=str(args.out),
        callbacks=[callback, Probe(args.out, callback)])
    trainer.fit(model, DigitsDataModule())


if __name__ == "__main__":
    main()
