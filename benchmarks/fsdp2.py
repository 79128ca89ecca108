"""FSDP2 vs DDP on 2 CPU ranks (gloo) with the default ``w4`` / ``ste``: per-rank model +
gradient + AdamW state, the k-means phase (vs one process) and the step time.

    python benchmarks/fsdp2.py [--layers 4 --hidden 256 --steps 5] [--dense]

Runs ``torchrun --nproc_per_node=2`` on itself twice (``--worker fsdp2``, ``--worker ddp``) and
the single-process k-means in this process; prints a Markdown table and the raw JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def llama(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=args.vocab, max_position_embeddings=256))


def _bytes(tensors) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from coreai_palettize_plugins import Palettization
    from coreai_palettize_plugins.engine.fsdp import replicated_state_bytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = llama(args)
    tokens = torch.randint(0, args.vocab, (args.batch * world, args.seq),
                           generator=torch.Generator().manual_seed(1))
    batch = tokens[rank * args.batch:(rank + 1) * args.batch]
    fields = {"training": args.training,
              **({"adapters": {"r": args.adapters}} if args.adapters else {})}
    engine = None if args.dense else Palettization("w4", export_formats=[], **fields)
    before = args.training != "ste" or bool(args.adapters)  # packed state: before sharding
    if engine is not None:
        engine.attach(model, {"input_ids": batch[:1]})
    if engine is not None and before:
        dist.barrier()
        start = time.perf_counter()
        engine.ensure_clustered()
    if args.worker == "fsdp2":
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    dist.barrier()
    if not before:
        start = time.perf_counter()
    if engine is not None:
        engine.ensure_clustered()
    dist.barrier()
    kmeans_s = time.perf_counter() - start
    wrapped = DistributedDataParallel(model) if args.worker == "ddp" else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if engine is not None:
        engine.start_training(0)
    times, grads = [], 0
    for step in range(1, args.warmup + args.steps + 1):
        dist.barrier()
        start = time.perf_counter()
        wrapped(input_ids=batch, labels=batch).loss.backward()
        grads = _bytes(p.grad for p in model.parameters() if p.grad is not None)
        if engine is not None:
            engine.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        if engine is not None:
            engine.after_optimizer_step(step)
        dist.barrier()
        if step > args.warmup:
            times.append(time.perf_counter() - start)
    params = _bytes(model.parameters())
    optim = _bytes(v for state in optimizer.state.values() for v in state.values()
                   if torch.is_tensor(v) and v.dim() > 0)
    facts = {"mode": args.worker, "rank": rank, "kmeans_s": kmeans_s,
             "step_s": statistics.median(times), "params_bytes": params, "grad_bytes": grads,
             "optim_bytes": optim, "total_bytes": params + grads + optim,
             "replicated_lut_bytes": replicated_state_bytes(model),
             "cluster_mode": engine.cluster_stats.mode if engine and engine.cluster_stats
             else None}
    name = f"{args.worker}{'_dense' if args.dense else ''}{rank}.json"
    (Path(args.out) / name).write_text(json.dumps(facts))
    dist.destroy_process_group()


def single_kmeans(args: argparse.Namespace) -> float:
    from coreai_palettize_plugins import Palettization

    torch.set_num_threads(1)
    model = llama(args)
    engine = Palettization("w4", export_formats=[])
    engine.attach(model, {"input_ids": torch.zeros(1, args.seq, dtype=torch.long)})
    start = time.perf_counter()
    engine.ensure_clustered()
    return time.perf_counter() - start


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=["fsdp2", "ddp"])
    parser.add_argument("--out")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--training", default="ste", choices=["ste", "frozen", "lut"])
    parser.add_argument("--adapters", type=int, default=0, help="LoRA rank on the compact base")
    parser.add_argument("--dense", action="store_true",
                        help="also run both arms without palettization (FSDP2's own cost)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    shape = [f"--{k}={getattr(args, k)}" for k in
             ("layers", "hidden", "intermediate", "vocab", "batch", "seq", "steps", "warmup",
              "training", "adapters")]
    out = tempfile.mkdtemp()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    arms = [(m, d) for d in ([False, True] if args.dense else [False]) for m in ("fsdp2", "ddp")]
    for mode, dense in arms:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_port()}", __file__, "--worker", mode, "--out", out,
                        *shape, *(["--dense"] if dense else [])], check=True, env=env)
    single = single_kmeans(args)
    names = [f"{m}{'_dense' if d else ''}" for m, d in arms]
    runs = {m: [json.loads((Path(out) / f"{m}{r}.json").read_text()) for r in (0, 1)]
            for m in names}

    def worst(mode: str, key: str) -> float:
        return max(r[key] for r in runs[mode])

    mib = 2**20
    print(f"training={args.training} adapters={args.adapters}")
    print("| per rank (max over ranks) | FSDP2 | DDP | FSDP2/DDP | goal |")
    print("|---|---:|---:|---:|---|")
    for key, goal in (("params_bytes", ""), ("grad_bytes", ""), ("optim_bytes", ""),
                      ("total_bytes", "<= 0.55")):
        f, d = worst("fsdp2", key), worst("ddp", key)
        print(f"| {key} MiB | {f / mib:.2f} | {d / mib:.2f} | {f / d:.3f} | {goal} |")
    f, d = worst("fsdp2", "step_s"), worst("ddp", "step_s")
    print(f"| step s (median of {args.steps}) | {f:.3f} | {d:.3f} | {f / d:.3f} | <= 1.3 |")
    f = worst("fsdp2", "kmeans_s")
    print(f"| k-means phase s (1 process: {single:.3f}) | {f:.3f} | {worst('ddp', 'kmeans_s'):.3f}"
          f" | FSDP2/1 process {f / single:.3f} | <= 0.6 |")
    f, d = worst("fsdp2", "replicated_lut_bytes"), worst("ddp", "replicated_lut_bytes")
    print(f"| palettization buffers MiB (LUTs, packed indices; on every rank) | {f / mib:.2f} | "
          f"{d / mib:.2f} | | |")
    f = worst("fsdp2", "total_bytes") + worst("fsdp2", "replicated_lut_bytes")
    d = worst("ddp", "total_bytes") + worst("ddp", "replicated_lut_bytes")
    print(f"| all of the above MiB | {f / mib:.2f} | {d / mib:.2f} | {f / d:.3f} | |")
    if args.dense:
        f, d = worst("fsdp2_dense", "step_s"), worst("ddp_dense", "step_s")
        print(f"| dense step s (no palettization) | {f:.3f} | {d:.3f} | {f / d:.3f} | |")
        print(f"| palettized / dense step | {worst('fsdp2', 'step_s') / f:.3f} | "
              f"{worst('ddp', 'step_s') / d:.3f} | | |")
    print(json.dumps({"single_kmeans_s": single, **runs}))


if __name__ == "__main__":
    main()
