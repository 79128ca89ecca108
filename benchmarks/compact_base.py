"""Compact base (``palettize.compact``) on a 27M-parameter Llama (built from config, CPU, 1 thread).

Model state (parameters + buffers, after prepare + k-means) of dense fp32/bf16 and of the
``frozen``/``lut`` strategies with and without the compact base; step time (forward, backward,
AdamW) of ``frozen`` vs dense at batch 4x128, in interleaved rounds; ``frozen`` also with the
rebuilt-weight cache (``COREAI_PALETTIZE_COMPACT_CACHE=1``).

    PYTHONPATH=. python benchmarks/compact_base.py [--rounds 3] [--steps 3]

Prints a markdown table of ratios (measured side by side in this run).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import LLAMA_27M, TrainArm, interleaved, llama, table, tokens

from coreai_palettize_plugins import Palettization
from coreai_palettize_plugins import _coreai_compat as compat
from coreai_palettize_plugins.engine.compact import compact_state_bytes

BATCH, LENGTH = 4, 128


def llama_27m(dtype: torch.dtype = torch.float32):
    return llama(LLAMA_27M, dtype)


def prepared(training: str, compact: bool, dtype: torch.dtype = torch.float32):
    model = llama_27m(dtype)
    engine = Palettization("w4", training=training, compact=compact, export_formats=())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.prepare(model, torch.zeros(1, 16, dtype=torch.long))
    return model, engine


def arm(model, engine=None, cache: bool = False) -> TrainArm:
    """One training setup; ``cache``: the compact base's rebuilt-weight cache."""
    return TrainArm(model, engine, env={compat.CACHE_ENV: "1" if cache else "0"})


def cached_bytes(model) -> int:
    """Bytes of the rebuilt weights the cache holds (dense-sized, outside the model state)."""
    total = 0
    for t in compat.fake_palettized_tensors(model):
        cached = t.fake.__dict__.get("_compact_cache")
        if cached is not None:
            total += cached[1].numel() * cached[1].element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    dense32 = llama_27m()
    params = sum(p.numel() for p in dense32.parameters())
    state = {"dense fp32": compact_state_bytes(dense32),
             "dense bf16": compact_state_bytes(llama_27m(torch.bfloat16))}
    arms = {"dense fp32": arm(dense32)}
    for training in ("frozen", "lut"):
        for compact in (False, True):
            if training == "lut" and not compact:
                continue
            model, engine = prepared(training, compact)
            label = f"{training}{'' if compact else ' (compact: false)'}"
            state[label] = compact_state_bytes(model)
            if training == "frozen":
                arms[label] = arm(model, engine)
                if compact:
                    arms["frozen + cache"] = arm(model, engine, cache=True)
            del model, engine
    bf16_model, _ = prepared("frozen", True, torch.bfloat16)
    state["frozen bf16"] = compact_state_bytes(bf16_model)
    del bf16_model

    batch = [tokens((BATCH, LENGTH), LLAMA_27M["vocab_size"])]
    medians = interleaved({name: (lambda a=a: a.step(batch)) for name, a in arms.items()},
                          args.rounds, args.steps, rotate=False)
    cache = cached_bytes(arms["frozen + cache"].model)

    print(f"27M Llama ({params / 1e6:.1f}M parameters, tied embeddings), w4, CPU, 1 thread\n")
    print(table(["arm", "model state", "vs dense bf16", "vs dense fp32"], [
        (name, f"{size / 2**20:.1f} MiB", f"{size / state['dense bf16']:.3f}x",
         f"{size / state['dense fp32']:.3f}x") for name, size in state.items()]))
    dense = medians["dense fp32"]
    print()
    print(table(["arm (fp32 model)", f"step, batch {BATCH}x{LENGTH} (median of "
                 f"{args.rounds}x{args.steps}, interleaved)", "vs dense"],
                [(name, f"{m:.3f} s", f"{m / dense:.2f}x") for name, m in medians.items()]))
    print(f"\nThe cache keeps {cache / 2**20:.1f} MiB of rebuilt weights alive "
          f"({cache / state['dense fp32']:.2f}x the dense fp32 model state).")


if __name__ == "__main__":
    main()
