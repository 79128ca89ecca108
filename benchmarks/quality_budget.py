"""Issue #11 (b): ``palettize.budget`` against uniform bit widths, post-training (no fine-tuning).

The small Llama of ``benchmarks/quality.py`` (4 layers, hidden 128, vocab 1024, pretrained there
on the shipped corpus; same cached checkpoint), held-out perplexity after k-means only, for

- uniform ``w2``, ``w3``, ``w4`` (every Linear incl. ``lm_head``, 16 output channels per LUT);
- ``palettize.budget`` at 2.5, 3.0 and 3.5 whole-model bits per weight over the same weights
  (base ``w4``, choices 2/3/4/6/8 bits, the same 16-channel groups); ``budget+pt`` also lets
  each layer pick per-tensor LUTs (``granularity: [base, per_tensor]``).

In every arm the input embedding is palettized at ``w4`` (a fixed module-state spec the budget
does not choose for): with it dense (fp32) no arm could get below 5.8 whole-model bits per weight.
Bits per weight are whole-model, LUTs included, as ``report().bits_per_weight`` counts them. The
budgets share one error cache, so only the first runs the trial k-means.

Goal: at 3.5 bpw the budget's perplexity <= the midpoint of uniform w3 and w4.

    python benchmarks/quality_budget.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # its model, data, pretraining and evaluation
from harness import lm_setup, ptq_arm

UNIFORM = (2, 3, 4)
TARGETS = (2.5, 3.0, 3.5)
CHOICES = [2, 3, 4, 6, 8]
BASE = {"overrides": {"embedding": "w4"}, "training": "frozen", "export": {"formats": []}}


def arm(dense, train, held_out, config: dict) -> dict:
    """Post-training only: the base plus ``config``, k-means (after the budget), evaluated."""
    return ptq_arm(dense, train, held_out, {**BASE, **config})[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 pretraining steps (smoke test)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    q.quiet()
    cfg = (q.QUICK if args.quick else q.FULL)["lm"]
    out_path = args.out or (q.CACHE / "quality_budget_quick.json" if args.quick
                            else q.BENCH / "quality_budget_results.json")
    _, train, held_out, dense, pre = lm_setup(cfg)
    cache = q.CACHE / "budget_errors.json"
    cache.unlink(missing_ok=True)  # measure the first budget's trial k-means honestly
    results = {"dense": q.lm_eval(dense, held_out)}
    q.log(f"dense ppl {results['dense']['ppl']:.3f}")
    for bits in UNIFORM:
        results[f"w{bits}"] = arm(dense, train, held_out, {"preset": f"w{bits}"})
        q.log(f"w{bits}: {results[f'w{bits}']['bits_per_weight']:.3f} bpw, "
              f"ppl {results[f'w{bits}']['ppl']:.3f}")
    for label, extra in (("budget", {}), ("budget+pt", {"granularity": ["base", "per_tensor"]})):
        for target in TARGETS:
            budget = {"bits_per_weight": target, "choices": CHOICES, "cache": str(cache), **extra}
            name = f"{label} {target}"
            results[name] = arm(dense, train, held_out, {"preset": "w4", "budget": budget})
            r = results[name]
            q.log(f"{name}: {r['bits_per_weight']:.3f} bpw, ppl {r['ppl']:.3f} "
                  f"({r['trial_kmeans_runs']} trial k-means, {r['allocation_seconds']:.1f} s)")
    midpoint = (results["w3"]["ppl"] + results["w4"]["ppl"]) / 2
    goal = {"midpoint_w3_w4_ppl": midpoint, "budget_3.5_ppl": results["budget 3.5"]["ppl"],
            "met": results["budget 3.5"]["ppl"] <= midpoint}
    payload = {"command": "python benchmarks/quality_budget.py" + (" --quick" if args.quick
                                                                   else ""),
               "config": {"lm": cfg, "llama": q.LLAMA, "choices": CHOICES, "base": BASE},
               "pretrain": {k: pre[k] for k in ("steps", "cache", "cached") if k in pre},
               "results": results, "goal": goal, "environment": q.environment()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(payload, indent=1))
    print(markdown(payload))


def markdown(payload: dict) -> str:
    res = payload["results"]
    lines = [f"`{payload['command']}`", "",
             "| arm | whole-model bits/weight | held-out ppl | weights at 2/3/4/6/8 bits |",
             "|---|---|---|---|",
             f"| dense | 32 | {res['dense']['ppl']:.3f} | |"]
    for name, r in res.items():
        if name == "dense":
            continue
        hist = r["bits_histogram"]
        total = sum(hist.values())
        mix = " / ".join(f"{100 * hist.get(str(b), 0) / total:.0f}%" for b in CHOICES)
        lines.append(f"| {name} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {mix} |")
    goal = payload["goal"]
    lines += ["", f"Goal: budget 3.5 ppl {goal['budget_3.5_ppl']:.3f} <= midpoint of w3/w4 "
              f"{goal['midpoint_w3_w4_ppl']:.3f}: {'met' if goal['met'] else 'NOT met'}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
