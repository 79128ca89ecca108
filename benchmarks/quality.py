"""Quality of the palettization training strategies: post-training palettization vs fine-tuning.

Measures, for every training strategy the package ships (``frozen``: coreai-opt's default,
palettized weights frozen; ``ste``: straight-through with exact nearest re-assignment, with a
fixed LUT (``lut_update_every: 0``) and with a Lloyd step on the LUT every epoch; ``lut``:
trainable centroids, fixed indices):

1. **digits**: test accuracy (and NLL) of a small ``DigitsCNN(channels=(8, 16), hidden=32)`` at
   w2, w3 and w4 (``{"n_bits": N, "group_size": 8}``, the 10-way head per-tensor), for dense,
   post-training palettization (PTQ: ``prepare`` only), and each strategy fine-tuned with the
   same recipe (fresh Adam, same lr, batch 32, same epochs, same shuffling). Seeds 0..4 (dense
   init + shuffling), mean +- sd. A ``dense +FT`` control fine-tunes the dense model with the
   same recipe.
2. **lm**: held-out perplexity of a small Llama (4 layers, hidden 128) pretrained inside the
   benchmark on the shipped corpus (``coreai_palettize_plugins/data``; checkpoint cached in
   ``benchmarks/.cache/``), at the presets ``w3`` and ``w4`` (group of 16 output channels; every
   Linear incl. ``lm_head``, embeddings dense), for the same arms.
3. **timing**: wall time of a full training step (zero_grad, forward, loss, backward,
   optimizer.step, ``engine.sync_step``) for dense and each strategy, interleaved in one process,
   on the LM and on the digits CNN (batch 32 and 256).

Recovery R = (arm - PTQ) / (dense - PTQ) on the means (accuracy; perplexity; also NLL = log ppl).

Goals (issue #5): at w2 on digits the best strategy recovers >= 80 % of the accuracy lost by
PTQ; at w3 on the LM it recovers >= 70 % of the perplexity gap; the best strategy's step time
is <= 1.5x dense.

    python benchmarks/quality.py [--part digits|lm|timing|all] [--quick] [--results-md PATH]
    python benchmarks/quality.py --report-only benchmarks/quality_results.json

Writes ``benchmarks/quality_results.json`` and ``benchmarks/quality.png`` (``--quick`` writes
``*_quick.*`` files in ``benchmarks/.cache/`` instead); ``--results-md`` upserts the generated
section (between ``quality.py`` markers) into a markdown file. The training parts run with
``--threads`` (default 1: on a shared 2-core CPU two threads can be 50x slower when another
process is busy); the step-time part runs once per ``--timing-threads`` value (default 2 1).
The full run takes about 15 minutes on 2 idle cores (2 of them pretraining the LM, skipped when
the cached checkpoint exists).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
CACHE = BENCH / ".cache"
DATA = REPO / "coreai_palettize_plugins" / "data"
MARK_BEGIN, MARK_END = "<!-- quality.py:begin -->", "<!-- quality.py:end -->"
SECTION_TITLE = "Training strategies: quality and step time (`benchmarks/quality.py`)"

# Arm name -> palettize.training value (``{epoch}`` is replaced by the steps of one epoch).
STRATEGY_ARMS: dict[str, Any] = {
    "frozen": "frozen",
    "ste": {"type": "ste", "lut_update_every": 0},
    "ste+lloyd": {"type": "ste", "lut_update_every": "{epoch}"},
    "lut": "lut",
}
ARM_LABELS = {
    "dense": "dense", "dense+ft": "dense +FT", "ptq": "PTQ", "frozen": "frozen",
    "ste": "ste (lut_update_every=0)", "ste+lloyd": "ste (lut_update_every=epoch)",
    "lut": "lut",
}

FULL = {
    "digits": {"seeds": [0, 1, 2, 3, 4], "dense_epochs": 30, "ft_epochs": 10,
               "lrs": [1e-3, 3e-4], "bits": [2, 3, 4], "batch": 32},
    "lm": {"pretrain_steps": 750, "pretrain_lr": 3e-3, "batch": 16, "seq_len": 128,
           "ft_steps": 150, "ft_lrs": [3e-4, 1e-4], "bits": [3, 4], "seed": 0},
    "timing": {"rounds": 5, "steps": 5, "warmup": 5, "lm_bits": 4, "digits_bits": 2,
               "digits_batches": [32, 256]},
}
QUICK = {
    "digits": {"seeds": [0], "dense_epochs": 5, "ft_epochs": 2, "lrs": [1e-3],
               "bits": [2, 3, 4], "batch": 32},
    "lm": {"pretrain_steps": 40, "pretrain_lr": 3e-3, "batch": 16, "seq_len": 128,
           "ft_steps": 10, "ft_lrs": [3e-4], "bits": [3, 4], "seed": 0},
    "timing": {"rounds": 2, "steps": 2, "warmup": 1, "lm_bits": 4, "digits_bits": 2,
               "digits_batches": [256]},
}
LLAMA = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128,
         "tie_word_embeddings": False, "use_cache": False}
LM_GROUP = 16  # presets w3/w4: 16 output channels per LUT; every palettized Linear divides


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("coreai_opt", "coreai_palettize_plugins", "transformers", "torchao",
                 "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def make_engine(preset: Any, training: Any, epoch_steps: int, modules: dict | None = None):
    from coreai_palettize_plugins.engine.lifecycle import Palettization

    if isinstance(training, dict):
        training = {k: (epoch_steps if v == "{epoch}" else v) for k, v in training.items()}
    return Palettization({"preset": preset}, training=training, modules=modules)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def recovery(arm: float, ptq: float, dense: float, min_gap: float) -> float | None:
    gap = dense - ptq
    return None if abs(gap) < min_gap else (arm - ptq) / gap


def fmt_r(r: float | None) -> str:
    return "n/a" if r is None else f"{r:+.2f}"


@torch.no_grad()
def palette_violations(engine) -> int:
    """Palettized weights whose eval value has more distinct values than ``#LUTs * 2**n``."""
    bad = 0
    for t in engine.tensors():
        module = engine.model.get_submodule(t.name.rsplit(".", 1)[0])
        weight = getattr(module, t.name.rsplit(".", 1)[1])
        luts = t.fake.centroids.shape[0]
        if torch.unique(weight).numel() > luts * 2 ** t.fake.n_bits:
            bad += 1
    return bad


