"""Budgets over the whole model: a tied 51864-row embedding/output projection (Whisper's
vocabulary, which w4's groups of 16 do not divide) joins the allocation with a fitted layout,
one choice for the tied pair; an unreachable target fails before any k-means."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import KMeansCounter

from coreai_palettize_plugins import _coreai_compat as compat
from coreai_palettize_plugins import load_palettized
from coreai_palettize_plugins.accuracy.budget import budget_floor
from coreai_palettize_plugins.engine import allocation
from coreai_palettize_plugins.engine.lifecycle import Palettization
from coreai_palettize_plugins.settings.schema import PalettizeConfigError

VOCAB = 51864
EMBED, HEAD = "model.decoder.embed_tokens", "proj_out"
INPUTS = {"input_features": torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(0)),
          "decoder_input_ids": torch.tensor([[1, 5, 6, 7]])}
HEAD_SPEC = {HEAD: {"n_bits": 2, "granularity": "per_tensor"}}


def whisper_vocab():
    """Whisper-shaped (tied decoder embedding / ``proj_out``), vocabulary of Whisper tiny. Narrow
    (d_model 16): coreai-opt's k-means costs ~10 ms per LUT group, and 51864 rows at groups of 12
    are 4322 groups per trial."""
    import transformers as T

    torch.manual_seed(0)
    return T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_source_positions=32, max_target_positions=32,
        decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1))


def attached(bits: float, granularity: list | None = None, **fields) -> Palettization:
    budget = {"bits_per_weight": bits, "choices": [2, 3, 4], "granularity": granularity}
    engine = Palettization("w4", budget=budget, export_formats=[], **fields)
    engine.attach(whisper_vocab(), INPUTS)
    return engine


def floor(engine: Palettization) -> float:
    scope = allocation.scope(engine.model, engine.settings, engine.tied)
    return budget_floor(scope, engine.settings.budget)


def test_the_floor_counts_the_tied_vocabulary_and_fit_layouts_false_keeps_it_dense():
    fitted = attached(3.5)
    dense = attached(3.5, fit_layouts=False)              # coreai-opt: the vocabulary stays dense
    assert f"{EMBED}.weight" in dense.skipped
    assert floor(fitted) < 3.5 < 20 < floor(dense)
    head = next(t for t in fitted.tensors() if t.name == f"{EMBED}.weight")
    assert compat.layout_name(head.fake.granularity) == "group 12 axis 0"
    with pytest.raises(PalettizeConfigError, match=r"valid: \d+\.\d+ or more"):
        dense.allocate_budget()


@pytest.mark.slow
def test_three_and_a_half_bits_reachable_with_one_choice_for_the_tied_pair(tmp_path, caplog):
    engine = attached(3.5, granularity=["base", "per_tensor"])
    floor_bpw = floor(engine)
    with pytest.warns(UserWarning, match="choices' steps are too coarse"):
        engine.ensure_clustered()
    # without calibration the objective is plain squared error: said, with the fix
    assert "palettize.budget without palettize.calibration" in caplog.text
    allocation, report = engine.allocation, engine.report()
    (tied,) = [x for x in allocation.layers if x.name == f"{EMBED}.weight"]
    assert tied.module == EMBED and tied.aliases == [HEAD]             # one choice, both modules
    assert allocation.fixed == {} and len(allocation.layers) == len(engine.tensors())
    assert report.bits_per_weight == pytest.approx(allocation.achieved, abs=1e-12)
    # the vocabulary is 95 % of this narrow model: its steps (2/3/4 bits) decide how close
    assert floor_bpw < allocation.achieved <= 3.5 and tied.n_bits == 3
    assert {f"{EMBED}.weight", f"{HEAD}.weight"} & {d.name for d in report.dense_layers} == set()
    block = allocation.modules_block()
    assert block[EMBED.replace(".", r"\.")] == block[HEAD] == tied.spec()
    result = engine.export(tmp_path / "out", formats=["torch"])
    assert result.errors == {} and result.rebuilt_max_abs_diff == 0.0
    model = engine.model.eval()
    loaded = load_palettized(tmp_path / "out", whisper_vocab).eval()
    with torch.no_grad():
        assert (loaded(**INPUTS).logits - model(**INPUTS).logits).abs().max().item() == 0.0
    assert loaded.proj_out.weight is loaded.model.decoder.embed_tokens.weight


def test_an_unreachable_target_fails_before_any_kmeans(monkeypatch):
    engine = attached(2.0)
    counter = KMeansCounter(monkeypatch)
    started = time.perf_counter()
    with pytest.raises(PalettizeConfigError, match=r"^palettize\.budget\.bits_per_weight: 2\.0 is "
                       r"below the smallest whole-model bits per weight the choices \[2, 3, 4\] "
                       r"reach on this model \(2\.\d+, .*valid: 2\.\d+ or more$"):
        engine.ensure_clustered()
    assert counter.calls == [] and time.perf_counter() - started < 10


def test_explicit_modules_on_the_tied_head_name_the_modules_spec():
    engine = attached(3.9, modules=HEAD_SPEC)
    allocation = engine.allocate_budget()
    assert allocation.fixed == {f"{EMBED}.weight": f"keeps the palettize.modules.{HEAD} spec "
                                                   "(explicit modules win over the budget)"}
    assert "base spec" not in allocation.to_text()
