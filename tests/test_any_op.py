"""A weight is palettized wherever it is used: the weight of a Linear or convolution module
(subclasses included) consumed by ``x @ w.T``, ``matmul``, ``bmm``, ``einsum`` or a squeeze
before a conv gets its module's spec; and ``.aimodel`` export of models with a module named
``convolution``. The family rows (Falcon, Mamba, ResNet, MobileNetV2, BEiT) run through the
architecture matrix's ``run_family``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from model_zoo import (
    _BUILDERS,
    VOCAB,
    _causal_lm,
    _vit_samples,
    linear_like_weights,
    palettized,
    run_family,
)

from coreai_palettize_plugins import Palettization, load_palettized
from coreai_palettize_plugins._coreai_compat import LUT_NAME_MATCH, avoid_lut_name_match
from coreai_palettize_plugins._coreai_compat.uses import WeightUses

# ------------------------------------------------------------------------- which op, which axis


def _use(weight: torch.Tensor, compute):
    mode = WeightUses([weight])
    mode.active = True
    with mode:
        compute()
    return mode.first[id(weight)]


@pytest.mark.parametrize("compute, axis, via", [
    (lambda x, w: x @ w.T, 0, ["torch.Tensor.T"]),
    (lambda x, w: w @ x.T, 0, []),
    (lambda x, w: torch.einsum("bi,oi->bo", x, w), 0, []),
    (lambda x, w: torch.einsum("oi,bi", w, x), 0, []),
    (lambda x, w: torch.bmm(x[None], w.t()[None].expand(1, -1, -1)), 0,
     ["torch.Tensor.t", "torch.Tensor.__getitem__", "torch.Tensor.expand"]),
    (lambda x, w: torch.addmm(torch.zeros(24), x, w.view(24, 16).transpose(0, 1)), 0,
     ["torch.Tensor.view", "torch.Tensor.transpose"]),
    (lambda x, w: x @ w.T.contiguous().float(), 0,  # .float() of a float tensor: itself
     ["torch.Tensor.T", "torch.Tensor.contiguous"]),
    (lambda x, w: torch.addmm(torch.zeros(16), x.new_ones(2, 24), w), 1, []),  # HF Conv1D
])
def test_the_output_axis_is_found_through_views(compute, axis, via):
    weight = nn.Parameter(torch.randn(24, 16))
    use = _use(weight, lambda: compute(torch.randn(2, 16), weight))
    assert (use.output_axis, use.conv, use.stacked, use.via) == (axis, False, False, via)


def test_a_squeezed_conv_kernel_is_a_conv_kernel():
    weight = nn.Parameter(torch.randn(32, 1, 4))
    x = torch.randn(1, 32, 8)
    use = _use(weight, lambda: F.conv1d(x, weight.squeeze(1).unsqueeze(1), groups=32))
    assert (use.op, use.output_axis, use.conv) == ("torch.nn.functional.conv1d", 0, True)
    assert use.via == ["torch.Tensor.squeeze", "torch.Tensor.unsqueeze"]


def test_a_stack_of_matrices_is_not_taken_for_one_matrix():
    weight = nn.Parameter(torch.randn(4, 16, 8))  # (experts, out, in)
    use = _use(weight, lambda: torch.bmm(torch.randn(4, 3, 8), weight.transpose(1, 2)))
    assert use.stacked and use.output_axis == 1


def test_a_reduction_is_a_use_but_not_a_linear_one():
    weight = nn.Parameter(torch.randn(16, 16))
    use = _use(weight, lambda: weight.T.sum())
    assert use.output_axis is None and use.describe() == "torch.Tensor.sum (after torch.Tensor.T)"


# ------------------------------------------------------------------------- a custom model


class TransposedLinear(nn.Linear):
    """Falcon's ``FalconLinear``: an ``nn.Linear`` computing ``input @ self.weight.T``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


