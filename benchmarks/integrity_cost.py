"""Cost of the integrity checks (issue #17): per-tensor sha256 of a ~27M-parameter packed artifact
(write and load), and the per-step LUT check against one training step of the tiny Llama.

    OMP_NUM_THREADS=2 python benchmarks/integrity_cost.py
"""

from __future__ import annotations

import shutil
import tempfile
import time
import zlib
from pathlib import Path

import torch

from coreai_palettize_plugins import Palettization, load_palettized
from coreai_palettize_plugins.core.integrity import check_luts_finite, tensor_digest
from coreai_palettize_plugins.export.artifact import PACKED_NAME


def llama(hidden: int, layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab,
        max_position_embeddings=128, tie_word_embeddings=False))


def best(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def artifact_cost() -> None:
    model = llama(hidden=512, layers=6, vocab=8192)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randint(0, 8192, (1, 16))
    engine = Palettization("w4", training="frozen")
    engine.prepare(model, (x,))
    out = Path(tempfile.mkdtemp())
    try:
        engine.export(out, formats=["torch"])
        from safetensors.torch import load_file

        stored = load_file(str(out / PACKED_NAME))
        size = sum(t.numel() * t.element_size() for t in stored.values())
        sha = best(lambda: [tensor_digest(t) for t in stored.values()])
        crc = best(lambda: [zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes())
                            for t in stored.values()])
        load = best(lambda: load_palettized(out, lambda: llama(512, 6, 8192)), repeat=3)
        print(f"artifact: {params / 1e6:.1f}M params, {size / 1e6:.1f} MB of tensors in "
              f"{len(stored)} tensors; sha256 all {sha * 1e3:.1f} ms, crc32 all "
              f"{crc * 1e3:.1f} ms; load_palettized (with sha256 verify) {load * 1e3:.0f} ms")
    finally:
        shutil.rmtree(out)


def step_cost() -> None:
    from helpers import TokenDataset, tiny_llama

    for training in ("ste", "lut"):
        model = tiny_llama()
        data = TokenDataset()
        batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in ("input_ids", "labels")}
        engine = Palettization("w4", training=training)
        engine.prepare(model, (batch["input_ids"][:1],))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
        engine.start_training(0)

        def step(model=model, batch=batch, engine=engine, optimizer=optimizer) -> None:
            optimizer.zero_grad()
            model(**batch).loss.backward()
            engine.before_optimizer_step()
            optimizer.step()

        step()
        tensors = engine.tensors()
        step_s = best(step, repeat=10)
        check_s = best(lambda tensors=tensors: check_luts_finite(tensors, 1), repeat=50)
        print(f"tiny Llama ({training}, {len(tensors)} LUT tensors): step {step_s * 1e3:.1f} ms, "
              f"LUT check {check_s * 1e6:.0f} us ({100 * check_s / step_s:.2f} % of a step)")
        engine.stop_training()


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    torch.set_num_threads(2)
    step_cost()
    artifact_cost()
