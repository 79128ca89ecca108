"""Any model a user brings, beyond the transformers matrix (tests/test_architectures.py): Lightning
modules with multi-input forwards and dict batches, and 0.1-style positional inputs with a gap.
Each trains a few steps with default callback arguments, exports, and reloads to outputs equal to
the trained model's on the stored example call."""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    feature_dicts,
    hf_model,
    keyword_only_module,
    lightning_demo,
    token_pairs,
)

from coreai_palettize_plugins import load_palettized
from coreai_palettize_plugins.core._modelcopy import max_abs_diff, model_outputs
from coreai_palettize_plugins.export.artifact import load_example_inputs
from coreai_palettize_plugins.export.writer import PACKED_NAME


def reload_diff(model, directory, factory=None) -> float:
    spec = load_example_inputs(directory)
    loaded = load_palettized(directory, factory)
    return max_abs_diff(model_outputs(model, spec), model_outputs(loaded, spec))


@pytest.mark.slow
def test_lightning_demo_transformer_with_tuple_batches(tmp_path, caplog):
    """Lightning's demo ``forward(inputs, target)``: both tuple elements feed the forward.
    torch.export cannot take even the dense model (``nn.Transformer._detect_is_causal_mask``
    guards on data): the reason is logged per format and the packed artifact reloads exactly."""
    import lightning.pytorch as pl

    from coreai_palettize_plugins.lightning import PalettizationCallback

    module = lightning_demo()
    callback = PalettizationCallback(export_dir=tmp_path / "out")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback],
                         default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(token_pairs(), batch_size=4))

    assert [tuple(a.shape) for a in callback.engine.example_inputs.args] == [(1, 12), (1, 12)]
    result = callback.export_result
    assert set(result.written) == {"torch"} and (tmp_path / "out" / PACKED_NAME).is_file()
    assert result.errors["coreai"].startswith("RuntimeError: torch.export could not trace TinyDemo")
    assert "data-dependent" in result.errors["coreai"]
    assert "format 'coreai' could not be written" in caplog.text
    diff = reload_diff(module, tmp_path / "out", lightning_demo)
    assert diff == 0.0


def test_lightning_dict_batches_and_keyword_only_forward(tmp_path):
    import lightning.pytorch as pl

    from coreai_palettize_plugins.lightning import PalettizationCallback

    module = keyword_only_module()
    callback = PalettizationCallback(export_dir=tmp_path / "out")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback],
                         default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(feature_dicts(), batch_size=4))

    spec = callback.engine.example_inputs
    assert spec.args == () and list(spec.kwargs) == ["features"]      # "target" is no input
    result = callback.export_result
    assert result.errors == {} and set(result.written) == {"coreai", "torch"}
    diff = reload_diff(module, tmp_path / "out", keyword_only_module)
    assert diff == 0.0


@pytest.mark.slow
def test_seq2seq_positional_inputs_with_a_none_gap_export(tmp_path):
    """The 0.1 form ``(input_ids, None, decoder_input_ids)`` no longer leaves a dead
    placeholder that coreai-torch cannot resolve: the gap becomes keywords."""
    from coreai_palettize_plugins import Palettization

    model = hf_model("t5")
    ids = torch.randint(3, 200, (1, 6))
    dec = model._shift_right(torch.randint(3, 200, (1, 4)))
    engine = Palettization("w4")
    engine.prepare(model, (ids, None, dec))
    result = engine.export(tmp_path / "out", configure_model=_no_cache)
    assert result.errors == {}, result.errors
    assert list(load_example_inputs(tmp_path / "out").kwargs) == ["decoder_input_ids"]


def _no_cache(model) -> None:
    from coreai_palettize_plugins.hf import disable_kv_cache

    disable_kv_cache(model)