class Steps:
    """Training-loop bookkeeping shared by every arm: optimizer over trainable params, the
    engine's step sync, and the strategy's end-of-training hook."""

    def __init__(self, model: nn.Module, engine, opt_factory: Callable) -> None:
        self.model, self.engine, self.step = model, engine, 0
        self.opt = opt_factory([p for p in model.parameters() if p.requires_grad])
        model.train()
        if engine is not None:
            engine.start_training(0)

    def __call__(self, loss_fn: Callable[[], torch.Tensor]) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        self.opt.step()
        self.step += 1
        if self.engine is not None:
            self.engine.sync_step(self.step)
        return float(loss.detach())

    def finish(self) -> None:
        if self.engine is not None:
            self.engine.stop_training()
        self.model.eval()


# ------------------------------------------------------------------------------------------
# Part 1: digits
# ------------------------------------------------------------------------------------------


def digits_batches(n: int, batch: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        yield from perm.split(batch)


def digits_model():
    from coreai_palettize_plugins.demo.digits import DigitsCNN

    return DigitsCNN(channels=(8, 16), hidden=32)


def digits_spec(bits: int) -> tuple[dict, dict]:
    return {"n_bits": bits, "group_size": 8}, {"net.7": {"n_bits": bits}}


@torch.no_grad()
def digits_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    return (float((logits.argmax(-1) == y).float().mean()) * 100,
            float(F.cross_entropy(logits, y)))


def digits_train(model, engine, x, y, *, epochs, lr, batch, seed) -> None:
    loop = Steps(model, engine, lambda ps: torch.optim.Adam(ps, lr=lr))
    for idx in digits_batches(len(x), batch, epochs, seed):
        loop(lambda idx=idx: F.cross_entropy(model(x[idx]), y[idx]))
    loop.finish()


def run_digits(cfg: dict) -> dict:
    from coreai_palettize_plugins.demo.digits import load_digits_tensors

    train, test = load_digits_tensors(0)
    x, y = train.tensors
    xt, yt = test.tensors
    epoch_steps = math.ceil(len(x) / cfg["batch"])
    runs = []
    for seed in cfg["seeds"]:
        t0 = time.time()
        torch.manual_seed(seed)
        dense = digits_model()
        digits_train(dense, None, x, y, epochs=cfg["dense_epochs"], lr=1e-3,
                     batch=cfg["batch"], seed=seed)
        run: dict[str, Any] = {"seed": seed, "dense": digits_eval(dense, xt, yt), "lr": {}}
        for lr in cfg["lrs"]:
            per_lr: dict[str, Any] = {}
            control = copy.deepcopy(dense)
            digits_train(control, None, x, y, epochs=cfg["ft_epochs"], lr=lr,
                         batch=cfg["batch"], seed=seed + 1000)
            per_lr["dense+ft"] = digits_eval(control, xt, yt)
            for bits in cfg["bits"]:
                preset, modules = digits_spec(bits)
                res: dict[str, Any] = {}
                for arm, training in STRATEGY_ARMS.items():
                    model = copy.deepcopy(dense)
                    engine = make_engine(preset, training, epoch_steps, modules)
                    engine.prepare(model, torch.zeros(1, 1, 8, 8))
                    ptq = digits_eval(model, xt, yt)
                    res.setdefault("ptq", ptq)
                    if ptq != res["ptq"]:
                        log(f"WARNING digits seed {seed} w{bits} {arm}: PTQ {ptq} != {res['ptq']}")
                    torch.manual_seed(seed + 2000)
                    digits_train(model, engine, x, y, epochs=cfg["ft_epochs"], lr=lr,
                                 batch=cfg["batch"], seed=seed + 1000)
                    res[arm] = digits_eval(model, xt, yt)
                    res.setdefault("palette_violations", 0)
                    res["palette_violations"] += palette_violations(engine)
                per_lr[f"w{bits}"] = res
            run["lr"][str(lr)] = per_lr
        log(f"digits seed {seed}: dense {run['dense'][0]:.2f} "
            + " ".join(f"lr{lr} w{b}: ptq {run['lr'][str(lr)][f'w{b}']['ptq'][0]:.1f} best "
                       f"{max(run['lr'][str(lr)][f'w{b}'][a][0] for a in STRATEGY_ARMS):.1f}"
                       for lr in cfg["lrs"] for b in cfg["bits"])
            + f" ({time.time() - t0:.0f} s)")
        runs.append(run)
    return {"config": {**cfg, "model": "DigitsCNN(channels=(8, 16), hidden=32)",
                       "epoch_steps": epoch_steps, "split": "load_digits_tensors(0)"},
            "runs": runs, "summary": summarize_digits(runs, cfg)}


def summarize_digits(runs: list[dict], cfg: dict) -> dict:
    out: dict[str, Any] = {}
    dense_acc = [r["dense"][0] for r in runs]
    dense_nll = [r["dense"][1] for r in runs]
    for lr in cfg["lrs"]:
        key = str(lr)
        per: dict[str, Any] = {}
        for bits in cfg["bits"]:
            w = f"w{bits}"
            rows: dict[str, Any] = {"dense": {"acc": mean_sd(dense_acc), "nll": mean_sd(dense_nll)}}
            for arm in ["dense+ft", "ptq", *STRATEGY_ARMS]:
                vals = [r["lr"][key]["dense+ft"] if arm == "dense+ft" else r["lr"][key][w][arm]
                        for r in runs]
                rows[arm] = {"acc": mean_sd([v[0] for v in vals]),
                             "nll": mean_sd([v[1] for v in vals])}
            d, p = rows["dense"]["acc"][0], rows["ptq"]["acc"][0]
            dn, pn = rows["dense"]["nll"][0], rows["ptq"]["nll"][0]
            for arm in STRATEGY_ARMS:
                rows[arm]["R_acc"] = recovery(rows[arm]["acc"][0], p, d, 0.5)
                rows[arm]["R_nll"] = recovery(rows[arm]["nll"][0], pn, dn, 0.01)
            rows["gap_acc"] = d - p
            rows["palette_violations"] = sum(r["lr"][key][w]["palette_violations"] for r in runs)
            per[w] = rows
        out[key] = per
    return out


def digits_tables(result: dict) -> str:
    cfg, summary = result["config"], result["summary"]
    n = len(cfg["seeds"])
    lines = []
    for lr in cfg["lrs"]:
        per = summary[str(lr)]
        lines += [f"Fine-tune lr {lr:g}: test accuracy % (mean ± sd over {n} seed(s)), "
                  "R = recovery of the PTQ accuracy loss",
                  "",
                  "| bits | dense | PTQ | gap | dense +FT | " + " | ".join(
                      ARM_LABELS[a] for a in STRATEGY_ARMS) + " |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(STRATEGY_ARMS)]
        for w, rows in per.items():
            cells = [f"{rows[a]['acc'][0]:.2f} ± {rows[a]['acc'][1]:.2f} (R {fmt_r(rows[a]['R_acc'])})"
                     for a in STRATEGY_ARMS]
            lines.append(f"| {w} | {rows['dense']['acc'][0]:.2f} ± {rows['dense']['acc'][1]:.2f} | "
                         f"{rows['ptq']['acc'][0]:.2f} ± {rows['ptq']['acc'][1]:.2f} | "
                         f"{rows['gap_acc']:+.2f} | "
                         f"{rows['dense+ft']['acc'][0]:.2f} ± {rows['dense+ft']['acc'][1]:.2f} | "
                         + " | ".join(cells) + " |")
        lines += ["", f"Fine-tune lr {lr:g}: test NLL (mean ± sd), R on NLL", "",
                  "| bits | dense | PTQ | dense +FT | " + " | ".join(
                      ARM_LABELS[a] for a in STRATEGY_ARMS) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(STRATEGY_ARMS)]
        for w, rows in per.items():
            cells = [f"{rows[a]['nll'][0]:.3f} ± {rows[a]['nll'][1]:.3f} (R {fmt_r(rows[a]['R_nll'])})"
                     for a in STRATEGY_ARMS]
            lines.append(f"| {w} | {rows['dense']['nll'][0]:.3f} ± {rows['dense']['nll'][1]:.3f} | "
                         f"{rows['ptq']['nll'][0]:.3f} ± {rows['ptq']['nll'][1]:.3f} | "
                         f"{rows['dense+ft']['nll'][0]:.3f} ± {rows['dense+ft']['nll'][1]:.3f} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    pairs = [("ste", "frozen"), ("ste", "ste+lloyd"), ("ste", "lut"), ("lut", "frozen")]
    lines += ["Paired accuracy differences (same seed, same dense model), pp: mean ± sd, "
              "wins/losses over the seeds", "",
              "| lr | bits | " + " | ".join(f"{a} - {b}" for a, b in pairs) + " |",
              "|---|---|" + "---:|" * len(pairs)]
    for lr in cfg["lrs"]:
        for bits in cfg["bits"]:
            cells = []
            for a, b in pairs:
                diffs = [r["lr"][str(lr)][f"w{bits}"][a][0] - r["lr"][str(lr)][f"w{bits}"][b][0]
                         for r in result["runs"]]
                m, sd = mean_sd(diffs)
                cells.append(f"{m:+.2f} ± {sd:.2f} ({sum(d > 1e-9 for d in diffs)}W/"
                             f"{sum(d < -1e-9 for d in diffs)}L)")
            lines.append(f"| {lr:g} | w{bits} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# Part 2: language model
# ------------------------------------------------------------------------------------------


def lm_data(seq_len: int):
    from transformers import PreTrainedTokenizerFast

    from coreai_palettize_plugins.recipes import split_blocks, tokenize_blocks

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(DATA / "tiny_tokenizer.json"), bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", unk_token="<unk>")
    text = (DATA / "tiny_corpus.txt").read_text(encoding="utf-8")
    blocks = tokenize_blocks([text], tokenizer, seq_len)
    train, held_out = split_blocks(blocks, 0.1)
    return tokenizer, train, held_out


def lm_model(tokenizer) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **LLAMA)
    return LlamaForCausalLM(config)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


@torch.no_grad()
def lm_eval(model: nn.Module, blocks: torch.Tensor, batch: int = 16) -> dict[str, float]:
    """exp(token-weighted mean next-token NLL) over the held-out blocks."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(blocks), batch):
        ids = blocks[start:start + batch]
        logits = model(input_ids=ids, use_cache=False).logits
        total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       ids[:, 1:].reshape(-1), reduction="sum"))
        tokens += ids[:, 1:].numel()
    return {"nll": total / tokens, "ppl": math.exp(total / tokens)}


def lm_batches(n: int, batch: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    produced = 0
    while True:
        for idx in torch.randperm(n, generator=generator).split(batch):
            if len(idx) < batch:
                continue
            yield idx
            produced += 1
            if produced == steps:
                return


def lm_pretrained(cfg: dict, tokenizer, train, held_out) -> tuple[nn.Module, dict]:
    """Dense pretraining (AdamW, linear warm-up, cosine decay), cached by its settings."""
    key_src = json.dumps({"llama": LLAMA, "vocab": len(tokenizer), "train_blocks": len(train),
                          "first": train[0, :8].tolist(),
                          **{k: cfg[k] for k in ("pretrain_steps", "pretrain_lr", "batch",
                                                 "seq_len", "seed")}}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    path = CACHE / f"lm_pretrain_{key}.pt"
    torch.manual_seed(cfg["seed"])
    model = lm_model(tokenizer)
    if path.exists():
        saved = torch.load(path, weights_only=False)
        model.load_state_dict(saved["state_dict"])
        log(f"lm: loaded cached pretrained model {path.relative_to(REPO)}")
        return model, {**saved["info"], "cache": str(path.relative_to(REPO)), "cached": True}
    steps, lr, warmup = cfg["pretrain_steps"], cfg["pretrain_lr"], max(1, cfg["pretrain_steps"] // 20)
    opt_holder: list[torch.optim.Optimizer] = []

    def make_opt(params):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
        opt_holder.append(opt)
        return opt

    loop = Steps(model, None, make_opt)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt_holder[0], lambda s: min(
        (s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    curve, t0, losses = [], time.time(), []
    every = max(1, steps // 10)
    for idx in lm_batches(len(train), cfg["batch"], steps, cfg["seed"]):
        losses.append(loop(lambda idx=idx: lm_loss(model, train[idx])))
        schedule.step()
        if loop.step % every == 0 or loop.step == steps:
            ev = lm_eval(model, held_out)
            model.train()
            curve.append({"step": loop.step, "train_loss": statistics.mean(losses[-every:]),
                          **ev, "elapsed_s": time.time() - t0})
            log(f"lm pretrain step {loop.step}/{steps}: train loss {curve[-1]['train_loss']:.3f}"
                f" held-out ppl {ev['ppl']:.2f} ({time.time() - t0:.0f} s)")
    loop.finish()
    info = {"steps": steps, "seconds": time.time() - t0, "curve": curve, "key": key_src}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "info": info}, path)
    return model, {**info, "cache": str(path.relative_to(REPO)), "cached": False}


def lm_finetune(model, engine, train, cfg: dict, lr: float) -> float:
    loop = Steps(model, engine, lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0))
    t0 = time.time()
    for idx in lm_batches(len(train), cfg["batch"], cfg["ft_steps"], cfg["seed"] + 1000):
        loop(lambda idx=idx: lm_loss(model, train[idx]))
    loop.finish()
    return time.time() - t0


def run_lm(cfg: dict) -> dict:
    torch.manual_seed(cfg["seed"])
    tokenizer, train, held_out = lm_data(cfg["seq_len"])
    train_probe = train[:len(held_out)]  # fit on (a slice of) the fine-tuning data
    dense, pre = lm_pretrained(cfg, tokenizer, train, held_out)
    epoch_steps = len(train) // cfg["batch"]

    def evaluate(model: nn.Module) -> dict[str, float]:
        train_fit = lm_eval(model, train_probe)
        return {**lm_eval(model, held_out), "train_ppl": train_fit["ppl"]}

    results: dict[str, Any] = {"dense": evaluate(dense), "lr": {}}
    log(f"lm dense held-out ppl {results['dense']['ppl']:.3f}")
    example = (train[:1],)
    ptq: dict[str, Any] = {}
    for lr in cfg["ft_lrs"]:
        per: dict[str, Any] = {}
        control = copy.deepcopy(dense)
        torch.manual_seed(cfg["seed"] + 2000)
        secs = lm_finetune(control, None, train, cfg, lr)
        per["dense+ft"] = {**evaluate(control), "ft_seconds": secs}
        log(f"lm lr {lr:g} dense +FT: ppl {per['dense+ft']['ppl']:.3f} ({secs:.0f} s)")
        for bits in cfg["bits"]:
            res: dict[str, Any] = {}
            for arm, training in STRATEGY_ARMS.items():
                model = copy.deepcopy(dense)
                engine = make_engine(f"w{bits}", training, epoch_steps)
                engine.prepare(model, example)
                if f"w{bits}" not in ptq:
                    ptq[f"w{bits}"] = evaluate(model)
                    ptq[f"w{bits}"]["palettized"] = len(engine.tensors())
                    ptq[f"w{bits}"]["skipped"] = dict(engine.skipped)
                elif abs(lm_eval(model, held_out)["nll"] - ptq[f"w{bits}"]["nll"]) > 1e-6:
                    log(f"WARNING lm w{bits} {arm}: PTQ differs between prepare() calls")
                torch.manual_seed(cfg["seed"] + 2000)
                secs = lm_finetune(model, engine, train, cfg, lr)
                res[arm] = {**evaluate(model), "ft_seconds": secs,
                            "palette_violations": palette_violations(engine)}
                log(f"lm lr {lr:g} w{bits} {arm}: ptq ppl {ptq[f'w{bits}']['ppl']:.3f} -> "
                    f"{res[arm]['ppl']:.3f} ({secs:.0f} s)")
            d, p, c = results["dense"], ptq[f"w{bits}"], per["dense+ft"]
            for arm in STRATEGY_ARMS:
                res[arm]["R_ppl"] = recovery(res[arm]["ppl"], p["ppl"], d["ppl"], 1e-3)
                res[arm]["R_nll"] = recovery(res[arm]["nll"], p["nll"], d["nll"], 1e-4)
                res[arm]["R_ppl_vs_dense_ft"] = recovery(res[arm]["ppl"], p["ppl"], c["ppl"], 1e-3)
            per[f"w{bits}"] = res
        results["lr"][str(lr)] = per
    results["ptq"] = ptq
    n_params = sum(p.numel() for p in dense.parameters())
    return {"config": {**cfg, "llama": LLAMA, "vocab_size": len(tokenizer), "params": n_params,
                       "train_blocks": len(train), "held_out_blocks": len(held_out),
                       "epoch_steps": epoch_steps, "group_size": LM_GROUP},
            "pretrain": pre, "results": results}


def lm_tables(result: dict) -> str:
    res, cfg = result["results"], result["config"]
    lines = []
    for lr in cfg["ft_lrs"]:
        per = res["lr"][str(lr)]
        lines += [f"Fine-tune AdamW lr {lr:g}: held-out perplexity ({cfg['held_out_blocks']} blocks "
                  f"x {cfg['seq_len']} tokens; one seed). Per arm: ppl (R on ppl / R on NLL = "
                  "log ppl / R on ppl with `dense +FT` as the reference)", "",
                  "| bits | dense | PTQ | gap | dense +FT | " + " | ".join(
                      ARM_LABELS[a] for a in STRATEGY_ARMS) + " |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(STRATEGY_ARMS)]
        for bits in cfg["bits"]:
            r, p = per[f"w{bits}"], res["ptq"][f"w{bits}"]
            cells = [f"{r[a]['ppl']:.2f} ({fmt_r(r[a]['R_ppl'])} / {fmt_r(r[a]['R_nll'])} / "
                     f"{fmt_r(r[a]['R_ppl_vs_dense_ft'])})" for a in STRATEGY_ARMS]
            lines.append(f"| w{bits} | {res['dense']['ppl']:.2f} | {p['ppl']:.2f} | "
                         f"{p['ppl'] - res['dense']['ppl']:+.2f} | {per['dense+ft']['ppl']:.2f} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Perplexity on the first "
              f"{cfg['held_out_blocks']} training blocks (data the arms were fine-tuned on):", "",
              "| lr | bits | dense | PTQ | dense +FT | " + " | ".join(
                  ARM_LABELS[a] for a in STRATEGY_ARMS) + " |",
              "|---|---|---:|---:|---:|" + "---:|" * len(STRATEGY_ARMS)]
    for lr in cfg["ft_lrs"]:
        per = res["lr"][str(lr)]
        for bits in cfg["bits"]:
            r = per[f"w{bits}"]
            lines.append(f"| {lr:g} | w{bits} | {res['dense']['train_ppl']:.2f} | "
                         f"{res['ptq'][f'w{bits}']['train_ppl']:.2f} | "
                         f"{per['dense+ft']['train_ppl']:.2f} | "
                         + " | ".join(f"{r[a]['train_ppl']:.2f}" for a in STRATEGY_ARMS) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# Part 3: step time
# ------------------------------------------------------------------------------------------


def time_arms(setups: dict[str, tuple[nn.Module, Any]], loss_fn: Callable, cfg: dict,
              opt_factory: Callable) -> dict[str, dict[str, float]]:
    """Interleaved rounds: each arm runs ``steps`` timed steps per round (rotating order)."""
    loops = {arm: Steps(model, engine, opt_factory) for arm, (model, engine) in setups.items()}
    names = list(loops)
    for name in names:
        for _ in range(cfg["warmup"]):
            loops[name](lambda name=name: loss_fn(loops[name].model))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(cfg["rounds"]):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(cfg["steps"]):
                t = time.perf_counter()
                loops[name](lambda name=name: loss_fn(loops[name].model))
                times[name].append(time.perf_counter() - t)
    for loop in loops.values():
        loop.finish()
    base = statistics.median(times["dense"])
    base_mean = statistics.mean(times["dense"])
    return {n: {"median_ms": 1e3 * statistics.median(v), "mean_ms": 1e3 * statistics.mean(v),
                "ratio": statistics.median(v) / base, "ratio_mean": statistics.mean(v) / base_mean,
                "n": len(v)} for n, v in times.items()}


def run_timing(cfg: dict, lm_cfg: dict, threads: Sequence[int]) -> dict:
    """Step time per thread count (the first one is the headline number)."""
    out: dict[str, Any] = {"threads": list(threads), "config": cfg}
    previous = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            out[f"threads{n}"] = time_cases(cfg, lm_cfg)
    finally:
        torch.set_num_threads(previous)
    return out


def time_cases(cfg: dict, lm_cfg: dict) -> dict:
    out: dict[str, Any] = {}
    tokenizer, train, _ = lm_data(lm_cfg["seq_len"])
    torch.manual_seed(0)
    base = lm_model(tokenizer)
    ids = train[:lm_cfg["batch"]]
    # A Lloyd step every ``timing_lloyd`` steps so that the timed window contains some.
    lloyd_every = cfg["steps"]
    setups: dict[str, tuple[nn.Module, Any]] = {"dense": (copy.deepcopy(base), None)}
    for arm, training in STRATEGY_ARMS.items():
        model = copy.deepcopy(base)
        engine = make_engine(f"w{cfg['lm_bits']}", training, lloyd_every)
        engine.prepare(model, (ids[:1],))
        setups[arm] = (model, engine)
    log(f"timing: lm ({torch.get_num_threads()} threads)")
    out["lm"] = {"batch": lm_cfg["batch"], "seq_len": lm_cfg["seq_len"], "bits": cfg["lm_bits"],
                 "arms": time_arms(setups, lambda m: lm_loss(m, ids), cfg,
                                   lambda ps: torch.optim.AdamW(ps, lr=1e-4))}
    from coreai_palettize_plugins.demo.digits import load_digits_tensors

    train_d, _ = load_digits_tensors(0)
    x, y = train_d.tensors
    for batch in cfg["digits_batches"]:
        torch.manual_seed(0)
        base_d = digits_model()
        preset, modules = digits_spec(cfg["digits_bits"])
        setups = {"dense": (copy.deepcopy(base_d), None)}
        for arm, training in STRATEGY_ARMS.items():
            model = copy.deepcopy(base_d)
            engine = make_engine(preset, training, lloyd_every, modules)
            engine.prepare(model, torch.zeros(1, 1, 8, 8))
            setups[arm] = (model, engine)
        xb, yb = x[:batch], y[:batch]
        log(f"timing: digits bs{batch} ({torch.get_num_threads()} threads)")
        digits_cfg = {**cfg, "rounds": cfg["rounds"] * 2, "steps": cfg["steps"] * 4}
        out[f"digits_bs{batch}"] = {
            "batch": batch, "bits": cfg["digits_bits"],
            "arms": time_arms(setups, lambda m, xb=xb, yb=yb: F.cross_entropy(m(xb), yb),
                              digits_cfg, lambda ps: torch.optim.Adam(ps, lr=1e-4))}
    out["lloyd_every_in_timing"] = lloyd_every
    return out


def timing_cases(timing: dict) -> list[tuple[int, str, dict]]:
    """(threads, case, data) for every timed case, headline thread count first."""
    return [(n, case, data) for n in timing["threads"]
            for case, data in timing[f"threads{n}"].items()
            if isinstance(data, dict) and "arms" in data]


def case_label(n: int, case: str, data: dict, sep: str = " ") -> str:
    return (f"{'LM' if case == 'lm' else 'digits'} w{data['bits']}{sep}bs{data['batch']}, "
            f"{n} thr")


def timing_table(timing: dict) -> str:
    cases = timing_cases(timing)
    lloyd = timing[f"threads{timing['threads'][0]}"]["lloyd_every_in_timing"]
    lines = ["Median step time (ms) for dense; for the strategies the ratio of median step "
             "times vs dense (in brackets: ratio of mean step times, which includes the Lloyd "
             f"steps of `ste+lloyd`, here one every {lloyd} steps, about 10x more often than "
             "in the quality runs).", "",
             "| arm | " + " | ".join(case_label(*c) for c in cases) + " |",
             "|---|" + "---:|" * len(cases)]
    for arm in ["dense", *STRATEGY_ARMS]:
        cells = []
        for _, _, data in cases:
            a = data["arms"][arm]
            cells.append(f"{a['median_ms']:.1f} ms" if arm == "dense"
                         else f"{a['ratio']:.2f}x ({a['ratio_mean']:.2f}x)")
        label = ARM_LABELS[arm].replace("=epoch", f"={lloyd}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# Goals, plot, report
# ------------------------------------------------------------------------------------------


def goals(results: dict) -> list[str]:
    lines = []
    best_arms = set()
    if "digits" in results:
        cfg = results["digits"]["config"]
        for lr in cfg["lrs"]:
            rows = results["digits"]["summary"][str(lr)].get("w2")
            if not rows:
                continue
            best = max(STRATEGY_ARMS, key=lambda a: rows[a]["acc"][0])
            best_arms.add(best)
            r = rows[best]["R_acc"]
            ok = r is not None and r >= 0.8
            lines.append(f"- digits w2, lr {lr:g}: best strategy `{best}` "
                         f"{rows[best]['acc'][0]:.2f} % vs PTQ {rows['ptq']['acc'][0]:.2f} %, "
                         f"dense {rows['dense']['acc'][0]:.2f} %: R = {fmt_r(r)} "
                         f"(goal >= 0.80): **{'met' if ok else 'MISSED'}**")
    if "lm" in results:
        res, cfg = results["lm"]["results"], results["lm"]["config"]
        for lr in cfg["ft_lrs"]:
            per = res["lr"][str(lr)]
            if "w3" not in per:
                continue
            best = min(STRATEGY_ARMS, key=lambda a: per["w3"][a]["ppl"])
            best_arms.add(best)
            r = per["w3"][best]["R_ppl"]
            ok = r is not None and r >= 0.7
            lines.append(f"- LM w3, lr {lr:g}: best strategy `{best}` ppl "
                         f"{per['w3'][best]['ppl']:.2f} vs PTQ {res['ptq']['w3']['ppl']:.2f}, "
                         f"dense {res['dense']['ppl']:.2f}: R_ppl = {fmt_r(r)} (R_nll = "
                         f"{fmt_r(per['w3'][best]['R_nll'])}; vs dense +FT "
                         f"{per['dense+ft']['ppl']:.2f}: {fmt_r(per['w3'][best]['R_ppl_vs_dense_ft'])})"
                         f" (goal >= 0.70): **{'met' if ok else 'MISSED'}**")
    if "timing" in results:
        cases = timing_cases(results["timing"])
        for arm in [a for a in STRATEGY_ARMS if a in best_arms]:
            cells = []
            for n, case, data in cases:
                ratio = data["arms"][arm]["ratio"]
                cells.append(f"{case_label(n, case, data)}: {ratio:.2f}x "
                             f"({'met' if ratio <= 1.5 else '**MISSED**'})")
            lines.append(f"- step time of `{arm}` vs dense (goal <= 1.5x): " + "; ".join(cells))
    return lines


COLORS = {"dense": "#555555", "ptq": "#d62728", "dense+ft": "#aaaaaa", "frozen": "#ff7f0e",
          "ste": "#1f77b4", "ste+lloyd": "#17becf", "lut": "#2ca02c"}


def grouped_bars(ax, groups: Sequence[str], arms: Sequence[str], value: Callable) -> None:
    """One bar per (group, arm); ``value(arm, group_index)`` -> (height, error or None)."""
    width = 0.84 / len(arms)
    for i, arm in enumerate(arms):
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(groups))]
        vals = [value(arm, j) for j in range(len(groups))]
        errs = [v[1] for v in vals]
        ax.bar(xs, [v[0] for v in vals], width, color=COLORS[arm],
               yerr=errs if any(e is not None for e in errs) else None, capsize=2,
               edgecolor="white", linewidth=0.3)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawers: list[Callable] = []
    if "digits" in results:
        cfg = results["digits"]["config"]
        for lr in cfg["lrs"]:
            def draw_digits(ax, lr=lr, cfg=cfg):
                summary = results["digits"]["summary"][str(lr)]
                ws = list(summary)
                arms = ["dense", "ptq", "dense+ft", *STRATEGY_ARMS]
                grouped_bars(ax, ws, arms, lambda a, j: (summary[ws[j]][a]["acc"][0],
                                                         summary[ws[j]][a]["acc"][1]))
                low = min(summary[w]["ptq"]["acc"][0] - summary[w]["ptq"]["acc"][1] for w in ws)
                ax.set_ylim(max(0, low - 2), 100.5)
                ax.set_ylabel("test accuracy % (higher is better)")
                ax.set_title(f"Digits CNN 8/16/32: {len(cfg['seeds'])} seed(s), mean ± sd; "
                             f"fine-tune {cfg['ft_epochs']} epochs, Adam lr {lr:g}", fontsize=9)
            drawers.append(draw_digits)
    if "lm" in results:
        def draw_lm(ax):
            res, cfg = results["lm"]["results"], results["lm"]["config"]
            groups = [(lr, b) for lr in cfg["ft_lrs"] for b in cfg["bits"]]
            arms = ["ptq", "dense+ft", *STRATEGY_ARMS]

            def value(arm, j):
                lr, b = groups[j]
                per = res["lr"][str(lr)]
                if arm == "ptq":
                    return res["ptq"][f"w{b}"]["ppl"], None
                if arm == "dense+ft":
                    return per["dense+ft"]["ppl"], None
                return per[f"w{b}"][arm]["ppl"], None

            grouped_bars(ax, [f"w{b}, lr {lr:g}" for lr, b in groups], arms, value)
            ax.axhline(res["dense"]["ppl"], color=COLORS["dense"], ls="--",
                       label=f"dense ({res['dense']['ppl']:.2f})")
            vals = [value(a, j)[0] for a in arms for j in range(len(groups))]
            ax.set_ylim(min([*vals, res["dense"]["ppl"]]) * 0.97, max(vals) * 1.02)
            ax.set_ylabel("held-out perplexity (lower is better)")
            ax.set_title(f"Llama {cfg['params'] / 1e6:.2f}M (presets w3/w4): {cfg['ft_steps']} "
                         "fine-tune steps, AdamW; one seed", fontsize=9)
        drawers.append(draw_lm)
    if "timing" in results:
        def draw_timing(ax):
            tim = results["timing"]
            cases = timing_cases(tim)
            lloyd = tim[f"threads{tim['threads'][0]}"]["lloyd_every_in_timing"]
            grouped_bars(ax, [case_label(*c, sep="\n") for c in cases], list(STRATEGY_ARMS),
                         lambda a, j: (cases[j][2]["arms"][a]["ratio"], None))
            ax.axhline(1.0, color=COLORS["dense"], ls="--", label="dense = 1")
            ax.axhline(1.5, color="black", ls=":", label="goal 1.5x")
            ax.set_ylabel("step time / dense (median)")
            ax.set_title("Training step time vs dense (interleaved, same process; ste+lloyd: "
                         f"LUT update every {lloyd} steps)", fontsize=9)
        drawers.append(draw_timing)
    cols = min(2, len(drawers))
    rows = math.ceil(len(drawers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.2 * cols, 4.6 * rows + 0.5), squeeze=False)
    for ax, draw in zip(axes.flat, drawers):
        draw(ax)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right", framealpha=0.85)
    for ax in list(axes.flat)[len(drawers):]:
        ax.axis("off")
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=c, label=ARM_LABELS[a]) for a, c in COLORS.items()],
               loc="upper center", ncol=len(COLORS), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict[str, str]:
    import transformers

    try:
        import coreai_opt

        coreai = getattr(coreai_opt, "__version__", "?")
    except ImportError:  # pragma: no cover
        coreai = "?"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
    except OSError:  # pragma: no cover
        commit = "?"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "torch": torch.__version__,
            "coreai_opt": coreai, "transformers": transformers.__version__,
            "threads": str(torch.get_num_threads()), "commit": commit,
            "cpu": platform.processor() or platform.machine()}


def markdown(results: dict, command: str) -> str:
    env = results["environment"]
    lines = [MARK_BEGIN, "", "```", command, "```", "",
             f"- Date: {env['date']}; wall time {results['wall_seconds'] / 60:.1f} min; commit "
             f"`{env['commit']}` (plus uncommitted work in the tree)",
             f"- torch {env['torch']}, coreai-opt {env['coreai_opt']}, transformers "
             f"{env['transformers']}, Python {env['python']}, no GPU",
             f"- Raw numbers: `{results['outputs'][0]}`; plot: `{results['outputs'][1]}`.",
             f"- Training threads (digits, LM): {results['threads']} "
             "(`torch.set_num_threads`); step time: see its table.",
             ""]
    if "digits" in results:
        cfg = results["digits"]["config"]
        lines += ["### Digits CNN", "",
                  f"`{cfg['model']}`, split `{cfg['split']}` (1437 train / 360 test; one image = "
                  f"0.28 pp). Dense: Adam lr 1e-3, batch {cfg['batch']}, {cfg['dense_epochs']} "
                  f"epochs. Every arm (and `dense +FT`): fresh Adam, batch {cfg['batch']}, "
                  f"{cfg['ft_epochs']} epochs, the same shuffling generator (seed + 1000). "
                  f"wN = `{{n_bits: N, group_size: 8}}`, head `net.7` per-tensor. "
                  f"`ste+lloyd` updates the LUT every {cfg['epoch_steps']} steps (one epoch). "
                  f"Seeds {cfg['seeds']} (dense init + shuffling); sd = sample sd. R on the means, "
                  "n/a when the gap is < 0.5 pp (accuracy) or < 0.01 (NLL).", "",
                  digits_tables(results["digits"])]
    if "lm" in results:
        cfg, pre = results["lm"]["config"], results["lm"]["pretrain"]
        final = pre["curve"][-1] if pre.get("curve") else {}
        n_pal = next((r["palettized"] for r in results["lm"]["results"]["ptq"].values()), "?")
        lines += ["### Small Llama LM", "",
                  f"`LlamaForCausalLM` hidden {LLAMA['hidden_size']}, {LLAMA['num_hidden_layers']}"
                  f" layers, {LLAMA['num_attention_heads']} heads, intermediate "
                  f"{LLAMA['intermediate_size']}, vocab {cfg['vocab_size']}, untied "
                  f"({cfg['params']:,} params). Shipped corpus + tokenizer, blocks of "
                  f"{cfg['seq_len']} tokens: {cfg['train_blocks']} train / "
                  f"{cfg['held_out_blocks']} held out (the last 10 %). Pretraining: "
                  f"{cfg['pretrain_steps']} steps, batch {cfg['batch']}, AdamW lr "
                  f"{cfg['pretrain_lr']:g} (wd 0.1, warm-up + cosine), "
                  f"{pre['seconds']:.0f} s when it ran (cached: `{pre['cache']}`); final train loss "
                  f"{final.get('train_loss', float('nan')):.3f}. Presets `w3`/`w4` (group of "
                  f"{cfg['group_size']} output channels) on all {n_pal} "
                  f"Linear weights incl. `lm_head`; embeddings dense. Every arm (and `dense +FT`):"
                  f" fresh AdamW (lr {' or '.join(f'{lr:g}' for lr in cfg['ft_lrs'])}, no weight "
                  f"decay), {cfg['ft_steps']} steps, batch "
                  f"{cfg['batch']}, the same batch order; `ste+lloyd` updates the LUT every "
                  f"{cfg['epoch_steps']} steps (one epoch).", "",
                  lm_tables(results["lm"])]
    if "timing" in results:
        tcfg = results["timing"]["config"]
        lines += ["### Step time", "",
                  f"One process; `torch.set_num_threads(n)` for n in {results['timing']['threads']}; "
                  "all arms built from the same "
                  f"initial weights; {tcfg['warmup']} warm-up steps each, then "
                  f"{tcfg['rounds']} rounds x {tcfg['steps']} steps (digits: "
                  f"{2 * tcfg['rounds']} x {4 * tcfg['steps']}), arms interleaved in a rotating "
                  "order. A step = zero_grad + forward + loss + backward + optimizer.step + "
                  "`engine.sync_step`.", "", timing_table(results["timing"])]

    lines += ["### Goals", "", *goals(results), "", MARK_END]
    return "\n".join(lines)


def upsert_section(path: Path, body: str, title: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        _, tail = rest.split(MARK_END, 1)
        text = head + body + tail
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{body}\n"
    path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["digits", "lm", "timing", "all"], default="all")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 seed, few epochs/steps, tiny pretraining")
    parser.add_argument("--results-md", type=Path, default=None,
                        help="upsert the generated section into this markdown file")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--report-only", type=Path, default=None, metavar="JSON",
                        help="re-render the markdown and the plot from a results JSON (no runs)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG output path")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the training of the quality parts (default 1: "
                        "robust on a shared CPU)")
    parser.add_argument("--timing-threads", type=int, nargs="+", default=[2, 1],
                        help="torch thread counts for the step-time part (first = headline)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    settings = QUICK if args.quick else FULL
    suffix = "_quick" if args.quick else ""
    out = args.out or (CACHE / f"quality_results{suffix}.json" if args.quick
                       else BENCH / "quality_results.json")
    png = args.plot or (CACHE / f"quality{suffix}.png" if args.quick else BENCH / "quality.png")
    if args.report_only is not None:
        results = json.loads(args.report_only.read_text(encoding="utf-8"))
        plot(results, png)
        text = markdown(results, results["command"])
        print(text)
        if args.results_md is not None:
            upsert_section(args.results_md, text, SECTION_TITLE)
        return
    parts = ["digits", "lm", "timing"] if args.part == "all" else [args.part]
    command = " ".join(["python", "benchmarks/quality.py",
                        *(argv if argv is not None else sys.argv[1:])])
    results: dict[str, Any] = {"environment": environment(), "command": command,
                               "quick": args.quick, "threads": args.threads,
                               "outputs": [str(p.resolve().relative_to(REPO)) for p in (out, png)]}
    t0 = time.time()
    for part in parts:
        t = time.time()
        if part == "digits":
            results["digits"] = run_digits(settings["digits"])
        elif part == "lm":
            results["lm"] = run_lm(settings["lm"])
        else:
            results["timing"] = run_timing(settings["timing"], settings["lm"],
                                           args.timing_threads)
        results.setdefault("part_seconds", {})[part] = time.time() - t
        log(f"{part} done in {time.time() - t:.0f} s")
    results["wall_seconds"] = time.time() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    plot(results, png)
    text = markdown(results, command)
    print(text)
    if args.results_md is not None:
        upsert_section(args.results_md, text, SECTION_TITLE)
    log(f"wrote {out} and {png} ({results['wall_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
