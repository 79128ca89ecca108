"""2-process Lightning DDP (gloo) with ``palettize.calibration``: each rank records the
sensitivities it computed (saved as ``sens_rank<r>.pt``), the palettized state after k-means,
and how many calibration passes ran."""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from _probe import palettized_state_hash, record
from lightning.pytorch.callbacks import Callback

from coreai_palettize_plugins.accuracy import calibration
from coreai_palettize_plugins.demo.digits import DigitsCNN, DigitsDataModule
from coreai_palettize_plugins.lightning import PalettizationCallback

RUNS: list[int] = []
SENSITIVITIES: dict[str, torch.Tensor] = {}
_means, _accumulate = calibration._means, calibration._accumulate


def _recording_means(sums, n_batches):
    out = _means(sums, n_batches)
    SENSITIVITIES.update({k: v.clone() for k, v in out.items()})
    return out


def _counting_accumulate(params, loss_fn, batches, progress=None):
    RUNS.append(1)
    return _accumulate(params, loss_fn, batches, progress)


calibration._means = _recording_means
calibration._accumulate = _counting_accumulate


class Probe(Callback):
    def __init__(self, out: Path, callback: PalettizationCallback) -> None:
        self.out, self.callback = out, callback

    def on_fit_start(self, trainer, pl_module):
        rank = trainer.global_rank
        torch.save(SENSITIVITIES, self.out / f"sens_rank{rank}.pt")
        stats = self.callback.engine.calibration_stats
        record(self.out, rank, hash_after_prepare=palettized_state_hash(pl_module),
               calibration=stats.to_dict() if stats else None, calibration_runs=len(RUNS),
               owners=self.callback.engine.cluster_stats.owners
               if self.callback.engine.cluster_stats else None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=320)
    parser.add_argument("--ckpt", default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = DigitsCNN()
    callback = PalettizationCallback("w4", overrides={"linear": "w8"}, distributed="sharded",
                                     training="ste", export_formats=(),
                                     calibration={"samples": args.samples})
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=2,
        limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(args.out), callbacks=[callback, Probe(args.out, callback)])
    try:
        trainer.fit(model, DigitsDataModule(batch_size=64), ckpt_path=args.ckpt)
    except Exception as error:
        record(args.out, trainer.global_rank, error=f"{type(error).__name__}: {error}")
        raise
    trainer.save_checkpoint(args.out / "last.ckpt")  # every rank (a collective); rank 0 writes
    record(args.out, trainer.global_rank, global_step=trainer.global_step,
           report_calibration=callback.report.calibration)


if __name__ == "__main__":
    main()
