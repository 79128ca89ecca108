"""The `palettize` config group: Hydra composition of the real conf/ tree and its translation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import yaml
from coreai_opt.palettization import (
    KMeansPalettizerConfig,
    ModuleKMeansPalettizerConfig,
    PalettizationSpec,
)
from helpers import example_image, mixed_net, with_default_training
from omegaconf import OmegaConf

from coreai_palettize_plugins import (
    Palettization,
    PalettizeConfigError,
    PalettizeSettings,
    build_palettizer_config,
)
from coreai_palettize_plugins.settings.coreai_config import config_from_yaml_text, config_to_yaml
from coreai_palettize_plugins.settings.schema import PRESETS

W4_LINEAR_W8 = KMeansPalettizerConfig.presets.w4().set_module_type(
    nn.Linear, ModuleKMeansPalettizerConfig.presets.w8())


def test_contract_w4_with_linear_w8_from_hydra(compose_config):
    cfg = compose_config("palettize=w4", "palettize.overrides.linear=w8")  # no leading '+'
    # The default training strategy (ste) is the only entry that differs from coreai-opt's.
    assert build_palettizer_config(cfg.palettize).to_dict() == \
        with_default_training(W4_LINEAR_W8.to_dict())
    cfg = compose_config("palettize=w4", "palettize.overrides.linear=w8",
                         "palettize.training=frozen")
    assert build_palettizer_config(cfg.palettize).to_dict() == W4_LINEAR_W8.to_dict()


def test_default_training_is_ste_everywhere(compose_config):
    assert PalettizeSettings().training == "ste"
    assert compose_config("palettize=w4").palettize.training == "ste"
    config = build_palettizer_config("w4", overrides={"linear": "w8"})
    for module_config in (config.global_config, *config.module_type_configs.values()):
        spec = module_config.op_state_spec["weight"]
        assert spec.training_strategy_spec.model_dump() == {"type": "ste", "lut_update_every": 0}


@pytest.mark.parametrize("preset", ["w4", "w6", "w8"])
def test_presets_equal_coreai_opt_presets(compose_config, preset):
    cfg = compose_config(f"palettize={preset}")
    expected = getattr(KMeansPalettizerConfig.presets, preset)()
    assert build_palettizer_config(cfg.palettize).to_dict() == \
        with_default_training(expected.to_dict())
    assert build_palettizer_config(preset).to_dict() == with_default_training(expected.to_dict())
    frozen = compose_config(f"palettize={preset}", "palettize.training=frozen").palettize
    assert build_palettizer_config(frozen).to_dict() == expected.to_dict()
    assert build_palettizer_config(preset, training="frozen").to_dict() == expected.to_dict()


def test_every_input_form_gives_the_same_config(compose_config, tmp_path):
    cfg = compose_config("palettize=w4", "palettize.overrides.linear=w8")
    plain = OmegaConf.to_container(cfg.palettize, resolve=True)
    yaml_path = tmp_path / "coreai.yaml"
    yaml_path.write_text(yaml.safe_dump(W4_LINEAR_W8.to_dict()))
    forms = [
        cfg.palettize,                                           # DictConfig
        plain,                                                   # plain dict
        PalettizeSettings(overrides={"linear": "w8"}),           # dataclass
        {"preset": "w4", "overrides": {"linear": "w8"}},         # partial dict
        str(yaml_path),                                          # coreai-opt YAML file
    ]
    expected = with_default_training(W4_LINEAR_W8.to_dict())
    for form in forms:
        assert build_palettizer_config(form).to_dict() == expected, form
    assert build_palettizer_config("w4", overrides={"linear": "w8"}).to_dict() == expected
    assert build_palettizer_config(W4_LINEAR_W8) is W4_LINEAR_W8  # passes through unchanged


def test_none_with_type_overrides_palettizes_only_those_types(compose_config):
    cfg = compose_config("palettize=none", "palettize.overrides.linear=w8",
                         "palettize.overrides.conv2d=w4")
    config = build_palettizer_config(cfg.palettize)
    model = mixed_net()
    Palettization(config).prepare(model, example_image())
    fakes = {name: module.parametrizations.weight[0]
             for name, module in model.named_modules()
             if hasattr(module, "parametrizations")}
    assert set(fakes) == {"conv2d", "fc", "head"}              # Conv1d stays dense
    assert isinstance(model.conv1d.weight, nn.Parameter)
    assert fakes["fc"].n_bits == fakes["head"].n_bits == 8
    assert fakes["conv2d"].n_bits == 4


def test_spec_mappings_modules_and_yaml_round_trip(compose_config):
    cfg = compose_config("palettize=w8", "palettize.overrides.linear={n_bits: 2, group_size: 8}",
                         "+palettize.modules.head=null")
    config = build_palettizer_config(cfg.palettize)
    linear = config.module_type_configs["torch.nn.modules.linear.Linear"]
    spec = linear.op_state_spec["weight"]
    assert spec.n_bits == 2 and spec.granularity.group_size == 8
    assert config.module_name_configs["head"].op_state_spec == {"*": None}
    model = mixed_net()
    Palettization(config).prepare(model, example_image())
    assert not hasattr(model.head, "parametrizations")
    assert model.fc.parametrizations.weight[0].n_bits == 2


def test_embedding_override_uses_module_state_spec():
    emb = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32))
    engine = Palettization("w8", overrides={"embedding": "w4"})
    engine.prepare(emb, torch.randint(0, 64, (1, 5)))
    assert {t.name for t in engine.tensors()} == {"0.weight", "1.weight"}


def test_schedule_and_training_fields_reach_every_module_config():
    config = build_palettizer_config("w4", overrides={"linear": "w8"}, modules={"head": "w2"},
                                     schedule={"start_step": 5}, training="ste")
    module_configs = [config.global_config, *config.module_type_configs.values(),
                      *config.module_name_configs.values()]
    assert len(module_configs) == 3
    for module_config in module_configs:
        assert module_config.pat_schedule.enable_fake_palettize == 5
        assert module_config.op_state_spec["weight"].training_strategy_spec.model_dump()["type"] == "ste"


@pytest.mark.parametrize("config", [
    build_palettizer_config("w8", overrides={"linear": {"n_bits": 2, "group_size": 8}},
                            modules={"head": None}),
    build_palettizer_config({"preset": {"n_bits": 6, "lut_dtype": "int8"}}),
    build_palettizer_config("w4", training={"type": "ste", "lut_update_every": 5}),
    build_palettizer_config("w4", training="lut", schedule={"start_step": 3}),
], ids=["spec-and-modules", "lut-dtype", "ste-options", "lut-with-schedule"])
def test_coreai_yaml_round_trip(config):
    assert config_from_yaml_text(config_to_yaml(config)).to_dict() == config.to_dict()


def test_composed_group_lists_all_overridable_types(compose_config):
    cfg = compose_config("palettize=w6")
    assert set(cfg.palettize.overrides) >= {"linear", "conv2d", "conv1d", "embedding"}
    assert all(v == "inherit" for v in cfg.palettize.overrides.values())
    for name in PRESETS:  # every option of the group composes and builds
        if name != "none":
            build_palettizer_config(compose_config(f"palettize={name}").palettize)


def test_config_file_key_uses_coreai_opt_yaml(compose_config, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(KMeansPalettizerConfig.presets.w6().to_dict()))
    cfg = compose_config(f"palettize.config_file={path}", "palettize.overrides.linear=w8")
    expected = KMeansPalettizerConfig.presets.w6().set_module_type(
        nn.Linear, ModuleKMeansPalettizerConfig.presets.w8())
    assert build_palettizer_config(cfg.palettize).to_dict() == \
        with_default_training(expected.to_dict())  # palettize.training applies on top


# ------------------------------------------------------------------------------- bad input

BAD_SETTINGS = [  # (settings, key the message starts with, text it contains)
    ({"preset": "w5"}, "palettize.preset", "unknown preset 'w5'; valid: w2, w3, w4, w6, w8, none"),
    ({"overrides": {"linearr": "w8"}}, "palettize.overrides.linearr",
     "unknown module type alias 'linearr'; valid: linear, conv1d, conv2d"),
    ({"overrides": {"linear": "w5"}}, "palettize.overrides.linear",
     "unknown preset 'w5'; valid: w2, w3, w4, w6, w8, none, inherit"),
    ({"overrides": {"linear": {"n_bits": 5}}}, "palettize.overrides.linear.n_bits",
     "5 is not supported; valid: 1, 2, 3, 4, 6, 8"),
    ({"preset": {"n_bits": 4, "group_size": 0}}, "palettize.preset.group_size",
     "must be a positive integer, got 0"),
    ({"overrides": {"conv2d": {"n_bits": 4, "group_size": -8}}},
     "palettize.overrides.conv2d.group_size", "must be a positive integer, got -8"),
    ({"overrides": {"linear": {"nbits": 4}}}, "palettize.overrides.linear.nbits",
     "unknown key; valid: preset, n_bits, granularity, group_size"),
    ({"preset": {"n_bits": 4, "granularity": "per_row"}}, "palettize.preset.granularity",
     "unknown granularity 'per_row'; valid: per_tensor, per_grouped_channel"),
    ({"preset": "none"}, "palettize.preset",
     "palettizes nothing; choose a preset (w2, w3, w4, w6, w8)"),
    ({"preset": "none", "overrides": {"linear": None}}, "palettize.preset", "palettizes nothing"),
    ({"presets": "w4"}, "palettize.presets", "unknown key; valid: preset, overrides, modules"),
    ({"distributed": "all"}, "palettize.distributed", "unknown mode 'all'; valid: sharded, rank0"),
    ({"training": "magic"}, "palettize.training", "unknown strategy 'magic'; valid: frozen"),
    ({"num_workers": 0}, "palettize.num_workers", "must be an integer >= 1, got 0"),
    ({"export": {"formats": ["onnx"]}}, "palettize.export.formats",
     "unknown format 'onnx'; valid: coreai, torch"),
    ({"schedule": {"start_step": -1}}, "palettize.schedule.start_step",
     "must be a non-negative integer"),
    ({"config_file": "/nonexistent.yaml"}, "palettize.config_file",
     "no such file: /nonexistent.yaml"),
    ({"modules": {"fc(": "w8"}}, "palettize.modules.fc(", "invalid regular expression"),
    ("w9", "palettize", "unknown preset 'w9'; valid: w2"),
    ({"training": {"type": "frozen", "x": 1}}, "palettize.training", "'frozen' takes no options"),
]


@pytest.mark.parametrize(("settings", "key", "text"), BAD_SETTINGS,
                         ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(BAD_SETTINGS)])
def test_bad_settings_fail_with_one_line_naming_key_and_choices(settings, key, text):
    with pytest.raises(PalettizeConfigError) as info:
        build_palettizer_config(settings)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{key}: ")
    assert text in message


def test_regex_matching_no_module_fails_before_any_change():
    model = mixed_net()
    engine = Palettization("w4", modules={"decoder\\..*": "w8"})
    with pytest.raises(PalettizeConfigError,
                       match=r"^palettize\.modules\.decoder\\\.\.\*: matches no module of MixedNet"):
        engine.check(model, example_image())
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_config_that_palettizes_no_weight_of_the_model():
    engine = Palettization("none", overrides={"conv3d": "w4"})
    with pytest.raises(PalettizeConfigError, match="palettizes no weight of MixedNet"):
        engine.check(mixed_net(), example_image())


def test_group_size_that_divides_nothing_palettizes_nothing():
    engine = Palettization({"preset": {"n_bits": 4, "group_size": 7}}, fit_layouts=False)
    with pytest.raises(PalettizeConfigError, match=r"palettizes no weight of MixedNet.*skipped: "):
        engine.check(mixed_net(), example_image())


def test_hydra_rejects_unknown_option_listing_choices(compose_config):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="w4"):
        compose_config("palettize=w5")


def test_spec_builds_coreai_objects():
    config = build_palettizer_config({"preset": {"n_bits": 6, "lut_dtype": "int8"}})
    spec: PalettizationSpec = config.global_config.op_state_spec["weight"]
    assert spec.n_bits == 6 and spec.lut_qspec.dtype == torch.int8


def test_training_strategy_selectable_from_hydra(compose_config):
    cfg = compose_config("palettize=w4", "palettize.training=ste")
    spec = build_palettizer_config(cfg.palettize).global_config.op_state_spec["weight"]
    assert spec.training_strategy_spec.model_dump() == {"lut_update_every": 0, "type": "ste"}
    cfg = compose_config("palettize=w4", "palettize.training={type: ste, lut_update_every: 5}",
                         "palettize.overrides.linear=w8")
    config = build_palettizer_config(cfg.palettize)
    linear = config.module_type_configs["torch.nn.modules.linear.Linear"]
    assert linear.op_state_spec["weight"].training_strategy_spec.lut_update_every == 5
    cfg = compose_config("palettize=w4", "palettize.training=lut")
    assert build_palettizer_config(cfg.palettize).global_config.op_state_spec[
        "weight"].training_strategy_spec.model_dump() == {"type": "lut"}
