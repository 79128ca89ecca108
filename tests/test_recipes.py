"""Recipes and the ``coreai-palettize finetune`` runner: a real HF Trainer on the tiny Llama recipe,
the shipped corpus and tokenizer, the one-line errors, and the hub recipes failing fast offline."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import pytest
import torch
from helpers import run_python

from coreai_palettize_plugins import load_palettized
from coreai_palettize_plugins.cli import main
from coreai_palettize_plugins.recipes import (
    DATA_DIR,
    RECIPES_DIR,
    FinetuneResult,
    RecipeError,
    finetune,
    format_summary,
    load_recipe,
    load_tokenizer,
    packaged_recipes,
    perplexity,
    read_texts,
    split_blocks,
    tokenize_blocks,
)
from coreai_palettize_plugins.settings.schema import PalettizeConfigError

TINY = "tiny-llama-offline"
TINY_LORA = "tiny-llama-offline-lora"
HUB_RECIPES = {
    "smollm2-135m-wikitext": "HuggingFaceTB/SmolLM2-135M",
    "qwen2.5-0.5b-wikitext": "Qwen/Qwen2.5-0.5B",
    "llama-3.2-1b-wikitext": "meta-llama/Llama-3.2-1B",
}
HUB_RECIPES.update({f"{name}-lora": repo for name, repo in HUB_RECIPES.items()})


def small_run(output_dir: Path, *extra: str) -> list[str]:
    """Overrides that make the tiny recipe a few-second run writing under ``output_dir``."""
    return [f"train.output_dir={output_dir}", "train.max_steps=4", "train.save_steps=2",
            "data.max_train_blocks=64", "data.eval_fraction=0.02", *extra]


def eval_blocks_of(recipe_overrides: list[str]) -> torch.Tensor:
    recipe = load_recipe(TINY, recipe_overrides)
    tokenizer = load_tokenizer(recipe.model.tokenizer)
    blocks = tokenize_blocks(read_texts(recipe.data), tokenizer, recipe.data.seq_len)
    return split_blocks(blocks, recipe.data.eval_fraction)[1]


# ------------------------------------------------------------------------------------ shipped files


def test_shipped_corpus_tokenizer_and_recipes():
    corpus = (DATA_DIR / "tiny_corpus.txt").read_text(encoding="utf-8")
    assert 300_000 < len(corpus.encode()) < 400_000
    notice = (DATA_DIR / "NOTICE").read_text()
    assert "Python Software Foundation; All Rights Reserved" in notice
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in notice
    tokenizer = load_tokenizer("builtin:tiny_tokenizer.json")
    assert len(tokenizer) == 1024
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>", "</s>", "<pad>", "<unk>")
    sample = corpus[:2000]
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample  # byte-level: lossless
    assert set(packaged_recipes()) == {TINY, TINY_LORA, "whisper-tiny-offline", *HUB_RECIPES}
    link = Path(__file__).resolve().parents[1] / "recipes"   # `finetune recipes/<name>.yaml`
    assert link.is_symlink() and os.readlink(link) == "coreai_palettize_plugins/recipes/packaged"
    assert sorted(p.name for p in link.iterdir()) == sorted(p.name for p in RECIPES_DIR.iterdir())


def test_corpus_script_is_deterministic(tmp_path):
    for out in ("a", "b"):
        result = run_python("scripts/make_tiny_corpus.py", "--out", str(tmp_path / out))
        assert result.returncode == 0, result.stderr
    for name in ("tiny_corpus.txt", "tiny_tokenizer.json", "NOTICE"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # The shipped corpus and NOTICE are this script's output under the Python version NOTICE
    # names (the topics text changes between Python releases).
    shipped_notice = (DATA_DIR / "NOTICE").read_text()
    if f"Text of the Python {platform.python_version()} documentation" in shipped_notice:
        assert (tmp_path / "a" / "NOTICE").read_text() == shipped_notice
        assert ((tmp_path / "a" / "tiny_corpus.txt").read_bytes()
                == (DATA_DIR / "tiny_corpus.txt").read_bytes())


def test_data_pipeline_jsonl_eos_and_held_out_tail(tmp_path):
    tokenizer = load_tokenizer("builtin:tiny_tokenizer.json")
    path = tmp_path / "docs.jsonl"
    docs = [f"def f{i}(x):\n    return x + {i}\n" for i in range(40)]
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    data = {"files": [str(path)], "dataset": None, "text_field": "body"}
    assert read_texts(data) == docs
    blocks = tokenize_blocks(docs, tokenizer, 16)
    stream = [t for d in docs for t in (*tokenizer(d, add_special_tokens=False)["input_ids"],
                                        tokenizer.eos_token_id)]
    assert blocks.shape == (len(stream) // 16, 16)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    train, held_out = split_blocks(blocks, 0.25, max_train_blocks=3)
    assert len(held_out) == math.ceil(len(blocks) * 0.25)
    assert torch.equal(held_out, blocks[len(blocks) - len(held_out):])
    assert torch.equal(train, blocks[:3])
    with pytest.raises(RecipeError, match=r"^recipe\.data\.text_field: .*docs\.jsonl:1 has no "
                       r"string field 'text'$"):
        read_texts({**data, "text_field": "text"})


# ------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("name", packaged_recipes())
def test_packaged_recipes_validate(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert load_recipe(recipe.to_dict()).to_dict() == recipe.to_dict()   # to_dict is a fixed point


def test_overrides_and_interpolation(tmp_path):
    recipe = load_recipe(TINY, [f"train.output_dir={tmp_path}/run", "palettize.preset=w6",
                                "train.learning_rate=3e-4", "+palettize.modules.lm_head=w6"])
    assert recipe.export.dir == f"{tmp_path}/run/palettized"   # ${train.output_dir}/palettized
    assert recipe.palettize["preset"] == "w6"
    assert recipe.palettize["modules"] == {"lm_head": "w6"}
    assert recipe.train["learning_rate"] == pytest.approx(3e-4)
    assert recipe.training_args.learning_rate == pytest.approx(3e-4)
    shown = load_recipe(recipe.to_dict(), [])
    assert shown.to_dict() == recipe.to_dict()


def test_recipe_is_read_only_and_replace_revalidates(tmp_path):
    recipe = load_recipe(TINY, [f"train.output_dir={tmp_path}/run"])
    assert (recipe.data.seq_len, recipe.model.dtype, recipe.export.formats) == (
        128, "float32", ("coreai", "torch"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.data.seq_len = 64
    with pytest.raises(TypeError, match="read-only"):
        recipe.train["max_steps"] = 3
    with pytest.raises(TypeError, match="read-only"):
        recipe.palettize["modules"]["lm_head"] = "w6"
    with pytest.raises(RecipeError, match=r"^recipe\.data\.seq_len: must be a positive integer, "
                       r"got 0$"):
        dataclasses.replace(recipe.data, seq_len=0)
    shorter = dataclasses.replace(recipe, train={**recipe.train, "max_steps": 3})
    assert shorter.training_args.max_steps == 3 and recipe.training_args.max_steps == 60
    assert copy.deepcopy(recipe) == recipe and copy.deepcopy(recipe).to_yaml() == recipe.to_yaml()


# (overrides, message): the error starts with message; or (overrides, (prefix, word)): it starts
# with our key prefix and names the word somewhere in the rest (transformers' own wording).
BAD_RECIPES = [
    (["train.learning_rat=0.1"], "recipe.train.learning_rat: unknown key; valid: learning_rate"),
    (["data.seq_len=0"], "recipe.data.seq_len: must be a positive integer, got 0"),
    (["data=null"], "recipe.data: missing; set data.files or data.dataset"),
    (["model=null"], "recipe.model: missing; set model.name_or_path (an HF id or a local "
     "directory) or model.config (a model built from scratch)"),
    (["modle.dtype=float32"], "recipe.modle: unknown key; valid: data, export, model, palettize, "
     "train"),
    (["data.seq_length=64"], "recipe.data.seq_length: unknown key; valid: audio_field, "
     "dataset, dataset_config, eval_fraction, files, max_train_blocks, seq_len, split, text_field"),
    (["model.dtype=int8"], "recipe.model.dtype: unknown dtype 'int8'; valid: float32, bfloat16, "
     "float16"),
    (["model.config.hiden_size=64"], "recipe.model.config.hiden_size: unknown key; valid: "
     "hidden_size, hidden_act"),
    (["model.config.architecture=LlamaForCausalLMM"], ("recipe.model.config.architecture: "
     "'LlamaForCausalLMM' is not a transformers causal LM class; valid: ", "LlamaForCausalLM")),
    (["model.config.hidden_size=130"], ("recipe.model.config.hidden_size: ", "multiple")),
    (["model.name_or_path=HuggingFaceTB/SmolLM2-135M"], "recipe.model: set one of "
     "model.name_or_path and model.config, not both"),
    (["model.tokenizer=builtin:nope.json"], "recipe.model.tokenizer: no packaged file "
     "'builtin:nope.json'; valid: builtin:tiny_tokenizer.json"),
    (["data.files=[builtin:nope.txt]"], "recipe.data.files: no packaged file 'builtin:nope.txt'; "
     "valid: builtin:speech_sentences.txt, builtin:tiny_corpus.txt"),
    (["data.files=[missing.txt]"], "recipe.data.files: no such file: 'missing.txt'"),
    (["data.files=[README.md]"], "recipe.data.files: 'README.md' is not a .txt/.jsonl file"),
    (["data.eval_fraction=1.5"], "recipe.data.eval_fraction: must be a number in [0, 1), got 1.5"),
    (["data.dataset=wikitext"], "recipe.data: set one of data.files and data.dataset, not both"),
    (["palettize.preset=w5"], "recipe.palettize.preset: unknown preset 'w5'; valid: w2, w3, w4, "
     "w6, w8, none, null or a spec mapping"),
    (["palettize.overrides.linear.n_bits=5"], "recipe.palettize.overrides.linear.n_bits: 5 is not "
     "supported; valid: 1, 2, 3, 4, 6, 8"),
    (["palettize.num_worker=2"], "recipe.palettize.num_worker: unknown key; valid: preset, "
     "overrides, modules, fit_layouts, config_file, schedule, training, num_workers, distributed, "
     "compact, export"),
    (["palettize.export.dir=x"], "recipe.palettize.export: set the export in the recipe's own "
     "export section (export.dir, export.formats)"),
    (["train.max_steps=ten"], "recipe.train.max_steps: must be an integer, got 'ten'"),
    (["train.use_cpu=maybe"], "recipe.train.use_cpu: must be true or false, got 'maybe'"),
    (["train.output_dir=null"], "recipe.train.output_dir: missing; set the directory for "
     "checkpoints (and the default export dir)"),
    (["train.resume_from_checkpoint=no/such/checkpoint-9"], "recipe.train.resume_from_checkpoint: "
     "no such checkpoint directory: 'no/such/checkpoint-9'"),
    (["train.lr_scheduler_type=bogus"], ("recipe.train.lr_scheduler_type: ", "bogus")),
    (["export.formats=[onnx]"], "recipe.export.formats: unknown format 'onnx'; valid: coreai, "
     "torch"),
    (["export.dir=${train.nope}"], "recipe.export.dir: Interpolation key 'train.nope' not found"),
    (["train.max_steps"], "override 'train.max_steps': expected key=value "
     "(e.g. train.max_steps=10)"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_RECIPES,
                         ids=[o[0] for o, _ in BAD_RECIPES])
def test_bad_recipe_one_line_error_exit_1_nothing_written(tmp_path, monkeypatch, capsys,
                                                          overrides, message):
    monkeypatch.chdir(tmp_path)   # relative paths (missing.txt, README.md) resolve here
    (tmp_path / "README.md").write_text("not a corpus")
    out = tmp_path / "out"
    args = [f"train.output_dir={out}", *overrides]
    with pytest.raises((RecipeError, PalettizeConfigError)) as error:
        load_recipe(TINY, args)
    prefix, word = message if isinstance(message, tuple) else (message, "")
    assert str(error.value).startswith(prefix)
    assert word in str(error.value)[len(prefix):]
    assert "\n" not in str(error.value)
    assert main(["finetune", TINY, *args]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: {error.value}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]   # nothing written


def test_resume_true_needs_a_checkpoint(tmp_path):
    with pytest.raises(RecipeError, match=r"^recipe\.train\.resume_from_checkpoint: true, but .* "
                       r"holds no checkpoint-<step> directory$"):
        load_recipe(TINY, [f"train.output_dir={tmp_path}/out", "train.resume_from_checkpoint=true"])
    assert not (tmp_path / "out").exists()


def test_module_regex_matching_nothing_fails_before_training_and_leaves_nothing(tmp_path):
    out = tmp_path / "deep" / "out"
    with pytest.raises(PalettizeConfigError, match=r"^recipe\.palettize\.modules\.head: matches no "
                       r"module of LlamaForCausalLM"):
        finetune(TINY, small_run(out, "+palettize.modules.head=w8"))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ hub access


@pytest.mark.parametrize("name", sorted(HUB_RECIPES))
def test_hub_recipes_fail_fast_offline(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(RecipeError) as error:
        finetune(name, [f"train.output_dir={tmp_path}/out"])
    assert time.monotonic() - started < 20
    repo = HUB_RECIPES[name]
    assert str(error.value) == (
        f"recipe.model.name_or_path: '{repo}' is not a local path and the Hugging Face Hub is "
        f"unreachable (offline: HF_HUB_OFFLINE=1); download it first (hf download {repo}) or "
        "point name_or_path at a local copy")
    assert list(tmp_path.iterdir()) == []


def test_unreachable_hub_is_probed_not_waited_for(monkeypatch, tmp_path):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY",
                 "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # nothing listens: refused at once
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))   # empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf_home/hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HOME", str(tmp_path / "hf_home"))
    started = time.monotonic()
    with pytest.raises(RecipeError) as error:
        finetune("smollm2-135m-wikitext", [f"train.output_dir={tmp_path}/out"])
    assert time.monotonic() - started < 10
    assert "(no connection to 127.0.0.1:9 within 3 s)" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_hub_dataset_needs_datasets_or_fails_offline(tmp_path):
    """A local model with a hub dataset: the dataset is the part that cannot load."""
    overrides = [f"train.output_dir={tmp_path}/out", "data.files=null",
                 "data.dataset=Salesforce/wikitext", "data.dataset_config=wikitext-2-raw-v1"]
    with pytest.raises(RecipeError) as error:
        finetune(TINY, overrides)
    try:
        import datasets  # noqa: F401
    except ImportError:
        assert str(error.value) == (
            "recipe.data.dataset: the 'datasets' package is not installed; pip install "
            "'coreai-palettize-plugins[hub]' (or use data.files)")
    else:
        assert str(error.value).startswith(
            "recipe.data.dataset: 'Salesforce/wikitext' is not a local path and the Hugging Face "
            "Hub is unreachable (offline: HF_HUB_OFFLINE=1); download it first (hf download "
            "--repo-type dataset Salesforce/wikitext)")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ runner


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real fine-tune of the tiny recipe (4 optimizer steps, checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    overrides = small_run(out)
    return out, overrides, finetune(TINY, overrides)


def test_finetune_writes_export_checkpoints_and_results(tiny_run):
    out, overrides, results = tiny_run
    export_dir = out / "palettized"
    assert results.export_dir == str(export_dir)
    for name in ("model.aimodel", "palettized.safetensors", "palettized.json", "config.json",
                 "tokenizer.json", "report.json", "recipe.yaml", "finetune_results.json"):
        assert (export_dir / name).exists(), name
    assert results.export_errors == {}
    assert set(results.artifacts) == {"coreai", "torch"}
    # The resolved recipe beside the export and every checkpoint, and it reproduces the recipe.
    recipe_text = (export_dir / "recipe.yaml").read_text()
    assert "${" not in recipe_text
    for step in (2, 4):
        assert (out / f"checkpoint-{step}" / "recipe.yaml").read_text() == recipe_text
    assert load_recipe(export_dir / "recipe.yaml").to_dict() == load_recipe(TINY, overrides).to_dict()

    saved = json.loads((export_dir / "finetune_results.json").read_text())
    assert saved == results.to_json()                       # the file is the JSON view ...
    assert saved["results_file"] == results.results_file == str(export_dir / "finetune_results.json")
    assert FinetuneResult.from_json(saved) == results       # ... and reads back (report/trainer aside)
    assert results.global_step == 4
    p = results.perplexity
    assert all(math.isfinite(v) and v > 1 for v in (p.dense, p.palettized, p.finetuned))
    assert p.palettized != p.dense                  # k-means changed the model before training
    assert p.finetuned < p.palettized               # and 4 straight-through steps trained it
    assert results.prepare_seconds > 0
    assert 4.5 < results.bits_per_weight < 5        # 4-bit body, one 8-bit tied head/embedding
    assert results.palettized_layers == 29          # 28 projections + the tied embedding/head
    assert results.artifact_bytes["torch"] < results.dense_bytes / 4
    summary = format_summary(results)
    assert "held-out perplexity dense" in summary and str(export_dir) in summary
    assert summary == results.summary() == format_summary(saved)


def test_export_reloads_to_identical_logits_and_perplexity(tiny_run):
    out, overrides, results = tiny_run
    trained = results.trainer.model.eval()
    loaded = load_palettized(out / "palettized")          # no factory: HF config.json
    blocks = eval_blocks_of(overrides)
    with torch.no_grad():
        expected = trained(input_ids=blocks[:2]).logits
        actual = loaded(input_ids=blocks[:2]).logits
    assert (expected - actual).abs().max().item() == 0
    assert perplexity(loaded, blocks, 16) == pytest.approx(results.perplexity.finetuned, rel=1e-6)


def test_resume_from_checkpoint_skips_kmeans_and_matches(tiny_run, tmp_path):
    out, _, results = tiny_run
    resumed = finetune(TINY, small_run(tmp_path / "resumed",
                                       f"train.resume_from_checkpoint={out}/checkpoint-2"))
    assert resumed.prepare_seconds is None
    assert resumed.perplexity.palettized is None
    assert resumed.resumed_from == f"{out}/checkpoint-2"
    assert resumed.global_step == 4
    assert resumed.perplexity.finetuned == pytest.approx(results.perplexity.finetuned, rel=1e-6)
    assert ((tmp_path / "resumed/palettized/palettized.safetensors").read_bytes()
            == (out / "palettized/palettized.safetensors").read_bytes())


def test_lora_recipe_trains_only_the_adapters_and_exports_them(tmp_path):
    from peft import PeftModel

    results = finetune(TINY_LORA, small_run(tmp_path / "run"))
    export = tmp_path / "run/palettized"
    for name in ("model.aimodel", "palettized.safetensors", "adapter_config.json",
                 "adapter_model.safetensors"):
        assert (export / name).exists(), name
    assert results.export_errors == {}
    model = results.trainer.model.eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 * 7 * 2 and all(".lora_" in n for n in trainable)
    p = results.perplexity
    assert p.finetuned < p.palettized                  # 4 steps of the adapters alone
    blocks = eval_blocks_of(small_run(tmp_path / "run"))[:2]
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(load_palettized(export), export)
        assert torch.equal(reloaded(input_ids=blocks).logits, model(input_ids=blocks).logits)
    report = json.loads((export / "report.json").read_text())["extra"]
    assert report["adapters_params"] == sum(p.numel() for n, p in model.named_parameters()
                                            if ".lora_" in n)
    assert 0 < report["base_palettized_bytes"] < results.palettized_bytes


def test_pretrained_local_model_dir_without_export(tmp_path):
    """``model.name_or_path`` = a local HF directory (AutoModel + AutoTokenizer), no export."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer("builtin:tiny_tokenizer.json")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    results = finetune(TINY, small_run(
        tmp_path / "out", "model.config=null", "model.tokenizer=null",
        f"model.name_or_path={tmp_path / 'model'}", "train.max_steps=2", "export.formats=[]",
        "palettize.overrides.embedding=w8"))
    assert results.export_dir is None and results.artifacts == {}
    assert not (tmp_path / "out" / "palettized").exists()
    assert json.loads((tmp_path / "out" / "finetune_results.json").read_text())["global_step"] == 2
    # untied: the 8-bit embedding, the seven 4-bit projections and the 8-bit lm_head
    assert results.palettized_layers == 1 + 7 + 1


