"""Size of the exported artifacts versus the theoretical floor and the fp16 dense model.

For each case the model is prepared with ``Palettization`` (k-means, no training), exported with
``engine.export(tmpdir)``, and ``report.json`` from the export directory is read:

* floor: ``palettized_bytes`` (n-bit indices + LUTs + the dense remainder at its own dtype)
* ``.aimodel``: ``extra.coreai_artifact_bytes`` (a directory; its files summed)
* fp16: ``dense_fp16_bytes`` (every weight dense at fp16)
* packed torch: ``extra.torch_artifact_bytes`` (``palettized.safetensors``)

Goal: ``.aimodel`` / floor <= 1.05.

    python benchmarks/export_size.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import torch.nn as nn

from coreai_palettize_plugins import Palettization

GOAL = 1.05


def digits() -> tuple[nn.Module, tuple[Any, ...]]:
    from coreai_palettize_plugins.demo.digits import DigitsCNN

    model = DigitsCNN()
    return model, (model.example_input_array,)


def llama(use_cache: bool | None = False, layers: int = 4) -> tuple[nn.Module, tuple[Any, ...]]:
    """The small Llama; ``use_cache=None`` keeps transformers' default (True)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    extra = {} if use_cache is None else {"use_cache": use_cache}
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=2048, **extra)
    return LlamaForCausalLM(config).eval(), (torch.randint(0, 2048, (1, 16)),)


def cases(quick: bool) -> list[tuple[str, Any, dict[str, Any]]]:
    layers = 1 if quick else 4
    out = [
        ("DigitsCNN w4 + linear=w8", digits, {"config": "w4", "overrides": {"linear": "w8"}}),
        ("DigitsCNN w4", digits, {"config": "w4"}),
        ("DigitsCNN w6", digits, {"config": "w6"}),
        ("DigitsCNN w2", digits, {"config": "w2"}),
        (f"Llama-{layers}L w4 (default use_cache=True)",
         lambda: llama(None, layers), {"config": "w4"}),
        (f"Llama-{layers}L w4 (use_cache=False)", lambda: llama(False, layers), {"config": "w4"}),
        (f"Llama-{layers}L w4 + lm_head=w8 (use_cache=False)",
         lambda: llama(False, layers), {"config": "w4", "modules": {"lm_head": "w8"}}),
    ]
    return out[:1] + out[3:4] + out[5:6] if quick else out


def measure(build, settings: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    model, inputs = build()
    engine = Palettization(settings["config"], overrides=settings.get("overrides"),
                           modules=settings.get("modules"))
    engine.prepare(model, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        result = engine.export(Path(tmp) / "export")
        report = json.loads((result.directory / "report.json").read_text())
    extra = report["extra"]
    return {
        "floor": report["palettized_bytes"],
        "fp16": report["dense_fp16_bytes"],
        "aimodel": extra.get("coreai_artifact_bytes"),
        "torch": extra.get("torch_artifact_bytes"),
        "bpw": report["bits_per_weight"],
        "errors": dict(result.errors),
    }


def fmt_ratio(num: int | None, den: int) -> str:
    return f"{num / den:.3f}" if num is not None else "n/a"


def fmt_bytes(value: int | None) -> str:
    return f"{value:,}" if value is not None else "FAILED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 cases, 1-layer Llama")
    args = parser.parse_args()
    torch.set_num_threads(2)

    rows = [(name, measure(build, settings)) for name, build, settings in cases(args.quick)]
    print("\n| case | floor B | .aimodel B | aimodel/floor | goal <= 1.05 | fp16 dense B "
          "| aimodel/fp16 | packed torch B | torch/floor |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for name, r in rows:
        ai = r["aimodel"]
        goal = "n/a" if ai is None else ("met" if ai / r["floor"] <= GOAL else "MISSED")
        print(f"| {name} | {r['floor']:,} | {fmt_bytes(ai)} | {fmt_ratio(ai, r['floor'])} | {goal} "
              f"| {r['fp16']:,} | {fmt_ratio(ai, r['fp16'])} | {fmt_bytes(r['torch'])} "
              f"| {fmt_ratio(r['torch'], r['floor'])} |")
    for name, r in rows:
        for fmt, error in r["errors"].items():
            print(f"\n{name}: export format {fmt!r} failed: {error}")


if __name__ == "__main__":
    main()
