"""``palettize.adapters``: settings, injection on the frozen palettized base, merge guard, export
(unmerged fp16 branch in the .aimodel, peft reload, merge)."""

from __future__ import annotations

import pytest
import torch
from helpers import KMeansCounter, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

from coreai_palettize_plugins import load_palettized
from coreai_palettize_plugins.accuracy.adapters import AdapterSettings
from coreai_palettize_plugins.engine.lifecycle import Palettization
from coreai_palettize_plugins.export.writer import AIMODEL_NAME
from coreai_palettize_plugins.hf import disable_kv_cache
from coreai_palettize_plugins.settings.schema import PalettizeConfigError, PalettizeSettings

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.mark.parametrize(("adapters", "message"), [
    ({"type": "dora"}, "palettize.adapters.type: unknown adapter type 'dora'; valid: lora"),
    ({"r": 0}, "palettize.adapters.r: must be an integer >= 1"),
    ({"alpha": -1}, "palettize.adapters.alpha: must be a number > 0"),
    ({"dropout": 1.5}, "palettize.adapters.dropout: must be a number in [0, 1)"),
    ({"target": []}, "palettize.adapters.target: must be a non-empty list"),
    ({"rank": 4}, "palettize.adapters.rank: unknown key; valid: type, r, alpha"),
    ({"refit_luts": True}, "palettize.adapters.refit_luts: re-fits the LUTs of merged weights"),
    ("lora", "palettize.adapters: must be null or a mapping"),
])
def test_bad_adapter_settings_are_one_line_errors(adapters, message):
    with pytest.raises(PalettizeConfigError) as error:
        PalettizeSettings.resolve("w4", training="frozen", adapters=adapters)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("training", [{"type": "ste", "lut_update_every": 2}, "lut"], ids=str)
def test_adapters_need_a_frozen_base(training):
    with pytest.raises(PalettizeConfigError, match=r"^palettize.training: '(ste|lut)' trains the "
                       r"palettized base.*valid with adapters: 'frozen'$"):
        PalettizeSettings.resolve("w4", training=training, adapters={"r": 4})


def test_adapters_turn_the_default_training_frozen(compose_config):
    assert PalettizeSettings.resolve("w4", adapters={"r": 4}).training == "frozen"
    assert PalettizeSettings.resolve("w4").training == "ste"
    cfg = compose_config("palettize=w4", "palettize.adapters={r: 4}")
    assert PalettizeSettings.resolve(cfg.palettize).training == "frozen"


def test_settings_round_trip():
    settings = PalettizeSettings.resolve("w4", training="frozen",
                                         adapters={"r": 8, "target": "q_proj"})
    assert settings.adapters == AdapterSettings(r=8, target=["q_proj"])
    again = PalettizeSettings.resolve(settings.to_dict())
    assert again.adapters == settings.adapters and again.to_dict() == settings.to_dict()
    assert PalettizeSettings.resolve("w4").adapters is None


def _engine(model, **adapters):
    engine = Palettization("w4", training="frozen", export_formats=("torch", "coreai"),
                           adapters={"r": 4, "target": TARGETS, **adapters})
    engine.attach(model, {"input_ids": IDS[:1]})
    return engine


def test_target_matching_no_palettized_layer_fails_before_training():
    with pytest.raises(PalettizeConfigError, match=r"^palettize.adapters.target: 'qkv' matches no "
                       r"palettized linear layer of LlamaForCausalLM; valid: down_proj, "):
        _engine(tiny_llama(), target=["q_proj", "qkv"])
    # A layer left dense by the config is no target either.
    with pytest.raises(PalettizeConfigError, match="'o_proj' matches no palettized"):
        Palettization("w4", training="frozen", modules={r".*o_proj": None},
                      adapters={"target": ["o_proj"]}).attach(tiny_llama(), {"input_ids": IDS[:1]})


def _train(model, engine, steps=4):
    engine.ensure_clustered()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    engine.start_training(0)
    for step in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        engine.after_optimizer_step(step + 1)
    model.eval()


def test_only_adapters_train_and_the_base_stays_palettized():
    model = tiny_llama(tied=True)
    engine = _engine(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 3 * 2                       # 3 targets x 2 layers x (A, B)
    engine.ensure_clustered()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    _train(model, engine)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in trainable if ".lora_B." in n} | {n for n in trainable
                                                                 if ".lora_A." in n}
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, base)
    # The base weight really is palettized: 16 values per LUT.
    assert base.unique().numel() <= 16 * base.shape[0]
    assert model.lm_head.weight is model.model.embed_tokens.weight or torch.equal(
        model.lm_head.weight, model.model.embed_tokens.weight)          # still tied
    report = engine.report()
    assert any(layer.name.endswith("q_proj.base_layer.weight") for layer in report.layers)
    adapters = [d for d in report.dense_layers if d.kind == "adapter"]
    assert len(adapters) == 12 and not any(d.warned for d in adapters)


