"""Straight-through (``ste``) step time vs dense, with and without the assignment cache.

    python benchmarks/ste_step_time.py [--rounds 3] [--steps 3]

A Llama built from config (hidden 256, 4 layers, vocab 4096), AdamW, one CPU thread, w4 ``ste``.
Four arms, each its own model from the same initial weights: ``dense``; ``ste before`` (the
behaviour before issue #10: a ``searchsorted`` assignment on every forward); ``ste uncached``
(the midpoint-counting assignment on every forward, ``COREAI_PALETTIZE_STE_CACHE=0``); ``ste
cached`` (the default: one assignment per dense-weight change). Two settings: batch 4 x 512 in
one forward, and gradient accumulation 4 over 4 x 128 micro-batches. Each round runs every arm
for ``--steps`` timed optimizer steps (after one untimed step), in a rotating order, so the
machine's noise hits every arm alike. Prints the median step time per arm, the ratio to dense
and the model-state memory (parameters, gradients, AdamW state, buffers, the strategy's cache).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")   # coreai-opt's k-means progress bars

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from coreai_palettize_plugins import Palettization, strategies

ARMS = ("dense", "ste before", "ste uncached", "ste cached")
COUNT_BELOW_MAX_K = strategies.COUNT_BELOW_MAX_K
SETTINGS = {"4x512": (4, 512, 1), "accumulate 4 x (4x128)": (4, 128, 4)}


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=4096,
                         max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


class Arm:
    def __init__(self, name: str, base: LlamaForCausalLM) -> None:
        self.name, self.model = name, copy.deepcopy(base).train()
        self.engine = None
        if name != "dense":
            self.engine = Palettization("w4", training="ste")
            self.engine.prepare(self.model, torch.zeros(1, 8, dtype=torch.long))
            self.engine.start_training(0)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.step = 0

    def train_step(self, batches: list[torch.Tensor]) -> float:
        os.environ[strategies.CACHE_ENV] = "1" if self.name == "ste cached" else "0"
        strategies.COUNT_BELOW_MAX_K = 0 if self.name == "ste before" else COUNT_BELOW_MAX_K
        start = time.perf_counter()
        for tokens in batches:
            loss = self.model(input_ids=tokens, labels=tokens).loss / len(batches)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.engine is not None:
            self.engine.after_optimizer_step(self.step)
        return time.perf_counter() - start

    def state_mib(self) -> float:
        """Parameters, gradients (as after backward), AdamW state, buffers, cached tensors."""
        tensors = {}
        for p in self.model.parameters():
            tensors[id(p)] = p.numel() * p.element_size() * (2 if p.requires_grad else 1)
        for b in self.model.buffers():
            tensors[id(b)] = b.numel() * b.element_size()
        for state in self.optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    tensors[id(v)] = v.numel() * v.element_size()
        for module in self.model.modules():
            cached = module.__dict__.get("_plugin_ste_cache")
            if cached is not None:
                tensors[id(cached[1])] = cached[1].numel() * cached[1].element_size()
        return sum(tensors.values()) / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = llama()
    generator = torch.Generator().manual_seed(0)
    print(f"Llama from config ({sum(p.numel() for p in base.parameters()):,} parameters: hidden "
          f"256, 4 layers, vocab 4096), AdamW, w4 ste, 1 thread, torch {torch.__version__}; "
          f"{args.rounds} rounds x {args.steps} timed steps per arm\n")
    print("| setting | arm | median step (s) | ratio to dense | model state (MiB) |")
    print("|---|---|---|---|---|")
    for setting, (batch, seq, accumulate) in SETTINGS.items():
        arms = [Arm(name, base) for name in ARMS]
        batches = [torch.randint(0, 4096, (batch, seq), generator=generator)
                   for _ in range(accumulate)]
        for arm in arms:
            arm.train_step(batches)                                  # untimed warm-up step
        times: dict[str, list[float]] = {name: [] for name in ARMS}
        for round_ in range(args.rounds):
            for arm in arms[round_ % len(arms):] + arms[:round_ % len(arms)]:
                times[arm.name] += [arm.train_step(batches) for _ in range(args.steps)]
        dense = statistics.median(times["dense"])
        for arm in arms:
            median = statistics.median(times[arm.name])
            print(f"| {setting} | {arm.name} | {median:.3f} | {median / dense:.2f}x | "
                  f"{arm.state_mib():.1f} |")
        for arm in arms:
            if arm.engine is not None:
                arm.engine.stop_training()


if __name__ == "__main__":
    main()
