"""Wall time of ``prepare`` through the plugin versus raw coreai-opt, same model and config.

Arms (timed calls only; the deep copy of the initial model is made before the clock starts):

* raw:    ``KMeansPalettizer(model, build_palettizer_config(...)).prepare(example_inputs)``
* plugin: ``Palettization(...).prepare(model, example_inputs)`` (attach + k-means; it also takes a
  zero-memory meta copy of the model for export and runs the tracing forward under no_grad)

After one untimed warm-up of each arm (the first k-means call JIT-builds a C++ extension), each
round runs both arms on fresh deep copies of the same initial model, alternating which goes
first. The table reports medians over the rounds. Goal: plugin / raw <= 1.05.

    python benchmarks/prepare_overhead.py [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # coreai-opt's per-layer progress bar, both arms

import torch
import torch.nn as nn

from coreai_palettize_plugins import Palettization, build_palettizer_config

GOAL = 1.05


def digits_case() -> tuple[str, nn.Module, tuple[Any, ...], dict[str, Any]]:
    from coreai_palettize_plugins.demo.digits import DigitsCNN

    model = DigitsCNN()
    return ("DigitsCNN", model, (model.example_input_array,),
            {"config": "w4", "overrides": {"linear": "w8"}})


def llama_case(layers: int = 4) -> tuple[str, nn.Module, tuple[Any, ...], dict[str, Any]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=2048)
    model = LlamaForCausalLM(config).eval()
    return (f"Llama-{layers}L", model, (torch.randint(0, 2048, (1, 16)),), {"config": "w4"})


def run_raw(model: nn.Module, inputs: tuple[Any, ...], cfg: dict[str, Any]) -> nn.Module:
    from coreai_opt.palettization import KMeansPalettizer

    config = build_palettizer_config(cfg["config"], overrides=cfg.get("overrides"))
    return KMeansPalettizer(model, config).prepare(inputs)


def run_plugin(model: nn.Module, inputs: tuple[Any, ...], cfg: dict[str, Any]) -> nn.Module:
    engine = Palettization(cfg["config"], overrides=cfg.get("overrides"))
    return engine.prepare(model, inputs)


ARMS: dict[str, Callable[..., nn.Module]] = {"raw": run_raw, "plugin": run_plugin}


def timed(arm: str, initial: nn.Module, inputs: tuple[Any, ...], cfg: dict[str, Any]):
    model = copy.deepcopy(initial)
    gc.collect()
    start = time.perf_counter()
    prepared = ARMS[arm](model, inputs, cfg)
    return time.perf_counter() - start, prepared


@torch.no_grad()
def outputs(model: nn.Module, inputs: tuple[Any, ...]) -> torch.Tensor:
    out = model.eval()(*inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def bench(case, rounds: int) -> dict[str, Any]:
    name, initial, inputs, cfg = case
    results: dict[str, Any] = {}
    for arm in ARMS:  # warm-up: JIT build of the k-means extension, lazy imports, allocator
        _, results[arm] = timed(arm, initial, inputs, cfg)
    diff = float((outputs(results["raw"], inputs) - outputs(results["plugin"], inputs)).abs().max())
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for r in range(rounds):
        order = list(ARMS) if r % 2 == 0 else list(ARMS)[::-1]
        for arm in order:
            seconds, prepared = timed(arm, initial, inputs, cfg)
            times[arm].append(seconds)
            del prepared
    raw, plugin = (statistics.median(times[a]) for a in ("raw", "plugin"))
    return {"model": name, "params": sum(p.numel() for p in initial.parameters()),
            "raw": raw, "plugin": plugin, "ratio": plugin / raw, "diff": diff, "times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per model")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1-layer Llama")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cases = [digits_case(), llama_case(1 if args.quick else 4)]
    rows = [bench(case, rounds) for case in cases]

    print(f"\nprepare wall time, median of {rounds} interleaved rounds "
          f"(torch threads: {torch.get_num_threads()})\n")
    print("| model | params | raw coreai-opt s | plugin s | plugin/raw | goal <= 1.05 |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        ok = "met" if row["ratio"] <= GOAL else "MISSED"
        print(f"| {row['model']} | {row['params']:,} | {row['raw']:.4f} | {row['plugin']:.4f} "
              f"| {row['ratio']:.3f} | {ok} |")
    print()
    for row in rows:
        per_round = {a: " ".join(f"{t:.4f}" for t in ts) for a, ts in row["times"].items()}
        print(f"{row['model']}: raw [{per_round['raw']}] plugin [{per_round['plugin']}]; "
              f"max |output(raw) - output(plugin)| = {row['diff']:.3g}")


if __name__ == "__main__":
    main()
