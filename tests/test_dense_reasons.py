"""No silent dense weights: every weight of a linear-like layer is palettized or listed in the
report's ``dense_layers`` with a precise reason (and named in one attach warning); overrides that
palettize nothing are an error; whole-model bits per weight and compression ratio."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as P

from coreai_palettize_plugins import Palettization, PalettizationWarning
from coreai_palettize_plugins.settings.schema import PalettizeConfigError

ADDMM = "consumed by torch.addmm, not an op coreai-opt palettizes"
EMBEDDING = "embeddings are palettized only with overrides.embedding or modules.<name>"


def attach(engine: Palettization, model: nn.Module, example_inputs) -> list[str]:
    """Attach (then cluster, for the report); return the messages of the PalettizationWarnings
    attach raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.attach(model, example_inputs)
    engine.ensure_clustered()
    return [str(w.message) for w in caught if issubclass(w.category, PalettizationWarning)]


def palettized(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    return P.is_parametrized(model.get_submodule(module_name), attr)


def dense_by_name(engine: Palettization) -> dict[str, tuple[str, str]]:
    return {d.name: (d.kind, d.reason) for d in engine.report().dense_layers}


# ------------------------------------------------------------------------------- models


class MatmulLinear(nn.Linear):
    """A Linear whose forward uses ``torch.matmul``: coreai-opt never sees an ``F.linear``, the
    plugin's op analysis does (through the ``.t()`` view)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.t()) + self.bias


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.mm = MatmulLinear(32, 32)
        self.unused = nn.Linear(32, 32)          # forward never calls it
        self.excluded = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)            # (10, 32): no 16-row groups for w4
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return self.head(self.excluded(self.mm(torch.relu(self.fc(x)))))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


X = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256,
                                      n_positions=64, use_cache=False))


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2, use_cache=False))


IDS = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------- reasons


def test_each_dense_reason_on_one_model_and_one_warning():
    model = net()
    engine = Palettization("w4", modules={"excluded": None}, fit_layouts=False)
    messages = attach(engine, model, X)

    assert model.forwards == 1                   # the reasons come from coreai-opt's own forward
    assert palettized(model, "fc.weight") and palettized(model, "mm.weight")
    dense = dense_by_name(engine)
    assert dense == {
        "unused.weight": ("not_run",
                          "not used by the tracing forward (not run by the example inputs)"),
        "excluded.weight": ("config", "excluded by palettize.modules.excluded=null"),
        "head.weight": ("shape", "skipped by coreai-opt: shape (10, 32) is not divisible into "
                                 "groups of 16 along axis 0"),
    }
    assert len(messages) == 1                     # one warning, the user's own opt-out left out
    (message,) = messages
    assert message.startswith("palettize: 2 weight(s) of linear-like layers left dense")
    for name in ("unused.weight", "head.weight"):
        assert f"\n  {name}: {dense[name][1]}" in message
    assert "excluded.weight" not in message
    report = engine.report()
    assert [d.name for d in report.skipped] == ["head.weight"]
    assert "head.weight" in report.to_text() and "head.weight" in report.to_markdown()


def test_type_override_null_is_named_as_the_reason():
    model = net()
    engine = Palettization("w4", overrides={"linear": None},
                           modules={"fc": "w4"})   # something must be palettized
    attach(engine, model, X)
    dense = dense_by_name(engine)
    assert dense["excluded.weight"] == ("config", "excluded by palettize.overrides.linear=null")
    assert dense["head.weight"][0] == "config"
    # a subclass follows its base class's override
    assert dense["mm.weight"] == ("config", "excluded by palettize.overrides.linear=null")

    engine = Palettization("none", modules={"fc": "w4"})
    attach(engine, net(), X)
    assert dense_by_name(engine)["excluded.weight"] == (
        "config", "excluded by palettize.preset=none (no override or module pattern palettizes it)")


def test_gpt2_every_linear_like_weight_palettized_or_listed_with_a_reason():
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    engine = Palettization("w4")
    messages = attach(engine, model, IDS)
    dense = dense_by_name(engine)

    linear_like = [f"{n}.weight" for n, m in model.named_modules()
                   if isinstance(m, (nn.Linear, nn.Embedding, Conv1D))]
    assert len(linear_like) == 2 + 8 + 1          # wte/wpe, 8 Conv1D, lm_head
    for name in linear_like:
        assert palettized(model, name) or dense[name][1], name
    assert dense["transformer.wpe.weight"] == ("embedding", EMBEDDING)
    conv1d = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)]
    dense_conv1d = [n for n in conv1d if not palettized(model, n)]
    for name in dense_conv1d:                     # today: all 8 (torch.addmm)
        assert dense[name] == ("op", ADDMM)
    assert len(messages) == (1 if dense_conv1d else 0)
    for name in dense_conv1d:
        assert f"  {name}: {ADDMM}" in messages[0]
    assert all("wpe" not in m for m in messages)  # a default-dense embedding is not warned


def test_mixtral_experts_and_router_palettized_or_listed():
    model = tiny_mixtral()
    experts = [f"{n}.{a}" for n, m in model.named_modules()
               for a, p in m.named_parameters(recurse=False) if p.dim() == 3]
    assert len(experts) == 4
    engine = Palettization("w4")
    messages = attach(engine, model, IDS)
    dense = dense_by_name(engine)

    for name in experts:
        if not palettized(model, name):           # today: grouped_mm transposes them first
            kind, reason = dense[name]
            assert kind == "op" and reason.startswith("consumed by torch.") and \
                reason.endswith(", not an op coreai-opt palettizes")
            assert f"  {name}: {reason}" in messages[0]
    assert palettized(model, "model.layers.0.mlp.gate.weight")      # router (4, 64): fitted
    assert "model.layers.0.mlp.gate.weight" not in dense
    assert dense["model.embed_tokens.weight"] == ("embedding", EMBEDDING)
    assert len(messages) == any(not palettized(model, n) for n in experts)


class Attention(nn.Module):
    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, kdim=kdim, vdim=kdim, batch_first=True)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.attn(x, kv, kv, need_weights=False)[0]


def test_multihead_attention_in_proj_palettized_separate_projections_listed():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 64)
    model = Attention()
    engine = Palettization("w4")
    assert attach(engine, model, (x, x)) == []
    assert palettized(model, "attn.in_proj_weight") and palettized(model, "attn.out_proj.weight")
    assert engine.report().dense_layers == []

    model = Attention(kdim=32)                    # q/k/v_proj_weight instead of in_proj_weight
    engine = Palettization("w4")
    messages = attach(engine, model, (x, torch.randn(1, 5, 32)))
    dense = dense_by_name(engine)
    assert sorted(dense) == ["attn.k_proj_weight", "attn.q_proj_weight", "attn.v_proj_weight"]
    assert dense["attn.q_proj_weight"] == (
        "state_spec", "consumed by torch.nn.functional.multi_head_attention_forward, whose "
        "q_proj_weight the config's op_state_spec does not name (it names in_proj_weight, weight)")
    assert len(messages) == 1 and "attn.v_proj_weight" in messages[0]


# ------------------------------------------------------------------------------- overrides


class Scaler(nn.Linear):
    """A Linear whose weight only scales the input (a reduction of a view): not used as a
    matrix by any op, so nothing can palettize it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.t().sum()


class ScalerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.scaler = Scaler(32, 32)
        self.unused = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaler(self.fc(x))


def test_type_override_that_palettizes_nothing_is_an_error():
    path = f"{Scaler.__module__}.{Scaler.__qualname__}"
    with pytest.raises(PalettizeConfigError) as error:
        Palettization("w4", overrides={path: "w8"}).attach(ScalerNet(), X)
    assert str(error.value) == (
        f"palettize.overrides.{path}: matches 1 module(s) (scaler) but palettizes none of their "
        "weights (consumed by torch.Tensor.sum (after torch.Tensor.t), not an op coreai-opt "
        "palettizes)")


def test_name_override_that_palettizes_nothing_is_an_error():
    with pytest.raises(PalettizeConfigError, match=r"^palettize\.modules\.scaler\|unused: matches "
                       r"2 module\(s\) \(scaler, unused\) but palettizes none of their weights "
                       r"\(consumed by torch\.Tensor\.sum \(after torch\.Tensor\.t\), .*; not "
                       r"used by the tracing forward"):
        Palettization("w4", modules={"scaler|unused": "w8"}).attach(ScalerNet(), X)


def test_an_override_of_a_linear_subclass_used_through_matmul_palettizes_it():
    path = f"{MatmulLinear.__module__}.{MatmulLinear.__qualname__}"
    engine = Palettization("w4", overrides={path: "w8"})
    attach(engine, net(), X)
    assert {t.name: t.fake.n_bits for t in engine.tensors()}["mm.weight"] == 8


def test_override_whose_modules_are_all_skipped_for_shape_gives_that_reason():
    class ConvHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 16, 3)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    with pytest.raises(PalettizeConfigError, match=r"^palettize\.overrides\.linear: matches 1 "
                       r"module\(s\) \(head\) but palettizes none of their weights \(skipped by "
                       r"coreai-opt: shape \(10, 16\) is not divisible into groups of 16"):
        Palettization("none", overrides={"conv2d": "w4", "linear": "w4"},
                      fit_layouts=False).attach(ConvHead(), torch.randn(1, 1, 8, 8))


