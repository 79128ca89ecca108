"""The engine's guards: each protects a user-facing promise and fails in one clear line."""

from __future__ import annotations

import pytest
from helpers import example_image, mixed_net

from coreai_palettize_plugins import Palettization, PalettizeConfigError


def test_resume_with_a_different_config_is_refused():
    saved = Palettization("w4")
    saved.prepare(mixed_net(), example_image())
    other = Palettization("w8")
    other.attach(mixed_net(), example_image())
    with pytest.raises(PalettizeConfigError,
                       match=r"^palettize: the checkpoint was palettized with a different config"):
        other.load_state_dict(saved.state_dict())


def test_attach_to_a_second_model_is_refused_and_the_same_model_is_a_no_op():
    engine = Palettization("w4")
    model = mixed_net()
    engine.attach(model, example_image())
    engine.attach(model, example_image())                       # the same model: no-op
    with pytest.raises(RuntimeError, match="already attached to another model"):
        engine.attach(mixed_net(), example_image())


def test_a_model_prepared_already_is_refused():
    model = mixed_net()
    Palettization("w4").prepare(model, example_image())
    with pytest.raises(RuntimeError, match=r"MixedNet is already palettized \(prepared by coreai-opt\)"):
        Palettization("w4").attach(model, example_image())


def test_export_without_a_directory_is_refused(tmp_path):
    engine = Palettization("w4")
    engine.prepare(mixed_net(), example_image())
    with pytest.raises(ValueError, match=r"no export directory: pass one or set palettize\.export\.dir"):
        engine.export()
    assert not any(tmp_path.iterdir())


def test_errors_carry_their_key_and_can_be_renamed_for_recipes():
    with pytest.raises(PalettizeConfigError) as info:
        Palettization({"overrides": {"linear": {"n_bits": 5}}})
    error = info.value
    assert error.key == "overrides.linear.n_bits"
    assert str(error.with_root("recipe.palettize")).startswith(
        "recipe.palettize.overrides.linear.n_bits: 5 is not supported")


def test_framework_private_access_still_exists():
    """Each Lightning/transformers private the adapters reach has one helper; this pins that the
    installed versions still have it, so a bump fails here, by name, rather than mid-training."""
    import lightning.pytorch as pl
    from helpers import tiny_llama
    from lightning.pytorch.strategies import DDPStrategy

    from coreai_palettize_plugins.lightning import _ddp_kwargs

    assert isinstance(_ddp_kwargs(DDPStrategy()), dict)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert hasattr(trainer.fit_loop._data_source, "dataloader")
    keys = tiny_llama(tied=True)._tied_weights_keys
    assert isinstance(keys, dict) and keys                    # transformers 5: {alias regex: source}


@pytest.mark.parametrize("training", ["ste", "frozen", "lut"])
def test_a_training_model_can_be_deep_copied_like_an_ema_or_swa_copy(training):
    """EMA/SWA callbacks deep-copy the model mid-training: the engine (and its coreai-opt
    training state) is shared by the copy's hooks, not copied; the copy computes the same
    outputs and loads the original's state."""
    import copy

    import torch
    from helpers import tiny_llama

    model = tiny_llama(tied=True)
    ids = model.dummy_inputs["input_ids"][:1]
    engine = Palettization("w4", training=training)
    engine.prepare(model, ids)
    engine.start_training()
    twin = copy.deepcopy(model)
    model.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)
    engine.stop_training()
