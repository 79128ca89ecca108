"""The plugin from other tools' side (issue #13): any Hydra app, LightningCLI, the `inspect`,
`report` and `recipes` commands, and `accelerate launch`. Apps run as subprocesses from
directories outside the repo, as a user runs them."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from coreai_opt.palettization import KMeansPalettizerConfig, ModuleKMeansPalettizerConfig
from helpers import REPO, palettized_state_hash, run_python, tiny_llama, with_default_training

from coreai_palettize_plugins import Palettization
from coreai_palettize_plugins.cli import main as cli
from coreai_palettize_plugins.cli.inspection import InspectError, inspect_target
from coreai_palettize_plugins.demo.digits import DigitsCNN
from coreai_palettize_plugins.recipes import RECIPES_DIR, load_recipe, packaged_recipes

TESTS = Path(__file__).resolve().parent


def w4_linear_w8() -> dict:
    """coreai-opt's ``w4`` + ``Linear: w8``, with the default training strategy (``ste``)."""
    return with_default_training(KMeansPalettizerConfig.presets.w4().set_module_type(
        nn.Linear, ModuleKMeansPalettizerConfig.presets.w8()).to_dict())


def run_in(directory: Path, *args: str, timeout: int = 300, env: dict | None = None,
           ) -> subprocess.CompletedProcess:
    """``python *args`` from ``directory`` (outside the repo), inheriting the test environment."""
    return run_python(*args, cwd=directory, timeout=timeout, env=env)


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------------- 1. Hydra

HYDRA_APP = '''
import pickle
import sys

import hydra


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg):
    heavy_before = "coreai_palettize_plugins.engine" in sys.modules
    if "palettize" not in cfg:
        print(f"no palettize group; package imported: {heavy_before}")
        return
    from hydra.utils import instantiate

    from coreai_palettize_plugins import build_palettizer_config

    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    with open(cfg.out, "wb") as f:
        pickle.dump({"config": build_palettizer_config(cfg.palettize).to_dict(),
                     "callbacks": [f"{type(c).__module__}.{type(c).__name__}" for c in callbacks],
                     "callback_config": callbacks[0].engine.config.to_dict()}, f)


if __name__ == "__main__":
    main()
'''


@pytest.fixture
def hydra_app(tmp_path) -> Path:
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text(HYDRA_APP)
    (app / "config.yaml").write_text(
        "defaults:\n  - palettize: w4\n  - callbacks: palettize\n  - _self_\n"
        "out: ${hydra:runtime.output_dir}/result.pkl\n")
    (app / "plain.yaml").write_text("lr: 0.1\n")
    return app