# ------------------------------------------------------------------------------------ CLI


@pytest.mark.slow
def test_cli_finetune_subprocess(tmp_path):
    out = tmp_path / "run"
    result = run_python("-m", "coreai_palettize_plugins", "finetune", "recipes/tiny-llama-offline.yaml",
                        *small_run(out, "train.max_steps=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out perplexity dense" in result.stdout
    assert f"results: {out}/palettized/finetune_results.json" in result.stdout
    assert (out / "palettized" / "model.aimodel").is_dir()
    assert (out / "checkpoint-2" / "recipe.yaml").is_file()


@pytest.mark.slow
def test_cli_hub_recipe_offline_subprocess(tmp_path):
    started = time.monotonic()
    result = run_python("-m", "coreai_palettize_plugins", "finetune",
                        "recipes/llama-3.2-1b-wikitext.yaml", f"train.output_dir={tmp_path}/out",
                        env={"HF_HUB_OFFLINE": "1"})
    assert time.monotonic() - started < 20
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: recipe.model.name_or_path: 'meta-llama/Llama-3.2-1B' is not a local path and the "
        "Hugging Face Hub is unreachable")
    assert list(tmp_path.iterdir()) == []


def test_cli_show_prints_resolved_recipe(capsys, tmp_path):
    assert main(["show", TINY, f"train.output_dir={tmp_path}/o", "palettize.preset=w6"]) == 0
    text = capsys.readouterr().out
    assert f"dir: {tmp_path}/o/palettized" in text and "preset: w6" in text
    assert list(tmp_path.iterdir()) == []
