"""2-process Lightning DDP run on CPU (gloo) with ``palettize.budget``; facts per rank as JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from _probe import KMEANS_CALLS, palettized_state_hash, record
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from coreai_palettize_plugins.demo.digits import DigitsCNN, DigitsDataModule
from coreai_palettize_plugins.lightning import PalettizationCallback


class Probe(Callback):
    def __init__(self, out: Path, callback: PalettizationCallback) -> None:
        self.out, self.callback = out, callback

    def on_fit_start(self, trainer, pl_module):
        engine = self.callback.engine
        record(self.out, trainer.global_rank, allocation=engine.allocation.to_dict(),
               kmeans_at_prepare=list(KMEANS_CALLS), hash_after_prepare=palettized_state_hash(
                   pl_module), report_bpw=engine.report().bits_per_weight,
               report_bits={r.name: r.n_bits for r in engine.report().layers})

    def on_train_end(self, trainer, pl_module):
        record(self.out, trainer.global_rank, hash_at_end=palettized_state_hash(pl_module),
               kmeans_total=list(KMEANS_CALLS))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bits", type=float, default=3.5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--ckpt", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = DigitsCNN()
    callback = PalettizationCallback(
        "w4", training="ste", export_formats=[],
        budget={"bits_per_weight": args.bits, "choices": [2, 3, 4, 6, 8]})
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=args.epochs,
        limit_train_batches=3, limit_val_batches=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(args.out),
        callbacks=[callback, Probe(args.out, callback),
                   ModelCheckpoint(dirpath=args.out / "ckpt", save_top_k=-1, filename="{epoch}")])
    try:
        trainer.fit(model, DigitsDataModule(), ckpt_path=args.ckpt)
    except Exception as error:
        record(args.out, trainer.global_rank, error=f"{type(error).__name__}: {error}")
        raise


if __name__ == "__main__":
    main()