def test_any_hydra_app_gets_the_palettize_group_and_callback(hydra_app):
    result = run_in(hydra_app, "app.py", "palettize=w4", "palettize.overrides.linear=w8",
                    "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "automatic_schema_matching" not in result.stderr
    facts = pickle.loads((hydra_app / "run" / "result.pkl").read_bytes())
    assert facts["config"] == w4_linear_w8()
    assert facts["callbacks"] == ["coreai_palettize_plugins.lightning.PalettizationCallback"]
    assert facts["callback_config"] == w4_linear_w8()


def test_hydra_app_lists_packaged_options_and_stays_light_without_them(hydra_app):
    result = run_in(hydra_app, "app.py", "palettize=w5", "hydra.run.dir=run")
    assert result.returncode == 1
    assert "Could not find 'palettize/w5'" in result.stderr
    assert all(f"\t{o}\n" in result.stderr for o in ("none", "w2", "w3", "w4", "w6", "w8"))
    assert "coreai-palettize://coreai_palettize_plugins/conf" in result.stderr
    # An app that never uses the group does not pay for importing torch/coreai-opt.
    plain = run_in(hydra_app, "app.py", "--config-name", "plain", "hydra.run.dir=run")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "no palettize group; package imported: False" in plain.stdout


def test_plugin_module_imports_only_hydra():
    probe = ("import sys, hydra_plugins.coreai_palettize_plugins.palettize_searchpath as p; "
             "print(sorted(m for m in ('torch', 'coreai_opt', 'coreai_palettize_plugins') "
             "if m in sys.modules)); print(p.packaged_conf_dir())")
    result = run_in(TESTS.parent.parent, "-c", probe)
    assert result.returncode == 0, result.stderr[-2000:]
    imported, conf = result.stdout.strip().splitlines()
    assert imported == "[]"
    assert sorted(p.name for p in (Path(conf) / "palettize").glob("*.yaml")) == [
        "none.yaml", "w2.yaml", "w3.yaml", "w4.yaml", "w6.yaml", "w8.yaml"]


@pytest.mark.slow
def test_wheel_ships_the_plugin_and_the_config_groups(tmp_path):
    import setuptools

    assert tuple(int(p) for p in setuptools.__version__.split(".")[:2]) >= (70, 1), (
        "building the wheel needs setuptools>=70.1 (the dev extra pins it)")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("coreai_palettize_plugins", "hydra_plugins"):
        shutil.copytree(REPO / package, source / package, ignore=skip)
    build = run_in(source, "-c", "import sys; from setuptools import build_meta; "
                   f"print(build_meta.build_wheel({str(tmp_path / 'dist')!r}))")
    assert build.returncode == 0, build.stderr[-3000:]
    import zipfile

    names = set(zipfile.ZipFile(tmp_path / "dist" / last_line(build.stdout)).namelist())
    assert "hydra_plugins/coreai_palettize_plugins/palettize_searchpath.py" in names
    assert "hydra_plugins/__init__.py" not in names          # a namespace shared with others
    assert {f"coreai_palettize_plugins/conf/palettize/{o}.yaml"
            for o in ("none", "w2", "w3", "w4", "w6", "w8")} <= names
    assert "coreai_palettize_plugins/conf/callbacks/palettize.yaml" in names


# ------------------------------------------------------------------------------ 2. LightningCLI

CLI_APP = '''
from lightning.pytorch.cli import LightningCLI

from coreai_palettize_plugins.demo.digits import DigitsCNN, DigitsDataModule

if __name__ == "__main__":
    LightningCLI(DigitsCNN, DigitsDataModule)
'''

TRAINER_FLAGS = ["--trainer.max_steps=3", "--trainer.accelerator=cpu", "--trainer.logger=false",
                 "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
                 "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0"]


@pytest.fixture
def cli_app(tmp_path) -> Path:
    (tmp_path / "main.py").write_text(CLI_APP)
    return tmp_path


def assert_w4_linear_w8_export(export: Path) -> None:
    report = json.loads((export / "report.json").read_text())
    bits = {layer["name"]: (layer["n_bits"], layer["granularity"]) for layer in report["layers"]}
    assert bits == {"net.0.weight": (4, "group 16 axis 0"), "net.2.weight": (4, "group 16 axis 0"),
                    "net.5.weight": (8, "per-tensor"), "net.7.weight": (8, "per-tensor")}
    assert (export / "palettized.safetensors").is_file()


def test_lightning_cli_adds_the_callback_from_the_command_line(cli_app):
    export = cli_app / "flags"
    result = run_in(cli_app, "main.py", "fit",
                    "--trainer.callbacks+=coreai_palettize_plugins.lightning.PalettizationCallback",
                    "--trainer.callbacks.config=w4", "--trainer.callbacks.overrides={linear: w8}",
                    "--trainer.callbacks.export_formats=[torch]",
                    f"--trainer.callbacks.export_dir={export}", *TRAINER_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_w4_linear_w8_export(export)


def test_lightning_cli_takes_the_callback_from_a_config_file(cli_app):
    export = cli_app / "yaml"
    (cli_app / "fit.yaml").write_text(textwrap.dedent(f"""\
        trainer:
          callbacks:
            - class_path: coreai_palettize_plugins.lightning.PalettizationCallback
              init_args:
                config: w4
                overrides: {{linear: w8}}
                export_formats: [torch]
                export_dir: {export}
        """))
    result = run_in(cli_app, "main.py", "fit", "--config", "fit.yaml", *TRAINER_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_w4_linear_w8_export(export)


def test_lightning_cli_type_checks_the_callback_arguments(cli_app):
    add = "--trainer.callbacks+=coreai_palettize_plugins.lightning.PalettizationCallback"
    # A mapping for `config` is parsed as the typed PalettizeSettings schema (defaults filled in).
    shown = run_in(cli_app, "main.py", "fit", add,
                   "--trainer.callbacks.config={preset: w4, training: ste}", "--print_config")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "training: ste" in shown.stdout and "distributed: sharded" in shown.stdout
    bad = run_in(cli_app, "main.py", "fit", add, "--trainer.callbacks.strict_export=maybe",
                 *TRAINER_FLAGS)
    assert bad.returncode != 0
    assert "strict_export" in bad.stderr and "Trainer" not in bad.stdout


# ------------------------------------------------------------------------------- 3. inspect


class OddNet(nn.Module):
    """A 24-channel conv (not divisible by w4's groups of 16), a 32-channel one, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.odd = nn.Conv2d(1, 24, 3)
        self.even = nn.Conv2d(24, 32, 3)
        self.head = nn.Linear(32 * 4 * 4, 10)
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.even(self.odd(x)).flatten(1))


def test_inspect_matches_what_training_palettizes_byte_for_byte():
    dry = inspect_target("coreai_palettize_plugins.demo.digits:DigitsCNN", ["overrides.linear=w8"])
    torch.manual_seed(0)
    model = DigitsCNN()
    engine = Palettization("w4", overrides={"linear": "w8"})
    engine.prepare(model, model.example_input_array)          # real weights, real k-means
    report = engine.report()
    assert [(p.name, p.n_bits, p.projected_bytes) for p in dry.layers] == [
        (r.name, r.n_bits, r.palettized_bytes) for r in report.layers]
    assert dry.projected_bytes == report.palettized_bytes
    assert dry.dense_bytes == report.dense_bytes
    assert dry.bits_per_weight == pytest.approx(report.bits_per_weight)
    assert dry.to_dict()["settings"]["overrides"]["linear"] == "w8"


def test_inspect_shows_layers_the_spec_cannot_take_as_dense_with_the_reason():
    result = inspect_target("test_ecosystem:OddNet", ["fit_layouts=false"])
    plans = {p.name: p for p in result.layers}
    assert not plans["odd.weight"].palettized
    assert plans["odd.weight"].reason == (
        "skipped: shape (24, 1, 3, 3) is not divisible into groups of 16 along axis 0")
    assert plans["odd.weight"].projected_bytes == 24 * 9 * 4
    assert plans["even.weight"].spec == "4-bit g16 axis 0 LUT float32"
    text = result.to_text()
    assert "odd.weight" in text and "skipped: shape (24, 1, 3, 3)" in text
    excluded = inspect_target("test_ecosystem:OddNet", ["overrides.linear=null",
                                                        "fit_layouts=false"])
    assert {p.name: p.reason for p in excluded.layers}["head.weight"] == "excluded by the config"


def test_inspect_shows_fitted_layouts_and_counts_them():
    result = inspect_target("test_ecosystem:OddNet")               # fit_layouts: true (default)
    plans = {p.name: p for p in result.layers}
    odd = plans["odd.weight"]
    assert odd.palettized and odd.spec == "4-bit g12 axis 0 LUT float32" and odd.num_luts == 2
    assert odd.fitted.startswith("fitted group 12 axis 0 (asked: group 16 axis 0; shape (24, ")
    assert odd.projected_bytes == 24 * 9 * 4 // 8 + 2 * 16 * 4      # indices + two fp32 LUTs
    assert plans["head.weight"].spec == "4-bit per-tensor LUT float32"   # 10 rows: one LUT
    assert plans["even.weight"].fitted is None
    assert "fitted group 12 axis 0" in result.to_text()
    strict = inspect_target("test_ecosystem:OddNet", ["fit_layouts=false"])
    assert strict.projected_bytes - result.projected_bytes == (
        odd.dense_bytes - odd.projected_bytes + plans["head.weight"].dense_bytes
        - plans["head.weight"].projected_bytes)


def test_inspect_recipe_builds_the_model_from_config_on_meta():
    result = inspect_target("tiny-llama-offline", ["preset=w3"])
    plans = {p.name: p for p in result.layers}
    recipe = load_recipe("tiny-llama-offline")
    assert result.settings["modules"] == recipe.palettize["modules"]       # the recipe's section
    assert plans["model.layers.0.mlp.up_proj.weight"].spec == "3-bit g16 axis 0 LUT float32"
    assert plans["model.embed_tokens.weight"].n_bits == 8                   # tied head: w8
    assert plans["lm_head.weight"].tied_to == "model.embed_tokens.weight"
    assert plans["lm_head.weight"].projected_bytes == 0
    assert all(p.palettized for p in result.layers)


def write_llama_dir(directory: Path, **shape) -> Path:
    from transformers import LlamaConfig

    fields = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
              "tie_word_embeddings": False, "dtype": "float16",
              "architectures": ["LlamaForCausalLM"], **shape}
    LlamaConfig(**fields).save_pretrained(directory)
    return directory


def test_inspect_cli_on_a_model_directory_prints_json(tmp_path, capsys):
    model_dir = write_llama_dir(tmp_path / "llama")
    assert cli(["inspect", str(model_dir), "modules.lm_head=w8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "LlamaForCausalLM" and result["dtype"] == "float16"
    plans = {p["name"]: p for p in result["layers"]}
    head = plans["lm_head.weight"]
    assert (head["n_bits"], head["granularity"], head["lut_dtype"]) == (8, "per_tensor", "float16")
    # 256x64 8-bit indices + one 256-entry fp16 LUT
    assert head["projected_bytes"] == 256 * 64 + 256 * 2
    q = plans["model.layers.0.self_attn.q_proj.weight"]
    assert (q["group_size"], q["axis"], q["num_luts"]) == (16, 0, 4)
    assert q["projected_bytes"] == 64 * 64 // 2 + 4 * 16 * 2
    assert plans["model.embed_tokens.weight"]["reason"].startswith("embeddings are palettized")
    assert result["fp16_bytes"] == result["dense_bytes"]
    assert result["ratio_vs_fp16"] > 2


@pytest.mark.parametrize(("args", "message"), [
    (["nowhere"], "error: inspect: 'nowhere' is not a recipe (a YAML file or one of: "),
    (["no_such_module:build"], "error: inspect: cannot import 'no_such_module:build' "
     "(ModuleNotFoundError: No module named 'no_such_module')"),
    (["tiny-llama-offline", "overrides.linear=w5"], "error: palettize.overrides.linear: unknown "
     "preset 'w5'; valid: w2, w3, w4, w6, w8, none, inherit, null or a spec mapping"),
    (["tiny-llama-offline", "preset"], "error: override 'preset': expected key=value"),
    (["tiny-llama-offline", "modules.encoder=w8"], "error: palettize.modules.encoder: matches "
     "no module of LlamaForCausalLM"),
    (["test_ecosystem:OddNet", "--dtype", "float16", "--input-shape", "1,2,8,8"],
     "error: inspect: OddNet's forward could not run on the meta device"),
])
def test_inspect_bad_input_fails_in_one_line(args, message, capsys):
    assert cli(["inspect", *args]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(message), err
    assert len(err.strip().splitlines()) == 1, err


def test_inspect_error_as_a_user_sees_it(tmp_path):
    result = run_in(tmp_path, "-m", "coreai_palettize_plugins", "inspect", "tiny-llama-offline",
                    "overrides.linear=w5")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == ("error: palettize.overrides.linear: unknown preset 'w5'; valid: "
                             "w2, w3, w4, w6, w8, none, inherit, null or a spec mapping\n")


def test_inspect_needs_an_input_it_can_guess():
    with pytest.raises(InspectError, match="pass --input-shape"):
        inspect_target("torch.nn:Identity")


def test_inspect_llama_1b_recipe_from_the_hub_cache_without_weights(tmp_path):
    """The llama-3.2-1b-wikitext recipe with only its config.json in the Hugging Face cache:
    1.24 B parameters (4.6 GiB in fp32) inspected in well under 1 GB."""
    snapshot = tmp_path / "hf" / "hub" / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "c0"
    write_llama_dir(snapshot, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                    vocab_size=128256, tie_word_embeddings=True, dtype="bfloat16")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("c0")
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
             "capture_output=True, text=True); sys.stderr.write(r.stderr); print(r.stdout); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    result = run_in(tmp_path, "-c", probe, sys.executable, "-m", "coreai_palettize_plugins",
                    "inspect", "llama-3.2-1b-wikitext", "--json", timeout=180,
                    env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    *out, rss_kb = result.stdout.strip().splitlines()
    assert out, result.stderr[-2000:]
    facts = json.loads("\n".join(out))
    assert facts["target"] == "recipe llama-3.2-1b-wikitext"
    assert facts["dtype"] == "float32"                          # the recipe's model.dtype
    assert facts["num_weights"] == 1_235_814_400
    assert (facts["palettized_weights"], facts["dense_weights"]) == (113, 0)
    plans = {p["name"]: p for p in facts["layers"]}
    assert plans["lm_head.weight"]["tied_to"] == "model.embed_tokens.weight"
    assert plans["model.embed_tokens.weight"]["spec"] == "8-bit per-tensor LUT float32"
    assert facts["fp16_bytes"] == 2 * facts["num_weights"]
    assert 3.2 < facts["ratio_vs_fp16"] < 3.4
    assert int(rss_kb) < 1024 * 1024, f"peak RSS {int(rss_kb) // 1024} MiB"


# ------------------------------------------------------------------------------- 4. report


@pytest.fixture
def export_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    model = DigitsCNN()
    engine = Palettization("w4", overrides={"linear": "w8"})
    engine.prepare(model, model.example_input_array)
    return engine.export(tmp_path / "export", formats=["torch"]).directory


def test_export_writes_report_png(export_dir):
    png = export_dir / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < png.stat().st_size < 200_000


def test_report_command_prints_the_table_and_writes_the_png(export_dir, capsys):
    (export_dir / "report.png").unlink()
    assert cli(["report", str(export_dir)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("palettized 4 weights, 0 left dense; 8.0")
    assert any(line.startswith("net.5.weight") and "per-tensor" in line for line in lines)
    assert "artifacts: torch " in out and f"wrote {export_dir / 'report.png'}" in out
    assert (export_dir / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_report_without_matplotlib_prints_the_table_and_says_so(export_dir, tmp_path):
    (export_dir / "report.png").unlink()
    code = ("import sys; sys.modules['matplotlib'] = None; "
            "from coreai_palettize_plugins.cli import main; "
            f"sys.exit(main(['report', {str(export_dir)!r}]))")
    result = run_in(tmp_path, "-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "net.0.weight" in result.stdout
    assert last_line(result.stderr) == ("note: report.png needs matplotlib: pip install "
                                        "'coreai-palettize-plugins[plot]'")
    assert not (export_dir / "report.png").exists()


def test_export_without_matplotlib_still_succeeds(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    torch.manual_seed(0)
    model = DigitsCNN()
    engine = Palettization("w8")
    engine.prepare(model, model.example_input_array)
    with caplog.at_level("INFO", logger="coreai_palettize_plugins.export.plots"):
        result = engine.export(tmp_path / "out", formats=["torch"])
    assert (result.directory / "report.json").is_file()
    assert not (result.directory / "report.png").exists()
    assert "report.png not written: matplotlib is not installed" in caplog.text


def test_report_of_a_directory_without_report_json_fails_in_one_line(tmp_path, capsys):
    assert cli(["report", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"error: report: no report.json in {tmp_path} (an export "
                                       "directory written by the callbacks or `coreai-palettize "
                                       "finetune` is expected)\n")


# ------------------------------------------------------------------------------- 5. recipes


def test_recipes_lists_every_packaged_recipe_with_one_line(capsys):
    assert cli(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == packaged_recipes()
    described = dict(line.split(None, 1) for line in lines)
    assert described["llama-3.2-1b-wikitext"] == "Llama-3.2-1B on WikiText-2: 4-bit body, 8-bit head."
    assert described["tiny-llama-offline"].startswith("The whole recipe pipeline")
    assert all(len(text) <= 100 for text in described.values())


def test_recipes_cp_writes_an_editable_copy_and_refuses_to_overwrite(tmp_path, capsys):
    target = tmp_path / "mine.yaml"
    assert cli(["recipes", "cp", "tiny-llama-offline", str(target)]) == 0
    assert target.read_bytes() == (RECIPES_DIR / "tiny-llama-offline.yaml").read_bytes()
    assert f"coreai-palettize finetune {target}" in capsys.readouterr().out
    copied = load_recipe(target, ["train.max_steps=2"])
    assert copied.name == "mine" and copied.palettize == load_recipe("tiny-llama-offline").palettize

    target.write_text("# my edits\n")
    assert cli(["recipes", "cp", "tiny-llama-offline", str(target)]) == 1
    assert capsys.readouterr().err == (f"error: recipes cp: {target} already exists; pass "
                                       "--force to overwrite it\n")
    assert target.read_text() == "# my edits\n"
    assert cli(["recipes", "cp", "tiny-llama-offline.yaml", str(target), "--force"]) == 0
    assert target.read_bytes() == (RECIPES_DIR / "tiny-llama-offline.yaml").read_bytes()

    assert cli(["recipes", "cp", "smollm2-135m-wikitext", str(tmp_path)]) == 0      # into a dir
    assert (tmp_path / "smollm2-135m-wikitext.yaml").is_file()
    assert cli(["recipes", "cp", "tiny-llama-offline", str(tmp_path / "a" / "b.yaml")]) == 1
    assert "pass --make-parents" in capsys.readouterr().err
    assert cli(["recipes", "cp", "nope", str(tmp_path / "x.yaml")]) == 1
    assert capsys.readouterr().err.startswith("error: recipes: no packaged recipe 'nope'; valid: "
                                              "llama-3.2-1b-wikitext, ")


# ------------------------------------------------------------------------ 6. accelerate launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()),
               str(TESTS / "ddp_scripts" / "hf_accelerate.py"), "--out", str(tmp_path)]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home")}   # no user accelerate config
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    model = tiny_llama(tied=True)
    Palettization("w4", overrides={"embedding": None}, modules={"lm_head": "w8"}).prepare(
        model, model.dummy_inputs["input_ids"][:1])
    expected = palettized_state_hash(model)
    for facts in ranks:
        assert facts["world_size"] == 2 and facts["distributed_type"] == "DistributedType.MULTI_CPU"
        assert facts["hash_after_prepare"] == expected
        assert facts["global_step"] == 3
    assert ranks[0]["hash_at_end"] == ranks[1]["hash_at_end"] != expected   # ste: trained, equal
    assert [facts["exported"] for facts in ranks] == [True, False]     # one export, rank 0
    export = tmp_path / "export"
    assert (export / "palettized.safetensors").is_file() and (export / "config.json").is_file()
