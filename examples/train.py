"""The offline default job (Hydra + Lightning): train dense, palettize, fine-tune, export.

    python examples/train.py                                           # w4
    python examples/train.py palettize=w4 palettize.overrides.linear=w8
    python examples/train.py -m palettize=w4,w6,w8                     # sweep
    python examples/train.py palettize=none palettize.overrides.linear=w8 --cfg job
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from coreai_palettize_plugins.cli import _quiet

_quiet.install()  # before coreai-opt (torchao) is imported: drop two known harmless log lines

from coreai_palettize_plugins import PalettizeConfigError  # noqa: E402
from coreai_palettize_plugins.demo.digits import accuracy  # noqa: E402
from coreai_palettize_plugins.lightning import PalettizationCallback  # noqa: E402


class AccuracyAfterPalettization(Callback):
    """Test accuracy right after k-means, before any fine-tuning step."""

    value: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.value = accuracy(pl_module, trainer.datamodule.test_dataloader())


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the job for a composed config; returns the accuracies and the export directory."""
    output_dir = Path(cfg.output_dir)
    export_dir = cfg.palettize.export.dir or output_dir / "palettized"
    pl.seed_everything(cfg.seed, verbose=False)
    try:
        palettize = PalettizationCallback(cfg.palettize, export_dir=export_dir)
        model = instantiate(cfg.model)
        palettize.engine.validate_for(model, model.example_input_array)
    except PalettizeConfigError as error:
        _remove_if_only_bookkeeping(output_dir)
        sys.exit(f"error: {error}")

    data = instantiate(cfg.data)
    dense_trainer = instantiate(cfg.trainer, max_epochs=cfg.dense_epochs, logger=False,
                                enable_checkpointing=False)
    dense_trainer.fit(model, data)
    dense_acc = accuracy(model, data.test_dataloader())

    after_prepare = AccuracyAfterPalettization()
    trainer = instantiate(cfg.trainer, max_epochs=cfg.finetune_epochs,
                          callbacks=[palettize, after_prepare], default_root_dir=str(output_dir),
                          logger=CSVLogger(str(output_dir), name="logs"),
                          enable_checkpointing=False)
    trainer.fit(model, data)
    finetuned_acc = accuracy(model, data.test_dataloader())

    results = {"dense_acc": dense_acc, "palettized_acc": after_prepare.value,
               "finetuned_acc": finetuned_acc, "export_dir": str(export_dir)}
    if trainer.is_global_zero:
        export = palettize.export_result
        print(f"\ndigits test accuracy: dense {dense_acc:.4f} | palettized {after_prepare.value:.4f}"
              f" | fine-tuned {finetuned_acc:.4f}")
        print(palettize.report.to_text())
        for fmt, path in export.written.items():
            print(f"{fmt:>7}: {path}")
        for fmt, error in export.errors.items():
            print(f"{fmt:>7}: FAILED: {error}")
        print(f" report: {export.directory / 'report.md'}")
    return results


def _remove_if_only_bookkeeping(run_dir: Path) -> None:
    """Leave nothing behind for a rejected config: drop a run dir holding only Hydra's files."""
    if run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
