"""PalettizationCallback with a real Lightning Trainer on CPU (single process)."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from helpers import KMeansCounter, palettized_state_hash
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from coreai_palettize_plugins import PalettizationWarning, load_palettized
from coreai_palettize_plugins.demo.digits import DigitsCNN, DigitsDataModule
from coreai_palettize_plugins.export.writer import PACKED_NAME
from coreai_palettize_plugins.lightning import PalettizationCallback


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=6,
                   limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False,
                   logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                   log_every_n_steps=1)
    options.update(kwargs)
    return pl.Trainer(**options)


def model() -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN()


def test_fit_palettizes_trains_exports_and_logs(tmp_path, monkeypatch):
    counter = KMeansCounter(monkeypatch)
    net, data = model(), DigitsDataModule()
    callback = PalettizationCallback("w4", overrides={"linear": "w8"}, export_dir=tmp_path / "out")
    logger = CSVLogger(str(tmp_path), name="logs")
    t = trainer(tmp_path, callbacks=[callback], logger=logger)
    t.fit(net, data)

    assert len(counter.calls) == 4 == len(callback.engine.tensors())  # k-means once per weight
    assert callback.engine.step == t.global_step == 12
    assert net.training  # training mode left cleanly: model back in its previous mode
    out = callback.export_result
    assert out.errors == {} and set(out.written) == {"coreai", "torch"}
    x = torch.randn(5, 1, 8, 8)
    loaded = load_palettized(tmp_path / "out", DigitsCNN)
    assert (loaded(x) - net.eval()(x)).abs().max().item() == 0.0

    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"palettize/bits_per_weight", "palettize/compression_ratio",
            "palettize/palettized_layers", "palettize/skipped_layers"} <= logged
    bpw = [float(r["palettize/bits_per_weight"]) for r in rows if r["palettize/bits_per_weight"]]
    assert all(7.9 < b < 8.1 for b in bpw)  # w4 convs + w8 linears on this model


def test_skipped_layer_is_named_in_a_warning(tmp_path):
    callback = PalettizationCallback("w4", export_formats=(), fit_layouts=False)
    with pytest.warns(PalettizationWarning,
                      match=r"net\.7\.weight: skipped by coreai-opt: shape \(10, 64\)"):
        trainer(tmp_path, callbacks=[callback], max_epochs=1).fit(model(), DigitsDataModule())
    assert callback.report.metrics()["palettize/skipped_layers"] == 1.0
    assert [d.name for d in callback.report.skipped] == ["net.7.weight"]


def _run(tmp_path, name, *, ckpt_path=None, max_epochs=4, checkpoint=False):
    callback = PalettizationCallback("w4", overrides={"linear": "w8"},
                                     export_dir=tmp_path / name / "export", export_formats=["torch"])
    callbacks = [callback]
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / name / "ckpt", save_top_k=-1,
                                         every_n_epochs=1, filename="{epoch}"))
    pl.seed_everything(0, verbose=False)
    net = model()
    trainer(tmp_path / name, callbacks=callbacks, max_epochs=max_epochs,
            enable_checkpointing=checkpoint).fit(
        net, DigitsDataModule(), ckpt_path=ckpt_path)
    return callback, net


def test_resume_restores_state_without_kmeans_and_is_bit_exact(tmp_path, monkeypatch):
    _, full_net = _run(tmp_path, "full", checkpoint=True)
    counter = KMeansCounter(monkeypatch)
    resumed, resumed_net = _run(tmp_path, "resumed", ckpt_path=tmp_path / "full/ckpt/epoch=1.ckpt")
    assert counter.calls == []                                  # restored, never re-clustered
    assert resumed.engine.restored
    assert palettized_state_hash(resumed_net) == palettized_state_hash(full_net)
    a = (tmp_path / "full/export" / PACKED_NAME).read_bytes()
    b = (tmp_path / "resumed/export" / PACKED_NAME).read_bytes()
    assert a == b                                               # byte-identical artifact
    for p_full, p_resumed in zip(full_net.parameters(), resumed_net.parameters()):
        assert torch.equal(p_full, p_resumed)


def test_resume_from_a_dense_checkpoint_fails_loudly(tmp_path):
    dense_dir = tmp_path / "dense"
    t = trainer(dense_dir, max_epochs=1, enable_checkpointing=True,
                callbacks=[ModelCheckpoint(dirpath=dense_dir, filename="dense")])
    t.fit(model(), DigitsDataModule())
    callback = PalettizationCallback("w4", export_formats=())
    with pytest.raises(RuntimeError, match="parametrizations"):
        trainer(tmp_path, callbacks=[callback], max_epochs=2).fit(
            model(), DigitsDataModule(), ckpt_path=dense_dir / "dense.ckpt")


class RecordSchedule(Callback):
    """(global_step, palettization enabled?) after every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        fake = pl_module.net[5].parametrizations.weight[0]
        self.seen.append((trainer.global_step, bool(fake.fake_palett_enabled[0])))


