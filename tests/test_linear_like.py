"""Linear-like modules coreai-opt does not palettize on its own: HF ``Conv1D`` (GPT-2) and fused
MoE experts (Mixtral, Qwen3-MoE, GPT-OSS). Tiny random-init models, no downloads, CPU."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import KMeansCounter

from coreai_palettize_plugins import (
    Palettization,
    PalettizeConfigError,
    build_palettizer_config,
    load_palettized,
)
from coreai_palettize_plugins import _coreai_compat as compat
from coreai_palettize_plugins.export.writer import MANIFEST_NAME
from coreai_palettize_plugins.settings.coreai_config import config_from_yaml_text, config_to_yaml

transformers = pytest.importorskip("transformers")

CONV1D_FQN = "transformers.pytorch_utils.Conv1D"
VOCAB = 256


def tiny_gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, use_cache=False,
        bos_token_id=0, eos_token_id=0))


MOE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
           use_cache=False)


def tiny_mixtral():
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **MOE, num_local_experts=4, num_experts_per_tok=2))


def tiny_qwen3_moe():
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **MOE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16))


def tiny_gpt_oss():  # transposed (E, in, out) expert stacks, 2-D expert biases
    torch.manual_seed(0)
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **MOE, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
        layer_types=["full_attention"] * 2))


MOE_FAMILIES = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe, "gpt_oss": tiny_gpt_oss}


def token_ids(batch: int = 1, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def weight_numel(model) -> int:
    """Elements of every >= 2-D float parameter, tied ones once (before prepare)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.dim() >= 2 and p.is_floating_point() and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def palettized(engine) -> dict[str, compat.PalettizedTensor]:
    return {t.name: t for t in engine.tensors()}


def max_values_per_group(weight: torch.Tensor, out_axis: int, group: int) -> int:
    """Most distinct values in any block of ``group`` output channels (``out_axis`` of each
    matrix; a 3-D weight is a stack of matrices, one per expert)."""
    matrices = weight.detach() if weight.dim() == 3 else weight.detach().unsqueeze(0)
    out_axis += 1
    most = 0
    for block in matrices.split(group, dim=out_axis):
        for matrix in block:
            most = max(most, matrix.unique().numel())
    return most


def values_per_lut(t: compat.PalettizedTensor) -> int:
    return max(torch.unique(group.round(decimals=5), dim=0).shape[0]
               for group in compat.lut_groups(t.fake, t.fake.hard_assign(t.original).detach()))


CONV1D_NAMES = [f"transformer.h.{i}.{m}.weight" for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


# ------------------------------------------------------------------------------------ Conv1D


def test_gpt2_conv1d_palettized_with_groups_along_output_columns():
    model = tiny_gpt2()
    dense = weight_numel(model)
    engine = Palettization("w4")
    engine.prepare(model, token_ids())
    tensors = palettized(engine)
    assert set(CONV1D_NAMES) <= set(tensors)
    for name in CONV1D_NAMES:
        t = tensors[name]
        weight = t.module.weight  # (in, out), palettized
        assert t.fake.granularity.axis == 1
        assert t.fake.centroids.shape == (weight.shape[1] // 16, 16, 1)
        assert max_values_per_group(weight, out_axis=1, group=16) <= 16
        assert max_values_per_group(weight, out_axis=0, group=16) > 16  # not along the inputs
    share = sum(t.original.numel() for t in tensors.values()) / dense
    assert share > 0.9                                   # everything but the position embedding
    # The config stays the preset's (Linear convention): the op analysis finds the layout.
    config = config_from_yaml_text(engine.state_dict()["config"])
    assert config.to_dict() == build_palettizer_config("w4").to_dict()


def test_conv1d_override_by_dotted_path_and_alias_is_a_linear_convention_spec():
    config = build_palettizer_config("w4", overrides={CONV1D_FQN: {"n_bits": 2, "group_size": 32}})
    conv1d = config.module_type_configs[CONV1D_FQN]
    assert not conv1d.module_state_spec
    spec = conv1d.op_state_spec["weight"]
    assert (spec.n_bits, spec.granularity.group_size, spec.granularity.axis) == (2, 32, 0)
    assert build_palettizer_config("w4", overrides={"conv1d_hf": {"n_bits": 2, "group_size": 32}}
                                   ).to_dict() == config.to_dict()


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"overrides": {CONV1D_FQN: {"n_bits": 2, "group_size": 32}}}, {n: (2, 32) for n in CONV1D_NAMES}),
    ({"overrides": {"linear": "w6"}}, {n: (6, 16) for n in CONV1D_NAMES}),
    ({"overrides": {"conv1d_hf": None}}, {}),
    ({"overrides": {"linear": None, "conv1d_hf": "w4"}}, {n: (4, 16) for n in CONV1D_NAMES}),
    ({"modules": {"transformer.h.0.attn.c_attn": None}},
     {n: (4, 16) for n in CONV1D_NAMES if "h.0.attn.c_attn" not in n}),
    ({"modules": {"transformer.h.1": {"n_bits": 2, "group_size": 8}}},     # a parent's spec
     {n: (2, 8) if ".h.1." in n else (4, 16) for n in CONV1D_NAMES}),
])
def test_conv1d_overrides_by_type_and_by_name(kwargs, expected):
    engine = Palettization("w4", **kwargs)
    engine.prepare(tiny_gpt2(), token_ids())
    tensors = palettized(engine)
    got = {n: (t.fake.n_bits, t.fake.granularity.group_size) for n, t in tensors.items()
           if n in CONV1D_NAMES}
    assert got == expected
    for name in got:
        t = tensors[name]
        assert t.fake.granularity.axis == 1
        assert max_values_per_group(t.module.weight, 1, expected[name][1]) <= 2**expected[name][0]
    # The tied lm_head/wte follows overrides.linear, not the Conv1D settings.
    linear_on = kwargs.get("overrides", {}).get("linear", "w4") is not None
    assert ("transformer.wte.weight" in tensors) == linear_on


