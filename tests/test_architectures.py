"""The architecture matrix: model classes shipped in transformers (tiny configs, random init), each
trained 2 steps by the real HF Trainer with ``callbacks=[PalettizationTrainerCallback()]`` alone
(no other call), exported and reloaded. Text, vision, audio, speech, contrastive and every head
type the Trainer trains (causal/masked LM, seq2seq, sequence/token/image/audio classification,
question answering, multiple choice).

The rule per family: >= 95 % of the linear-like weight elements palettized, every other one named
dense with a reason, ``.aimodel`` written unless the dense model itself cannot export, exact
reload, no warning from the HF adapter.

CI runs ``CI_FAMILIES`` (a broad sample: one or more per modality and head type); the long tail
is marked ``nightly`` and runs with ``PALETTIZE_NIGHTLY=1``.
"""

from __future__ import annotations

import pytest
from model_zoo import FAMILIES, run_family

from coreai_palettize_plugins.export.artifact import load_example_inputs

MIN_SHARE = 0.95

# The inputs the stored example call passes by keyword (besides the use_cache constant).
STORED_INPUTS = {
    "t5": ["input_ids", "attention_mask", "decoder_input_ids"],
    "bart": ["input_ids", "attention_mask", "decoder_input_ids"],
    "whisper": ["input_features", "decoder_input_ids"],
    "bert": ["input_ids", "attention_mask"],
    "roberta": ["input_ids", "attention_mask"],
    "vit": ["pixel_values"],
    "clip": ["input_ids", "pixel_values"],
    "wav2vec2": ["input_values"],
    "roberta_choice": ["input_ids", "attention_mask"],
}

# Formats that cannot be produced for a family even from the dense model: {family: (format, why)}.
KNOWN_EXPORT_FAILURES: dict[str, tuple[str, str]] = {
    # coreai-torch 0.4 has no lowering for aten.as_strided (Swin's window partition): measured
    # on the dense model too.
    "swin": ("coreai", "unsupported ATen ops: aten.as_strided"),
}

# Rows that fail only because of work on other branches. Each entry names the branch, what is
# expected today, and the exact cause; the test asserts that failure, so it fails (telling the
# integrator to delete the entry) once the cause is fixed.
NEEDS: dict[str, tuple[str, str, str]] = {}

# One or more per modality and head type; the tail repeats a covered case with another class.
CI_FAMILIES = ("gpt2", "llama", "qwen2_tied", "mixtral", "t5", "bert", "whisper", "vit", "resnet",
               "wav2vec2", "ast", "clip", "distilbert_tokens", "electra_qa", "roberta_choice")
TAIL = tuple(f for f in FAMILIES if f not in CI_FAMILIES)


def _param(name: str):
    marks = [pytest.mark.slow] + ([pytest.mark.nightly] if name in TAIL else [])
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", [_param(n) for n in FAMILIES])
def test_family_trains_exports_and_reloads_with_the_callback_alone(tmp_path, name):
    facts = run_family(name, tmp_path)
    branch, what, cause = NEEDS.get(name, (None, None, None))

    assert facts["attached_at_init"], "the structure was not built at Trainer.__init__"
    assert facts["adapter_warnings"] == [], facts["adapter_warnings"]
    assert any("palettize/bits_per_weight" in h for h in facts["log_history"])
    unnamed = [w for w in facts["weights"]
               if w not in facts["palettized"] and not facts["dense_reasons"].get(w)]
    if what == "share":
        assert cause in unnamed and facts["palettized_share"] < MIN_SHARE, (
            f"fixed by {branch}? drop {name} from NEEDS")
        unnamed.remove(cause)
    else:
        assert facts["palettized_share"] >= MIN_SHARE, facts["dense_reasons"]
    assert unnamed == [], f"left dense without a reason: {unnamed}"

    assert "torch" in facts["written"], facts["errors"]
    if name in KNOWN_EXPORT_FAILURES:
        fmt, why = KNOWN_EXPORT_FAILURES[name]
        assert why in facts["errors"][fmt]
    elif what == "aimodel":
        assert cause in facts["errors"].get("coreai", ""), f"fixed by {branch}? drop {name}"
    else:
        assert "coreai" in facts["written"], facts["errors"]
        assert facts["result"].coreai_graph_max_abs_diff < 1e-4
    assert facts["reload_max_diff"] <= 1e-5
    assert facts["result"].rebuilt_max_abs_diff == 0.0
    if name in STORED_INPUTS:
        spec = load_example_inputs(facts["result"].directory)
        assert [k for k in spec.kwargs if k != "use_cache"] == STORED_INPUTS[name]
        if "decoder_input_ids" in STORED_INPUTS[name]:
            assert spec.constants == {"use_cache": False}


# ------------------------------------------------------------------------------------ Lightning


def _lightning_fit(module, data, tmp_path, **callback_kwargs):
    import lightning.pytorch as pl
    import torch

    from coreai_palettize_plugins.lightning import PalettizationCallback

    callback = PalettizationCallback(export_dir=tmp_path / "out", **callback_kwargs)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback],
                         default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return callback


@pytest.mark.slow
def test_a_lightning_module_without_forward_trains_the_network_inside(tmp_path):
    """``training_step`` calls ``self.model(x)`` and the module defines no ``forward``: the
    callback alone traces, palettizes and exports the network inside it."""
    import torch
    from model_zoo import linear_like_weights, palettized
    from tiny_models import convnext, forwardless_module, image_pairs

    from coreai_palettize_plugins import load_palettized

    module = forwardless_module()
    weights = linear_like_weights(module.model)
    callback = _lightning_fit(module, image_pairs(), tmp_path)

    assert callback.engine.model is module.model
    assert [tuple(a.shape) for a in callback.engine.example_inputs.args] == [(1, 3, 32, 32)]
    total = sum(torch.Size(s).numel() for s in weights.values())
    share = sum(torch.Size(s).numel() for n, s in weights.items()
                if palettized(module.model, n)) / total
    assert share >= MIN_SHARE
    result = callback.export_result
    assert result.errors == {} and set(result.written) == {"coreai", "torch"}
    x = torch.randn(2, 3, 32, 32)
    module.model.eval()
    loaded = load_palettized(tmp_path / "out", convnext).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, module.model(x).logits)


def test_a_module_without_forward_or_one_network_is_a_one_line_error(tmp_path):
    import torch.nn as nn
    from tiny_models import forwardless_module, image_pairs

    from coreai_palettize_plugins import PalettizeConfigError

    module = forwardless_module(nn.Linear(3 * 32 * 32, 16))
    module.head = nn.Linear(16, 16)              # a second child with weights
    with pytest.raises(PalettizeConfigError, match=r"^palettize: NoForward has no forward\(\) "
                       r"and its parameters are not all in one child module \(children with "
                       r"parameters: model, head\): define forward\(\)") as error:
        _lightning_fit(module, image_pairs(), tmp_path)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
