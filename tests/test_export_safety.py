"""The export owns only its own files (issue 17): shared directories, failed formats, kill -9,
a full disk, concurrent exports and a DDP export longer than the process group's timeout."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
from helpers import TokenDataset, example_image, mixed_net, tiny_llama
from lightning.pytorch.callbacks import ModelCheckpoint

from coreai_palettize_plugins import ExportError, Palettization, load_palettized
from coreai_palettize_plugins.core.checks import PalettizeConfigError
from coreai_palettize_plugins.demo.digits import DigitsCNN, DigitsDataModule
from coreai_palettize_plugins.export.writer import AIMODEL_NAME, MANIFEST_NAME, PACKED_NAME
from coreai_palettize_plugins.lightning import PalettizationCallback

DEBRIS = re.compile(r"(\.partial|\.old|\.tmp|\.journal)$")


def debris(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if DEBRIS.search(p.name))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name[0] != "."}


def engine(model: nn.Module | None = None) -> Palettization:
    e = Palettization("w4", overrides={"linear": "w8"})
    e.prepare(model if model is not None else mixed_net(), example_image())
    return e


def assert_loads_as_trained(directory: Path, trained: nn.Module) -> None:
    x = example_image(3)
    loaded = load_palettized(directory, mixed_net)
    assert torch.equal(loaded(x), trained.eval()(x))


# ---------------------------------------------------------------- shared directories

def test_export_into_the_working_directory_keeps_the_users_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("train.py").write_text("print('mine')\n")
    Path("data").mkdir()
    Path("data/train.csv").write_text("a,b\n1,2\n")
    e = engine()
    e.export(".", formats=["torch"])
    first = json.loads(Path("palettize_export.json").read_text())
    e.export(".")                                 # again, with the .aimodel (a directory) too
    assert Path("train.py").read_text() == "print('mine')\n"
    assert Path("data/train.csv").read_text() == "a,b\n1,2\n"
    done = json.loads(Path("palettize_export.json").read_text())
    assert done["export_id"] != first["export_id"]
    assert set(done["files"]) >= {PACKED_NAME, MANIFEST_NAME, AIMODEL_NAME, "report.json"}
    assert "train.py" not in done["files"] and debris(tmp_path) == []
    assert_loads_as_trained(Path("."), e.model)


def test_export_into_default_root_dir_keeps_lightning_checkpoints(tmp_path):
    callback = PalettizationCallback("w4", overrides={"linear": "w8"}, export_dir=tmp_path,
                                     export_formats=["torch"])
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1,
                                  filename="{epoch}")
    torch.manual_seed(0)
    pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=3,
               limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
               logger=False, default_root_dir=str(tmp_path), callbacks=[callback, checkpoints]
               ).fit(DigitsCNN(), DigitsDataModule())
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0.ckpt", "epoch=1.ckpt"]
    assert (tmp_path / PACKED_NAME).is_file() and debris(tmp_path) == []


@pytest.mark.slow
def test_export_into_hf_output_dir_keeps_checkpoints(tmp_path):
    from transformers import Trainer, TrainingArguments

    from coreai_palettize_plugins.hf import PalettizationTrainerCallback

    callback = PalettizationTrainerCallback("w4", export_dir=tmp_path, export_formats=["torch"])
    args = TrainingArguments(str(tmp_path), max_steps=4, save_steps=2, save_strategy="steps",
                             per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(blocks=16),
            callbacks=[callback]).train()
    assert {"checkpoint-2", "checkpoint-4"} <= {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "checkpoint-4" / "model.safetensors").is_file()
    assert (tmp_path / "config.json").is_file() and (tmp_path / PACKED_NAME).is_file()
    assert load_palettized(tmp_path) is not None                 # HF export: no factory needed


def test_bad_export_dir_is_refused_before_training(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a directory")
    callback = PalettizationCallback("w4", export_dir=target / "out")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path),
                         enable_progress_bar=False, callbacks=[callback])
    with pytest.raises(PalettizeConfigError, match=r"^palettize\.export\.dir: .*file, not a "
                                                   r"directory"):
        trainer.fit(DigitsCNN(), DigitsDataModule())
    assert trainer.global_step == 0
    assert target.read_text() == "not a directory"


# ---------------------------------------------------------------- tmpfs (root on CI)

@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]),
                              "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'}): "
                    "the full-disk and mount-point cases need it")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_unwritable_export_dir_is_refused(tmp_path):
    from coreai_palettize_plugins.export.writer import check_export_dir

    with tmpfs(tmp_path / "ro", "1m", "ro") as readonly, pytest.raises(
            PalettizeConfigError, match=r"^palettize\.export\.dir: .* not writable"):
        check_export_dir(readonly / "out")


def test_export_to_a_mount_point_and_a_full_disk_keeps_the_earlier_export(tmp_path, caplog):
    e = engine()
    with tmpfs(tmp_path / "mnt", "400k") as mount:
        e.export(mount, formats=["torch"])         # the mount point itself is the export dir
        good = snapshot(mount)
        filler = mount / "user-data.bin"            # the user's file fills the disk
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        with pytest.raises(OSError, match=r"no space left on device.*previous export there is "
                                          r"unchanged"):
            e.export(mount)
        assert snapshot(mount) == {**good, "user-data.bin": filler.read_bytes()}
        assert debris(mount) == []
        assert_loads_as_trained(mount, e.model)


class Wide(nn.Module):
    """A model whose .aimodel (~0.5 MiB) does not fit beside its report on a small disk."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1024, 1024)

    def forward(self, x):
        return self.fc(x)