@pytest.mark.parametrize("spec", [
    "w4",
    {"n_bits": 2, "cluster_dim": 2, "group_size": 32},               # vectors along the inputs
    {"n_bits": 4, "group_size": 16, "enable_per_channel_scale": True},
    {"n_bits": 6, "group_size": 32, "lut_dtype": "int8"},
    {"n_bits": 3, "group_size": 16},                                   # widened to 4 in .aimodel
])
def test_gpt2_export_aimodel_and_reload_equal(tmp_path, spec):
    model = tiny_gpt2()
    # Only one Conv1D gets an unusual spec (vector k-means is slow); the rest gets w4.
    modules = {} if spec == "w4" else {"transformer.h.0.attn.c_proj": spec}
    engine = Palettization("w4", modules=modules)
    started = time.perf_counter()
    engine.prepare(model, token_ids())
    result = engine.export(tmp_path / "out")
    assert result.errors == {}
    assert result.rebuilt_max_abs_diff == 0.0 and result.coreai_graph_max_abs_diff < 1e-4
    x = token_ids(2, 10, seed=3)
    expected = model.eval()(x).logits
    for finalize in (True, False):
        loaded = load_palettized(tmp_path / "out", tiny_gpt2, finalize=finalize)
        assert (loaded(x).logits - expected).abs().max().item() == 0.0
    if spec == "w4":
        dense_kib = weight_numel(tiny_gpt2()) * 4 / 1024
        aimodel_kib = result.artifact_bytes["coreai"] / 1024
        assert aimodel_kib < dense_kib / 3
        print(f"\ngpt2 w4: bpw {result.report.bits_per_weight:.2f}, .aimodel {aimodel_kib:.0f} KiB "
              f"(dense weights {dense_kib:.0f} KiB), {time.perf_counter() - started:.1f} s")


# ------------------------------------------------------------------------------ fused experts