def test_schedule_counts_optimizer_steps_under_gradient_accumulation(tmp_path, monkeypatch):
    callback = PalettizationCallback("w4", overrides={"linear": "w8"}, export_formats=(),
                                     schedule={"start_step": 4})
    record = RecordSchedule()
    t = trainer(tmp_path, callbacks=[callback, record], accumulate_grad_batches=3,
                limit_train_batches=9, max_epochs=3)
    counter = KMeansCounter(monkeypatch)
    t.fit(model(), DigitsDataModule())
    assert t.global_step == 9 == callback.engine.step          # 27 micro-batches, 9 steps
    assert len(record.seen) == 27
    assert all(enabled == (step >= 4) for step, enabled in record.seen), record.seen
    # coreai-opt re-clusters from the warmed-up weights when palettization switches on.
    assert len(counter.calls) == 8                             # 4 at prepare + 4 at step 4


def test_validate_test_predict_before_and_after_fit_and_fit_twice(tmp_path, monkeypatch):
    net, data = model(), DigitsDataModule()
    callback = PalettizationCallback("w4", overrides={"linear": "w8"}, export_formats=(),
                                     training="frozen")
    t = trainer(tmp_path, callbacks=[callback], max_epochs=1)
    dense = t.validate(net, data, verbose=False)[0]
    assert not callback.engine.attached
    t.test(net, data, verbose=False)
    t.fit(net, data)
    after = t.validate(net, data, verbose=False)[0]
    assert 0 < after["val_acc"] <= 1 and dense.keys() == after.keys()
    t.test(net, data, verbose=False)
    predictions = t.predict(net, dataloaders=data.test_dataloader())
    assert predictions[0].shape[-1] == 10
    state = palettized_state_hash(net)

    counter = KMeansCounter(monkeypatch)
    t2 = trainer(tmp_path, callbacks=[callback], max_epochs=1)
    t2.fit(net, data)                                          # same callback, same model
    assert counter.calls == []                                 # not prepared again
    assert palettized_state_hash(net) == state                 # frozen LUTs/indices kept
    assert t2.global_step == 6 and callback.engine.step == 6


class NoExampleArray(DigitsCNN):
    def __init__(self) -> None:
        super().__init__()
        self.example_input_array = None


def test_example_inputs_from_first_batch_and_custom_fn(tmp_path):
    seen = []

    def inputs_fn(batch):
        seen.append(batch[0].shape)
        return (batch[0][:2],)

    callback = PalettizationCallback("w8", example_inputs_fn=inputs_fn, export_formats=())
    trainer(tmp_path, callbacks=[callback], max_epochs=1).fit(NoExampleArray(), DigitsDataModule())
    assert seen == [torch.Size([64, 1, 8, 8])]
    assert callback.engine.example_inputs[0].shape == (2, 1, 8, 8)

    default = PalettizationCallback("w8", export_formats=())
    trainer(tmp_path, callbacks=[default], max_epochs=1).fit(NoExampleArray(), DigitsDataModule())
    assert default.engine.example_inputs[0].shape == (1, 1, 8, 8)


def test_first_batch_for_example_inputs_leaves_the_rng_stream_alone(tmp_path):
    """Drawing the first batch of a shuffled loader must not consume the user's RNG stream."""
    t = trainer(tmp_path, max_epochs=1)
    module, data = NoExampleArray(), DigitsDataModule()
    t._data_connector.attach_data(module, datamodule=data)   # what fit() does first
    data.setup("fit")
    callback = PalettizationCallback("w8")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    inputs = callback._resolve_example_inputs(t, module)
    assert torch.equal(before, torch.get_rng_state())
    assert inputs[0].shape == (1, 1, 8, 8)


def test_strategy_checks_before_training():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from coreai_palettize_plugins import Palettization, PalettizeConfigError
    from coreai_palettize_plugins.lightning import _check_strategy

    with pytest.raises(PalettizeConfigError, match=r"^palettize: the FSDPStrategy is not supported"):
        _check_strategy(SimpleNamespace(strategy=FSDPStrategy()), Palettization("w4"))
    warm_up = Palettization("w4", schedule={"start_step": 10}, training="frozen")
    ddp = DDPStrategy()
    _check_strategy(SimpleNamespace(strategy=ddp), warm_up)
    assert ddp._ddp_kwargs["find_unused_parameters"] is True     # set for the user
    plain = DDPStrategy()
    _check_strategy(SimpleNamespace(strategy=plain), Palettization("w4", training="frozen"))
    assert "find_unused_parameters" not in plain._ddp_kwargs     # frozen weights: not needed
    ste = DDPStrategy()           # the default ste: dense weights get gradients, warm-up or not
    _check_strategy(SimpleNamespace(strategy=ste), Palettization("w4", schedule={"start_step": 10}))
    assert "find_unused_parameters" not in ste._ddp_kwargs
    with pytest.raises(PalettizeConfigError, match="use strategy='ddp_find_unused_parameters_true'"):
        _check_strategy(SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=False)), warm_up)
