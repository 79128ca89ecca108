"""Run under `torchrun --nproc_per_node=2`: HF Trainer + PalettizationTrainerCallback on CPU."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _probe import KMEANS_CALLS, palettized_state_hash, record
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TokenDataset, tiny_llama

from coreai_palettize_plugins.hf import PalettizationTrainerCallback


class Probe(TrainerCallback):
    def __init__(self, out: Path, callback: PalettizationTrainerCallback) -> None:
        self.out, self.callback = out, callback

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        stats = self.callback.engine.cluster_stats
        record(self.out, args.process_index, hash_after_prepare=palettized_state_hash(model),
               kmeans_at_prepare=list(KMEANS_CALLS),
               bytes_per_weight=stats.bytes_per_weight if stats else None)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        record(self.out, args.process_index, hash_at_end=palettized_state_hash(model),
               kmeans_total=list(KMEANS_CALLS), global_step=state.global_step,
               engine_step=self.callback.engine.step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", default="sharded")
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    callback = PalettizationTrainerCallback("w4", distributed=args.mode, export_formats=["torch"],
                                            export_dir=args.out / "export")
    training = TrainingArguments(
        str(args.out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        save_steps=2, logging_steps=1, report_to=[], use_cpu=True, ddp_backend="gloo",
        disable_tqdm=True, seed=0)
    trainer = Trainer(model=tiny_llama(), args=training, train_dataset=TokenDataset(),
                      callbacks=[callback])
    trainer.add_callback(Probe(args.out, callback))
    try:
        trainer.train(resume_from_checkpoint=args.resume)
    except Exception as error:
        record(args.out, training.process_index, error=f"{type(error).__name__}: {error}")
        raise
    record(args.out, training.process_index, exported=callback.export_result is not None)


if __name__ == "__main__":
    main()
