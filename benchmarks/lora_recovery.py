"""LoRA accuracy-recovery adapters vs ``frozen`` and ``ste`` on a palettized small Llama (issue #12).

The pretrained small Llama of ``benchmarks/quality.py`` (4 layers, hidden 128, trained on the
shipped corpus; cached in ``benchmarks/.cache/``) is palettized at ``w3`` and ``w2`` (both one LUT
per 16 output channels, every Linear incl. ``lm_head``) and fine-tuned with equal steps and
tokens (same batches, AdamW) by each arm:

- ``frozen``: palettized weights fixed; norms and embeddings train (coreai-opt's default);
- ``ste``: straight-through, every dense weight trains;
- ``lora r=N``: ``palettize.adapters`` (r=N, alpha=2N, all 7 projections) on the frozen base;
  only the adapters train.

Measured per arm: held-out perplexity after k-means (PTQ) and after recovery, the recovery
R = (PTQ - arm) / (PTQ - dense), trainable parameters, peak training memory as tensor bytes
(unique storages of parameters and buffers + gradients + optimizer state + the activations
autograd saved in one step's forward, the largest part of which differs between arms) and the
median step time. Each arm takes its best learning rate of ``--lrs`` (held-out ppl).

Goal: LoRA recovers >= 70 % of the gap ``ste`` recovers, with < 5 % of its trainable
parameters and <= 60 % of its peak training memory.

    python benchmarks/lora_recovery.py [--quick] [--ranks 16 64] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # the pretrained small Llama, its data and its eval

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LRS = {"frozen": [1e-4, 3e-4], "ste": [1e-4, 3e-4], "lora": [1e-3, 3e-3]}


def make_engine(preset: str, arm: str, rank: int | None):
    from coreai_palettize_plugins.engine.lifecycle import Palettization

    if arm == "lora":
        return Palettization({"preset": preset}, training="frozen", export_formats=(),
                             adapters={"r": rank, "alpha": 2 * rank, "target": TARGETS})
    training = {"type": "ste", "lut_update_every": 0} if arm == "ste" else "frozen"
    return Palettization({"preset": preset}, training=training, export_formats=())


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def step_memory(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> dict[str, int]:
    """Tensor bytes of one training step (after the optimizer state exists)."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = q.lm_loss(model, ids)
    activations = _storage_bytes(saved)
    weights = _storage_bytes([*model.parameters(), *model.buffers()])
    loss.backward()
    grads = _storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
    opt_state = _storage_bytes(v for s in opt.state.values() for v in s.values())
    opt.zero_grad(set_to_none=True)
    return {"weights": weights, "grads": grads, "optimizer": opt_state,
            "activations": activations, "total": weights + grads + opt_state + activations}


