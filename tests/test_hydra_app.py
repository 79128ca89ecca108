"""The offline default job, run as a user runs it: `python examples/train.py ...`."""

from __future__ import annotations

import json

import pytest
from helpers import run_python

FAST = ["dense_epochs=2", "finetune_epochs=1"]


def test_readme_command_trains_palettizes_and_exports(tmp_path):
    run_dir = tmp_path / "run"
    result = run_python("examples/train.py", "palettize=w4", "palettize.overrides.linear=w8",
                        *FAST, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "digits test accuracy: dense" in out and "| fine-tuned" in out
    assert "net.5.weight  8-bit per-tensor" in out
    export = run_dir / "palettized"
    assert (export / "model.aimodel" / "main.mlirb").is_file()
    assert (export / "palettized.safetensors").is_file()
    report = json.loads((export / "report.json").read_text())
    assert report["extra"]["rebuilt_model_max_abs_diff"] == 0.0
    assert (run_dir / "logs").is_dir()


def test_cfg_job_shows_the_palettize_section():
    result = run_python("examples/train.py", "palettize=none", "palettize.overrides.linear=w8",
                        "palettize.overrides.conv2d=w4", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "palettize:\n  preset: none\n  overrides:\n    linear: w8\n" in out
    assert "    conv2d: w4\n" in out and "    conv1d: inherit\n" in out


@pytest.mark.parametrize(("override", "message"), [
    ("palettize.overrides.linear=w5",
     "error: palettize.overrides.linear: unknown preset 'w5'; valid: w2, w3, w4, w6, w8, none, "
     "inherit, null or a spec mapping"),
    ("palettize.overrides.linear={n_bits: 5}",
     "error: palettize.overrides.linear.n_bits: 5 is not supported; valid: 1, 2, 3, 4, 6, 8"),
    ("palettize.adapters={type: dora}",
     "error: palettize.adapters.type: unknown adapter type 'dora'; valid: lora"),
    ("+palettize.modules.encoder=w8",
     "error: palettize.modules.encoder: matches no module of DigitsCNN (re.fullmatch); module "
     "names look like: net, net.0, net.1"),
])
def test_bad_values_fail_in_one_line_before_training_leaving_nothing(tmp_path, override, message):
    run_dir = tmp_path / "run"
    result = run_python("examples/train.py", override, f"hydra.run.dir={run_dir}", timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Trainer" not in result.stdout + result.stderr          # no training started
    assert not run_dir.exists()                                    # nothing left on disk


def test_unknown_group_option_lists_the_choices(tmp_path):
    result = run_python("examples/train.py", "palettize=w5", f"hydra.run.dir={tmp_path / 'r'}")
    assert result.returncode == 1
    assert "Could not find 'palettize/w5'" in result.stderr
    assert "none" in result.stderr and "w4" in result.stderr and "w8" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_multirun_sweeps_presets(tmp_path):
    result = run_python("examples/train.py", "-m", "palettize=w4,w6,w8", *FAST,
                        f"hydra.sweep.dir={tmp_path}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = sorted(tmp_path.glob("*/palettized/report.json"))
    assert len(reports) == 3
    bits = sorted(json.loads(r.read_text())["layers"][1]["n_bits"] for r in reports)
    assert bits == [4, 6, 8]