def expert_names(model) -> list[str]:
    return [f"{n}.{p}" for n, m in model.named_modules() if type(m).__name__.endswith("Experts")
            for p, w in m.named_parameters(recurse=False) if w.dim() == 3]


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_moe_experts_palettized_per_expert_along_output_channels(family):
    model = MOE_FAMILIES[family]()
    dense = weight_numel(model)
    experts = expert_names(model)
    engine = Palettization("w4")
    engine.prepare(model, token_ids())
    tensors = palettized(engine)
    assert experts and set(experts) <= set(tensors)
    for name in experts:
        t = tensors[name]
        transposed = t.module.is_transposed
        weight = getattr(t.module, t.attr)
        out_axis = 1 if transposed else 0
        num_experts, out = weight.shape[0], weight.shape[1 + out_axis]
        assert t.fake.centroids.shape == (num_experts * out // 16, 16, 1)
        assert max_values_per_group(weight, out_axis=out_axis, group=16) <= 16
        assert values_per_lut(t) <= 16
    share = sum(t.original.numel() for t in tensors.values()) / dense
    assert share >= 0.8
    # The router (E = 4 rows) cannot take groups of 16: it gets a fitted layout (fit_layouts).
    routers = [t for n, t in tensors.items() if "router" in n or n.endswith("gate.weight")]
    assert routers and all(compat.fitted_layout(t) is not None for t in routers)


def test_experts_per_tensor_spec_is_one_lut_per_expert():
    engine = Palettization("w4", overrides={"experts": {"n_bits": 2, "granularity": "per_tensor"}})
    model = tiny_mixtral()
    experts = expert_names(model)
    engine.prepare(model, token_ids())
    assert experts
    for name in experts:
        t = palettized(engine)[name]
        assert t.fake.centroids.shape == (4, 4, 1)                   # 4 experts, 2 bits
        assert max_values_per_group(getattr(t.module, t.attr), 0, t.original.shape[1]) <= 4


@pytest.mark.parametrize(("kwargs", "dense_layers"), [
    ({"overrides": {"experts": None}}, {0, 1}),
    ({"overrides": {"transformers.models.mixtral.modeling_mixtral.MixtralExperts": None}}, {0, 1}),
    ({"overrides": {"linear": None}, "modules": {"lm_head": "w4"}}, {0, 1}),  # follow linear
    ({"modules": {"model.layers.0.mlp.experts": None}}, {0}),
    ({"modules": {r"model\.layers\.1\..*": None}}, {1}),
])
def test_experts_opt_out_by_type_and_by_name(kwargs, dense_layers):
    model = tiny_mixtral()
    experts = expert_names(model)
    engine = Palettization("w4", **kwargs)
    engine.prepare(model, token_ids())
    names = set(palettized(engine))
    for layer in (0, 1):
        layer_experts = {n for n in experts if f"layers.{layer}." in n}
        assert layer_experts
        assert (not layer_experts & names) == (layer in dense_layers), layer


def test_experts_override_with_its_own_spec():
    engine = Palettization("w4", overrides={"experts": {"n_bits": 2, "group_size": 32}})
    model = tiny_qwen3_moe()
    experts = expert_names(model)
    engine.prepare(model, token_ids())
    tensors = palettized(engine)
    assert experts
    for name in experts:
        t = tensors[name]
        assert (t.fake.n_bits, t.fake.granularity.group_size) == (2, 32)
        assert values_per_lut(t) <= 4
    assert tensors["model.layers.0.self_attn.q_proj.weight"].fake.n_bits == 4


@pytest.mark.parametrize(("spec", "what"), [
    ({"n_bits": 2, "cluster_dim": 2}, "cluster_dim=2"),
    ({"n_bits": 4, "group_size": 16, "enable_per_channel_scale": True}, "enable_per_channel_scale"),
    ({"n_bits": 4, "group_size": 16, "lut_dtype": "int8"}, "lut_dtype"),
    ({"n_bits": 4, "group_size": 16, "axis": 1}, "axis 1"),
])
def test_unsupported_experts_spec_is_a_one_line_error(spec, what):
    engine = Palettization("w4", overrides={"experts": spec})
    with pytest.raises(PalettizeConfigError) as error:
        engine.prepare(tiny_mixtral(), token_ids())
    message = str(error.value)
    assert message.startswith(f"palettize.overrides.experts: {what}")
    assert "not supported on fused MoE experts" in message and "\n" not in message


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("training", ["ste", "lut"])
def test_strategies_train_conv1d_and_expert_weights(family, training):
    model = MOE_FAMILIES[family]()
    engine = Palettization({"preset": {"n_bits": 2, "group_size": 16}}, training=training)
    ids = token_ids(4, 16, seed=5)
    engine.prepare(model, ids[:1])
    trained = [t for t in engine.tensors() if t.original.dim() == 3]
    assert trained
    before = {t.name: (t.original.detach().clone(), t.fake.centroids.detach().clone())
              for t in trained}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    engine.start_training(0)
    for step in range(1, 4):
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        engine.after_optimizer_step(step)
    engine.stop_training()
    model.eval()
    for t in trained:
        original, centroids = before[t.name]
        changed = (t.original if training == "ste" else t.fake.centroids).detach()
        assert not torch.equal(changed, original if training == "ste" else centroids), t.name
        assert values_per_lut(t) <= 4, t.name


def test_strategies_train_gpt2_conv1d():
    ids = token_ids(4, 16, seed=5)
    for training in ("ste", "lut"):
        model = tiny_gpt2()
        engine = Palettization({"preset": {"n_bits": 2, "group_size": 16}}, training=training)
        engine.prepare(model, ids[:1])
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        engine.start_training(0)
        for step in range(1, 4):
            loss = model(ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            engine.after_optimizer_step(step)
        engine.stop_training()
        for name in CONV1D_NAMES:
            t = palettized(engine)[name]
            assert values_per_lut(t) <= 4, (training, name)
            assert max_values_per_group(t.module.weight, 1, 16) <= 4, (training, name)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_moe_export_aimodel_via_batched_mm_and_reload_equal(tmp_path, family):
    build = MOE_FAMILIES[family]
    model = build()
    dense = weight_numel(model)
    started = time.perf_counter()
    engine = Palettization("w4")
    engine.prepare(model, token_ids())
    implementation = model.config._experts_implementation
    result = engine.export(tmp_path / "out")
    seconds = time.perf_counter() - started
    assert result.errors == {}, result.errors
    assert result.rebuilt_max_abs_diff == 0.0 and result.coreai_graph_max_abs_diff < 1e-4
    assert model.config._experts_implementation == implementation     # trained model untouched
    x = token_ids(2, 10, seed=3)
    expected = model.eval()(x).logits
    loaded = load_palettized(tmp_path / "out", build)
    reload_diff = (loaded(x).logits - expected).abs().max().item()
    assert reload_diff == 0.0
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert set(expert_names(build())) <= set(manifest["palettized"])
    share = sum(t.original.numel() for t in engine.tensors()) / dense
    print(f"\n{family} w4: palettized share {share:.1%}, bpw {result.report.bits_per_weight:.2f}, "
          f".aimodel {result.artifact_bytes['coreai'] / 1024:.0f} KiB, reload diff {reload_diff}, "
          f"{seconds:.1f} s")


@pytest.mark.slow
def test_experts_layout_survives_the_kmeans_spawn_pool(monkeypatch):
    serial, pooled = tiny_gpt_oss(), tiny_gpt_oss()
    Palettization("w4").prepare(serial, token_ids())
    counter = KMeansCounter(monkeypatch)  # counts in this process only
    engine = Palettization("w4", num_workers=2)
    engine.prepare(pooled, token_ids())
    assert counter.calls == []            # every weight (with its pickled layout) went to the pool
    x = token_ids(2, 10, seed=3)
    assert torch.equal(serial.eval()(x).logits, pooled.eval()(x).logits)
    for t in engine.tensors():
        if t.original.dim() == 3:
            assert isinstance(t.fake.reshape_strategy, compat.ExpertsLayout)
            assert values_per_lut(t) <= 16


def test_resume_from_checkpoint_restores_expert_layout():
    model = tiny_mixtral()
    engine = Palettization("w4")
    engine.prepare(model, token_ids())
    state, engine_state = model.state_dict(), engine.state_dict()
    x = token_ids(2, 10, seed=3)
    expected = model.eval()(x).logits

    resumed = tiny_mixtral()
    again = Palettization("w4")
    again.prepare(resumed, token_ids(), state_dict=state)      # no k-means: loaded
    again.load_state_dict(engine_state)                         # same config (extended)
    assert torch.equal(resumed.eval()(x).logits, expected)
    assert config_to_yaml(again.config) == engine_state["config"]


def test_hydra_lists_the_linear_like_aliases_and_takes_them_without_plus(compose_config):
    from coreai_palettize_plugins.settings.schema import PalettizeSettings

    cfg = compose_config("palettize=none", "palettize.overrides.conv1d_hf=w4",
                         "palettize.overrides.experts=null")
    settings = PalettizeSettings.resolve(cfg.palettize)
    assert settings.overrides["conv1d_hf"] == "w4" and settings.overrides["experts"] is None
    engine = Palettization(settings)
    engine.validate_for(tiny_gpt2(), token_ids())               # only the Conv1D layers
    engine.prepare(tiny_gpt2(), token_ids())
    assert set(palettized(engine)) == set(CONV1D_NAMES)


def test_unknown_alias_names_the_linear_like_ones():
    with pytest.raises(PalettizeConfigError, match=r"valid: linear, conv1d, .*conv1d_hf, experts"):
        Palettization("w4", overrides={"expert": "w4"})


def test_experts_alone_with_preset_none():
    model = tiny_mixtral()
    experts = expert_names(model)
    engine = Palettization("none", overrides={"experts": "w4"})
    engine.prepare(model, token_ids())
    assert set(palettized(engine)) == set(experts)


@pytest.mark.slow
def test_a_family_that_cannot_convert_is_named_and_the_packed_artifact_still_written(
        tmp_path, monkeypatch):
    import coreai_palettize_plugins.export.writer as export

    # Without the batched_mm switch the default grouped_mm path has no coreai-torch lowering.
    monkeypatch.setattr(export, "use_exportable_experts", lambda model: False)
    model = tiny_mixtral()
    engine = Palettization("w4")
    engine.prepare(model, token_ids())
    result = engine.export(tmp_path / "out")
    assert set(result.errors) == {"coreai"}
    assert "unsupported ATen ops" in result.errors["coreai"]
    assert set(result.written) == {"torch"}
    x = token_ids(2, 10, seed=3)
    loaded = load_palettized(tmp_path / "out", tiny_mixtral)
    assert torch.equal(loaded(x).logits, model.eval()(x).logits)
