"""2-process Lightning DDP (gloo) with palettize.adapters on a tiny Llama; facts per rank."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import lightning.pytorch as pl
import torch
from _probe import palettized_state_hash, record
from lightning.pytorch.callbacks import Callback
from lora_llm import TinyLlamaModule

from coreai_palettize_plugins.lightning import PalettizationCallback


def lora_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        if ".lora_" in key:
            digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


class Probe(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.start: str | None = None

    def on_train_start(self, trainer, pl_module):
        self.start = lora_hash(pl_module)
        record(self.out, trainer.global_rank,
               find_unused_parameters=trainer.strategy.model.find_unused_parameters)

    def on_after_backward(self, trainer, pl_module):
        params = list(pl_module.named_parameters())
        record(self.out, trainer.global_rank,
               trainable=sum(p.requires_grad for _, p in params),
               params_without_grad=[n for n, p in params if p.requires_grad and p.grad is None],
               base_params_with_grad=[n for n, p in params if ".lora_" not in n
                                      and p.grad is not None])

    def on_train_end(self, trainer, pl_module):
        record(self.out, trainer.global_rank, global_step=trainer.global_step,
               hash_at_end=palettized_state_hash(pl_module), lora_hash=lora_hash(pl_module),
               lora_changed=lora_hash(pl_module) != self.start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    module = TinyLlamaModule()
    callback = PalettizationCallback("w4", training="frozen",
                                     adapters={"r": 4, "target": ["q_proj", "v_proj", "up_proj"]},
                                     export_formats=[])
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(args.out),
                         callbacks=[callback, Probe(args.out)])
    trainer.fit(module)


if __name__ == "__main__":
    main()
