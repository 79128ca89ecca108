"""Digits test accuracy of the offline default job: dense, right after k-means, fine-tuned.

For each palettize config and seed, composes the real Hydra config (``conf/``) and calls
``run(cfg)`` from ``examples/train.py`` (dense training, ``PalettizationCallback`` prepare,
palettization-aware fine-tuning, export). Reports mean +- sample sd over seeds of the dense
accuracy, the accuracy right after k-means (before any fine-tuning step) and after
fine-tuning. Goal: the fine-tuned palettized model keeps the dense accuracy (within about one
point for w4 + linear=w8 and w4; w2 is expected to need the fine-tuning to recover). The
default ``palettize.training`` is ``ste``; the ``training=frozen`` rows are coreai-opt's own
strategy, for comparison.

    python benchmarks/digits_accuracy.py [--seeds 0 1 2] [--configs NAME ...] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import coreai_palettize_plugins  # noqa: F401  (registers the palettize/base schema first)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "w4 + linear=w8": ["palettize=w4", "palettize.overrides.linear=w8"],
    "w4": ["palettize=w4"],
    "w2": ["palettize=w2"],
    "w2, training=frozen": ["palettize=w2", "palettize.training=frozen"],
    "w2 group 8": ["palettize=w2", "palettize.preset={preset: w2, group_size: 8}"],
    "w2 group 8, training=frozen": ["palettize=w2", "palettize.preset={preset: w2, group_size: 8}",
                                    "palettize.training=frozen"],
}
KEYS = ("dense_acc", "palettized_acc", "finetuned_acc")


def run_job(overrides: list[str], seed: int, extra: list[str]) -> dict[str, float]:
    from hydra import compose, initialize_config_dir
    from train import run  # examples/train.py (on sys.path, see main)

    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"seed={seed}", *extra,
                                               f"output_dir={Path(tmp) / 'run'}"])
        # train.run builds the model before pl.seed_everything(cfg.seed): seed the model's
        # initialisation here too, or each process starts from random (unseeded) weights.
        torch.manual_seed(seed)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run(cfg)
    return {k: float(result[k]) for k in KEYS}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="which rows to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="seed 0, w4 + linear=w8 only, 3 dense + 1 fine-tuning epochs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sys.path.insert(0, str(REPO / "examples"))
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch", "coreai_opt"):
        logging.getLogger(name).setLevel(logging.ERROR)

    seeds, configs, extra = args.seeds, {k: CONFIGS[k] for k in args.configs}, []
    if args.quick:
        seeds, configs = [0], dict(list(CONFIGS.items())[:1])
        extra = ["dense_epochs=3", "finetune_epochs=1"]

    table: dict[str, list[dict[str, float]]] = {}
    for name, overrides in configs.items():
        for seed in seeds:
            start = time.perf_counter()
            accs = run_job(overrides, seed, extra)
            table.setdefault(name, []).append(accs)
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in accs.items())
                  + f" ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    print(f"\ndigits test accuracy (%), mean ± sd over seeds {seeds}"
          + (f", overrides {extra}" if extra else "") + "\n")
    print("| palettize | dense | palettized (after k-means) | fine-tuned | fine-tuned - dense |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in table.items():
        cols = [mean_sd([r[k] for r in runs]) for k in KEYS]
        delta = [r["finetuned_acc"] - r["dense_acc"] for r in runs]
        print(f"| {name} | {' | '.join(cols)} | {mean_sd(delta)} |")


if __name__ == "__main__":
    main()
