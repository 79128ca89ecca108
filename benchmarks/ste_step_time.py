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
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")   # coreai-opt's k-means progress bars

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import LLAMA_4X256, TrainArm, interleaved, llama, table, tokens, training_state_bytes

from coreai_palettize_plugins import Palettization
from coreai_palettize_plugins.core import strategies

ARMS = ("dense", "ste before", "ste uncached", "ste cached")
COUNT_BELOW_MAX_K = strategies.COUNT_BELOW_MAX_K
SETTINGS = {"4x512": (4, 512, 1), "accumulate 4 x (4x128)": (4, 128, 4)}


def make_arm(name: str, base) -> TrainArm:
    """``ste before``: without the count-below-max-k shortcut; ``ste cached``: with the cache."""
    model, engine = copy.deepcopy(base), None
    if name != "dense":
        engine = Palettization("w4", training="ste")
        engine.prepare(model, torch.zeros(1, 8, dtype=torch.long))

    def shortcut() -> None:
        strategies.COUNT_BELOW_MAX_K = 0 if name == "ste before" else COUNT_BELOW_MAX_K

    return TrainArm(model, engine, env={strategies.CACHE_ENV: "1" if name == "ste cached"
                                        else "0"}, before_step=shortcut)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = llama(LLAMA_4X256)
    print(f"Llama from config ({sum(p.numel() for p in base.parameters()):,} parameters: hidden "
          f"256, 4 layers, vocab 4096), AdamW, w4 ste, 1 thread, torch {torch.__version__}; "
          f"{args.rounds} rounds x {args.steps} timed steps per arm\n")
    rows = []
    for setting, (batch, seq, accumulate) in SETTINGS.items():
        arms = {name: make_arm(name, base) for name in ARMS}
        batches = [tokens((batch, seq), LLAMA_4X256["vocab_size"], seed=i)
                   for i in range(accumulate)]
        medians = interleaved({n: (lambda a=a, b=batches: a.step(b)) for n, a in arms.items()},
                              args.rounds, args.steps)
        for name, arm in arms.items():
            state = training_state_bytes(arm.model, arm.optimizer, ("_plugin_ste_cache",))
            rows.append((setting, name, f"{medians[name]:.3f}",
                         f"{medians[name] / medians['dense']:.2f}x", f"{state / 2**20:.1f}"))
            arm.stop()
    print(table(["setting", "arm", "median step (s)", "ratio to dense", "model state (MiB)"],
                rows))

if __name__ == "__main__":
    main()
