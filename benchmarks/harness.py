"""What the benchmarks share: models, data, timers, memory probes and result writing.

- models: ``llama(...)`` (a Llama built from config, seeded), ``LLAMA_27M``/``LLAMA_4X256``;
  the small pretrained Llama and its corpus come from ``quality.py`` (``lm_setup``);
- arms: ``ptq_arm`` (attach, calibrate/budget when configured, cluster, evaluate) and
  ``TrainArm`` (a model, its optimizer and one timed optimizer step);
- timers: ``interleaved`` (median step time of arms timed in rotating rounds);
- memory: ``tensor_bytes`` (model state), ``training_state_bytes`` (+ gradients, optimizer
  state, cached rebuilt weights);
- results: ``write_json``, ``table`` (a markdown table).

Each script is then the measurement alone.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

BENCH = Path(__file__).resolve().parent

LLAMA_27M = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
             "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 4096,
             "max_position_embeddings": 128, "tie_word_embeddings": True}
"""27M parameters, tied embeddings (``compact_base.py``)."""
LLAMA_4X256 = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 4096,
               "max_position_embeddings": 512, "tie_word_embeddings": False}
"""Hidden 256, 4 layers, vocab 4096 (``ste_step_time.py``)."""


# ------------------------------------------------------------------------------ models, data


def llama(config: Mapping[str, Any], dtype: torch.dtype = torch.float32, seed: int = 0
          ) -> nn.Module:
    """A ``LlamaForCausalLM`` from ``config`` (``LlamaConfig`` fields), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).to(dtype)


def tokens(shape: Sequence[int], vocab: int, seed: int = 0) -> torch.Tensor:
    """Random token ids, from their own generator."""
    return torch.randint(0, vocab, tuple(shape), generator=torch.Generator().manual_seed(seed))


def lm_setup(cfg: Mapping[str, Any] | None = None) -> tuple[Any, torch.Tensor, torch.Tensor,
                                                             nn.Module, dict]:
    """The small pretrained Llama of ``quality.py`` and its corpus: ``(tokenizer, train blocks,
    held-out blocks, dense model, pretraining info)``; ``cfg`` defaults to ``quality.FULL``."""
    import quality as q

    cfg = dict(cfg or q.FULL["lm"])
    torch.manual_seed(cfg["seed"])
    tokenizer, train, held_out = q.lm_data(cfg["seq_len"])
    dense, pre = q.lm_pretrained(cfg, tokenizer, train, held_out)
    return tokenizer, train, held_out, dense, pre


# ------------------------------------------------------------------------------ arms


def ptq_arm(dense: nn.Module, train: torch.Tensor, held_out: torch.Tensor, config: Any, *,
            batch: int = 16, **fields: Any) -> tuple[dict[str, Any], nn.Module, Any]:
    """A copy of ``dense`` palettized with ``config`` (+ ``fields``) post-training: attach,
    calibration (over ``train`` in batches of ``batch``) and budget when configured, k-means.
    Returns the held-out metrics with the report's numbers, the model and its engine."""
    import quality as q

    from coreai_palettize_plugins.accuracy.calibration import CalibrationData
    from coreai_palettize_plugins.engine.lifecycle import Palettization

    model = copy.deepcopy(dense)
    engine = Palettization(config, **fields)
    engine.calibration_data = lambda: CalibrationData(
        loss=lambda ids, _: q.lm_loss(model, ids), dataset=train, collate_fn=torch.stack,
        batch_size=batch)
    started = time.perf_counter()
    engine.attach(model, (train[:1],))
    engine.cluster()
    seconds = time.perf_counter() - started
    report = engine.report()
    out = {**q.lm_eval(model, held_out), "bits_per_weight": report.bits_per_weight,
           "prepare_seconds": seconds,
           "bits_histogram": {str(b): sum(r.numel for r in report.layers if r.n_bits == b)
                              for b in sorted({r.n_bits for r in report.layers})}}
    if engine.allocation is not None:
        out.update(budget_achieved=engine.allocation.achieved,
                   trial_kmeans_runs=engine.allocation.kmeans_runs,
                   allocation_seconds=engine.allocation.seconds)
    if engine.calibration_stats is not None:
        out["calibration"] = engine.calibration_stats.to_dict()
    return out, model, engine


class TrainArm:
    """A model (palettized by ``engine`` when given), AdamW, and one timed optimizer step over
    ``batches`` (gradient accumulation when more than one). ``env``: environment variables set
    before each step (e.g. a cache switch)."""

    def __init__(self, model: nn.Module, engine: Any = None, env: Mapping[str, str] | None = None,
                 before_step: Callable[[], None] | None = None, lr: float = 1e-4) -> None:
        self.model, self.engine, self.env, self.before_step = model.train(), engine, env, before_step
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                           lr=lr)
        self.steps = 0
        if engine is not None:
            engine.start_training(0)

    def step(self, batches: Sequence[torch.Tensor]) -> float:
        """One optimizer step; returns its seconds."""
        os.environ.update(self.env or {})
        if self.before_step is not None:
            self.before_step()
        start = time.perf_counter()
        for ids in batches:
            loss = self.model(input_ids=ids, labels=ids).loss / len(batches)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.engine is not None:
            self.engine.after_optimizer_step(self.steps)
        return time.perf_counter() - start

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop_training()


# ------------------------------------------------------------------------------ timers


def interleaved(steps: Mapping[str, Callable[[], float]], rounds: int, per_round: int,
                rotate: bool = True, warmup: bool = True) -> dict[str, float]:
    """Median seconds per call of each ``steps[name]()`` (which returns its own time): one
    untimed warm-up call each, then ``rounds`` rounds of ``per_round`` calls per arm, the arm
    order rotating each round (so drift and caches do not favour one arm)."""
    names = list(steps)
    if warmup:
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            times[name] += [steps[name]() for _ in range(per_round)]
    return {name: statistics.median(values) for name, values in times.items()}


# ------------------------------------------------------------------------------ memory


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of ``tensors``, each storage-sharing tensor once (by identity)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            seen.setdefault(id(t), t.numel() * t.element_size())
    return sum(seen.values())


def model_state_bytes(model: nn.Module) -> int:
    """Parameters and buffers of ``model`` (shared tensors once)."""
    return tensor_bytes([*model.parameters(), *model.buffers()])


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                         cache_attrs: Sequence[str] = ()) -> int:
    """Parameters, their gradients (as after backward), buffers, the optimizer's tensors and
    the rebuilt weights modules hold under ``cache_attrs`` (``(key, tensor)`` tuples)."""
    tensors = {id(p): p.numel() * p.element_size() * (2 if p.requires_grad else 1)
               for p in model.parameters()}
    tensors.update({id(b): b.numel() * b.element_size() for b in model.buffers()})
    for state in (optimizer.state.values() if optimizer is not None else ()):
        tensors.update({id(v): v.numel() * v.element_size() for v in state.values()
                        if torch.is_tensor(v)})
    for module in model.modules():
        for attr in cache_attrs:
            cached = module.__dict__.get(attr)
            if cached is not None:
                tensors[id(cached[1])] = cached[1].numel() * cached[1].element_size()
    return sum(tensors.values())


# ------------------------------------------------------------------------------ results


def write_json(path: str | Path, payload: Any) -> Path:
    """``payload`` as indented JSON (beside the script unless ``path`` is absolute)."""
    path = Path(path) if Path(path).is_absolute() else BENCH / path
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
