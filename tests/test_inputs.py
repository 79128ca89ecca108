"""How the plugin calls any model: CallSpec from batches and example inputs, keyword_call,
storage (CPU, no training; each test well under a few seconds)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from helpers import example_image, mixed_net
from tiny_models import hf_data, hf_model, keyword_only_module, lightning_demo, token_pairs

from coreai_palettize_plugins import Palettization, load_palettized
from coreai_palettize_plugins.core._inputs import CallSpec, ExampleInputsError, as_call_spec
from coreai_palettize_plugins.export.artifact import (
    EXAMPLE_INPUTS_NAME,
    MANIFEST_NAME,
    load_example_inputs,
)
from coreai_palettize_plugins.hf import batch_to_example_inputs, kv_cache_disabled
from coreai_palettize_plugins.integrations._batches import call_spec_from_batch
from coreai_palettize_plugins.lightning import default_example_inputs


def collate(family: str, n: int = 2):
    data = hf_data(family)
    return torch.utils.data.default_collate([data[i] for i in range(n)])


@pytest.mark.parametrize(("family", "names"), [
    ("t5", ["input_ids", "attention_mask", "decoder_input_ids", "use_cache"]),
    ("bart", ["input_ids", "attention_mask", "decoder_input_ids", "use_cache"]),
    ("whisper", ["input_features", "decoder_input_ids", "use_cache"]),
    ("bert", ["input_ids", "attention_mask"]),
    ("vit", ["pixel_values"]),
])
def test_hf_batches_become_keyword_calls_of_one_sample(family, names):
    model, batch = hf_model(family), collate(family)
    spec = batch_to_example_inputs(model, batch)
    assert spec.args == () and list(spec.kwargs) == names
    assert all(t.shape[0] == 1 for t in spec.inputs)                  # one sample
    assert "labels" not in spec.kwargs
    if "decoder_input_ids" in names:                                  # the model's own shift
        labels = batch["labels"][:1]
        if family == "whisper":
            from transformers.models.whisper.modeling_whisper import shift_tokens_right

            expected = shift_tokens_right(labels, 0, 1)
        else:
            expected = model.prepare_decoder_input_ids_from_labels(labels=labels)
        assert torch.equal(spec["decoder_input_ids"], expected)
        assert (spec["decoder_input_ids"] >= 0).all()                 # -100 padding replaced
        assert spec.constants == {"use_cache": False}
    model.eval()
    spec.call(model)                                                  # the call works


def test_hf_structure_inputs_without_labels_use_the_decoder_start_token():
    model = hf_model("t5")
    spec = batch_to_example_inputs(model, {"input_ids": torch.ones(1, 4, dtype=torch.long)})
    assert spec["decoder_input_ids"].tolist() == [[model.config.decoder_start_token_id]]
    dummy = batch_to_example_inputs(model, model.dummy_inputs)        # T5's include decoder ids
    assert torch.equal(dummy["decoder_input_ids"], model.dummy_inputs["decoder_input_ids"][:1])


def test_tuple_batches_fill_the_required_positional_parameters():
    demo = lightning_demo()
    inputs, target = torch.utils.data.default_collate([token_pairs()[i] for i in range(3)])
    spec = default_example_inputs((inputs, target), demo)             # forward(inputs, target)
    assert spec.kwargs == {} and [tuple(a.shape) for a in spec.args] == [(1, 12), (1, 12)]
    assert spec.input_names(demo) == ["inputs", "target"]
    net = mixed_net()                                                 # forward(x) with (x, y)
    spec = default_example_inputs((example_image(4), torch.zeros(4)), net)
    assert len(spec.args) == 1 and spec[0].shape == (1, 1, 8, 8)
    assert default_example_inputs((example_image(4), torch.zeros(4)))[0].shape == (1, 1, 8, 8)


def test_dict_batches_fill_keyword_only_parameters():
    module = keyword_only_module()
    spec = default_example_inputs({"features": torch.randn(4, 16), "target": torch.randn(4, 16)},
                                  module)
    assert spec.args == () and list(spec.kwargs) == ["features"] and spec[0].shape == (1, 16)


def test_a_mapping_example_input_array_is_a_keyword_call_and_validates():
    from coreai_palettize_plugins.lightning import PalettizationCallback

    module = keyword_only_module()
    module.example_input_array = {"features": torch.randn(1, 16)}     # Lightning: model(**array)
    callback = PalettizationCallback("w4")
    spec = callback._resolve_example_inputs(None, module)
    assert list(spec.kwargs) == ["features"]
    callback.engine.validate_for(module, spec)                         # a dry run on a copy
    assert not callback.engine.attached and not module._forward_pre_hooks


class WholeBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, batch):
        return self.fc(batch["x"])


class VarKeyword(WholeBatch):
    def forward(self, **batch):
        return self.fc(batch["x"])


def test_whole_batch_and_var_keyword_forwards():
    batch = {"x": torch.randn(3, 4), "y": torch.randn(3)}
    spec = call_spec_from_batch(WholeBatch(), batch)
    assert spec.kwargs == {} and set(spec.args[0]) == {"x", "y"} and spec[0].shape == (1, 4)
    spec = call_spec_from_batch(VarKeyword(), batch)
    assert list(spec.kwargs) == ["x", "y"]


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, lengths, *, scale):
        return self.fc(x) * scale


def test_impossible_batches_name_the_signature_and_the_fix():
    with pytest.raises(ExampleInputsError, match=r"TwoInputs\.forward\(x, lengths, \*, scale\).*"
                       r"missing a required argument: 'lengths'.*example_input_array"):
        default_example_inputs((torch.randn(2, 4),), TwoInputs())
    with pytest.raises(ExampleInputsError, match=r"none of the batch's keys \(a, b\) is a "
                       r"parameter of TwoInputs\.forward.*example_inputs="):
        call_spec_from_batch(TwoInputs(), {"a": torch.ones(1), "b": torch.ones(1)})
    with pytest.raises(ExampleInputsError, match=r"PalettizationTrainerCallback"):
        batch_to_example_inputs(hf_model("bert"), {"pixel_values": torch.ones(1, 3, 4, 4)})


def test_a_failing_tracing_forward_names_the_forward_and_the_fix():
    engine = Palettization("w4")
    with pytest.raises(ExampleInputsError, match=r"MixedNet\.forward\(x\) failed on the example "
                       r"inputs \(args=\(\(1, 3\) float32\)\): RuntimeError: .*; "
                       r"pass example_inputs="):
        engine.attach(mixed_net(), torch.randn(1, 3))
    assert not engine.attached


def test_none_gaps_become_keywords_and_mappings_are_keyword_calls():
    model = hf_model("t5")
    ids, dec = torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)
    spec = as_call_spec((ids, None, dec), model)                    # the 0.1 positional form
    assert spec.args == (ids,) and list(spec.kwargs) == ["decoder_input_ids"]
    spec = as_call_spec({"input_ids": ids, "attention_mask": None, "decoder_input_ids": dec},
                        model)
    assert list(spec.kwargs) == ["input_ids", "decoder_input_ids"]
    with pytest.raises(TypeError, match=r"a tensor, a tuple .* a mapping"):
        as_call_spec("input_ids")


def test_keyword_call_keeps_module_names_and_name_configs():
    model = hf_model("t5").eval()
    engine = Palettization("w4", modules={r"decoder\..*\.wo": "w8"})
    with kv_cache_disabled(model):
        engine.attach(model, batch_to_example_inputs(model, collate("t5")))
    assert model.config.use_cache and model.decoder.config.use_cache   # restored
    bits = {t.name: t.fake.n_bits for t in engine.tensors()}
    assert bits["decoder.block.0.layer.2.DenseReluDense.wo.weight"] == 8
    assert bits["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == 4
    assert "decoder.block.0.layer.2.DenseReluDense.wo.parametrizations.weight.original" in \
        model.state_dict()
    assert not model._forward_pre_hooks                                # the hook is gone


def test_call_spec_storage_round_trip():
    spec = CallSpec((torch.ones(1, 2), {"m": torch.zeros(1)}),
                    {"ids": torch.arange(3)[None], "use_cache": False, "scale": 0.5})
    tensors, layout = spec.to_storage()
    assert set(tensors) == {"args.0", "args.1.m", "kwargs.ids"}
    back = CallSpec.from_storage(json.loads(json.dumps(layout)), tensors)
    assert back.constants == {"use_cache": False, "scale": 0.5}
    assert all(torch.equal(a, b) for a, b in zip(back.inputs, spec.inputs))
    assert back.input_names() == ["input_0", "input_1_m", "ids"]


def test_artifacts_of_0_1_with_positional_inputs_still_load(tmp_path):
    from safetensors.torch import save_file

    model = mixed_net()
    engine = Palettization("w4", overrides={"linear": "w8"})
    engine.prepare(model, example_image())
    engine.export(tmp_path / "out", formats=["torch"])
    manifest_path = tmp_path / "out" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    assert manifest["example_inputs"]["args"] == [{"tensor": "args.0"}]
    # Rewrite as 0.1 wrote it: packed-v1, input_<i> tensors, num_example_inputs.
    del manifest["example_inputs"]
    manifest.pop("example_inputs_checksums", None)  # 0.1 recorded no checksums
    manifest.update(format="coreai-palettize-plugins/packed-v1", num_example_inputs=1)
    manifest_path.write_text(json.dumps(manifest))
    save_file({"input_0": example_image(1)}, str(tmp_path / "out" / EXAMPLE_INPUTS_NAME))
    assert load_example_inputs(tmp_path / "out")[0].shape == (1, 1, 8, 8)
    x = example_image(3)
    loaded = load_palettized(tmp_path / "out", mixed_net)
    assert torch.equal(loaded(x), model.eval()(x))


def test_keyword_inputs_through_engine_export_and_reload(tmp_path):
    """A mapping of keyword inputs: attach, export (.aimodel named after the keywords) and
    reload from the stored keyword call."""
    module = keyword_only_module()
    engine = Palettization("w4")
    engine.prepare(module, {"features": torch.randn(2, 16)})
    result = engine.export(tmp_path / "out")
    assert result.errors == {} and set(result.written) == {"coreai", "torch"}
    spec = load_example_inputs(tmp_path / "out")
    assert list(spec.kwargs) == ["features"]
    loaded = load_palettized(tmp_path / "out", keyword_only_module)
    x = torch.randn(3, 16)
    assert torch.equal(loaded(features=x), module.eval()(features=x))


class IgnoresAnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x, extra=None):
        return self.fc(x)


def test_keyword_inputs_the_graph_does_not_use_are_not_aimodel_inputs(tmp_path, caplog):
    torch.manual_seed(0)
    engine = Palettization("w4")
    engine.prepare(IgnoresAnInput(), {"x": torch.randn(1, 16), "extra": torch.randn(1, 3)})
    with caplog.at_level("INFO", logger="coreai_palettize_plugins.export"):
        result = engine.export(tmp_path / "out")
    assert result.errors == {} and result.coreai_graph_max_abs_diff == 0.0
    assert "does not use extra; the .aimodel does not take it" in caplog.text
    assert list(load_example_inputs(tmp_path / "out").kwargs) == ["x", "extra"]  # eager call kept
