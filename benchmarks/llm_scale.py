"""LLM-scale cost of palettization-aware training vs dense (issue #10): memory and step time.

    python benchmarks/llm_scale.py [--shapes 27m,110m] [--rounds 1] [--steps 2] [--quick]

Two Llama shapes built from ``LlamaConfig`` (no downloads), fp32, tied embeddings, ``w4``:
``27m`` (hidden 512, 8 layers, vocab 4096) and ``110m`` (hidden 768, 12 layers, vocab 32000).
Arms: ``dense``, ``frozen``, ``ste``, ``lut``, each driven through the package's engine exactly as
the callbacks drive it (``Palettization.attach`` -> ``ensure_clustered`` -> ``start_training`` ->
``before_optimizer_step`` / ``after_optimizer_step`` around each AdamW step).

Every (shape, arm, round) runs in its own subprocess (one CPU thread), so peak RSS is per arm.
Per arm it measures:

- prepare: peak RSS above the baseline taken after building the model (``VmHWM`` reset through
  ``/proc/self/clear_refs``) during attach + k-means, against the goal ``2 x largest weight +
  200 MB`` (issue #10 item 5; ``num_workers=1``, the default, clusters in this process);
- model state (parameters + buffers + tensors cached on modules, each storage once) and AdamW
  state, between optimizer steps after the first step;
- median step time (after one untimed step) at batch 4 x 128, 4 x 512, and gradient
  accumulation 4 over 4 x 128 micro-batches, as wall time and as the process's CPU time (one
  thread: the table shows CPU time, which a shared, loaded machine inflates far less);
- peak RSS of the whole run.

Rounds run the arms in a rotating order so the machine's noise hits every arm alike; times are
medians over rounds x steps and reported as ratios to dense. Prints a markdown table and writes
``benchmarks/llm_scale_results.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")   # coreai-opt's k-means progress bars

ARMS = ("dense", "frozen", "ste", "lut")
SHAPES = {
    "27m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8, vocab_size=4096),
    "110m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
}
SETTINGS = {"4x128": (4, 128, 1), "4x512": (4, 512, 1), "accum 4x(4x128)": (4, 128, 4)}
QUICK_SETTINGS = {"4x32": (4, 32, 1), "4x64": (4, 64, 1), "accum 4x(4x32)": (4, 32, 4)}
PRESET = "w4"
MiB = 2**20


# ------------------------------------------------------------------------------- worker side


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build_model(shape: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def state_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def model_state_bytes(model) -> int:
    """Parameters, buffers, and tensors a module keeps in its own attributes (caches)."""
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        for value in vars(module).values():
            items = value if isinstance(value, tuple) else (value,)
            tensors += [v for v in items if torch.is_tensor(v)]
    return state_bytes(tensors)


def worker(shape: str, arm: str, steps: int, settings: dict) -> dict:
    import torch

    from coreai_palettize_plugins import Palettization

    torch.set_num_threads(1)
    model = build_model(shape).train()
    resettable = _reset_peak()
    baseline = _status("VmRSS")
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    engine, result = None, {"shape": shape, "arm": arm,
                            "params": sum(p.numel() for p in model.parameters()),
                            "largest_weight_mib": largest / MiB}
    vocab = model.config.vocab_size
    if arm != "dense":
        start = time.perf_counter()
        engine = Palettization(PRESET, training=arm)
        engine.attach(model, torch.zeros(1, 8, dtype=torch.long))
        engine.ensure_clustered()
        result["prepare_s"] = time.perf_counter() - start
        peak = _status("VmHWM")
        result["prepare_peak_mib"] = (peak - baseline) / MiB if resettable else None
        result["prepare_goal_mib"] = (2 * largest) / MiB + 200
        engine.start_training(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    step = 0

    def train_step(batch: int, seq: int, accumulate: int) -> tuple[float, float]:
        nonlocal step
        tokens = [torch.randint(0, vocab, (batch, seq), generator=generator)
                  for _ in range(accumulate)]
        begin, cpu = time.perf_counter(), time.process_time()
        for t in tokens:
            (model(input_ids=t, labels=t).loss / accumulate).backward()
        if engine is not None:
            engine.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if engine is not None:
            engine.after_optimizer_step(step)
        return time.perf_counter() - begin, time.process_time() - cpu

    times = {}
    for name, (batch, seq, accumulate) in settings.items():
        train_step(batch, seq, accumulate)                                # untimed
        if "model_state_mib" not in result:                               # between steps
            result["model_state_mib"] = model_state_bytes(model) / MiB
            result["optimizer_state_mib"] = state_bytes(
                [v for s in optimizer.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.numel() > 1]) / MiB
        times[name] = [train_step(batch, seq, accumulate) for _ in range(steps)]
    result["step_s"] = {name: [wall for wall, _ in t] for name, t in times.items()}
    result["step_cpu_s"] = {name: [cpu for _, cpu in t] for name, t in times.items()}
    result["peak_rss_mib"] = _status("VmHWM") / MiB   # since the model was built (if reset)
    result["baseline_rss_mib"] = baseline / MiB
    return result


# ------------------------------------------------------------------------------- driver side


def run_arm(shape: str, arm: str, steps: int, quick: bool, settings: dict) -> dict:
    command = [sys.executable, __file__, "--worker", f"{shape}:{arm}", "--steps", str(steps),
               "--settings", ",".join(settings)]
    if quick:
        command.append("--quick")
    done = subprocess.run(command, capture_output=True, text=True, env={
        **os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise RuntimeError(f"{shape}/{arm} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict], settings: dict) -> dict:
    """Per arm: memory from the first round, times as medians over every round and step."""
    first = runs[0]
    out = {k: v for k, v in first.items() if k not in ("step_s", "step_cpu_s")}
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    for key in ("step_s", "step_cpu_s"):
        out[key] = {name: statistics.median(t for r in runs for t in r[key][name])
                    for name in settings}
    return out


def table(shape: str, arms: dict[str, dict], settings: dict) -> str:
    dense = arms["dense"]

    def ratio(value: float, base: float) -> str:
        return f"{value / base:.2f}x" if base else "-"

    head = ["arm", "model state MiB", "AdamW state MiB", "peak RSS MiB", "prepare peak MiB "
            "(goal)"] + [f"step {name} CPU s" for name in settings]
    lines = [f"### {shape} ({dense['params'] / 1e6:.1f}M parameters, fp32, {PRESET})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, r in arms.items():
        prep = ("-" if r.get("prepare_peak_mib") is None else
                f"{r['prepare_peak_mib']:.0f} ({r['prepare_goal_mib']:.0f})")
        cells = [arm,
                 f"{r['model_state_mib']:.1f} ({ratio(r['model_state_mib'], dense['model_state_mib'])})",
                 f"{r['optimizer_state_mib']:.1f}",
                 f"{r['peak_rss_mib']:.0f} ({ratio(r['peak_rss_mib'], dense['peak_rss_mib'])})",
                 prep]
        cells += [f"{r['step_cpu_s'][n]:.2f} ({ratio(r['step_cpu_s'][n], dense['step_cpu_s'][n])})"
                  for n in settings]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="27m,110m")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 27m only, short sequences, one step")
    parser.add_argument("--settings", default=None,
                        help="comma-separated subset of the batch settings, e.g. 4x128")
    parser.add_argument("--out", default=str(Path(__file__).with_name("llm_scale_results.json")))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    if args.settings:
        settings = {k: settings[k] for k in args.settings.split(",")}
    if args.worker:
        shape, arm = args.worker.split(":")
        print(json.dumps(worker(shape, arm, args.steps, settings)))
        return
    shapes = ["27m"] if args.quick else args.shapes.split(",")
    arms = args.arms.split(",")
    if "dense" not in arms:
        arms.insert(0, "dense")
    steps = 1 if args.quick else args.steps
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for shape in shapes:
        runs: dict[str, list[dict]] = {arm: [] for arm in arms}
        for r in range(args.rounds):
            for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
                runs[arm].append(run_arm(shape, arm, steps, args.quick, settings))
                print(f"[{time.perf_counter() - started:6.0f}s] {shape} {arm} round {r + 1}",
                      file=sys.stderr, flush=True)
        results[shape] = {arm: summarize(runs[arm], settings) for arm in arms}
        print(table(shape, results[shape], settings) + "\n", flush=True)
    Path(args.out).write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/llm_scale.py", *sys.argv[1:]]),
        "torch_threads": 1, "rounds": args.rounds, "steps": steps, "preset": PRESET,
        "settings": {k: list(v) for k, v in settings.items()}, "results": results,
        "wall_s": time.perf_counter() - started}, indent=2) + "\n")


if __name__ == "__main__":
    main()
