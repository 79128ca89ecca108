"""2-process Lightning ModelParallelStrategy (FSDP2, gloo, CPU) run of a tiny Llama with
PalettizationCallback; facts per rank as JSON (LUT hash, k-means calls, step, export)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from _probe import KMEANS_CALLS, palettized_state_hash, record
from helpers import TokenDataset, tiny_llama
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from coreai_palettize_plugins.lightning import PalettizationCallback


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

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class Probe(Callback):
    def __init__(self, out: Path, callback: PalettizationCallback) -> None:
        self.out, self.callback = out, callback

    def on_fit_start(self, trainer, pl_module):
        record(self.out, trainer.global_rank, lut_hash_at_start=palettized_state_hash(pl_module),
               kmeans_at_start=list(KMEANS_CALLS))

    def on_train_end(self, trainer, pl_module):
        record(self.out, trainer.global_rank, lut_hash_at_end=palettized_state_hash(pl_module),
               kmeans_total=list(KMEANS_CALLS), global_step=trainer.global_step,
               engine_step=self.callback.engine.step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--training", default="ste")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    module = TinyLlamaModule(lr=args.lr)
    callback = PalettizationCallback("w4", example_inputs={"input_ids": torch.zeros(1, 16, dtype=torch.long)},
                                     export_dir=args.out / "export", export_formats=["torch"],
                                     training=args.training)
    data = torch.utils.data.DataLoader(TokenDataset(blocks=16, length=16), batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_steps=args.steps, logger=False,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(args.out),
        callbacks=[callback, Probe(args.out, callback),
                   ModelCheckpoint(dirpath=args.out / "ckpt", save_top_k=-1,
                                   every_n_train_steps=2, filename="{step}")])
    try:
        trainer.fit(module, data, ckpt_path=args.ckpt)
    except Exception as error:
        record(args.out, trainer.global_rank, error=f"{type(error).__name__}: {error}")
        raise
    record(args.out, trainer.global_rank, exported=callback.export_result is not None)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
