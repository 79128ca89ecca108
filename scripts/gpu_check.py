"""GPU check (run on a CUDA machine; CI has none): the callbacks on one GPU, and step time.

    python scripts/gpu_check.py --out /tmp/gpu_check

1. Lightning on cuda: frozen / ste / lut fit + export; the packed artifact, loaded on the CPU,
   reproduces the trained model's logits (up to GPU-vs-CPU float differences).
2. HF Trainer on cuda with a tiny Llama and the straight-through strategy: export + reload.
3. Step time (forward, backward, AdamW step, schedule step) on a ~50M-parameter Llama,
   bf16 autocast, dense vs each strategy, interleaved; medians and ratios vs dense.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from coreai_palettize_plugins import Palettization, load_palettized
from coreai_palettize_plugins.demo.digits import DigitsCNN, DigitsDataModule
from coreai_palettize_plugins.lightning import PalettizationCallback


def lightning_on_gpu(out: Path) -> dict:
    results = {}
    for training in ("frozen", "ste", "lut"):
        pl.seed_everything(0, verbose=False)
        model = DigitsCNN()
        callback = PalettizationCallback("w4", overrides={"linear": "w8"}, training=training,
                                         export_dir=out / f"lightning_{training}",
                                         export_formats=["torch"])
        trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=2, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, callbacks=[callback])
        trainer.fit(model, DigitsDataModule())
        fake = callback.engine.tensors()[0].fake
        x = torch.rand(8, 1, 8, 8)
        expected = model.cuda().eval()(x.cuda()).float().cpu()
        loaded = load_palettized(out / f"lightning_{training}", DigitsCNN)
        results[training] = {
            "export_errors": callback.export_result.errors,
            "max_abs_diff_cpu_reload_vs_gpu": float((loaded(x) - expected).abs().max()),
            "indices_device": str(fake.indices.device),
            "centroids_device": str(fake.centroids.device),
            "trained_steps": trainer.global_step,
        }
    return results


def hf_on_gpu(out: Path) -> dict:
    import sys

    from transformers import Trainer, TrainingArguments

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import TokenDataset, tiny_llama

    from coreai_palettize_plugins.hf import PalettizationTrainerCallback

    model = tiny_llama()
    callback = PalettizationTrainerCallback("w4", training="ste", export_dir=out / "hf",
                                            export_formats=["torch"])
    args = TrainingArguments(str(out / "hf_run"), max_steps=8, per_device_train_batch_size=8,
                             learning_rate=1e-3, report_to=[], save_strategy="no",
                             disable_tqdm=True, logging_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback])
    trainer.train()
    x = torch.randint(0, 256, (2, 16))
    expected = model.eval()(x.to(model.device)).logits.float().cpu()
    loaded = load_palettized(out / "hf")
    return {"device": str(model.device), "export_errors": callback.export_result.errors,
            "max_abs_diff_cpu_reload_vs_gpu": float((loaded(x).logits - expected).abs().max()),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def step_times(rounds: int = 5, steps: int = 5) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=8192)
    base = LlamaForCausalLM(config)
    tokens = torch.randint(0, 8192, (8, 256), device="cuda")
    arms = {}
    for name in ("dense", "frozen", "ste", "lut"):
        model = copy.deepcopy(base)
        engine = None
        if name != "dense":
            engine = Palettization("w4", training=name, export={"formats": []})
            engine.prepare(model, tokens[:1, :16].cpu())
        model.cuda().train()
        if engine is not None:
            engine.start_training(0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        arms[name] = (model, engine, optimizer, [])
    for round_ in range(rounds + 1):
        for name, (model, engine, optimizer, times) in arms.items():
            print(f"round {round_} arm {name}", flush=True)
            for step in range(steps):
                torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(tokens).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                       tokens[:, 1:].flatten())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if engine is not None:
                    engine.sync_step(round_ * steps + step + 1)
                torch.cuda.synchronize()
                if round_:  # round 0 is warm-up
                    times.append(time.perf_counter() - start)
    dense = statistics.median(arms["dense"][3])
    return {name: {"median_ms": 1000 * statistics.median(t), "vs_dense":
                   statistics.median(t) / dense} for name, (_, _, _, t) in arms.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu_check"))
    parser.add_argument("--parts", default="lightning,hf,step_time")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for part, fn in (("lightning", lambda: lightning_on_gpu(args.out)),
                     ("hf", lambda: hf_on_gpu(args.out)), ("step_time", step_times)):
        if part not in args.parts.split(","):
            continue
        start = time.perf_counter()
        try:
            report[part] = fn()
        except Exception:  # report every part, even if one fails
            import traceback

            report[part] = {"error": traceback.format_exc(limit=-8)}
        report[f"{part}_seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps({part: report[part]}, indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
