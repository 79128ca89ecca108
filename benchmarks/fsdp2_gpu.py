"""One-shot GPU check of FSDP2 (issue #20) on a CUDA machine; CI has none.

    python benchmarks/fsdp2_gpu.py --out DIR [--layers 2]
    python benchmarks/fsdp2_gpu.py --out DIR --smoke      # on a CPU: what runs without a GPU
    python benchmarks/fsdp2_gpu.py --out DIR --skip-big --calibration 5 --budget 5.0

1. HF ``Trainer`` with accelerate's FSDP2 (``fsdp="full_shard"``, ``fsdp_config`` version 2),
   one process under torchrun, a tiny Llama, ``PalettizationTrainerCallback("w4")``:
   a. lr 0, 2 steps: the packed artifact equals the same run without FSDP;
   b. 4 steps saving ``checkpoint-2``, then a resume from it: no k-means on the resume, and the
      export equals the uninterrupted run's.
   With ``--calibration``/``--budget`` every arm calibrates on the train data and allocates
   the bits (the allocation and LUTs must equal the run without FSDP).
2. The engine API with ``fully_shard`` (NCCL) on Llama layers of the 1.1B shape (TinyLlama:
   hidden 2048, MLP 5632, vocab 32000; ``--layers`` of its 22), fp32 master weights with bf16
   compute (``MixedPrecisionPolicy``): k-means seconds, median step and peak memory, against the
   same model without ``fully_shard`` (bf16 autocast) loaded from the sharded run's state
   (no second k-means).

Each arm runs in its own torchrun process. Writes ``fsdp2_gpu.json`` into ``--out`` after
each part (what finished comes back even if a later part runs out of time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lut_hash(engine) -> str:
    digest = hashlib.sha256()
    for t in engine.tensors():
        digest.update(t.fake.centroids.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- 1. HF Trainer + accelerate FSDP2


def hf_worker(args: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from coreai_palettize_plugins.hf import PalettizationTrainerCallback

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=512, max_position_embeddings=128))
    tokens = torch.randint(0, 512, (16, 32), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    fsdp = args.arm != "single"
    out = Path(args.out) / args.arm
    targs = TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=2,
        learning_rate=args.lr, lr_scheduler_type="constant", optim="adamw_torch",
        save_strategy="steps" if args.save else "no", save_steps=2, report_to=[],
        logging_steps=1, seed=0, data_seed=0, dataloader_num_workers=0,
        use_cpu=args.smoke, fsdp="full_shard" if fsdp else "",
        fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
        if fsdp else None)
    accuracy = ({"calibration": {"samples": args.calibration, "show_progress": False}}
                if args.calibration else {})
    if args.budget:
        accuracy["budget"] = {"bits_per_weight": args.budget, "choices": [2, 4, 8]}
    callback = PalettizationTrainerCallback("w4", export_formats=["torch"], **accuracy)
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[callback])
    facts: dict = {"arm": args.arm}
    try:
        trainer.train(resume_from_checkpoint=args.resume)
        engine = callback.engine
        facts.update(
            fsdp_enabled=bool(getattr(trainer, "is_fsdp_enabled", False)),
            sharded=any(type(p).__name__ == "DTensor" for p in trainer.model.parameters()),
            restored=engine.restored, global_step=trainer.state.global_step,
            cluster_mode=engine.cluster_stats.mode if engine.cluster_stats else None,
            lut_hash=_lut_hash(engine), exported=callback.export_result is not None,
            allocation=[[x.name, x.n_bits] for x in engine.allocation.layers]
            if engine.allocation else None,
            calibration=engine.calibration_stats.to_dict() if engine.calibration_stats else None,
            export_errors=dict(callback.export_result.errors) if callback.export_result else None)
    except Exception as error:
        facts["error"] = f"{type(error).__name__}: {error}"[:2000]
        raise
    finally:
        (Path(args.out) / f"{args.arm}.json").write_text(json.dumps(facts, indent=1))


def _torchrun(*argv: str, timeout: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
           f"--master_port={_port()}", __file__, *argv]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout} s"
    return done.returncode, done.stderr[-3000:]


def _safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    file = path / "palettized" / "palettized.safetensors"
    return load_file(file) if file.is_file() else {}


def _equal(a: dict, b: dict) -> bool:
    return bool(a) and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def hf_part(args: argparse.Namespace, out: Path) -> dict:
    extra = (["--calibration", str(args.calibration)] if args.calibration else []) + (
        ["--budget", str(args.budget)] if args.budget else [])
    arms = [("single", ["--lr", "0", "--steps", "2", *extra])]
    if not args.smoke:
        arms += [("fsdp2_lr0", ["--lr", "0", "--steps", "2", *extra]),
                 ("fsdp2", ["--lr", "1e-3", "--steps", "4", "--save", *extra]),
                 ("fsdp2_resumed", ["--lr", "1e-3", "--steps", "4", "--save", "--resume",
                                    str(out / "fsdp2" / "checkpoint-2"), *extra])]
    if args.arms:
        arms = [(arm, flags) for arm, flags in arms if arm in args.arms.split(",")]
    result: dict = {}
    for arm, flags in arms:
        started = time.perf_counter()
        code, stderr = _torchrun("--worker", "hf", "--arm", arm, "--out", str(out),
                                 *(["--smoke"] if args.smoke else []), *flags, timeout=300)
        facts_file = out / f"{arm}.json"
        facts = json.loads(facts_file.read_text()) if facts_file.is_file() else {}
        facts.update(returncode=code, seconds=round(time.perf_counter() - started, 1))
        if code:
            facts["stderr_tail"] = stderr
        result[arm] = facts
    if not args.smoke and {"single", "fsdp2_lr0"} <= set(result):
        result["luts_equal_single"] = (result["fsdp2_lr0"].get("lut_hash")
                                       == result["single"].get("lut_hash"))
        result["allocation_equals_single"] = (result["fsdp2_lr0"].get("allocation")
                                              == result["single"].get("allocation"))
        result["lr0_export_equals_single"] = _equal(_safetensors(out / "fsdp2_lr0"),
                                                     _safetensors(out / "single"))
    if not args.smoke and {"fsdp2", "fsdp2_resumed"} <= set(result):
        result["resume_export_equals_uninterrupted"] = _equal(
            _safetensors(out / "fsdp2_resumed"), _safetensors(out / "fsdp2"))
    return result


# ---------------------------------------------------------------- 2. engine + fully_shard, 1B shape


def big_worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from coreai_palettize_plugins import Palettization

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    dims = (dict(hidden_size=64, intermediate_size=176, vocab_size=512) if args.smoke else
            dict(hidden_size=2048, intermediate_size=5632, vocab_size=32000))
    config = LlamaConfig(num_hidden_layers=args.layers, num_attention_heads=32 if not args.smoke
                         else 4, num_key_value_heads=4, max_position_embeddings=2048, **dims)
    batch, seq = (4, 1024) if not args.smoke else (2, 32)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), device=device,
                           generator=torch.Generator(device=device).manual_seed(1))
    facts: dict = {"layers": args.layers, "device": str(device),
                   "gpu": torch.cuda.get_device_name(0) if cuda else None}
    out = Path(args.out)

    def measure(model, engine, autocast: bool) -> dict:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=1e-5)
        engine.start_training(0)
        times = []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for step in range(args.steps + 1):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            engine.before_optimizer_step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            engine.after_optimizer_step(step + 1)
            if cuda:
                torch.cuda.synchronize()
            if step:  # the first step warms up
                times.append(time.perf_counter() - started)
        engine.stop_training()
        return {"median_step_s": statistics.median(times), "loss": float(loss),
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    facts["parameters_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    engine = Palettization("w4", export_formats=[])
    engine.attach(model, {"input_ids": tokens[:1, :16]})
    mesh = init_device_mesh(device.type, (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    started = time.perf_counter()
    engine.ensure_clustered()
    facts["kmeans_s"] = time.perf_counter() - started
    facts["cluster_mode"] = engine.cluster_stats.mode
    facts["fsdp2"] = measure(model, engine, autocast=False)
    (out / "big.json").write_text(json.dumps(facts, indent=1))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    lut_hash = _lut_hash(engine)
    del model, engine
    if cuda:
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    with torch.device(device):
        plain = LlamaForCausalLM(config)
    engine = Palettization("w4", export_formats=[])
    engine.prepare(plain, {"input_ids": tokens[:1, :16]}, state_dict=state)  # no k-means
    del state
    facts["plain_luts_equal"] = _lut_hash(engine) == lut_hash
    facts["plain"] = measure(plain, engine, autocast=True)
    facts["step_fsdp2_vs_plain"] = facts["fsdp2"]["median_step_s"] / facts["plain"]["median_step_s"]
    (out / "big.json").write_text(json.dumps(facts, indent=1))
    dist.destroy_process_group()


def big_part(args: argparse.Namespace, out: Path) -> dict:
    code, stderr = _torchrun("--worker", "big", "--out", str(out), "--layers", str(args.layers),
                             "--steps", str(args.steps), *(["--smoke"] if args.smoke else []),
                             timeout=args.big_timeout)
    facts = json.loads((out / "big.json").read_text()) if (out / "big.json").is_file() else {}
    facts["returncode"] = code
    if code:
        facts["stderr_tail"] = stderr
    return facts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--worker", choices=["hf", "big"])
    parser.add_argument("--arm")
    parser.add_argument("--lr", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--resume")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=0, help="HF arms: samples")
    parser.add_argument("--budget", type=float, default=0.0, help="HF arms: bits per weight")
    parser.add_argument("--big-timeout", type=float, default=360)
    parser.add_argument("--smoke", action="store_true", help="CPU: the parts that need no GPU")
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--arms", default="", help="HF arms to run, comma-separated (all)")
    args = parser.parse_args()
    if args.worker == "hf":
        return hf_worker(args)
    if args.worker == "big":
        return big_worker(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"torch": torch.__version__}
    try:
        import accelerate
        import transformers
        report.update(transformers=transformers.__version__, accelerate=accelerate.__version__)
    except ImportError:
        pass
    report["hf"] = hf_part(args, out)
    (out / "fsdp2_gpu.json").write_text(json.dumps(report, indent=1))
    if not args.skip_big:
        report["big"] = big_part(args, out)
        (out / "fsdp2_gpu.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
