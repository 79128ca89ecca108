"""``palettize.distillation``: a dense teacher's KL term reaches the loss the framework trains on."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TokenDataset, tiny_llama
from transformers import Trainer, TrainingArguments

from coreai_palettize_plugins import Palettization, load_palettized
from coreai_palettize_plugins.accuracy.distillation import distillation_loss
from coreai_palettize_plugins.hf import PalettizationTrainerCallback
from coreai_palettize_plugins.settings.schema import PalettizeConfigError


def kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    p = F.softmax(teacher / temperature, -1)
    return (p * (p.log() - F.log_softmax(student / temperature, -1))).sum(-1) * temperature ** 2


def test_the_hf_loss_is_the_task_loss_plus_the_weighted_kl_of_label_positions():
    dense = tiny_llama()
    reference = tiny_llama()  # the same weights: the teacher must be the dense model as attached
    engine = Palettization("w4", export_formats=[], distillation={"weight": 0.5, "temperature": 2})
    engine.prepare(dense, {"input_ids": torch.randint(0, 256, (1, 8))})
    engine.start_training()
    ids = torch.randint(0, 256, (2, 12))
    labels = ids.clone()
    labels[0, :5] = -100                                  # positions the task loss ignores
    dense.train()
    out = dense(input_ids=ids, labels=labels)
    with torch.no_grad():
        teacher = reference(input_ids=ids).logits
        student = dense(input_ids=ids).logits             # eval forwards of a training model:
    engine.stop_training()
    task = F.cross_entropy(student[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1))
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100                  # causal LM: logit i predicts label i+1
    kd = kl_by_hand(student, teacher, 2.0)[keep].mean()
    assert kd > 1e-4                                      # w4 moved the logits
    torch.testing.assert_close(out.loss, task + 0.5 * kd, rtol=1e-4, atol=1e-5)
    assert engine.distiller.last == pytest.approx(kd.item(), rel=1e-2)
    assert not any(p is q for p in dense.parameters() for q in engine.distiller.teacher.parameters())
    assert not any("teacher" in k for k in dense.state_dict())


class LogitsNet(nn.Module):
    """Returns a logits tensor; the loss is computed outside, as in a Lightning training_step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_logits_tensor_output_trains_both_terms_through_its_gradient():
    model = LogitsNet()
    teacher = LogitsNet()
    engine = Palettization("w4", export_formats=[], distillation={"weight": 2.0})
    engine.prepare(model, torch.randn(1, 32))
    engine.start_training()
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    model.train()
    F.cross_entropy(model(x), y).backward()
    hooked = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    engine.stop_training()                                # the hook is off outside training
    logits = model(x)
    with torch.no_grad():
        target = teacher(x)
    (F.cross_entropy(logits, y) + 2.0 * distillation_loss(logits, target, 1.0)).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert hooked.keys() == expected.keys() and hooked
    for name in expected:
        torch.testing.assert_close(hooked[name], expected[name], rtol=1e-4, atol=1e-6)


class NoLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.proj(x),)


def test_a_model_without_logits_fails_after_the_first_step_naming_the_key():
    model = NoLogits()
    engine = Palettization("w4", export_formats=[], distillation={"weight": 1.0})
    engine.prepare(model, torch.randn(1, 32))
    engine.start_training()
    model(torch.randn(4, 32))[0].sum().backward()
    with pytest.raises(RuntimeError, match=r"palettize.distillation: no training forward .* "
                       "returned logits"):
        engine.after_optimizer_step(1)


@pytest.mark.parametrize(("value", "message"), [
    ({"weight": 0}, "palettize.distillation.weight: must be a number > 0, got 0"),
    ({"wieght": 1}, "palettize.distillation.wieght: unknown key; valid: weight, temperature, "
                    "teacher"),
    ({"teacher": "no/such/dir"}, "palettize.distillation.teacher: no such directory"),
    (1, "palettize.distillation: must be null or a mapping"),
])
def test_bad_settings_name_the_key(value, message):
    with pytest.raises(PalettizeConfigError) as info:
        Palettization("w4", distillation=value)
    assert str(info.value).startswith(message)


def test_hf_trainer_distills_from_a_saved_dense_teacher_and_exports_the_student(tmp_path):
    teacher_dir = tmp_path / "teacher"
    tiny_llama(seed=1).save_pretrained(teacher_dir)       # e.g. a dense fine-tune
    callback = PalettizationTrainerCallback(
        "w4", distillation={"weight": 1.0, "teacher": str(teacher_dir)})
    model = tiny_llama()
    args = TrainingArguments(str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, save_strategy="steps", save_steps=3,
                             gradient_accumulation_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback])
    teacher = callback.engine.distiller.teacher
    saved = tiny_llama(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(),
                                                 saved.state_dict().values()))
    trainer.train()
    assert callback.engine.distiller.used == 6            # every micro-batch of 3 steps x 2
    assert callback.engine.distiller.teacher is None      # freed at the end of training
    assert callback.export_result.errors == {}
    # Neither the checkpoint nor the export holds the teacher; the export reloads exactly.
    from safetensors.torch import load_file

    checkpoint = load_file(str(tmp_path / "run" / "checkpoint-3" / "model.safetensors"))
    assert not any("teacher" in k for k in checkpoint)
    loaded = load_palettized(tmp_path / "run" / "palettized")
    x = torch.randint(0, 256, (2, 16))
    model.eval()
    assert (loaded(x).logits - model(x).logits).abs().max().item() == 0.0


def test_hydra_turns_it_on_with_one_override_and_the_schema_node_means_off():
    from helpers import run_python
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from coreai_palettize_plugins.settings.schema import PalettizeSettings

    result = run_python("examples/train.py", "palettize=w4", "palettize.distillation.weight=0.5",
                        "--cfg", "job")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "  distillation:\n    weight: 0.5\n    temperature: null\n" in result.stdout
    from coreai_palettize_plugins import conf

    with initialize_config_dir(str(conf.__path__[0]), version_base=None):
        node = compose("palettize/w4").palettize
    assert PalettizeSettings.resolve(node).distillation is None            # all-null node: off
    node.distillation.weight = 0.5
    on = PalettizeSettings.resolve(OmegaConf.to_container(node)).distillation
    assert (on.weight, on.temperature, on.teacher) == (0.5, 1.0, None)
