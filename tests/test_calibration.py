"""palettize.calibration: sensitivity-weighted k-means from the training data."""

from __future__ import annotations

import random
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import KMeansCounter, TokenDataset, palettized_state_hash, tiny_llama
from lightning.pytorch.callbacks import ModelCheckpoint

from coreai_palettize_plugins.accuracy import calibration
from coreai_palettize_plugins.accuracy.calibration import (
    CalibrationData,
    compute_sensitivities,
    load_sensitivities,
)
from coreai_palettize_plugins.demo.digits import DigitsCNN, DigitsDataModule
from coreai_palettize_plugins.engine.lifecycle import Palettization
from coreai_palettize_plugins.lightning import PalettizationCallback
from coreai_palettize_plugins.settings.schema import PalettizeConfigError, PalettizeSettings

TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-llama-offline.yaml"

# ------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(("value", "message"), [
    ({"samples": 0}, "palettize.calibration.samples: must be an integer >= 1, got 0"),
    ({"batches": 2.5}, "palettize.calibration.batches: must be an integer >= 1, got 2.5"),
    ({"sample": 8}, "palettize.calibration.sample: unknown key; valid: samples, batches, path, "
                    "show_progress"),
    ({"samples": 8, "batches": 2}, "palettize.calibration: set exactly one of samples, batches"),
    ({"path": "s.pt"}, "palettize.calibration: set exactly one of samples, batches"),
    ({"samples": 8, "show_progress": "yes"},
     "palettize.calibration.show_progress: must be true or false"),
    (8, "palettize.calibration: must be null or a mapping with one of samples, batches"),
])
def test_bad_calibration_settings_are_one_line_errors(value, message):
    with pytest.raises(PalettizeConfigError) as error:
        PalettizeSettings.resolve("w4", calibration=value)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_calibration_path_must_not_be_a_directory(tmp_path):
    with pytest.raises(PalettizeConfigError, match=r"^palettize\.calibration\.path: must be a "
                       "file path"):
        PalettizeSettings.resolve("w4", calibration={"samples": 4, "path": str(tmp_path)})


def test_hydra_override_composes_and_default_is_off(compose_config):
    on = PalettizeSettings.resolve(compose_config("palettize.calibration.samples=8").palettize)
    assert on.calibration == calibration.CalibrationSettings(samples=8)
    assert PalettizeSettings.resolve(compose_config().palettize).calibration is None
    both = compose_config("palettize.calibration.batches=2", "palettize.calibration.samples=8")
    with pytest.raises(PalettizeConfigError, match="exactly one of samples, batches"):
        PalettizeSettings.resolve(both.palettize)


def test_recipe_palettize_section_validates_calibration():
    from coreai_palettize_plugins.recipes import load_recipe

    recipe = load_recipe(TINY_RECIPE, ["palettize.calibration.samples=8"])
    assert recipe.palettize["calibration"] == {"samples": 8}
    with pytest.raises(PalettizeConfigError, match=r"^recipe\.palettize\.calibration\.samples: "
                       "must be an integer >= 1"):
        load_recipe(TINY_RECIPE, ["palettize.calibration.samples=0"])


# ------------------------------------------------------------------------------ the sensitivities


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.drop, self.fc2 = nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def _batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(n)]


def test_compute_sensitivities_is_the_mean_squared_gradient_and_disturbs_nothing():
    model = TwoLayer().train()
    model.fc2.bias.grad = torch.ones(4)                       # a user's pending gradient
    batches = _batches()

    def loss(batch):
        x, y = batch
        torch.rand(1), random.random(), np.random.rand()      # draws from every RNG
        return F.cross_entropy(model(x), y)

    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    sens = compute_sensitivities(model, loss, batches)
    after = (torch.rand(3).tolist(), random.random(), np.random.rand())
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    assert after == (torch.rand(3).tolist(), random.random(), np.random.rand())  # RNG restored

    assert set(sens) == {"fc1.weight", "fc2.weight"}
    reference = TwoLayer().eval()                              # eval: no dropout
    expected = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in sens.items()}
    for x, y in batches:
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        for name in expected:
            expected[name] += reference.get_parameter(name).grad.double() ** 2
    for name, value in sens.items():
        assert value.dtype == torch.float32 and value.shape == model.get_parameter(name).shape
        assert torch.equal(value, (expected[name] / len(batches)).float())
    assert model.training and model.drop.training              # mode restored
    assert all(p.requires_grad for p in model.parameters())
    assert model.fc1.weight.grad is None and torch.equal(model.fc2.bias.grad, torch.ones(4))


