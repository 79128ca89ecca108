"""A fresh process: ``trainer.validate/test/predict(model, ckpt_path=...)`` with a new
PalettizationCallback on a new, dense model. Facts per stage as JSON (k-means calls, metrics)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import count_kmeans, palettized_state_hash

from coreai_palettize_plugins.demo.digits import DigitsCNN, DigitsDataModule
from coreai_palettize_plugins.lightning import PalettizationCallback

KMEANS: list[str] = []
count_kmeans(lambda fake: KMEANS.append(fake.tensor_fqn), setattr)


class NoExampleArray(DigitsCNN):
    """Example inputs must then come from the stage's own dataloader."""

    def __init__(self) -> None:
        super().__init__()
        self.example_input_array = None


def run(stage: str, inputs: str, ckpt: str, out: Path) -> dict:
    KMEANS.clear()
    torch.manual_seed(123)  # the new model's random init differs from the checkpoint's
    model = NoExampleArray() if inputs == "dataloader" else DigitsCNN()
    callback = PalettizationCallback(
        "w4", overrides={"linear": "w8"}, export_formats=(),
        example_inputs=torch.zeros(1, 1, 8, 8) if inputs == "argument" else None)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(out),
                         callbacks=[callback])
    data = DigitsDataModule()
    facts: dict = {"stage": stage, "inputs": inputs}
    if stage == "predict":
        data.setup("predict")  # the demo module has no predict_dataloader: its test split
        predictions = trainer.predict(model, dataloaders=data.test_dataloader(), ckpt_path=ckpt)
        torch.save(torch.cat(predictions), out / f"predictions_{inputs}.pt")
    else:
        metrics = getattr(trainer, stage)(model, datamodule=data, ckpt_path=ckpt, verbose=False)
        facts["metrics"] = metrics[0]
    facts.update(kmeans=list(KMEANS), attached=callback.engine.attached,
                 restored=callback.engine.restored,
                 palettized=[t.name for t in callback.engine.tensors()],
                 hash=palettized_state_hash(model) if callback.engine.attached else None,
                 instance_hooks_left=sorted(k for k in ("configure_model", "load_state_dict")
                                            if k in vars(model)))
    return facts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--runs", nargs="+", required=True, help="stage:inputs, e.g. test:dataloader")
    args = parser.parse_args()
    torch.set_num_threads(2)  # as tests/conftest.py: bitwise-equal outputs to the parent
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run(*spec.split(":"), args.ckpt, args.out) for spec in args.runs]
    (args.out / "facts.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