def finetune(model, engine, train, cfg: dict, lr: float) -> dict[str, Any]:
    loop = q.Steps(model, engine, lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0))
    times: list[float] = []
    memory = None
    for idx in q.lm_batches(len(train), cfg["batch"], cfg["ft_steps"], cfg["seed"] + 1000):
        start = time.perf_counter()
        loop(lambda idx=idx: q.lm_loss(model, train[idx]))
        times.append(time.perf_counter() - start)
        if memory is None:  # after the first step: the optimizer state exists
            memory = step_memory(model, loop.opt, train[idx])
    loop.finish()
    return {"step_s": statistics.median(times[1:] or times), "memory": memory,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run(cfg: dict, presets: Sequence[str], ranks: Sequence[int],
        arm_names: Sequence[str] = ("frozen", "ste", "lora")) -> dict:
    torch.manual_seed(cfg["seed"])
    tokenizer, train, held_out = q.lm_data(cfg["seq_len"])
    dense, _ = q.lm_pretrained(cfg, tokenizer, train, held_out)
    dense_ppl = q.lm_eval(dense, held_out)["ppl"]
    q.log(f"dense held-out ppl {dense_ppl:.3f}")
    arms = [(a, None) for a in ("frozen", "ste") if a in arm_names]
    arms += [("lora", r) for r in ranks] if "lora" in arm_names else []
    out: dict[str, Any] = {"dense_ppl": dense_ppl, "presets": {}}
    for preset in presets:
        rows: dict[str, Any] = {}
        ptq = None
        for arm, rank in arms:
            name = arm if rank is None else f"lora r={rank}"
            best = None
            for lr in cfg["lrs"][arm]:
                model = copy.deepcopy(dense)
                engine = make_engine(preset, arm, rank)
                engine.prepare(model, (train[:1],))
                if ptq is None:
                    ptq = q.lm_eval(model, held_out)["ppl"]
                torch.manual_seed(cfg["seed"] + 2000)
                stats = finetune(model, engine, train, cfg, lr)
                ppl = q.lm_eval(model, held_out)["ppl"]
                q.log(f"{preset} {name} lr {lr:g}: ppl {ptq:.3f} -> {ppl:.3f} "
                      f"({stats['step_s'] * 1e3:.0f} ms/step)")
                if best is None or ppl < best["ppl"]:
                    best = {"ppl": ppl, "lr": lr, **stats}
            best["R"] = (ptq - best["ppl"]) / (ptq - dense_ppl)  # recovery of the k-means gap
            rows[name] = best
        out["presets"][preset] = {"ptq_ppl": ptq, "arms": rows}
    return out


def _state_bytes(memory: dict[str, int]) -> int:
    """Weights + gradients + optimizer state (what grows with the model, not the batch)."""
    return memory["weights"] + memory["grads"] + memory["optimizer"]


def table(result: dict) -> str:
    lines = [f"dense held-out ppl {result['dense_ppl']:.3f}", "",
             "| preset | arm | lr | ppl after k-means | ppl after recovery | R | R / R(ste) "
             "| trainable | vs ste | peak training MiB | vs ste | without activations: MiB "
             "| vs ste | step ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset, data in result["presets"].items():
        if "ste" not in data["arms"]:  # e.g. an --arms lora run: merge it with --report-only
            continue
        ste = data["arms"]["ste"]
        ste_state = _state_bytes(ste["memory"])
        for name, row in data["arms"].items():
            mib = row["memory"]["total"] / 2**20
            state = _state_bytes(row["memory"])
            lines.append(
                f"| {preset} | {name} | {row['lr']:g} | {data['ptq_ppl']:.3f} | {row['ppl']:.3f} "
                f"| {row['R']:.1%} | {row['R'] / ste['R']:.1%} | {row['trainable']:,} "
                f"| {row['trainable'] / ste['trainable']:.1%} | {mib:.1f} "
                f"| {row['memory']['total'] / ste['memory']['total']:.1%} "
                f"| {state / 2**20:.1f} | {state / ste_state:.1%} "
                f"| {row['step_s'] * 1e3:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--presets", nargs="+", default=["w3", "w2"])
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per arm")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="dense pretraining steps (default: quality.py's)")
    parser.add_argument("--single-lr", action="store_true",
                        help="only the first learning rate of each arm")
    parser.add_argument("--lr", nargs="+", default=[], metavar="ARM=LR",
                        help="learning rates of an arm (frozen, ste, lora), e.g. lora=3e-3,1e-3")
    parser.add_argument("--arms", nargs="+", default=["frozen", "ste", "lora"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=q.BENCH / "lora_recovery.json")
    parser.add_argument("--report-only", type=Path, nargs="+", default=None,
                        help="merge earlier results (JSON files) into --out and print the table")
    args = parser.parse_args(argv)
    if args.report_only:
        merged: dict[str, Any] = {"presets": {}}
        for path in args.report_only:  # same pretrained model; per arm the best learning rate
            data = json.loads(path.read_text())
            merged["dense_ppl"] = data["dense_ppl"]
            for preset, part in data["presets"].items():
                into = merged["presets"].setdefault(preset, {"ptq_ppl": part["ptq_ppl"],
                                                             "arms": {}})
                for name, row in part["arms"].items():
                    if name not in into["arms"] or row["ppl"] < into["arms"][name]["ppl"]:
                        into["arms"][name] = row
        merged["table"] = table(merged)
        merged["sources"] = [json.loads(p.read_text()).get("config", {}) for p in args.report_only]
        print(merged["table"])
        args.out.write_text(json.dumps(merged, indent=1) + "\n")
        return
    torch.set_num_threads(args.threads)
    q.quiet()
    cfg = dict((q.QUICK if args.quick else q.FULL)["lm"])
    cfg["lrs"] = {k: v[:1] for k, v in LRS.items()} if args.quick or args.single_lr else LRS
    for item in args.lr:
        arm, _, values = item.partition("=")
        cfg["lrs"] = {**cfg["lrs"], arm: [float(v) for v in values.split(",")]}
    if args.steps:
        cfg["ft_steps"] = args.steps
    if args.pretrain_steps:
        cfg["pretrain_steps"] = args.pretrain_steps
    result = run(cfg, args.presets, args.ranks, args.arms)
    result["config"] = {**cfg, "ranks": args.ranks, "presets": args.presets,
                        "threads": args.threads, "command": " ".join(sys.argv)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    result["table"] = table(result)
    print(result["table"])
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
