"""Issue #11 (a), follow-up: does a supported calibration knob reach 50 % gap recovery at w3?

Same small Llama and held-out perplexity as ``quality_calibration.py`` (preset ``w3``: every
Linear incl. ``lm_head``, 16 output channels per LUT; the embedding stays dense). Post-training
only. Knobs: ``calibration.samples`` (256 / 1024) and the calibration batch size (the training
loader's batch size: 16, or 1 = per-sequence squared gradients, SqueezeLLM's Fisher estimate),
and the granularity (grouped vs ``per_tensor``, and per-channel ``group_size: 1`` as in the
coremltools/SqueezeLLM anchors; run it alone with ``"w3 per-channel"`` as argument).
R = (plain - calibrated) / (plain - dense).

    python benchmarks/quality_calibration_knobs.py
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q

from coreai_palettize_plugins.calibration import CalibrationData
from coreai_palettize_plugins.engine import Palettization

SPECS = {"w3 grouped-16": "w3", "w3 per-tensor": {"preset": "w3", "granularity": "per_tensor"},
         "w3 per-channel": {"preset": "w3", "group_size": 1}}
DEFAULT = ("w3 grouped-16", "w3 per-tensor")
KNOBS = {"w3 grouped-16": [(256, 16), (256, 1), (1024, 16), (1024, 4)],
         "w3 per-tensor": [(256, 16), (256, 1)], "w3 per-channel": [(256, 16)]}


def evaluate(dense, train, held_out, preset, samples: int | None, batch: int) -> dict:
    model = copy.deepcopy(dense)
    cal = None if samples is None else {"samples": samples, "show_progress": False}
    engine = Palettization({"preset": preset}, training="ste", calibration=cal)
    engine.calibration_data = lambda: CalibrationData(
        loss=lambda ids, _: q.lm_loss(model, ids), dataset=train, collate_fn=torch.stack,
        batch_size=batch)
    t0 = time.perf_counter()
    engine.attach(model, (train[:1],))
    engine.cluster()
    out = {**q.lm_eval(model, held_out), "seconds": time.perf_counter() - t0}
    if engine.calibration_stats is not None:
        out["calibration_seconds"] = engine.calibration_stats.seconds
    return out


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    q.quiet()
    cfg = dict(q.FULL["lm"])
    torch.manual_seed(cfg["seed"])
    tokenizer, train, held_out = q.lm_data(cfg["seq_len"])
    dense, _ = q.lm_pretrained(cfg, tokenizer, train, held_out)
    d = q.lm_eval(dense, held_out)["ppl"]
    only = argv if argv is not None else sys.argv[1:]  # spec labels to run
    res: dict = {"dense": d, "arms": {}}
    for label, preset in SPECS.items():
        if label not in (only or DEFAULT):
            continue
        plain = evaluate(dense, train, held_out, preset, None, 16)
        arms = {"plain": plain}
        q.log(f"{label} plain {plain['ppl']:.3f} (dense {d:.3f})")
        for samples, batch in KNOBS[label]:
            r = evaluate(dense, train, held_out, preset, samples, batch)
            r["R"] = (plain["ppl"] - r["ppl"]) / (plain["ppl"] - d)
            arms[f"samples {samples}, batch {batch}"] = r
            q.log(f"{label} samples {samples} batch {batch}: {r['ppl']:.3f} R {r['R']:.1%} "
                  f"({r['calibration_seconds']:.0f} s calibration)")
        res["arms"][label] = arms
    res.update(command=" ".join(["python benchmarks/quality_calibration_knobs.py", *only]),
               environment=q.environment())
    name = "quality_calibration_knobs" + ("_" + "_".join(x.split()[-1] for x in only)
                                          if only else "")
    (q.BENCH / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    print("| spec | arm | ppl | R |\n|---|---|---|---|")
    for label, arms in res["arms"].items():
        for name, r in arms.items():
            rr = f"{r['R']:.1%}" if "R" in r else ""
            print(f"| {label} | {name} | {r['ppl']:.3f} | {rr} |")


if __name__ == "__main__":
    main()
