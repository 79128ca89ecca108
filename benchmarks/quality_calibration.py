"""Calibrated (sensitivity-weighted) vs plain k-means on the small pretrained Llama (issue #11 (a)).

Reuses ``benchmarks/quality.py``'s LM: a 4-layer, hidden-128 Llama pretrained on the shipped
corpus (cached in ``benchmarks/.cache/``; pretrains on the first run). For ``w3`` and ``w2``
(16 output channels per LUT, every Linear incl. ``lm_head``), held-out perplexity of:

- ``plain``: ``Palettization(preset).prepare`` (plain k-means, post-training);
- ``calibrated``: the same with ``calibration: {samples: N}``: diagonal Fisher (mean grad² of the
  LM loss over the first N training blocks, batches of 16) weighting coreai-opt's k-means;
- optionally (``--ft-steps``) each fine-tuned with ``training: ste`` for the same steps and seed.

Recovery R = (ppl plain - ppl calibrated) / (ppl plain - ppl dense). Goal: R >= 50 % at w3.
Also checks ``calibration.compute_sensitivities`` on the dense model equals what the engine used
(saved via ``calibration.path``), and reports calibration time.

``--knobs [SPEC ...]``: does a supported calibration knob reach 50 % recovery at w3? Post-training
only, R per ``calibration.samples`` (256 / 1024) and calibration batch size (16, or 1 = per-
sequence squared gradients, SqueezeLLM's Fisher estimate), for the granularities grouped-16,
``per_tensor`` and per-channel ``group_size: 1`` (the coremltools/SqueezeLLM anchors; run it
alone with ``--knobs "w3 per-channel"``).

    python benchmarks/quality_calibration.py [--samples 256] [--ft-steps 100] [--out PATH]
    python benchmarks/quality_calibration.py --knobs ["w3 per-channel"]
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
import quality as q
from harness import lm_setup, ptq_arm, table

from coreai_palettize_plugins.accuracy.calibration import (
    CalibrationData,
    compute_sensitivities,
    load_sensitivities,
)
from coreai_palettize_plugins.engine.lifecycle import Palettization

BATCH = 16


def calibrated_engine(model, preset: str, train: torch.Tensor, samples: int, training: str,
                      path: str | None = None) -> Palettization:
    """``Palettization`` with ``calibration: {samples}`` over the first training blocks."""
    engine = Palettization({"preset": preset}, training=training,
                           calibration={"samples": samples, "path": path,
                                        "show_progress": False})
    engine.calibration_data = lambda: CalibrationData(
        loss=lambda ids, _: q.lm_loss(model, ids), dataset=train, collate_fn=torch.stack,
        batch_size=BATCH)
    return engine


def weighted_error(engine: Palettization, sens: dict[str, torch.Tensor]) -> float:
    """sum over palettized weights of sum(F * (w - palettized(w))²): the loss increase the
    diagonal Fisher predicts (up to 1/2)."""
    total = 0.0
    with torch.no_grad():
        for t in engine.tensors():
            w = t.original
            total += float((sens[t.name].double() * (w - t.fake.hard_assign(w)).double() ** 2).sum())
    return total


def run(samples: int, ft_steps: int, ft_lr: float) -> dict[str, Any]:
    cfg = dict(q.FULL["lm"])
    _, train, held_out, dense, pre = lm_setup(cfg)
    example = (train[:1],)
    out: dict[str, Any] = {"dense": q.lm_eval(dense, held_out), "pretrain_cached": pre["cached"],
                           "samples": samples, "batch": BATCH, "arms": {}}
    q.log(f"dense held-out ppl {out['dense']['ppl']:.3f}")

    # The budget helper's contract: compute_sensitivities on the dense model, keyed by FQN.
    probe = copy.deepcopy(dense)
    t0 = time.perf_counter()
    sens = compute_sensitivities(
        probe, lambda ids: q.lm_loss(probe, ids), train[:samples].split(BATCH),
        params={n: p for n, p in probe.named_parameters()
                if p.dim() == 2 and "embed_tokens" not in n})
    out["compute_sensitivities_seconds"] = time.perf_counter() - t0
    out["sensitivity_keys_sample"] = sorted(sens)[:2]

    for bits in (3, 2):
        preset = f"w{bits}"
        arms: dict[str, Any] = {}
        plain_model = copy.deepcopy(dense)
        plain = Palettization({"preset": preset}, training="ste")
        t0 = time.perf_counter()
        plain.prepare(plain_model, example)
        arms["plain"] = {**q.lm_eval(plain_model, held_out),
                         "prepare_seconds": time.perf_counter() - t0,
                         "fisher_weighted_error": weighted_error(plain, sens)}
        cal_model = copy.deepcopy(dense)
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "sens.pt")
            cal = calibrated_engine(cal_model, preset, train, samples, "ste", path)
            t0 = time.perf_counter()
            cal.attach(cal_model, example)
            cal.cluster()
            seconds = time.perf_counter() - t0
            saved, _ = load_sensitivities(path, cal.tensors())
        same = all(torch.equal(saved[k], sens[k]) for k in saved)
        arms["calibrated"] = {**q.lm_eval(cal_model, held_out), "prepare_seconds": seconds,
                              "calibration": cal.calibration_stats.to_dict(),
                              "fisher_weighted_error": weighted_error(cal, sens),
                              "engine_equals_compute_sensitivities": same}
        d, p, c = out["dense"]["ppl"], arms["plain"]["ppl"], arms["calibrated"]["ppl"]
        arms["R_ppl"] = (p - c) / (p - d) if p - d > 1e-6 else None
        q.log(f"{preset}: plain {p:.3f} calibrated {c:.3f} (dense {d:.3f}) R {arms['R_ppl']:.1%}"
              f"; calibration {arms['calibrated']['calibration']['seconds']:.1f} s")
        if ft_steps:
            ft_cfg = {**cfg, "ft_steps": ft_steps}
            for arm, (model, engine) in {"plain": (plain_model, plain),
                                         "calibrated": (cal_model, cal)}.items():
                torch.manual_seed(cfg["seed"] + 2000)
                secs = q.lm_finetune(model, engine, train, ft_cfg, ft_lr)
                arms[f"{arm}+ft"] = {**q.lm_eval(model, held_out), "ft_seconds": secs}
                q.log(f"{preset} {arm} + {ft_steps} ste steps: ppl {arms[f'{arm}+ft']['ppl']:.3f}")
        out["arms"][preset] = arms
    return out


def markdown(res: dict[str, Any], command: str) -> str:
    d = res["dense"]["ppl"]
    ft = any("plain+ft" in a for a in res["arms"].values())
    head = "| preset | dense | plain k-means | calibrated | R (gap recovered) |"
    head += " plain + FT | calibrated + FT |" if ft else ""
    lines = [f"`{command}`", "", head, "|" + "---|" * (7 if ft else 5)]
    for preset, a in res["arms"].items():
        row = (f"| {preset} | {d:.2f} | {a['plain']['ppl']:.2f} | {a['calibrated']['ppl']:.2f} "
               f"| {a['R_ppl']:.1%} |")
        if ft:
            row += f" {a['plain+ft']['ppl']:.2f} | {a['calibrated+ft']['ppl']:.2f} |"
        lines.append(row)
    w3 = res["arms"].get("w3", {}).get("R_ppl")
    lines += ["", f"Goal (calibration recovers >= 50 % of the post-training gap at w3): "
              f"{'met' if w3 is not None and w3 >= 0.5 else 'NOT met'} ({w3:.1%})."]
    return "\n".join(lines) + "\n"


KNOB_SPECS = {"w3 grouped-16": "w3",
              "w3 per-tensor": {"preset": "w3", "granularity": "per_tensor"},
              "w3 per-channel": {"preset": "w3", "group_size": 1}}
KNOB_DEFAULT = ("w3 grouped-16", "w3 per-tensor")
KNOBS = {"w3 grouped-16": [(256, 16), (256, 1), (1024, 16), (1024, 4)],
         "w3 per-tensor": [(256, 16), (256, 1)], "w3 per-channel": [(256, 16)]}


def knobs(only: list[str]) -> dict[str, Any]:
    """R of each calibration knob (samples, batch size) per granularity, post-training."""
    _, train, held_out, dense, _ = lm_setup()
    d = q.lm_eval(dense, held_out)["ppl"]
    res: dict[str, Any] = {"dense": d, "arms": {}}
    for label, preset in KNOB_SPECS.items():
        if label not in (only or KNOB_DEFAULT):
            continue
        plain = ptq_arm(dense, train, held_out, {"preset": preset}, training="ste")[0]
        arms = {"plain": plain}
        q.log(f"{label} plain {plain['ppl']:.3f} (dense {d:.3f})")
        for samples, batch in KNOBS[label]:
            r = ptq_arm(dense, train, held_out, {"preset": preset}, batch=batch, training="ste",
                        calibration={"samples": samples, "show_progress": False})[0]
            r["R"] = (plain["ppl"] - r["ppl"]) / (plain["ppl"] - d)
            r["calibration_seconds"] = r["calibration"]["seconds"]
            arms[f"samples {samples}, batch {batch}"] = r
            q.log(f"{label} samples {samples} batch {batch}: {r['ppl']:.3f} R {r['R']:.1%} "
                  f"({r['calibration_seconds']:.0f} s calibration)")
        res["arms"][label] = arms
    return res


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--ft-steps", type=int, default=0)
    parser.add_argument("--ft-lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--knobs", nargs="*", default=None, metavar="SPEC",
                        help=f"the knobs sweep instead, for these specs ({', '.join(KNOB_SPECS)})")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    q.quiet()
    command = " ".join(["python", "benchmarks/quality_calibration.py",
                        *(argv if argv is not None else sys.argv[1:])])
    t0 = time.time()
    if args.knobs is not None:
        res = knobs(args.knobs)
        res.update(command=command, environment=q.environment())
        name = "quality_calibration_knobs" + (
            "_" + "_".join(x.split()[-1] for x in args.knobs) if args.knobs else "")
        (args.out or q.BENCH / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
        print(table(["spec", "arm", "ppl", "R"], [
            (label, name, f"{r['ppl']:.3f}", f"{r['R']:.1%}" if "R" in r else "")
            for label, arms in res["arms"].items() for name, r in arms.items()]))
        return
    res = run(args.samples, args.ft_steps, args.ft_lr)
    res.update(command=command, wall_seconds=time.time() - t0, environment=q.environment())
    out = args.out or q.BENCH / "quality_calibration_results.json"
    out.write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")
    print(markdown(res, command))


if __name__ == "__main__":
    main()
