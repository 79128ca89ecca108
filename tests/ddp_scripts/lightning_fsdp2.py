"""2-process Lightning ModelParallelStrategy (FSDP2, gloo, CPU) run of a tiny Llama with
PalettizationCallback; facts per rank as JSON (LUT hash, k-means calls, step, export)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from _fsdp2_models import TinyLlamaModule, accuracy_settings
from _probe import KMEANS_CALLS, record
from helpers import TokenDataset, lut_hash
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from coreai_palettize_plugins.lightning import PalettizationCallback


class Probe(Callback):
    def __init__(self, out: Path, callback: PalettizationCallback) -> None:
        self.out, self.callback = out, callback

    def on_train_start(self, trainer, pl_module):  # after the callback's (listed first)
        record(self.out, trainer.global_rank, lut_hash_at_start=lut_hash(pl_module),
               kmeans_at_start=list(KMEANS_CALLS))

    def on_train_end(self, trainer, pl_module):
        record(self.out, trainer.global_rank, lut_hash_at_end=lut_hash(pl_module),
               kmeans_total=list(KMEANS_CALLS), global_step=trainer.global_step,
               engine_step=self.callback.engine.step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--training", default="ste")
    parser.add_argument("--formats", default="torch", help="comma-separated, or 'default'")
    parser.add_argument("--calibration", type=int, default=0, help="samples")
    parser.add_argument("--budget", type=float, default=0.0, help="bits_per_weight")
    parser.add_argument("--devices", type=int, default=2, help="1: one process, no FSDP2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    module = TinyLlamaModule(lr=args.lr)
    formats = {"export_formats": args.formats.split(",") if args.formats else []}
    callback = PalettizationCallback("w4", export_dir=args.out / "export",
                                     training=args.training,
                                     **(formats if args.formats != "default" else {}),
                                     **accuracy_settings(args.calibration, None, args.budget))
    # 2 batches of 2 per rank and epoch, every block the same: Lightning's epoch-end checkpoint
    # resumes with a different batch order, which must not matter here.
    dataset = TokenDataset(blocks=8, length=16)
    dataset.tokens[:] = dataset.tokens[0]
    data = torch.utils.data.DataLoader(dataset, batch_size=2)
    if args.devices == 1:  # the reference: one process, configure_model not sharding
        module.configure_model = lambda: None
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, max_steps=args.steps, logger=False,
        strategy=(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
                  if args.devices == 2 else "auto"),
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(args.out),
        callbacks=[callback, Probe(args.out, callback),
                   ModelCheckpoint(dirpath=args.out / "ckpt", save_top_k=-1,
                                   filename="{step}")])
    try:
        trainer.fit(module, data, ckpt_path=args.ckpt)
    except Exception as error:
        record(args.out, trainer.global_rank, error=f"{type(error).__name__}: {error}")
        raise
    engine = callback.engine
    record(args.out, trainer.global_rank, exported=callback.export_result is not None,
           calibration=engine.calibration_stats.to_dict() if engine.calibration_stats else None,
           allocation=engine.allocation.to_dict() if engine.allocation else None)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