def _calibrated(model: nn.Module, batches, **settings) -> Palettization:
    engine = Palettization({"preset": {"n_bits": 2, "group_size": 4}}, training="frozen",
                           calibration={"batches": len(batches), **settings})
    engine.calibration_data = lambda: CalibrationData(
        loss=lambda batch, _: F.cross_entropy(model(batch[0]), batch[1]), loader=batches)
    return engine


def test_weighted_kmeans_uses_the_sensitivities(tmp_path):
    batches = _batches()
    plain_model, cal_model = TwoLayer(), TwoLayer()
    x = batches[0][0][:1]
    plain = Palettization({"preset": {"n_bits": 2, "group_size": 4}}, training="frozen")
    plain.prepare(plain_model, x)
    path = tmp_path / "sens.pt"
    cal = _calibrated(cal_model, batches, path=str(path))
    cal.prepare(cal_model, x)
    sens, meta = load_sensitivities(path, cal.tensors())
    assert meta["batches"] == 4 and meta["samples"] == 32
    assert cal.calibration_stats.source == "computed" and cal.calibration_stats.samples == 32
    for t_plain, t_cal in zip(plain.tensors(), cal.tensors()):
        assert torch.equal(t_plain.original, t_cal.original)
        assert not torch.equal(t_plain.fake.centroids, t_cal.fake.centroids)
        s = sens[t_cal.name].double()

        def weighted(t, s=s):
            return float((s * (t.original - t.fake.hard_assign(t.original)).double() ** 2).sum())

        assert weighted(t_cal) < weighted(t_plain)               # what weighting optimizes
        assert calibration.compat.kmeans_sensitivities(t_cal) is None  # released after k-means
    report = cal.report()
    assert report.to_dict()["calibration"]["batches"] == 4     # report.json's section
    assert report.metrics()["palettize/calibration_samples"] == 32.0
    assert "- calibration: sensitivities computed (32 samples, 4 batches" in report.to_markdown()
    assert plain.report().to_dict()["calibration"] is None


def test_calibration_path_is_reused_and_bad_files_fail_in_one_line(tmp_path, monkeypatch):
    batches = _batches()
    path = tmp_path / "sens.pt"
    first = TwoLayer()
    _calibrated(first, batches, path=str(path)).prepare(first, batches[0][0][:1])
    runs = []
    accumulate = calibration._accumulate
    monkeypatch.setattr(calibration, "_accumulate", lambda *a, **k: runs.append(1) or
                        accumulate(*a, **k))
    second = TwoLayer()
    engine = _calibrated(second, batches, path=str(path))
    engine.calibration_data = None                            # no data needed: loaded
    engine.prepare(second, batches[0][0][:1])
    assert runs == [] and engine.calibration_stats.source == "loaded"
    assert palettized_state_hash(second) == palettized_state_hash(first)

    torch.save({"fc1.weight": torch.ones(2, 2)}, path)
    third = TwoLayer()
    with pytest.raises(PalettizeConfigError, match=r"^palettize\.calibration\.path: .*fc1\.weight "
                       r"has shape \(2, 2\), the weight \(32, 16\); delete it to recompute$"):
        _calibrated(third, batches, path=str(path)).prepare(third, batches[0][0][:1])


# ------------------------------------------------------------------------------ Lightning


