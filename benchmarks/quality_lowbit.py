"""Issue #11 (b') and (c): bit budgets with calibration sensitivities, then fine-tuned with ``ste``.

The small Llama of ``benchmarks/quality.py`` (4 layers, hidden 128, vocab 1024, pretrained there
on the shipped corpus; the same cached checkpoint as ``quality_budget.py`` and
``quality_calibration.py``). Held-out perplexity against whole-model bits per weight for

- ``uniform w2/w3/w4`` and ``budget 2.5/3.0/3.5`` (plain objective), as in ``quality_budget.py``
  (recomputed here so that every arm of the plot comes from one run);
- ``budget+cal``: the same budgets with ``calibration: {samples: N}``: the engine computes the
  diagonal Fisher first, the budget's per-layer objective is weighted by it, and so is k-means;
- ``budget+cal +ft``: each ``budget+cal`` model fine-tuned with ``training: ste`` for
  ``--ft-steps`` steps at ``--ft-lr`` (the fine-tune of ``quality_calibration.py``: AdamW,
  batch 16, same seed); controls fine-tuned identically: ``dense+ft``, ``w2/w3/w4 +ft`` and
  ``budget 3.5 +ft`` (plain objective, no calibration).

As in ``quality_budget.py`` every arm palettizes the input embedding at ``w4`` (choices
2/3/4/6/8 bits, 16 output channels per LUT). Goal (c): after fine-tuning, the 3.5 bpw model is
within 3 % of dense perplexity. Writes ``quality_lowbit_results.json`` and ``quality_lowbit.png``.

    python benchmarks/quality_lowbit.py [--samples 256] [--ft-steps 100] [--ft-targets 3.5 ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # its model, data, pretraining and evaluation
from harness import lm_setup, ptq_arm
from quality_budget import BASE, CHOICES, TARGETS, UNIFORM

from coreai_palettize_plugins.engine.lifecycle import Palettization

BATCH = 16


def arm(dense, train, held_out, config: dict, training: str = "ste"
        ) -> tuple[dict[str, Any], torch.nn.Module, Palettization]:
    """Attach + cluster (calibration and budget first when configured); evaluate."""
    return ptq_arm(dense, train, held_out, {**BASE, **config, "training": training}, batch=BATCH)


def run(samples: int, ft_steps: int, ft_lr: float, ft_targets: list[float], ft_uniform: bool,
        ft_plain_budget: list[float], cache: Path, sens_dir: str, ft_seed: int = 0
        ) -> dict[str, Any]:
    cfg = dict(q.FULL["lm"])
    _, train, held_out, dense, pre = lm_setup(cfg)
    res: dict[str, Any] = {"dense": q.lm_eval(dense, held_out)}
    q.log(f"dense ppl {res['dense']['ppl']:.3f}")
    ft_cfg = {**cfg, "ft_steps": ft_steps, "seed": cfg["seed"] + ft_seed}
    if ft_steps:
        model = copy.deepcopy(dense)
        torch.manual_seed(ft_cfg["seed"] + 2000)
        secs = q.lm_finetune(model, None, train, ft_cfg, ft_lr)
        res["dense+ft"] = {**q.lm_eval(model, held_out), "ft_seconds": secs}
        q.log(f"dense + {ft_steps} steps: ppl {res['dense+ft']['ppl']:.3f}")
    def finetune(name: str, model: torch.nn.Module, engine: Palettization) -> None:
        torch.manual_seed(ft_cfg["seed"] + 2000)
        secs = q.lm_finetune(model, engine, train, ft_cfg, ft_lr)
        res[f"{name} +ft"] = {**q.lm_eval(model, held_out), "ft_seconds": secs,
                              "bits_per_weight": engine.report().bits_per_weight}
        q.log(f"{name} + {ft_steps} ste steps: ppl {res[f'{name} +ft']['ppl']:.3f}")

    for bits in UNIFORM:
        res[f"w{bits}"], model, engine = arm(dense, train, held_out, {"preset": f"w{bits}"})
        q.log(f"w{bits}: {res[f'w{bits}']['bits_per_weight']:.3f} bpw, "
              f"ppl {res[f'w{bits}']['ppl']:.3f}")
        if ft_steps and ft_uniform:
            finetune(f"w{bits}", model, engine)
    calibration = {"samples": samples, "path": str(Path(sens_dir) / "sens.pt"),
                   "show_progress": False}
    for target in TARGETS:
        budget = {"bits_per_weight": target, "choices": CHOICES, "cache": str(cache)}
        for label, extra in (("budget", {}), ("budget+cal", {"calibration": calibration})):
            name = f"{label} {target}"
            res[name], model, engine = arm(dense, train, held_out,
                                           {"preset": "w4", "budget": budget, **extra})
            r = res[name]
            q.log(f"{name}: {r['bits_per_weight']:.3f} bpw, ppl {r['ppl']:.3f} "
                  f"({r['trial_kmeans_runs']} trial k-means, {r['prepare_seconds']:.1f} s)")
            if ft_steps and (target in ft_targets if label == "budget+cal"
                             else target in ft_plain_budget):
                finetune(name, model, engine)
    return {"results": res, "pretrain": {k: pre[k] for k in ("steps", "cache", "cached")
                                         if k in pre}}


def goals(res: dict[str, Any]) -> dict[str, Any]:
    d = res["dense"]["ppl"]
    midpoint = (res["w3"]["ppl"] + res["w4"]["ppl"]) / 2
    out: dict[str, Any] = {
        "b_budget_3.5_le_midpoint_w3_w4": {"midpoint": midpoint,
                                           "budget 3.5": res["budget 3.5"]["ppl"],
                                           "budget+cal 3.5": res["budget+cal 3.5"]["ppl"],
                                           "met": res["budget 3.5"]["ppl"] <= midpoint}}
    ft = res.get("budget+cal 3.5 +ft")
    if ft is not None:
        out["c_ft_3.5_within_3pct_of_dense"] = {"ppl": ft["ppl"], "dense": d,
                                                "ratio": ft["ppl"] / d - 1,
                                                "met": ft["ppl"] <= 1.03 * d}
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("uniform w2/w3/w4", [f"w{b}" for b in UNIFORM], "o-", "#d62728"),
              ("budget", [f"budget {t}" for t in TARGETS], "s-", "#1f77b4"),
              ("budget + calibration", [f"budget+cal {t}" for t in TARGETS], "^-", "#2ca02c"),
              ("budget + calibration + ste fine-tune",
               [f"budget+cal {t} +ft" for t in TARGETS], "D-", "#9467bd"),
              ("uniform + ste fine-tune", [f"w{b} +ft" for b in UNIFORM], "o--", "#ff9896")]
    for label, names, style, color in series:
        pts = [(res[n]["bits_per_weight"], res[n]["ppl"]) for n in names if n in res]
        if pts:
            ax.plot(*zip(*pts), style, color=color, label=label)
    d = res["dense"]["ppl"]
    ax.axhline(d, color="#555555", ls="--", label=f"dense fp32 ({d:.2f})")
    ax.axhline(1.03 * d, color="#555555", ls=":", lw=0.8, label="dense + 3 %")
    if "dense+ft" in res:
        ax.axhline(res["dense+ft"]["ppl"], color="#aaaaaa", ls="-.",
                   label=f"dense + same fine-tune ({res['dense+ft']['ppl']:.2f})")
    ax.set_xlabel("whole-model bits per weight (LUTs included)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Small Llama on the shipped corpus: perplexity vs bits per weight")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(payload: dict[str, Any]) -> str:
    res = payload["results"]
    lines = [f"`{payload['command']}`", "",
             "| arm | whole-model bits/weight | held-out ppl | vs dense | "
             "weights at 2/3/4/6/8 bits |", "|---|---|---|---|---|"]
    d = res["dense"]["ppl"]
    for name, r in res.items():
        hist = r.get("bits_histogram")
        mix = ""
        if hist:
            total = sum(hist.values())
            mix = " / ".join(f"{100 * hist.get(str(b), 0) / total:.0f}%" for b in CHOICES)
        bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "32"
        lines.append(f"| {name} | {bpw} | {r['ppl']:.3f} | {100 * (r['ppl'] / d - 1):+.1f} % "
                     f"| {mix} |")
    g = payload["goals"]
    b = g["b_budget_3.5_le_midpoint_w3_w4"]
    lines += ["", f"Goal (b): budget 3.5 ppl {b['budget 3.5']:.3f} <= midpoint of w3/w4 "
              f"{b['midpoint']:.3f}: {'met' if b['met'] else 'NOT met'} "
              f"(with calibration: {b['budget+cal 3.5']:.3f})."]
    c = g.get("c_ft_3.5_within_3pct_of_dense")
    if c:
        lines.append(f"Goal (c): budget 3.5 + calibration + ste ppl {c['ppl']:.3f} vs dense "
                     f"{c['dense']:.3f} ({100 * c['ratio']:+.1f} %): "
                     f"{'met' if c['met'] else 'NOT met'}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--ft-steps", type=int, default=100)
    parser.add_argument("--ft-lr", type=float, default=3e-4)
    parser.add_argument("--ft-targets", type=float, nargs="*", default=list(TARGETS))
    parser.add_argument("--ft-plain-budget", type=float, nargs="*", default=[3.5],
                        help="plain-objective budgets also fine-tuned (controls)")
    parser.add_argument("--ft-seed", type=int, default=0,
                        help="offset of the fine-tune's data order and RNG seed")
    parser.add_argument("--no-ft-uniform", action="store_true",
                        help="do not fine-tune the uniform w2/w3/w4 arms")
    parser.add_argument("--out", type=Path, default=q.BENCH / "quality_lowbit_results.json")
    parser.add_argument("--plot", type=Path, default=q.BENCH / "quality_lowbit.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    q.quiet()
    command = " ".join(["python", "benchmarks/quality_lowbit.py",
                        *(argv if argv is not None else sys.argv[1:])])
    t0 = time.time()
    with tempfile.TemporaryDirectory() as sens_dir:
        payload = run(args.samples, args.ft_steps, args.ft_lr, args.ft_targets,
                      not args.no_ft_uniform, args.ft_plain_budget,
                      q.CACHE / "budget_errors.json", sens_dir, args.ft_seed)
    payload.update(command=command, goals=goals(payload["results"]),
                   config={"samples": args.samples, "batch": BATCH, "ft_steps": args.ft_steps,
                           "ft_lr": args.ft_lr, "ft_seed": args.ft_seed, "choices": CHOICES,
                           "base": BASE, "llama": q.LLAMA},
                   wall_seconds=time.time() - t0, environment=q.environment())
    args.out.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    plot(payload["results"], args.plot)
    print(markdown(payload))


if __name__ == "__main__":
    main()
