"""Structure inputs built without data from a model's config and forward signature
(``_synthetic.py``): each candidate runs the model it was built for, for classes of every
modality, and a model whose config sizes nothing is a one-line error at ``Trainer(...)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from model_zoo import build

from coreai_palettize_plugins.integrations._synthetic import synthetic_candidates

# family -> the inputs of the first (most complete) candidate and their shapes
EXPECTED = {
    "vit": {"pixel_values": (1, 3, 32, 32)},
    "clip": {"input_ids": (1, 8), "pixel_values": (1, 3, 32, 32), "attention_mask": (1, 8)},
    "whisper": {"input_features": (1, 16, 64), "decoder_input_ids": (1, 8)},  # encoder-decoder
    "wav2vec2": {"input_values": (1, ((32 - 1) * 4 + 8 - 1) * 5 + 10)},  # 32 frames out
    "ast": {"input_values": (1, 64, 32)},
    "resnet": {"pixel_values": (1, 3, 224, 224)},     # ResNetConfig has no image_size
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_the_first_candidate_fits_the_config_and_runs(family):
    model = build(family).model.eval()
    first = synthetic_candidates(model)[0]
    assert {k: tuple(v.shape) for k, v in first.items()} == EXPECTED[family]
    with torch.no_grad():
        model(**first)


def test_a_dummy_input_is_completed_and_multiple_choice_gets_a_choice_dimension():
    clip = build("clip").model
    dummy = {"input_ids": clip.dummy_inputs["input_ids"][:1]}
    first, alone, *_ = synthetic_candidates(clip, dummy)
    assert set(first) == {"input_ids", "pixel_values"} and first["input_ids"] is dummy["input_ids"]
    assert set(alone) == {"input_ids"}
    choice = build("roberta_choice").model
    shapes = [tuple(c["input_ids"].shape) for c in synthetic_candidates(choice)]
    assert shapes[-1] == (1, 2, 8) and (1, 8) in shapes


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(x).sum()


def test_a_model_whose_config_sizes_nothing_fails_in_trainer_init_in_one_line(tmp_path):
    from transformers import Trainer, TrainingArguments

    from coreai_palettize_plugins import PalettizeConfigError
    from coreai_palettize_plugins.hf import PalettizationTrainerCallback

    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    with pytest.raises(PalettizeConfigError, match=r"^palettize: no example inputs for Plain: "
                       r".*pass example_inputs= to PalettizationTrainerCallback$") as error:
        Trainer(model=Plain(), args=args, callbacks=[PalettizationTrainerCallback("w4")])
    assert "\n" not in str(error.value)
    callback = PalettizationTrainerCallback("w4", example_inputs=torch.randn(1, 16))
    Trainer(model=Plain(), args=args, callbacks=[callback])
    assert callback.engine.attached
