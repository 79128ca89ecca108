"""2-process Lightning DDP run on CPU (gloo) with PalettizationCallback; facts per rank as JSON."""

from __future__ import annotations

import argparse
import os
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
        stats = self.callback.engine.cluster_stats
        record(self.out, trainer.global_rank, hash_after_prepare=palettized_state_hash(pl_module),
               kmeans_at_prepare=list(KMEANS_CALLS),
               owners=stats.owners if stats else None,
               bytes_per_weight=stats.bytes_per_weight if stats else None)

    def on_after_backward(self, trainer, pl_module):
        trainable = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        missing = [n for n, p in trainable if p.grad is None]
        record(self.out, trainer.global_rank, trainable=len(trainable),
               params_without_grad=sorted(set(missing) | set(self._missing())))

    def _missing(self) -> list[str]:
        import json
        path = self.out / f"rank{int(os.environ.get('LOCAL_RANK', '0'))}.json"
        return json.loads(path.read_text()).get("params_without_grad", []) if path.exists() else []

    def on_train_end(self, trainer, pl_module):
        record(self.out, trainer.global_rank, hash_at_end=palettized_state_hash(pl_module),
               kmeans_total=list(KMEANS_CALLS), global_step=trainer.global_step,
               engine_step=self.callback.engine.step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", default="sharded")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--start-step", type=int, default=0)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--rank1-preset", default=None)
    parser.add_argument("--training", default="frozen")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = DigitsCNN()
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    preset = args.rank1_preset if (args.rank1_preset and rank == 1) else "w4"
    callback = PalettizationCallback(preset, overrides={"linear": "w8"}, distributed=args.mode,
                                     export_dir=args.out / "export", export_formats=["torch"],
                                     schedule={"start_step": args.start_step},
                                     training=args.training)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=args.epochs,
        limit_train_batches=6, limit_val_batches=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(args.out),
        callbacks=[callback, Probe(args.out, callback),
                   ModelCheckpoint(dirpath=args.out / "ckpt", save_top_k=-1, filename="{epoch}")])
    try:
        trainer.fit(model, DigitsDataModule(), ckpt_path=args.ckpt)
    except Exception as error:
        record(args.out, trainer.global_rank, error=f"{type(error).__name__}: {error}")
        raise
    record(args.out, trainer.global_rank, exported=callback.export_result is not None,
           settings_preset=callback.engine.settings.preset)


if __name__ == "__main__":
    main()
