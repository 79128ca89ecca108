"""HF Trainer step time with palettization vs dense, side by side, on the tiny-llama-offline recipe.

    python benchmarks/hf_step_time.py [--rounds 3] [--steps 12]

Each round runs every arm (dense Trainer; Trainer + PalettizationTrainerCallback with the
frozen, ste and lut strategies) for ``--steps`` optimizer steps from the same starting weights,
in a rotating order; the time of each optimizer step (``on_step_begin`` -> ``on_step_end``) is
recorded after the first two steps of each run. Prints the median step time per arm and the ratio
to dense. Measured in one process, so the machine's noise hits every arm alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from transformers import Trainer, TrainerCallback, default_data_collator

from coreai_palettize_plugins.hf import PalettizationTrainerCallback
from coreai_palettize_plugins.recipes import (
    TokenBlocks,
    build_model,
    load_recipe,
    load_tokenizer,
    read_texts,
    split_blocks,
    tokenize_blocks,
)

ARMS = ("dense", "frozen", "ste", "lut")


class StepTimer(TrainerCallback):
    def __init__(self, skip: int = 2) -> None:
        self.skip, self.times, self._start = skip, [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.skip:
            self.times.append(time.perf_counter() - self._start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)  # robust to a busy machine; the ratios are what we report
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe("tiny-llama-offline", [f"train.output_dir={tmp}",
                                                    f"train.max_steps={args.steps}",
                                                    "train.save_strategy='no'"])
        tokenizer = load_tokenizer(recipe.model.tokenizer)
        blocks = tokenize_blocks(read_texts(recipe.data), tokenizer, recipe.data.seq_len)
        train_blocks, _ = split_blocks(blocks, recipe.data.eval_fraction, None)
        torch.manual_seed(0)
        base = build_model(recipe.model, tokenizer)
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for round_ in range(args.rounds):
            for arm in ARMS[round_ % len(ARMS):] + ARMS[:round_ % len(ARMS)]:
                timer = StepTimer()
                callbacks = [timer]
                if arm != "dense":
                    callbacks.insert(0, PalettizationTrainerCallback(
                        recipe.palettize | {"training": arm}, export_formats=()))
                trainer = Trainer(model=copy.deepcopy(base), args=recipe.training_args,
                                  train_dataset=TokenBlocks(train_blocks),
                                  data_collator=default_data_collator, callbacks=callbacks)
                trainer.train()
                times[arm] += timer.times
    dense = statistics.median(times["dense"])
    print(f"tiny-llama-offline ({sum(p.numel() for p in base.parameters()):,} parameters), "
          f"batch {recipe.training_args.per_device_train_batch_size} x {recipe.data.seq_len} "
          f"tokens, {args.rounds} rounds x {args.steps - 2} timed steps per arm\n")
    print("| arm | median step ms | vs dense |\n|---|---:|---:|")
    for arm in ARMS:
        median = statistics.median(times[arm])
        print(f"| {arm} | {1000 * median:.1f} | {median / dense:.2f}x |")


if __name__ == "__main__":
    main()