class AnyOps(nn.Module):
    """Linear and conv weights read through ``@ .T``, ``einsum``, ``bmm``, ``matmul`` from a
    parent's forward, and a squeeze before a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.first = TransposedLinear(16, 32)
        self.mixer = nn.Linear(32, 32)
        self.batched = nn.Linear(32, 32, bias=False)
        self.gate = nn.Linear(32, 32, bias=False)
        self.conv = nn.Conv1d(32, 32, 4, groups=32)
        self.head = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))                                    # (B, L, 32)
        h = torch.einsum("bld,ed->ble", h, self.mixer.weight) + self.mixer.bias
        h = torch.bmm(h, self.batched.weight.T.unsqueeze(0).expand(h.shape[0], -1, -1))
        h = h * torch.sigmoid((self.gate.weight @ h.transpose(1, 2)).transpose(1, 2))
        kernel = self.conv.weight.squeeze(1)
        h = F.conv1d(h.transpose(1, 2), kernel.unsqueeze(1), self.conv.bias, padding=3,
                     groups=32)[..., : x.shape[1]].transpose(1, 2)
        return self.head(h)


def _example() -> torch.Tensor:
    return torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))


def test_every_weight_is_palettized_whatever_op_uses_it(tmp_path):
    torch.manual_seed(0)
    model = AnyOps()
    weights = linear_like_weights(model)
    engine = Palettization("w4")
    engine.prepare(model, (_example(),))
    assert all(palettized(model, name) for name in weights), engine.report().dense_layers
    assert engine.report().dense_layers == []
    luts = {t.name: t.fake for t in engine.tensors()}
    assert type(luts["conv.weight"].reshape_strategy).__name__ == "_Conv1dSupport"
    assert {f.granularity.axis for f in luts.values()} == {0}  # output channels
    with torch.no_grad():
        for t in engine.tensors():  # the weight is the palettized one in every op
            assert torch.equal(model.get_submodule(t.name.rsplit(".", 1)[0]).weight,
                               t.fake.hard_assign(t.original))
    result = engine.export(tmp_path / "out", formats=["torch", "coreai"])
    assert set(result.written) == {"torch", "coreai"}, result.errors
    assert result.coreai_graph_max_abs_diff < 1e-5
    loaded = load_palettized(result.directory, AnyOps).eval()
    with torch.no_grad():
        assert (loaded(_example()) - model.eval()(_example())).abs().max() <= 1e-6


def test_an_override_of_a_linear_subclass_applies_wherever_its_weight_is_used():
    torch.manual_seed(0)
    model = AnyOps()
    engine = Palettization("w4", overrides={f"{__name__}.TransposedLinear": "w8"})
    engine.prepare(model, (_example(),))
    bits = {t.name: t.fake.n_bits for t in engine.tensors()}
    assert bits.pop("first.weight") == 8 and set(bits.values()) == {4}


def test_a_view_is_a_use_in_the_dense_reason():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, 16)
            self.scale = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x) * self.scale.weight.T.sum()

    model = Odd()
    engine = Palettization("w4")
    engine.prepare(model, (torch.randn(2, 16),))
    [dense] = engine.report().dense_layers
    assert dense.name == "scale.weight" and dense.kind == "op"
    assert dense.reason == ("consumed by torch.Tensor.sum (after torch.Tensor.T), not an op "
                            "coreai-opt palettizes")


# ------------------------------------------------------------------------- coreai-torch "lut"


class Convolution(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(16, 32, 1)
        self.head = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convolution(x).mean((2, 3)))


def test_coreai_torch_still_reads_a_convolution_as_a_lut(tmp_path):
    """Upstream bug (coreai-torch 0.4.3 ``_inject_subbyte_in_lut``): any ``lut_to_dense``
    argument whose name contains "lut" is taken as the LUT. When this test fails, coreai-torch
    fixed it: drop ``avoid_lut_name_match`` from the export."""
    import coreai_torch
    from coreai_opt import ExportBackend

    from coreai_palettize_plugins.export.writer import rebuild_prepared

    torch.manual_seed(0)
    model, x = Convolution(), torch.randn(1, 16, 8, 8)
    engine = Palettization("w4")
    engine.prepare(model, (x,))

    def program():
        fresh, palettizer = rebuild_prepared(Convolution, engine.config, (x,), model.state_dict())
        finalized = palettizer.finalize(fresh, backend=ExportBackend.CoreAI).eval()
        exported = torch.export.export(finalized, (x,))
        return exported.run_decompositions(coreai_torch.get_decomp_table())

    def convert(exported) -> None:
        converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
        converter.add_exported_program(exported, input_names=["x"])
        converter.to_coreai().save_asset(tmp_path / "m.aimodel")

    with pytest.raises(RuntimeError, match="0-bit palettization is not supported"):
        convert(program())
    fixed = program()
    assert avoid_lut_name_match(fixed) == ["b_convolution_parametrizations_weight_0_indices"]
    assert not [n for n in fixed.graph.nodes if LUT_NAME_MATCH in n.name and "indices" in n.name]
    convert(fixed)
    assert (tmp_path / "m.aimodel").exists()


# ------------------------------------------------------------------------- families

def _falcon():
    import transformers as T

    return T.FalconForCausalLM(T.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64))


def _mamba():
    import transformers as T

    return T.MambaForCausalLM(T.MambaConfig(
        vocab_size=VOCAB, hidden_size=64, state_size=16, num_hidden_layers=2, expand=2,
        conv_kernel=4, time_step_rank=16))


def _resnet():
    import transformers as T

    return T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=32, hidden_sizes=[64, 128], depths=[1, 1], layer_type="bottleneck",
        num_labels=16))


def _mobilenet_v2():
    import transformers as T

    return T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
        image_size=32, depth_multiplier=0.25, finegrained_output=False, num_labels=16))


def _beit():
    import transformers as T

    return T.BeitForImageClassification(T.BeitConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=16))


PER_TENSOR_4 = {"n_bits": 4, "granularity": "per_tensor"}
ANY_OP_FAMILIES = {
    # name: (builder, samples, callback arguments)
    "falcon": (_falcon, _causal_lm, {}),
    "mamba": (_mamba, _causal_lm, {}),
    "resnet": (_resnet, lambda m: _vit_samples(), {}),
    # MobileNetV2's channel counts (8, 24, 40 ...) do not divide into w4's groups of 16:
    # per-tensor 4-bit keeps this row about the export, not the layouts.
    "mobilenet_v2": (_mobilenet_v2, lambda m: _vit_samples(),
                     {"overrides": dict.fromkeys(("conv2d", "linear"), PER_TENSOR_4)}),
    "beit": (_beit, lambda m: _vit_samples(), {}),
}
# Registered under their own names ("ops_<family>"): model_zoo's own rows stay untouched.
_BUILDERS.update({f"ops_{name}": (make, samples, "logits")
                  for name, (make, samples, _) in ANY_OP_FAMILIES.items()})


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ANY_OP_FAMILIES))
def test_family_is_palettized_wherever_used_and_exports(tmp_path, name):
    facts = run_family(f"ops_{name}", tmp_path, **ANY_OP_FAMILIES[name][2])
    assert facts["palettized_share"] >= 0.95, facts["dense_reasons"]
    for weight in facts["weights"]:
        assert weight in facts["palettized"] or facts["dense_reasons"].get(weight)
    assert set(facts["written"]) == {"coreai", "torch"}, facts["errors"]
    assert facts["reload_max_diff"] <= 1e-5
    result = facts["result"]
    assert result.rebuilt_max_abs_diff == 0.0 and result.coreai_graph_max_abs_diff < 1e-4


class NormedLayers(nn.Module):
    """Weights under torch's own parametrizations (Wav2Vec2/HuBERT's positional conv is under
    ``weight_norm``), next to a plain Linear that keeps working as before."""

    def __init__(self) -> None:
        super().__init__()
        from torch.nn.utils.parametrizations import spectral_norm, weight_norm

        self.conv = weight_norm(nn.Conv1d(16, 32, 3, padding=1), dim=2)
        self.proj = spectral_norm(nn.Linear(32, 32))
        self.head = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.conv(x).transpose(1, 2)))


def test_a_weight_under_another_parametrization_is_folded_and_palettized(tmp_path, caplog):
    torch.manual_seed(0)
    model = NormedLayers().eval()
    x = torch.randn(2, 16, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_weight = model.conv.weight.clone()
    with caplog.at_level("WARNING"):
        engine = Palettization("w4")
        engine.prepare(model, (x,))
    assert "conv.weight (_WeightNorm)" in caplog.text and "proj.weight (_SpectralNorm)" in caplog.text
    for module in (model.conv, model.proj):                     # folded: the palettization is
        assert len(module.parametrizations["weight"]) == 1      # the only parametrization left
    assert {t.name for t in engine.tensors()} == {"conv.weight", "proj.weight", "head.weight"}
    assert torch.equal(engine.tensors()[0].original, dense_weight)       # the value is kept
    assert engine.report().dense_layers == []
    result = engine.export(tmp_path / "out", formats=["torch", "coreai"])  # a copy of the
    assert set(result.written) == {"torch", "coreai"}, result.errors         # unfolded model
    loaded = load_palettized(result.directory, NormedLayers).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
