"""Eval forwards of an ``ste`` model after training: the cached assignment (one byte per weight,
gathered each forward) against re-assigning every weight on every forward (the path before
issue #21's fix, ``COREAI_PALETTIZE_STE_CACHE=0``). Ratios of CPU time, measured side by side.

    python benchmarks/ste_eval.py [--hidden 256] [--layers 4] [--forwards 10]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from coreai_palettize_plugins import Palettization
from coreai_palettize_plugins.core import strategies


def eval_time(model: torch.nn.Module, x: torch.Tensor, forwards: int, cache: bool) -> float:
    os.environ[strategies.CACHE_ENV] = "1" if cache else "0"
    with torch.inference_mode():
        model(x)                                   # the cached arm assigns here, once
        start = time.process_time()
        for _ in range(forwards):
            model(x)
        return (time.process_time() - start) / forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--forwards", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=8, vocab_size=args.vocab)
    dense, model = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config)
    engine = Palettization("w4", training="ste", export_formats=[])
    x = torch.randint(0, args.vocab, (1, args.tokens))
    engine.prepare(model, {"input_ids": x})
    engine.start_training(0)
    engine.finish_training("unused")
    model.eval()
    cached = eval_time(model, x, args.forwards, cache=True)
    uncached = eval_time(model, x, args.forwards, cache=False)
    dense_time = eval_time(dense, x, args.forwards, cache=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.1f}M parameters, w4 ste after training, {args.tokens} tokens, "
          f"1 thread, CPU time per eval forward")
    print(f"dense model:             {dense_time * 1e3:8.1f} ms")
    print(f"re-assign every forward: {uncached * 1e3:8.1f} ms")
    print(f"cached assignment:       {cached * 1e3:8.1f} ms  ({cached / uncached:.2f}x re-assign, "
          f"{cached / dense_time:.2f}x dense)")


if __name__ == "__main__":
    main()