def _fit(tmp_path, name, *, ckpt_path=None, epochs=1, budget=None, **calibration_settings):
    callback = PalettizationCallback("w4", overrides={"linear": "w8"}, training="ste",
                                     export_formats=(), budget=budget,
                                     calibration={"samples": 96, "show_progress": False,
                                                  **calibration_settings})
    pl.seed_everything(0, verbose=False)
    net = DigitsCNN()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=2,
                         limit_val_batches=1, enable_progress_bar=False, logger=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path / name),
                         callbacks=[callback, ModelCheckpoint(dirpath=tmp_path / name / "ckpt",
                                                              save_top_k=-1, filename="{epoch}")])
    trainer.fit(net, DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
    return callback, net, trainer


def test_lightning_calibrates_at_fit_start_and_resume_does_not(tmp_path, monkeypatch):
    runs = []
    accumulate = calibration._accumulate
    monkeypatch.setattr(calibration, "_accumulate", lambda *a, **k: runs.append(1) or
                        accumulate(*a, **k))
    callback, net, trainer = _fit(tmp_path, "full", epochs=2)
    assert runs == [1]
    stats = callback.report.calibration
    assert (stats["source"], stats["samples"], stats["batches"]) == ("computed", 96, 2)
    assert trainer.global_step == 4 and net.training          # training ran; mode restored

    counter = KMeansCounter(monkeypatch)
    resumed, resumed_net, _ = _fit(tmp_path, "resumed", epochs=2,
                                   ckpt_path=tmp_path / "full/ckpt/epoch=0.ckpt")
    assert runs == [1] and counter.calls == []                # no recalibration, no k-means
    assert resumed.engine.restored
    assert resumed.report.calibration == stats                # restored from the checkpoint
    assert palettized_state_hash(resumed_net) == palettized_state_hash(net)


def test_manual_optimization_is_rejected_before_training(tmp_path):
    class Manual(DigitsCNN):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    callback = PalettizationCallback("w4", training="ste", export_formats=(),
                                     calibration={"samples": 8})
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False,
                         default_root_dir=str(tmp_path), callbacks=[callback])
    with pytest.raises(PalettizeConfigError, match=r"^palettize\.calibration: needs the "
                       "training_step loss of automatic optimization"):
        trainer.fit(Manual(), DigitsDataModule())
    assert trainer.global_step == 0


# ------------------------------------------------------------------------------ HF


def test_hf_trainer_calibrates_with_compute_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    from coreai_palettize_plugins.hf import PalettizationTrainerCallback

    class CountingTrainer(Trainer):
        calls = 0

        def compute_loss(self, model, inputs, *args, **kwargs):
            CountingTrainer.calls += 1
            return super().compute_loss(model, inputs, *args, **kwargs)

    dataset = TokenDataset(blocks=16)
    callback = PalettizationTrainerCallback("w4", training="ste", export_formats=(),
                                            calibration={"batches": 2, "show_progress": False,
                                                         "path": str(tmp_path / "s.pt")})
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = CountingTrainer(model=tiny_llama(), args=args, train_dataset=dataset,
                              callbacks=[callback])
    callback.attach_to_trainer(trainer)
    trainer.train()
    assert CountingTrainer.calls == 2 + 2                      # 2 calibration + 2 training
    stats = callback.report.calibration
    assert (stats["samples"], stats["batches"]) == (8, 2)

    # The same sensitivities as compute_sensitivities on the dense model, same batches.
    dense = tiny_llama()
    expected = compute_sensitivities(
        dense, lambda b: dense(**b).loss,
        [{k: torch.stack([dataset[i][k] for i in range(s, s + 4)]) for k in ("input_ids",
                                                                              "labels")}
         for s in (0, 4)],
        params={t.name: dense.get_parameter(t.name) for t in callback.engine.tensors()})
    saved, _ = load_sensitivities(tmp_path / "s.pt", callback.engine.tensors())
    assert "model.layers.0.self_attn.q_proj.weight" in saved
    for name, value in expected.items():
        assert torch.equal(saved[name], value), name


# ------------------------------------------------------------------------------ distributed


