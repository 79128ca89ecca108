"""PalettizationCallback beyond the plain ``fit``: layers built in ``configure_model``, and
``validate/test/predict(ckpt_path=...)`` of a palettized checkpoint in a fresh process."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
from helpers import KMeansCounter, palettized_state_hash, run_python
from lightning.pytorch.utilities.model_helpers import is_overridden

from coreai_palettize_plugins import _coreai_compat as compat
from coreai_palettize_plugins import load_palettized
from coreai_palettize_plugins.demo.digits import DigitsCNN, DigitsDataModule
from coreai_palettize_plugins.lightning import PalettizationCallback, _first_batch_of_stage

SCRIPTS = Path(__file__).resolve().parent / "ddp_scripts"


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=6,
                   limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False,
                   logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    options.update(kwargs)
    return pl.Trainer(**options)


class LayersInConfigureModel(DigitsCNN):
    """Its layers exist only after ``configure_model`` (Lightning's recipe for big models)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            torch.manual_seed(0)
            self.net = DigitsCNN().net


def built() -> LayersInConfigureModel:
    model = LayersInConfigureModel()
    model.configure_model()
    return model


def test_layers_from_configure_model_train_palettized_and_export(tmp_path, monkeypatch):
    counter = KMeansCounter(monkeypatch)
    net = LayersInConfigureModel()
    callback = PalettizationCallback("w4", overrides={"linear": "w8"},
                                     export_dir=tmp_path / "out", export_formats=["torch"])
    t = trainer(tmp_path, callbacks=[callback])
    t.fit(net, DigitsDataModule())

    assert [x.name for x in callback.engine.tensors()] == [
        "net.0.weight", "net.2.weight", "net.5.weight", "net.7.weight"]
    assert len(counter.calls) == 4 and t.global_step == 6
    optimized = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert all(id(x.parameter) in optimized for x in callback.engine.tensors())
    assert "configure_model" not in vars(net)                 # the instance hook was removed
    assert is_overridden("configure_model", net)
    x = torch.randn(5, 1, 8, 8)
    loaded = load_palettized(tmp_path / "out", built)
    assert torch.equal(loaded(x), net.eval()(x))


def test_attach_failure_inside_configure_model_leaves_the_module_clean(tmp_path):
    net = LayersInConfigureModel()
    callback = PalettizationCallback("w4", modules={"nope": "w8"}, export_formats=())
    with pytest.raises(Exception, match=r"modules\.nope"):
        trainer(tmp_path, callbacks=[callback]).fit(net, DigitsDataModule())
    assert "configure_model" not in vars(net)


def test_the_stage_dataloader_helper_reaches_every_loop(tmp_path):
    """Pins the Lightning-private ``_data_source`` of the validate/test/predict loops."""
    from torch.utils.data import DataLoader, TensorDataset

    t = trainer(tmp_path)
    first = DataLoader(TensorDataset(torch.ones(4, 1, 8, 8)), batch_size=2)
    second = DataLoader(TensorDataset(torch.zeros(4, 3)), batch_size=2)
    for stage, loop in (("validate", t.validate_loop), ("test", t.test_loop),
                        ("predict", t.predict_loop)):
        loop._data_source.instance = first                  # what trainer.<stage>() attaches
        assert _first_batch_of_stage(t, stage)[0].shape == (2, 1, 8, 8), stage
        loop._data_source.instance = [first, second]        # several loaders: the first
        assert _first_batch_of_stage(t, stage)[0].shape == (2, 1, 8, 8), stage


def test_stages_from_a_palettized_checkpoint_in_a_fresh_process(tmp_path):
    pl.seed_everything(0, verbose=False)
    torch.manual_seed(0)
    net, data = DigitsCNN(), DigitsDataModule()
    callback = PalettizationCallback("w4", overrides={"linear": "w8"}, export_formats=())
    t = trainer(tmp_path / "fit", callbacks=[callback], max_epochs=2)
    t.fit(net, data)
    ckpt = tmp_path / "palettized.ckpt"
    t.save_checkpoint(ckpt)
    evaluate = trainer(tmp_path / "eval", callbacks=[callback], limit_val_batches=1.0)
    expected_test = evaluate.test(net, data, verbose=False)[0]
    expected_val = evaluate.validate(net, data, verbose=False)[0]
    expected_pred = torch.cat(evaluate.predict(net, dataloaders=data.test_dataloader()))
    expected_hash = palettized_state_hash(net)

    out = tmp_path / "fresh"
    result = run_python(str(SCRIPTS / "lightning_stage_from_ckpt.py"), "--out", str(out),
                        "--ckpt", str(ckpt), "--runs", "test:dataloader", "validate:array",
                        "predict:dataloader", "test:argument", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    test, validate, predict, test_given_inputs = json.loads((out / "facts.json").read_text())
    for facts in (test, validate, predict, test_given_inputs):
        assert facts["kmeans"] == [], facts["stage"]           # restored, never clustered
        assert facts["attached"] and facts["restored"]
        assert len(facts["palettized"]) == 4 and facts["hash"] == expected_hash
        assert facts["instance_hooks_left"] == []
    assert test["metrics"] == expected_test                    # same palettized model
    assert test_given_inputs["metrics"] == expected_test
    assert validate["metrics"] == expected_val
    assert torch.equal(torch.load(out / "predictions_dataloader.pt"), expected_pred)


def test_a_dense_checkpoint_with_the_callback_still_loads_dense(tmp_path):
    torch.manual_seed(0)
    net, data = DigitsCNN(), DigitsDataModule()
    t = trainer(tmp_path / "fit")
    t.fit(net, data)
    ckpt = tmp_path / "dense.ckpt"
    t.save_checkpoint(ckpt)
    expected = t.test(net, data, verbose=False)[0]

    torch.manual_seed(123)
    fresh = DigitsCNN()
    callback = PalettizationCallback("w4", overrides={"linear": "w8"}, export_formats=())
    got = trainer(tmp_path / "test", callbacks=[callback]).test(
        fresh, datamodule=data, ckpt_path=ckpt, verbose=False)[0]
    assert got == expected and not callback.engine.attached
    assert compat.fake_palettized_tensors(fresh) == []
    assert "load_state_dict" not in vars(fresh)


def test_validate_with_a_palettized_checkpoint_needs_no_training_hooks(tmp_path, monkeypatch):
    """In-process variant (no subprocess): a new model and callback, layers from configure_model."""
    torch.manual_seed(0)
    net = LayersInConfigureModel()
    callback = PalettizationCallback("w4", overrides={"linear": "w8"}, export_formats=())
    t = trainer(tmp_path / "fit", callbacks=[callback])
    t.fit(net, DigitsDataModule())
    ckpt = tmp_path / "p.ckpt"
    t.save_checkpoint(ckpt)
    expected = t.validate(net, DigitsDataModule(), verbose=False)[0]

    counter = KMeansCounter(monkeypatch)
    fresh, second = LayersInConfigureModel(), PalettizationCallback(
        "w4", overrides={"linear": "w8"}, export_formats=())
    got = trainer(tmp_path / "val", callbacks=[second]).validate(
        fresh, DigitsDataModule(), ckpt_path=ckpt, verbose=False)[0]
    assert counter.calls == [] and second.engine.restored
    assert got == expected
    assert palettized_state_hash(fresh) == palettized_state_hash(net)
    assert isinstance(fresh.net[0], nn.Conv2d)

    third = PalettizationCallback("w4", overrides={"linear": "w8"}, export_formats=())
    again = trainer(tmp_path / "again", callbacks=[third]).validate(   # prepared by the first
        net, DigitsDataModule(), ckpt_path=ckpt, verbose=False)[0]
    assert again == expected and not third.engine.attached and counter.calls == []
