"""Run under `accelerate launch --multi_gpu --num_processes 2 ...` on CPU: an HF Trainer script
with PalettizationTrainerCallback, as a user writes it (TrainingArguments(use_cpu=True))."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _probe import palettized_state_hash, record
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TokenDataset, tiny_llama

from coreai_palettize_plugins.hf import PalettizationTrainerCallback


class Probe(TrainerCallback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        record(self.out, args.process_index, hash_after_prepare=palettized_state_hash(model))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        record(self.out, args.process_index, hash_at_end=palettized_state_hash(model),
               global_step=state.global_step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    callback = PalettizationTrainerCallback("w4", overrides={"embedding": None},
                                            modules={"lm_head": "w8"}, export_formats=["torch"],
                                            export_dir=args.out / "export")
    training = TrainingArguments(
        str(args.out / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
        save_strategy="no", logging_steps=1, report_to=[], use_cpu=True, ddp_backend="gloo",
        disable_tqdm=True, seed=0)
    trainer = Trainer(model=tiny_llama(tied=True), args=training, train_dataset=TokenDataset(),
                      callbacks=[callback, Probe(args.out)])
    record(args.out, training.process_index, world_size=training.world_size,
           distributed_type=str(trainer.accelerator.distributed_type))
    trainer.train()
    record(args.out, training.process_index, exported=callback.export_result is not None)


if __name__ == "__main__":
    main()
