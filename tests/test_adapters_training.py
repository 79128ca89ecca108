"""``palettize.adapters`` in both callbacks: training, resume without k-means, 2-rank DDP."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import KMeansCounter, TokenDataset, palettized_state_hash, run_python, tiny_llama
from lightning.pytorch.callbacks import ModelCheckpoint
from lora_llm import TinyLlamaModule
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from coreai_palettize_plugins import load_palettized
from coreai_palettize_plugins.hf import PalettizationTrainerCallback
from coreai_palettize_plugins.lightning import PalettizationCallback

ADAPTERS = {"r": 4, "alpha": 8, "target": ["q_proj", "v_proj", "up_proj"]}
SCRIPTS = Path(__file__).parent / "ddp_scripts"


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}


def _lightning(out: Path, ckpt: str | None = None):
    pl.seed_everything(0, verbose=False)
    module = TinyLlamaModule()
    callback = PalettizationCallback("w4", training="frozen", adapters=ADAPTERS,
                                     export_dir=out / "export", export_formats=["torch"])
    # Two epochs of two steps: resuming from an epoch's end replays no batch.
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(out),
                         callbacks=[callback, ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1,
                                                              filename="{epoch}")])
    trainer.fit(module, ckpt_path=ckpt)
    return module, callback, trainer


def test_lightning_trains_adapters_and_resumes_without_kmeans(tmp_path, monkeypatch):
    module, callback, trainer = _lightning(tmp_path / "full")
    # configure_optimizers ran after the injection: the optimizer holds the adapters.
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    adapters = [p for n, p in module.named_parameters() if ".lora_" in n]
    assert len(adapters) == 12 and all(id(p) in optimized and p.requires_grad for p in adapters)
    assert [n for n, p in module.named_parameters() if p.requires_grad and ".lora_" not in n] == []
    assert any(v.abs().sum() > 0 for k, v in lora_state(module).items() if ".lora_B." in k)
    export = tmp_path / "full/export"
    assert callback.export_result.extra()["adapters_params"] > 0
    with torch.no_grad():
        # peft reloads onto any nn.Module: here the LightningModule the export was taken of.
        reloaded = PeftModel.from_pretrained(load_palettized(export, TinyLlamaModule), export)
        x = module.example_input_array["input_ids"]
        module.eval()
        assert torch.equal(reloaded(input_ids=x), module(x))

    counter = KMeansCounter(monkeypatch)
    resumed, resumed_cb, _ = _lightning(tmp_path / "resumed",
                                        ckpt=str(tmp_path / "full/ckpt/epoch=0.ckpt"))
    assert counter.calls == [] and resumed_cb.engine.restored
    assert palettized_state_hash(resumed) == palettized_state_hash(module)
    full, again = lora_state(module), lora_state(resumed)
    assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)


def _hf(out: Path, resume: str | None = None, **adapters):
    callback = PalettizationTrainerCallback("w4", training="frozen",
                                            adapters={**ADAPTERS, **adapters},
                                            export_formats=["torch"])
    args = TrainingArguments(str(out), max_steps=4, per_device_train_batch_size=8,
                             learning_rate=1e-2, save_steps=2, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, save_strategy="steps")
    trainer = Trainer(model=tiny_llama(True), args=args, train_dataset=TokenDataset(blocks=32),
                      callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return callback, trainer


def test_hf_trains_adapters_and_resumes_without_kmeans(tmp_path, monkeypatch):
    callback, trainer = _hf(tmp_path / "full")
    assert callback.export_result.extra()["adapters_layers"] == 6
    optimized = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert optimized and all(".lora_" in names[id(p)] for p in optimized)
    assert len(optimized) == 12
    # The tied lm_head/embedding is still one palettized weight.
    lm_head = trainer.model.lm_head.parametrizations.weight
    assert lm_head.original is trainer.model.model.embed_tokens.parametrizations.weight.original
    saved = load_file(str(tmp_path / "full/checkpoint-2/model.safetensors"))
    assert [k for k in saved if ".lora_A." in k] and [k for k in saved if "base_layer" in k]

    counter = KMeansCounter(monkeypatch)
    resumed, resumed_trainer = _hf(tmp_path / "resumed", resume=str(tmp_path / "full/checkpoint-2"))
    assert counter.calls == [] and resumed.engine.restored
    assert palettized_state_hash(resumed_trainer.model) == palettized_state_hash(trainer.model)
    full, again = lora_state(trainer.model), lora_state(resumed_trainer.model)
    assert all(torch.equal(full[k], again[k]) for k in full)
    first = (tmp_path / "full/palettized/adapter_model.safetensors").read_bytes()
    assert first == (tmp_path / "resumed/palettized/adapter_model.safetensors").read_bytes()
    config = json.loads((tmp_path / "full/palettized/adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "up_proj", "v_proj"]


def test_hf_resume_of_a_user_peft_model_fails_loudly(tmp_path):
    """transformers saves a PeftModel's adapters only: the resume names the cause and the fix."""
    from peft import LoraConfig, get_peft_model

    def run(out: Path, resume: str | None = None) -> None:
        model = get_peft_model(tiny_llama(True), LoraConfig(r=4, target_modules=["q_proj"]))
        callback = PalettizationTrainerCallback("w4", training="frozen", export_formats=[])
        args = TrainingArguments(str(out), max_steps=2, per_device_train_batch_size=8,
                                 save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
                                 save_strategy="steps")
        Trainer(model=model, args=args, train_dataset=TokenDataset(blocks=16),
                callbacks=[callback]).train(resume_from_checkpoint=resume)

    run(tmp_path / "a")
    with pytest.raises(RuntimeError, match=r"no palettized state .* saves only the adapters of a "
                       r"PeftModel.*pass the plain model with palettize.adapters"):
        run(tmp_path / "b", resume=str(tmp_path / "a/checkpoint-2"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_lightning_ddp_only_adapters_get_gradients_and_ranks_agree(tmp_path):
    result = run_python(str(SCRIPTS / "lightning_lora_ddp.py"), "--out", str(tmp_path),
                        timeout=300, env={"MASTER_PORT": str(_free_port())})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["trainable"] == 12 and rank["params_without_grad"] == []
        assert rank["base_params_with_grad"] == []
        assert rank["find_unused_parameters"] is False
        assert rank["global_step"] == 4
    assert ranks[0]["hash_at_end"] == ranks[1]["hash_at_end"]
    assert ranks[0]["lora_hash"] == ranks[1]["lora_hash"]
    assert ranks[0]["lora_changed"]
