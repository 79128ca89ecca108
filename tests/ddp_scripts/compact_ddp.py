"""Run under `torchrun --nproc_per_node=2`: HF Trainer, tied tiny Llama, compact frozen/lut (gloo)."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch
from _probe import KMEANS_CALLS, palettized_state_hash, record
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TokenDataset, tiny_llama

from coreai_palettize_plugins import _coreai_compat as compat
from coreai_palettize_plugins.hf import PalettizationTrainerCallback


def state_hash(model: torch.nn.Module) -> str:
    """sha256 over the whole state dict (trained norms, LUTs, packed indices)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Probe(TrainerCallback):
    def __init__(self, out: Path, callback: PalettizationTrainerCallback) -> None:
        self.out, self.callback = out, callback

    def facts(self, model: torch.nn.Module) -> dict:
        tensors = self.callback.engine.tensors()
        return {"compact": sum(compat.is_compact(t.fake) for t in tensors),
                "dense_elements": sum(t.parameter.numel() for t in tensors),
                "palettized_hash": palettized_state_hash(model)}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        facts = self.facts(model)
        record(self.out, args.process_index, kmeans_at_prepare=list(KMEANS_CALLS),
               **{f"{k}_at_begin": v for k, v in facts.items()})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            logits = model(torch.arange(32)[None] % 256).logits
        record(self.out, args.process_index, state_hash=state_hash(model),
               logits_hash=hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
               global_step=state.global_step, kmeans_total=list(KMEANS_CALLS),
               **{f"{k}_at_end": v for k, v in self.facts(model).items()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--training", default="frozen")
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    callback = PalettizationTrainerCallback("w4", training=args.training, distributed="sharded",
                                            export_formats=["torch"],
                                            export_dir=args.out / "export")
    training = TrainingArguments(
        str(args.out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        save_steps=2, logging_steps=1, report_to=[], use_cpu=True, ddp_backend="gloo",
        disable_tqdm=True, seed=0)
    trainer = Trainer(model=tiny_llama(tied=True), args=training, train_dataset=TokenDataset(),
                      callbacks=[callback])
    trainer.add_callback(Probe(args.out, callback))
    try:
        trainer.train(resume_from_checkpoint=args.resume)
    except Exception as error:
        record(args.out, training.process_index, error=f"{type(error).__name__}: {error}")
        raise


if __name__ == "__main__":
    main()
