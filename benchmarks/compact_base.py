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
import os
import statistics
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from coreai_palettize_plugins import Palettization
from coreai_palettize_plugins import _coreai_compat as compat
from coreai_palettize_plugins.compact import compact_state_bytes

BATCH, LENGTH = 4, 128


def llama_27m(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=4096,
                         max_position_embeddings=LENGTH, tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(dtype)


def prepared(training: str, compact: bool, dtype: torch.dtype = torch.float32):
    model = llama_27m(dtype)
    engine = Palettization("w4", training=training, compact=compact, export_formats=())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.prepare(model, torch.zeros(1, 16, dtype=torch.long))
    return model, engine


class Arm:
    """One training setup: model, optimizer, and one timed optimizer step."""

    def __init__(self, model, engine=None, cache: bool = False) -> None:
        self.model, self.engine, self.cache = model, engine, cache
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                           lr=1e-4)
        self.steps = 0
        model.train()
        if engine is not None:
            engine.start_training(0)
        generator = torch.Generator().manual_seed(0)
        self.batch = torch.randint(0, 4096, (BATCH, LENGTH), generator=generator)

    def step(self) -> float:
        os.environ[compat.CACHE_ENV] = "1" if self.cache else "0"
        start = time.perf_counter()
        loss = self.model(input_ids=self.batch, labels=self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.engine is not None:
            self.engine.after_optimizer_step(self.steps)
        return time.perf_counter() - start


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
    arms = {"dense fp32": Arm(dense32)}
    for training in ("frozen", "lut"):
        for compact in (False, True):
            if training == "lut" and not compact:
                continue
            model, engine = prepared(training, compact)
            label = f"{training}{'' if compact else ' (compact: false)'}"
            state[label] = compact_state_bytes(model)
            if training == "frozen":
                arms[label] = Arm(model, engine)
                if compact:
                    arms["frozen + cache"] = Arm(model, engine, cache=True)
            del model, engine
    bf16_model, _ = prepared("frozen", True, torch.bfloat16)
    state["frozen bf16"] = compact_state_bytes(bf16_model)
    del bf16_model

    times: dict[str, list[float]] = {name: [] for name in arms}
    for arm in arms.values():  # warm-up step (allocator, caches)
        arm.step()
    for _ in range(args.rounds):
        for name, arm in arms.items():
            times[name].extend(arm.step() for _ in range(args.steps))
    cache = cached_bytes(arms["frozen + cache"].model)

    print(f"27M Llama ({params / 1e6:.1f}M parameters, tied embeddings), w4, CPU, 1 thread\n")
    print("| arm | model state | vs dense bf16 | vs dense fp32 |")
    print("|---|---|---|---|")
    for name, size in state.items():
        print(f"| {name} | {size / 2**20:.1f} MiB | {size / state['dense bf16']:.3f}x | "
              f"{size / state['dense fp32']:.3f}x |")
    dense = statistics.median(times["dense fp32"])
    print(f"\n| arm (fp32 model) | step, batch {BATCH}x{LENGTH} (median of "
          f"{args.rounds}x{args.steps}, interleaved) | vs dense |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} s | {median / dense:.2f}x |")
    print(f"\nThe cache keeps {cache / 2**20:.1f} MiB of rebuilt weights alive "
          f"({cache / state['dense fp32']:.2f}x the dense fp32 model state).")


if __name__ == "__main__":
    main()
