"""Training strategies: frozen (coreai-opt default), straight-through (ste), trainable LUT (lut)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import TokenDataset, example_image, mixed_net, run_python, tiny_llama
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import Trainer, TrainingArguments

from coreai_palettize_plugins import (
    Palettization,
    PalettizeConfigError,
    build_palettizer_config,
    load_palettized,
)
from coreai_palettize_plugins import _coreai_compat as compat
from coreai_palettize_plugins._coreai_compat import fake_palettized_tensors
from coreai_palettize_plugins.demo.digits import DigitsCNN, DigitsDataModule
from coreai_palettize_plugins.export.writer import PACKED_NAME
from coreai_palettize_plugins.hf import PalettizationTrainerCallback
from coreai_palettize_plugins.lightning import PalettizationCallback

STRATEGIES = ["frozen", "ste", {"type": "ste", "lut_update_every": 2}, "lut"]
PRESETS = [
    {"n_bits": 2, "group_size": 8},
    {"n_bits": 3, "granularity": "per_grouped_channel", "axis": 1, "group_size": 16},
    {"n_bits": 2, "cluster_dim": 2},
    {"n_bits": 2, "enable_per_channel_scale": True},
]


def values_per_lut(tensor, weight: torch.Tensor) -> int:
    """Most distinct values (vectors) in any LUT group of ``weight``, grouped as ``tensor``
    (with per-channel scales, counted after dividing the stored scales out)."""
    fake, weight = tensor.fake, weight.detach()
    if fake.enable_per_channel_scale:
        weight = (weight.flatten(1) / fake.per_channel_scale).reshape(weight.shape)
    return max(torch.unique(group.round(decimals=5), dim=0).shape[0]
               for group in compat.lut_groups(fake, weight))


def train_steps(engine, model, steps=12, lr=1e-2):
    x, y = example_image(16), torch.randint(0, 16, (16,), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    engine.start_training(0)
    losses = []
    for step in range(1, steps + 1):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        engine.sync_step(step)
        losses.append(loss.item())
    engine.stop_training()
    return losses, x


@pytest.mark.parametrize("training", STRATEGIES, ids=str)
@pytest.mark.parametrize("preset", PRESETS, ids=str)
def test_strategy_trains_and_stays_palettized(tmp_path, training, preset):
    model = mixed_net()
    engine = Palettization({"preset": preset, "training": training})
    engine.prepare(model, example_image(1))
    losses, x = train_steps(engine, model)
    assert losses[-1] < losses[0]
    model.eval()
    for tensor in engine.tensors():
        weight = tensor.fake.hard_assign(tensor.original)
        assert values_per_lut(tensor, weight) <= 2 ** tensor.fake.n_bits
    result = engine.export(tmp_path / "out", formats=["torch"])
    assert result.errors == {}
    loaded = load_palettized(tmp_path / "out", mixed_net, finalize=False)
    assert torch.equal(loaded(x), model(x))                     # the export is what was trained
    exported = fake_palettized_tensors(loaded)
    assert [t.name for t in exported] == [t.name for t in engine.tensors()]
    for tensor in exported:                                     # still palettized once exported
        assert values_per_lut(tensor, tensor.original) <= 2 ** tensor.fake.n_bits


def indices_of(t) -> torch.Tensor:
    """``t``'s indices as a checkpoint holds them (stored, or derived when read: ``ste``;
    unpacked from ``packed_indices``: a compact ``frozen``/``lut`` weight)."""
    state = t.module.parametrizations[t.attr].state_dict()
    return state["0.indices"] if "0.indices" in state else t.fake.indices  # noqa: SIM401 (lazy)


def test_training_moves_what_each_strategy_should_move():
    def trained(training):
        model = mixed_net()
        engine = Palettization({"preset": {"n_bits": 2, "group_size": 8}, "training": training})
        engine.prepare(model, example_image(1))
        before = {t.name: (t.original.detach().clone(), t.fake.centroids.clone(),
                           indices_of(t).clone()) for t in engine.tensors()}
        train_steps(engine, model, steps=4)
        return engine, before

    engine, before = trained("frozen")
    for t in engine.tensors():
        original, centroids, indices = before[t.name]
        assert torch.equal(t.original, original) and torch.equal(t.fake.centroids, centroids)
        assert not t.original.requires_grad

    engine, before = trained("ste")
    assert all(t.original.requires_grad for t in engine.tensors())
    assert any(not torch.equal(t.original, before[t.name][0]) for t in engine.tensors())
    assert all(torch.equal(t.fake.centroids, before[t.name][1]) for t in engine.tensors())

    engine, before = trained("lut")
    for t in engine.tensors():
        original, centroids, indices = before[t.name]
        assert torch.equal(t.original, original) and torch.equal(indices_of(t), indices)
        assert not torch.equal(t.fake.centroids, centroids)
        assert torch.equal(t.fake.centroids, t.fake.trainable_lut)   # synced after each step


def test_lut_gradient_is_the_sum_over_mapped_weights():
    model = mixed_net()
    engine = Palettization({"preset": {"n_bits": 2, "group_size": 8}, "training": "lut"})
    engine.prepare(model, example_image(1))
    engine.start_training(0)
    tensor = engine.tensors()[2]                                  # fc
    weight = model.fc.weight                                      # runs the training forward
    weight.retain_grad()
    (weight * torch.randn_like(weight)).sum().backward()
    vectors_grad, _ = tensor.fake.vectorize(weight.grad)
    indices, _ = tensor.fake.vectorize(tensor.fake.indices.float())
    expected = torch.zeros_like(tensor.fake.trainable_lut)
    expected.scatter_add_(1, indices.long(), vectors_grad)
    assert torch.allclose(tensor.fake.trainable_lut.grad, expected, atol=1e-5)
    engine.stop_training()


def test_strategy_specs_build_and_reject_bad_options():
    assert build_palettizer_config("w4", training="lut").global_config.op_state_spec[
        "weight"].training_strategy_spec.model_dump() == {"type": "lut"}
    with pytest.raises(PalettizeConfigError, match=r"^palettize\.training\.every: unknown option"):
        build_palettizer_config("w4", training={"type": "ste", "every": 5})
    for training in ("lut", "ste"):  # a quantized LUT keeps coreai-opt's strategy, and says so
        with pytest.warns(UserWarning, match=rf"training={training}: 2 spec\(s\) with lut_dtype "
                          r"or sparsity train frozen .*: global:weight, global:in_proj_weight"):
            engine = Palettization({"preset": {"n_bits": 4, "lut_dtype": "int8"},
                                    "overrides": {"linear": "w8"}, "training": training})
        engine.prepare(mixed_net(), example_image(1))
        strategies = {t.name: type(t.fake._training_strategy).__name__ for t in engine.tensors()}
        assert strategies["fc.weight"] != "DefaultTrainingStrategy"
        assert strategies["conv2d.weight"] not in ("StraightThroughStrategy", "TrainableLUTStrategy")


@pytest.mark.parametrize("training", ["ste", {"type": "ste", "lut_update_every": 3}, "lut"],
                         ids=str)
def test_lightning_resume_is_exact_and_optimizer_sees_the_right_parameters(tmp_path, training):
    def run(name, ckpt=None):
        pl.seed_everything(0, verbose=False)
        model = DigitsCNN()
        callback = PalettizationCallback("w2", overrides={"linear": {"n_bits": 2}},
                                         training=training, export_dir=tmp_path / name / "out",
                                         export_formats=["torch"])
        trainer = pl.Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=5,
                             limit_val_batches=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[callback, ModelCheckpoint(
                                 dirpath=tmp_path / name / "ckpt", save_top_k=-1,
                                 filename="{epoch}")])
        trainer.fit(model, DigitsDataModule(), ckpt_path=ckpt)
        return trainer, model

    trainer, model = run("full")
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if training == "lut":
        assert {n for n in trainable if n.endswith("trainable_lut")} == {
            f"net.{i}.parametrizations.weight.0.trainable_lut" for i in (0, 2, 5, 7)}
        assert not any(n.endswith("original") for n in trainable)
    else:
        assert {f"net.{i}.parametrizations.weight.original" for i in (0, 2, 5, 7)} <= trainable
    assert all(id(p) in optimized for n, p in model.named_parameters() if n in trainable)

    run("resumed", ckpt=tmp_path / "full/ckpt/epoch=0.ckpt")
    full = (tmp_path / "full/out" / PACKED_NAME).read_bytes()
    assert full == (tmp_path / "resumed/out" / PACKED_NAME).read_bytes()


def test_hf_trainer_with_straight_through(tmp_path):
    callback = PalettizationTrainerCallback("w4", training="ste", export_formats=["torch"])
    model = tiny_llama()
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                             learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True,
                             save_strategy="no", logging_steps=1)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback])
    trainer.train()
    after = model.model.layers[0].mlp.up_proj.parametrizations.weight.original
    assert not torch.equal(before, after)                         # dense weights trained
    x = torch.randint(0, 256, (2, 8))
    loaded = load_palettized(tmp_path / "palettized")
    assert torch.equal(loaded(x).logits, model.eval()(x).logits)


@pytest.mark.slow
@pytest.mark.parametrize("training", ["ste", "lut"])
def test_ddp_gives_every_trainable_parameter_a_gradient(tmp_path, training):
    script = Path(__file__).resolve().parent / "ddp_scripts" / "lightning_ddp.py"
    result = run_python(str(script), "--out", str(tmp_path), "--training", training,
                        "--epochs", "1", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for facts in ranks:
        assert facts["trainable"] == 8 and facts["params_without_grad"] == []
        assert facts["global_step"] == 6
    assert ranks[0]["hash_at_end"] == ranks[1]["hash_at_end"]
    assert ranks[0]["hash_at_end"] != ranks[0]["hash_after_prepare"]   # the LUT/indices trained
