"""``palettize.fit_layouts``: weights whose channels the preset's groups do not divide get the
nearest layout that fits; weights the preset fits keep coreai-opt's exact spec; ``false`` is
coreai-opt's behaviour."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
from coreai_opt.palettization import KMeansPalettizer, KMeansPalettizerConfig
from mobilenet_like import MobileNetV3Small, conv_linear_weights

from coreai_palettize_plugins import _coreai_compat as compat
from coreai_palettize_plugins import load_palettized
from coreai_palettize_plugins.engine.lifecycle import Palettization
from coreai_palettize_plugins.lightning import PalettizationCallback
from coreai_palettize_plugins.settings.coreai_config import config_to_yaml
from coreai_palettize_plugins.settings.schema import PalettizeConfigError

IMAGE = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def mobilenet() -> MobileNetV3Small:
    torch.manual_seed(0)
    return MobileNetV3Small()


def layouts(model: nn.Module) -> dict[str, tuple[int, str]]:
    """``{weight: (n_bits, layout)}`` of every palettized weight."""
    return {t.name: (t.fake.n_bits, compat.layout_name(t.fake.granularity))
            for t in compat.fake_palettized_tensors(model)}


def coreai_opt_layouts(model: nn.Module) -> dict[str, tuple[int, str]]:
    """What coreai-opt's own ``prepare`` palettizes with its w4 preset (k-means included)."""
    KMeansPalettizer(model, KMeansPalettizerConfig.presets.w4()).prepare((IMAGE,))
    return layouts(model)


def test_fit_layouts_must_be_a_bool():
    with pytest.raises(PalettizeConfigError, match=r"^palettize\.fit_layouts: must be true or "
                       r"false, got 'yes'$"):
        Palettization("w4", fit_layouts="yes")


def test_false_is_coreai_opts_behaviour_exactly():
    model = mobilenet()
    engine = Palettization("w4", training="frozen", fit_layouts=False)
    engine.attach(model, IMAGE)
    assert engine.config.to_dict() == KMeansPalettizerConfig.presets.w4().to_dict()
    assert layouts(model) == coreai_opt_layouts(mobilenet())
    assert len(engine.skipped) == 17 and "features.2.block.0.0.weight" in engine.skipped


def test_fitted_weights_get_the_nearest_layout_the_rest_keep_the_preset(caplog):
    theirs = coreai_opt_layouts(mobilenet())
    model = mobilenet()
    engine = Palettization("w4", training="frozen")
    with caplog.at_level(logging.WARNING, logger="coreai_palettize_plugins.accuracy.fitting"):
        engine.attach(model, IMAGE)
    ours = layouts(model)
    assert set(ours) == set(conv_linear_weights(model))            # every conv/linear weight
    assert {n: ours[n] for n in theirs} == theirs                   # coreai-opt's spec kept
    fitted = {n: v for n, v in ours.items() if n not in theirs}
    assert len(fitted) == 17 and engine.skipped == {}
    assert fitted["features.2.block.0.0.weight"] == (4, "group 12 axis 0")   # 72 channels
    assert fitted["features.3.block.0.0.weight"] == (4, "group 11 axis 0")   # 88
    assert fitted["features.4.block.3.0.weight"] == (4, "group 10 axis 0")   # 40
    assert fitted["features.7.block.0.0.weight"] == (4, "group 15 axis 0")   # 120
    assert fitted["features.1.block.1.fc1.weight"] == (4, "per-tensor")      # 8: one group
    assert fitted["classifier.2.weight"] == (4, "per-tensor")                # 10 classes
    # one log record names every fitted weight with its layout
    (record,) = [r for r in caplog.records if "nearest layout" in r.getMessage()]
    assert all(f"\n  {n} " in record.getMessage() for n in fitted)
    assert "features.2.block.0.0.weight (72, 16, 1, 1): fitted group 12 axis 0 (asked: group " \
           "16 axis 0; shape (72, 16, 1, 1) is not divisible" in record.getMessage()
    # the config says it in coreai-opt's terms: the preset plus one module-name entry each
    config = engine.config.to_dict()["kmeans_palettization_config"]
    preset = KMeansPalettizerConfig.presets.w4().to_dict()["kmeans_palettization_config"]
    assert config["global_config"] == preset["global_config"]
    assert config["module_type_configs"] == preset["module_type_configs"]
    assert sorted(config["module_name_configs"]) == sorted(
        n.removesuffix(".weight").replace(".", r"\.") for n in fitted)
    # a fresh model prepared by coreai-opt itself with that config gets the same layouts
    assert coreai_opt_layouts_with(engine.config) == ours
    # attaching again (a resumed run) rebuilds the identical config
    again = Palettization("w4", training="frozen")
    again.attach(mobilenet(), IMAGE)
    assert config_to_yaml(again.config) == config_to_yaml(engine.config)


def coreai_opt_layouts_with(config: KMeansPalettizerConfig) -> dict[str, tuple[int, str]]:
    model = mobilenet()
    KMeansPalettizer(model, config.model_copy(deep=True)).prepare((IMAGE,))
    return layouts(model)


def test_a_submodule_under_a_fitted_module_keeps_its_own_spec():
    class Block(nn.Module):                       # a module with its own weight and a child
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(40, 32))
            self.child = nn.Linear(32, 32)

        def forward(self, x):
            return self.child(nn.functional.linear(x, self.weight)[:, :32])

    torch.manual_seed(0)
    model = Block()
    engine = Palettization("w4", training="frozen", overrides={"linear": "w8"})
    engine.attach(model, torch.randn(2, 32))
    assert layouts(model) == {"weight": (4, "group 10 axis 0"), "child.weight": (8, "per-tensor")}
    fresh = Block()
    KMeansPalettizer(fresh, engine.config.model_copy(deep=True)).prepare((torch.randn(2, 32),))
    assert layouts(fresh) == layouts(model)


class LitMobileNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mobilenet()
        self.example_input_array = IMAGE[:1]

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


@pytest.mark.slow
def test_mobilenet_shaped_through_lightning_with_the_callback_alone(tmp_path):
    module = LitMobileNet()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, torch.arange(8) % 10), batch_size=4)
    callback = PalettizationCallback("w4", export_dir=tmp_path / "out")
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[callback])
    trainer.fit(module, data)

    weights = conv_linear_weights(module.net)
    report = callback.report
    palettized = {r.name.removeprefix("net."): r.numel for r in report.layers}
    assert sum(palettized.values()) / sum(weights.values()) >= 0.95
    assert set(palettized) == set(weights) and report.dense_layers == []
    fitted = {r.name: r.granularity for r in report.fitted}
    assert len(fitted) == 17 and fitted["net.features.9.block.2.fc1.weight"] == "group 12 axis 0"
    assert "(fitted)" in report.to_markdown() and "fitted group 15 axis 0" in report.to_text()
    result = callback.export_result
    assert result.errors == {} and set(result.written) == {"coreai", "torch"}
    assert result.coreai_graph_max_abs_diff == 0.0
    module.eval()
    loaded = load_palettized(tmp_path / "out", LitMobileNet).eval()
    with torch.no_grad():
        assert (loaded(IMAGE) - module(IMAGE)).abs().max().item() == 0.0