@pytest.mark.slow
def test_ddp_sensitivities_identical_on_every_rank_and_equal_to_one_process(tmp_path,
                                                                           monkeypatch):
    import json

    from helpers import run_python

    script = Path(__file__).resolve().parent / "ddp_scripts" / "calibration_ddp.py"
    result = run_python(str(script), "--out", str(tmp_path / "ddp"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    sens = [torch.load(tmp_path / "ddp" / f"sens_rank{r}.pt") for r in (0, 1)]

    # One process over the same 5 global batches (rank 0 had batches 0, 2, 4; rank 1: 1, 3),
    # with the ranks' thread count (conv gradients are summed in a thread-dependent order).
    torch.set_num_threads(1)
    captured: dict[str, torch.Tensor] = {}
    means = calibration._means
    monkeypatch.setattr(calibration, "_means", lambda sums, n: captured.update(means(sums, n))
                        or dict(captured))
    callback = PalettizationCallback("w4", overrides={"linear": "w8"}, training="ste",
                                     export_formats=(), calibration={"samples": 320})
    hashes: list[str] = []

    class Hash(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            hashes.append(palettized_state_hash(pl_module))

    pl.seed_everything(0, verbose=False)
    net = DigitsCNN()
    pl.Trainer(accelerator="cpu", devices=1, max_steps=1, limit_val_batches=0, logger=False,
               enable_progress_bar=False, enable_checkpointing=False,
               default_root_dir=str(tmp_path / "one"), callbacks=[callback, Hash()]).fit(
        net, DigitsDataModule(batch_size=64))

    assert set(sens[0]) == set(captured) == {"net.0.weight", "net.2.weight", "net.5.weight",
                                             "net.7.weight"}
    for name, value in captured.items():
        assert torch.equal(sens[0][name], sens[1][name]), name      # bit-identical ranks
        assert torch.equal(sens[0][name], value), name               # == one process
    for facts in ranks:
        assert facts["calibration"]["samples"] == 320 and facts["calibration"]["batches"] == 5
        assert facts["calibration"]["world_size"] == 2 and facts["calibration_runs"] == 1
    assert set(ranks[0]["owners"].values()) == {0, 1}                 # sharded k-means
    assert ranks[0]["hash_after_prepare"] == ranks[1]["hash_after_prepare"]
    assert ranks[0]["hash_after_prepare"] == hashes[0]                 # == one process

    resumed = run_python(str(script), "--out", str(tmp_path / "resumed"), "--ckpt",
                         str(tmp_path / "ddp" / "last.ckpt"), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for r in (0, 1):
        facts = json.loads((tmp_path / "resumed" / f"rank{r}.json").read_text())
        assert facts["calibration_runs"] == 0                         # restored, not recomputed
        assert facts["report_calibration"] == ranks[0]["calibration"]  # rank 0's checkpoint


@pytest.mark.slow
def test_recipe_finetune_calibrates_before_its_post_training_perplexity(tmp_path):
    import json

    from coreai_palettize_plugins.hf import PalettizationTrainerCallback
    from coreai_palettize_plugins.recipes import finetune

    path = tmp_path / "sens.pt"
    result = finetune(TINY_RECIPE, [
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.save_steps=2",
        "data.max_train_blocks=32", "data.eval_fraction=0.02", "export.formats=[torch]",
        "palettize.calibration.samples=16", f"palettize.calibration.path={path}",
        "palettize.calibration.show_progress=false"])
    stats = result.report.calibration
    assert (stats["source"], stats["samples"], stats["batches"]) == ("computed", 16, 2)
    callback = next(c for c in result.trainer.callback_handler.callbacks
                    if isinstance(c, PalettizationTrainerCallback))
    saved, meta = load_sensitivities(path, callback.engine.tensors())
    assert meta["samples"] == 16 and len(saved) == len(callback.engine.tensors())
    written = json.loads((Path(result.export_dir) / "report.json").read_text())
    assert written["calibration"]["samples"] == 16


def test_calibration_sensitivities_weight_the_budget_and_resume_keeps_both(tmp_path, monkeypatch,
                                                                          caplog):
    from coreai_palettize_plugins.accuracy import budget

    seen = []
    allocate = budget.allocate
    monkeypatch.setattr(budget, "allocate", lambda scope, target, sens=None: seen.append(sens)
                        or allocate(scope, target, sens))
    target = {"bits_per_weight": 4.0, "choices": [2, 4, 8]}
    callback, net, _ = _fit(tmp_path, "full", epochs=2, budget=target)
    (sens,) = seen
    assert "without palettize.calibration" not in caplog.text  # only a plain-error budget warns
    names = {t.name for t in callback.engine.tensors()}
    assert sens is not None and set(sens) == names            # calibration came first
    assert all(s.shape == t.original.shape for t in callback.engine.tensors()
               for s in [sens[t.name]])
    assert callback.engine.sensitivities is None               # released after k-means
    report = callback.report
    assert report.calibration["source"] == "computed"
    assert report.budget["achieved_bits_per_weight"] <= 4.0   # coarse steps on a tiny CNN
    assert abs(report.bits_per_weight - report.budget["achieved_bits_per_weight"]) < 1e-9

    counter = KMeansCounter(monkeypatch)
    resumed, resumed_net, _ = _fit(tmp_path, "resumed", epochs=2, budget=target,
                                   ckpt_path=tmp_path / "full/ckpt/epoch=0.ckpt")
    assert len(seen) == 1 and counter.calls == []              # no recalibration, no k-means
    assert resumed.report.budget["layers"] == report.budget["layers"]
    assert palettized_state_hash(resumed_net) == palettized_state_hash(net)