def test_null_overrides_and_overrides_that_palettize_are_fine():
    engine = Palettization("w4", overrides={"linear": None, "embedding": None},
                           modules={"fc": "w8", "unused": None})
    attach(engine, net(), X)
    assert [t.name for t in engine.tensors()] == ["fc.weight"]


def test_gpt2_conv1d_type_override_palettizes_or_fails_naming_addmm():
    model = tiny_gpt2()
    engine = Palettization("w4", overrides={"transformers.pytorch_utils.Conv1D": "w4"})
    try:
        attach(engine, model, IDS)
    except PalettizeConfigError as error:         # today: Conv1D computes with torch.addmm
        assert str(error).startswith("palettize.overrides.transformers.pytorch_utils.Conv1D: "
                                     "matches 8 module(s) (transformer.h.0.attn.c_attn, ")
        assert str(error).endswith(f"but palettizes none of their weights ({ADDMM})")
    else:                                         # once Conv1D is palettizable
        assert all(palettized(model, f"{n}.weight") for n, m in model.named_modules()
                   if type(m).__name__ == "Conv1D")


# ------------------------------------------------------------------------------- sizes


class Tied(nn.Module):
    """Embedding tied to the head (palettized through the head's F.linear), a dense tied pair,
    persistent float and int buffers and a non-persistent one."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.fc = nn.Linear(16, 16)
        self.a = nn.Linear(16, 16, bias=False)
        self.b = nn.Linear(16, 16, bias=False)
        self.b.weight = self.a.weight
        self.head = nn.Linear(16, 32)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.ones(16))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("cache", torch.ones(100), persistent=False)

    def forward(self, ids):
        return self.head(self.b(self.a(self.fc(self.emb(ids) * self.scale))))


def test_bits_per_weight_and_ratio_count_the_whole_model_tied_once():
    from coreai_opt.inspection import bits_per_weight

    torch.manual_seed(0)
    model = Tied()
    # compact=False: coreai-opt's bits_per_weight (compared below) reads the dense weights; the
    # plugin's report is the same either way (test_compact)
    engine = Palettization("w4", modules={"a|b": None}, compact=False)
    engine.prepare(model, torch.randint(0, 32, (1, 5)))
    report = engine.report()

    # palettized: emb/head (32, 16) and fc (16, 16), 4-bit indices + one fp32 LUT of 16
    # entries per 16 output rows
    assert {r.name: r.palettized_bytes for r in report.layers} == {
        "emb.weight": 32 * 16 * 4 // 8 + 2 * 16 * 4,        # 256 + 128
        "fc.weight": 16 * 16 * 4 // 8 + 1 * 16 * 4,         # 128 + 64
    }
    rest = 16 * 4 + 16 * 16 * 4 + 32 * 4 + 16 * 4 + 8      # fc.bias, a=b once, head.bias, scale, count
    assert report.dense_bytes == (32 * 16 + 16 * 16) * 4 + rest == 4360
    assert report.palettized_bytes == 384 + 192 + rest == 1864
    assert report.dense_fp16_bytes == (32 * 16 + 16 * 16 + 16 + 256 + 32 + 16) * 2 + 8
    numel = 32 * 16 + 16 * 16 + 16 + 16 * 16 + 32 + 16 + 1  # every parameter and persistent buffer
    assert report.bits_per_weight == pytest.approx(8 * 1864 / numel)
    assert report.compression_ratio == pytest.approx(4360 / 1864)
    assert [d.name for d in report.dense_layers] == ["a.weight"]   # tied pair once

    # coreai-opt's definition differs only by the non-persistent buffer (100 fp32 values)
    theirs = bits_per_weight(model)
    assert theirs.total_bits == 8 * report.palettized_bytes + 100 * 32
    assert theirs.total_weights == numel + 100
    assert "whole model" in report.to_text() and "whole model" in report.to_markdown()
