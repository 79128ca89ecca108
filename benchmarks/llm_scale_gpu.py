"""GPU memory and step time of palettization-aware training vs dense (issue #10, item 6).

    python benchmarks/llm_scale_gpu.py [--out DIR] [--steps 3]       # on a CUDA machine
    python benchmarks/llm_scale_gpu.py --device cpu --tiny            # smoke check only

A ~0.65B Llama built from config (hidden 1536, 24 layers, 12 heads / 4 KV heads, intermediate
4096, vocab 32000, tied embeddings) in bf16, batch 8 x 1024, AdamW, ``w4``. Arms ``dense``,
``frozen``, ``ste``, ``lut``, each in its own subprocess, driven through the package's engine as
the callbacks drive it (``attach`` -> ``ensure_clustered`` -> ``start_training`` ->
``before_optimizer_step`` / ``after_optimizer_step``). k-means runs once: the first
palettized arm saves the clustered model state, the others load it
(``Palettization.prepare(..., state_dict=...)``; centroids and indices do not depend on the
training strategy). Per arm: ``torch.cuda.max_memory_allocated`` over the
training steps, the model state after ``prepare``, and the median step time after one untimed
step. Writes ``llm_scale_gpu.json`` into ``--out`` (default ``$OUT``, else ``benchmarks/``) and
prints a markdown table with ratios to dense.
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

os.environ.setdefault("TQDM_DISABLE", "1")

ARMS = ("dense", "frozen", "ste", "lut")
SHAPE = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24,
             num_attention_heads=12, num_key_value_heads=4, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)
GiB = 2**30


def build(tiny: bool, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**(TINY if tiny else SHAPE), max_position_embeddings=1024,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).train()


def worker(arm: str, args: argparse.Namespace) -> dict:
    import torch

    from coreai_palettize_plugins import Palettization

    cuda = args.device.startswith("cuda")
    model = build(args.tiny, args.device)
    batch, seq = (2, 32) if args.tiny else (8, 1024)
    vocab = model.config.vocab_size
    engine, result = None, {"arm": arm, "params": sum(p.numel() for p in model.parameters())}
    if arm != "dense":
        start = time.perf_counter()
        engine = Palettization("w4", training=arm, num_workers=args.kmeans_workers)
        example = torch.zeros(1, 8, dtype=torch.long, device=args.device)
        state_path = Path(args.state)
        if state_path.is_file():
            state = torch.load(state_path, map_location=args.device)
            if arm == "lut":   # its trainable LUT starts as the k-means centroids
                state.update({k[:-len("centroids")] + "trainable_lut": v
                              for k, v in state.items() if k.endswith(".centroids")})
            engine.prepare(model, example, state_dict=state)
            result["kmeans"] = "loaded"
        else:
            engine.prepare(model, example)
            torch.save({k: v for k, v in model.state_dict().items()
                        if not k.endswith("trainable_lut")}, state_path)
            result["kmeans"] = "ran"
        result["prepare_s"] = time.perf_counter() - start
        engine.start_training(0)
    state_bytes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                   for t in [*model.parameters(), *model.buffers()]}
    result["model_state_mib"] = sum(state_bytes.values()) / 2**20
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(1)

    def step(i: int) -> float:
        tokens = torch.randint(0, vocab, (batch, seq), generator=generator).to(args.device)
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        model(input_ids=tokens, labels=tokens).loss.backward()
        if engine is not None:
            engine.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if engine is not None:
            engine.after_optimizer_step(i)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step(1)                                                             # untimed
    times = [step(i) for i in range(2, args.steps + 2)]
    result["step_s"] = statistics.median(times)
    result["step_times_s"] = times
    if cuda:
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        result["device_name"] = torch.cuda.get_device_name()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: smoke check only")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--kmeans-workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = out / "llm_scale_gpu_clustered.pt"
    state.unlink(missing_ok=True)
    results, started = {}, time.perf_counter()
    for arm in args.arms.split(","):
        command = [sys.executable, __file__, "--worker", arm, "--state", str(state),
                   "--device", args.device, "--steps", str(args.steps),
                   "--kmeans-workers", str(args.kmeans_workers)] + (["--tiny"] if args.tiny else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            results[arm] = {"arm": arm, "error": done.stderr[-2000:]}
            print(f"{arm} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        else:
            results[arm] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"[{time.perf_counter() - started:5.0f}s] {arm} done", file=sys.stderr, flush=True)
    state.unlink(missing_ok=True)
    (out / "llm_scale_gpu.json").write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/llm_scale_gpu.py", *sys.argv[1:]]),
        "shape": TINY if args.tiny else SHAPE, "dtype": "bfloat16",
        "batch": [2, 32] if args.tiny else [8, 1024], "results": results}, indent=2) + "\n")
    dense = results.get("dense", {})

    def cell(r: dict, key: str, digits: int) -> str:
        value, base = r.get(key), dense.get(key)
        if value is None:
            return "-"
        return f"{value:.{digits}f}" + (f" ({value / base:.2f}x)" if base else "")

    print("| arm | model state MiB | max_memory_allocated GiB | step s |\n|---|---|---|---|")
    for arm, r in results.items():
        if "error" in r:
            print(f"| {arm} | failed | | |")
            continue
        print(f"| {arm} | {cell(r, 'model_state_mib', 1)} | "
              f"{cell(r, 'max_memory_allocated_gib', 2)} | {cell(r, 'step_s', 3)} |")
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