def test_llvm_abort_on_a_full_disk_fails_the_format_not_the_process(tmp_path, caplog):
    torch.manual_seed(0)
    e = Palettization("w4")
    e.prepare(Wide(), torch.randn(1, 1024))
    with tmpfs(tmp_path / "mnt", "1200k") as mount:
        e.export(mount, formats=["torch"])
        good = snapshot(mount)

        def fill_leaving_256k(directory: Path) -> None:      # a real full disk, mid-export
            free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
            (mount / "user-data.bin").write_bytes(b"\0" * max(free - 256 * 1024, 0))

        result = e.export(mount, formats=["coreai"], extra_files=fill_leaving_256k)
    # this process is alive: the conversion's abort (or error) stayed in its child
    assert set(result.errors) == {"coreai"} and result.written == {}
    # measured: "ChildProcessDied: the Core AI (.aimodel) conversion aborted the process it ran
    # in (exit code 1): LLVM ERROR: IO failure on output stream: No space left on device"
    assert "No space left on device" in result.errors["coreai"], result.errors
    assert "nothing in" in caplog.text and "was replaced" in caplog.text
    assert all(good[k] == v for k, v in good.items())


# ---------------------------------------------------------------- failed formats

class Switchable(nn.Module):
    """Traceable until ``data_dependent`` is set on the export copy (configure_model)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.data_dependent = False

    def forward(self, x):
        h = self.fc(x)
        if self.data_dependent and h.sum() > 0:    # torch.export cannot trace this branch
            return h * 2
        return h


def break_tracing(model: nn.Module) -> None:
    model.data_dependent = True


def switchable_engine() -> Palettization:
    torch.manual_seed(0)
    e = Palettization("w4")
    e.prepare(Switchable(), torch.randn(1, 16))
    return e


def test_failed_format_keeps_the_previous_good_file_and_says_so(tmp_path, caplog):
    e = switchable_engine()
    out = tmp_path / "out"
    e.export(out)
    aimodel = snapshot(out / AIMODEL_NAME)
    first = json.loads((out / "palettize_export.json").read_text())
    caplog.set_level(logging.ERROR)
    result = e.export(out, configure_model=break_tracing)
    assert set(result.errors) == {"coreai"} and set(result.written) == {"torch"}
    assert result.kept == {"coreai": out / AIMODEL_NAME}
    assert snapshot(out / AIMODEL_NAME) == aimodel                      # the good file survives
    assert re.search(r"format 'coreai' could not be written: .*torch\.export.*the earlier "
                     r"model\.aimodel in .* is kept", caplog.text)
    done = json.loads((out / "palettize_export.json").read_text())
    assert done["files"][AIMODEL_NAME]["export_id"] == first["export_id"]
    assert done["files"][PACKED_NAME]["export_id"] == done["export_id"] != first["export_id"]
    assert done["formats"]["coreai"]["status"] == "failed"
    report = json.loads((out / "report.json").read_text())
    assert report["extra"]["coreai_kept_previous"] == str(out / AIMODEL_NAME)


def test_strict_export_raises_before_replacing_anything(tmp_path):
    e = switchable_engine()
    out = tmp_path / "out"
    e.export(out)
    before = snapshot(out)
    with pytest.raises(ExportError, match=r"coreai: .*nothing in .* was replaced"):
        e.export(out, configure_model=break_tracing, strict=True)
    assert snapshot(out) == before and debris(out) == []


# ---------------------------------------------------------------- kill -9, concurrency

def forked(target) -> int:
    """Run ``target()`` in a forked child; returns its pid (exit 0 on success, 1 on error)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)  # GNU OpenMP's thread pool does not survive a fork
            target()
            code = 0
        finally:
            os._exit(code)
    return pid


def exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.slow
def test_kill_9_at_random_moments_keeps_a_loadable_export_and_no_debris(tmp_path):
    e = engine()
    out = tmp_path / "out"
    start = time.monotonic()
    e.export(out)
    duration = time.monotonic() - start
    rng = random.Random(17)
    for _ in range(4):
        def export_forever() -> None:
            while True:
                e.export(out)

        pid = forked(export_forever)
        time.sleep(rng.uniform(0.05, 1.3 * duration))
        os.kill(pid, signal.SIGKILL)
        assert exit_code(pid) == -signal.SIGKILL
        assert_loads_as_trained(out, e.model)              # an interrupted commit is finished
        done = json.loads((out / "palettize_export.json").read_text())
        assert all((out / name).exists() for name in done["files"])
    e.export(out)
    assert debris(out) == []
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.slow
def test_two_concurrent_exports_to_one_directory_serialise(tmp_path, caplog):
    e = engine()
    out = tmp_path / "out"
    pids = [forked(lambda: e.export(out, formats=["torch"])) for _ in range(2)]
    assert [exit_code(pid) for pid in pids] == [0, 0]
    assert debris(out) == []
    done = json.loads((out / "palettize_export.json").read_text())
    assert done["pid"] in pids
    assert_loads_as_trained(out, e.model)


# ---------------------------------------------------------------- DDP

def _slow_ddp_rank(rank: int, init: str, out: Path, delay: float) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=timedelta(seconds=2))
    e = engine()
    start = time.monotonic()
    result = e.export_on_main(out / "export", formats=["torch"],
                              extra_files=lambda d: time.sleep(delay))
    waited = time.monotonic() - start
    dist.barrier()                                       # the group is still usable afterwards
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"waited": waited, "exported": result is not None}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_export_longer_than_the_process_group_timeout(tmp_path):
    init = f"file://{tmp_path / 'store'}"
    pids = [forked(lambda r=r: _slow_ddp_rank(r, init, tmp_path, delay=6.0)) for r in (0, 1)]
    assert [exit_code(pid) for pid in pids] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["exported"] for r in ranks] == [True, False]
    assert ranks[1]["waited"] > 6.0                       # 3x the 2 s process-group timeout
    assert_loads_as_trained(tmp_path / "export", engine().model)