def test_peft_merge_into_a_palettized_base_raises_instead_of_losing_the_write():
    model = tiny_llama()
    _engine(model).ensure_clustered()
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="cannot merge the LoRA adapter of "
                       r"model.layers.0.self_attn.q_proj into its palettized base"):
        layer.merge()
    # What the guard prevents: the write to a parametrized weight's .data is lost silently.
    before = layer.base_layer.weight.detach().clone()
    layer.base_layer.weight.data += 1.0
    assert torch.equal(layer.base_layer.weight, before)


def _export(engine, path):
    return engine.export(path, configure_model=disable_kv_cache, strict=True)


def test_export_aimodel_with_the_unmerged_branch_and_peft_reload(tmp_path):
    model = tiny_llama(tied=True)
    engine = _engine(model)
    _train(model, engine)
    result = _export(engine, tmp_path)
    assert (tmp_path / AIMODEL_NAME / "main.mlirb").is_file()
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_model.safetensors").is_file()
    # The graph handed to coreai-torch equals the export copy (base + fp16 branch), which
    # equals the trained model up to the fp16 rounding of the adapters.
    assert result.coreai_graph_max_abs_diff < 1e-4
    assert 0 < result.rebuilt_max_abs_diff < 2e-3
    extra = result.extra()
    # 2 layers, r=4: q, v, down
    assert extra["adapters_params"] == 2 * 4 * (64 + 64 + 64 + 64 + 128 + 64)
    assert extra["adapters_fp16_bytes"] == 2 * extra["adapters_params"]
    assert 0 < extra["base_palettized_bytes"] < result.report.palettized_bytes
    assert "adapters_fp16_bytes" in (tmp_path / "report.md").read_text()

    with torch.no_grad():
        trained = model(IDS).logits
        base = load_palettized(tmp_path, lambda: tiny_llama(tied=True))
        assert (base(IDS).logits - trained).abs().max() > 1e-3           # the adapters matter
        reloaded = PeftModel.from_pretrained(base, tmp_path)
        assert torch.equal(reloaded(IDS).logits, trained)


@pytest.mark.parametrize("refit", [False, True])
def test_export_merge_reassigns_indices_and_reports_the_error(tmp_path, refit):
    model = tiny_llama()
    engine = _engine(model, merge=True, refit_luts=refit)
    _train(model, engine)
    result = _export(engine, tmp_path)
    extra = result.extra()
    assert extra["adapters_merged"] and 0 < extra["merge_rel_error"] < 1
    assert not (tmp_path / "adapter_config.json").exists()
    merged = load_palettized(tmp_path, tiny_llama)
    with torch.no_grad():
        trained = model(IDS).logits
        q = model.model.layers[0].self_attn.q_proj
        dense = (q.base_layer.weight + q.lora_B["default"].weight @ q.lora_A["default"].weight
                 * q.scaling["default"])
        weight = merged.model.layers[0].self_attn.q_proj.weight
        # Every merged weight sits on a centroid of its LUT, the one nearest to base + delta.
        assert weight.unique().numel() <= 16 * weight.shape[0]
        assert (weight - dense).abs().max() < (q.base_layer.weight - dense).abs().max()
        # The export's check runs on the example inputs (attach's: IDS[:1]).
        error = (merged(IDS[:1]).logits - model(IDS[:1]).logits).abs().max().item()
        assert (merged(IDS).logits - trained).abs().max() > 1e-3
    # ... over every output (logits and the KV cache of the merged v_proj).
    assert 0 < error <= result.rebuilt_max_abs_diff + 1e-6
    assert extra["merge_max_abs_diff"] == result.rebuilt_max_abs_diff


def test_user_peft_model_palettizes_the_base_layers_and_keeps_adapters_dense(tmp_path,
                                                                              monkeypatch):
    peft_model = get_peft_model(tiny_llama(tied=True),
                                LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    engine = Palettization("w4", training="frozen", export_formats=("torch", "coreai"))
    counter = KMeansCounter(monkeypatch)
    engine.attach(peft_model, {"input_ids": IDS[:1]})
    names = [t.name for t in engine.tensors()]
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in names
    assert not [n for n in names if "lora_" in n] and len(names) == 15
    assert engine.adapters is not None and not engine.adapters.injected
    _train(peft_model, engine)
    assert len(counter.calls) == 15
    with pytest.raises(RuntimeError, match="cannot merge the LoRA adapter"):
        peft_model.merge_and_unload()
    result = _export(engine, tmp_path)
    assert result.coreai_graph_max_abs_diff < 1e-4
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(load_palettized(tmp_path, lambda: tiny_llama(True)),
                                             tmp_path)
        assert torch.equal(reloaded(IDS).logits, peft_model(input_ids=IDS).logits)
    with pytest.raises(PalettizeConfigError, match=r"^palettize\.adapters: PeftModel already"):
        Palettization("w4", training="frozen", adapters={}).attach(
            get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])), {"input_ids": IDS})
