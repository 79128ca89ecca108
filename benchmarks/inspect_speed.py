"""Wall time and peak RSS of ``coreai-palettize inspect`` on a Llama-3.2-1B-shaped model.

    python benchmarks/inspect_speed.py [--rounds 3]

Writes the model's config.json (hidden 2048, 16 layers, 32 query / 8 KV heads, MLP 8192, vocab
128256, tied embeddings, bfloat16: the shapes of meta-llama/Llama-3.2-1B) into a temp directory
and runs the CLI on it in a fresh subprocess per round, with the llama-3.2-1b-wikitext recipe's
palettize section (w4 body, lm_head w8, embedding not palettized on its own). Measures, per
round, the wall time of the whole command (interpreter start, imports, meta build, the traced
forward, accounting) and the child's peak RSS (``resource.getrusage(RUSAGE_CHILDREN)``). Goal:
under 10 s and under 1 GB on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_S, GOAL_RSS_MB = 10.0, 1024
OVERRIDES = ["modules.lm_head=w8", "overrides.embedding=null"]


def write_config(directory: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                max_position_embeddings=131072, tie_word_embeddings=True, dtype="bfloat16",
                architectures=["LlamaForCausalLM"]).save_pretrained(directory)


def one_round(model_dir: Path) -> tuple[float, float, dict]:
    """(wall seconds, peak RSS MiB, JSON result) of one ``inspect --json`` subprocess."""
    command = [sys.executable, "-m", "coreai_palettize_plugins", "inspect", str(model_dir),
               *OVERRIDES, "--json"]
    start = time.perf_counter()
    # A fresh child per round: RUSAGE_CHILDREN's ru_maxrss is the largest child so far, so the
    # rounds are measured in a throw-away parent each (python -c ...) to keep them separate.
    probe = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:], "
             "capture_output=True, text=True); print(json.dumps({'rc': r.returncode, "
             "'out': r.stdout, 'err': r.stderr[-2000:], 'rss_kb': "
             "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True,
                          text=True, check=True)
    wall = time.perf_counter() - start
    facts = json.loads(done.stdout)
    if facts["rc"] != 0:
        raise SystemExit(f"inspect failed: {facts['err']}")
    return wall, facts["rss_kb"] / 1024, json.loads(facts["out"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama-3.2-1b-shape"
        write_config(model_dir)
        rounds = [one_round(model_dir) for _ in range(args.rounds)]
    walls = [w for w, _, _ in rounds]
    rss = [r for _, r, _ in rounds]
    result = rounds[-1][2]
    print(f"model: {result['model']} {result['dtype']}, {result['num_weights']:,} parameters "
          f"(meta device), palettize: w4, {' '.join(OVERRIDES)}")
    print(f"weights palettized: {result['palettized_weights']}, dense: {result['dense_weights']}"
          f"; {result['bits_per_weight']:.3f} bits/weight; fp16 "
          f"{result['fp16_bytes'] / 2**30:.2f} GiB -> {result['projected_bytes'] / 2**30:.3f} GiB "
          f"({result['ratio_vs_fp16']:.2f}x)")
    print(f"wall time per run (s): {', '.join(f'{w:.2f}' for w in walls)}; "
          f"median {statistics.median(walls):.2f} (goal < {GOAL_S:.0f})")
    print(f"peak RSS (MiB):        {', '.join(f'{r:.0f}' for r in rss)}; "
          f"max {max(rss):.0f} (goal < {GOAL_RSS_MB})")


if __name__ == "__main__":
    main()
