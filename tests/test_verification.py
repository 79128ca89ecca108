"""What the plugin reads is verified (issue #17, rows 5-8): HF resume with another config, damaged
checkpoints (both frameworks), non-finite weights and LUTs, tampered packed artifacts."""

from __future__ import annotations

import json
import re
import shutil
import struct

import lightning.pytorch as pl
import pytest
import torch
from helpers import TokenDataset, run_python, tiny_llama
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from coreai_palettize_plugins import Palettization, PalettizeConfigError, load_palettized
from coreai_palettize_plugins.core.integrity import CHECKPOINT_RECORD, IntegrityError, tensor_digest
from coreai_palettize_plugins.demo.digits import DigitsCNN, DigitsDataModule
from coreai_palettize_plugins.export.artifact import MANIFEST_NAME, PACKED_NAME, ArtifactError
from coreai_palettize_plugins.hf import PalettizationTrainerCallback
from coreai_palettize_plugins.lightning import PalettizationCallback


def arguments(out, **kwargs) -> TrainingArguments:
    options = dict(max_steps=3, per_device_train_batch_size=8, learning_rate=1e-3, save_steps=3,
                   logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                   save_strategy="steps")
    options.update(kwargs)
    return TrainingArguments(str(out), **options)


class CountSteps(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps += 1


def hf_resume(out, checkpoint, config="w4", **fields):
    steps = CountSteps()
    callback = PalettizationTrainerCallback(config, export_formats=(), **fields)
    trainer = Trainer(model=tiny_llama(), args=arguments(out, max_steps=5),
                      train_dataset=TokenDataset(), callbacks=[callback, steps])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return steps


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """w4 checkpoints after 3 steps: default training (ste) and frozen (compact base)."""
    out = {}
    for training in ("ste", "frozen"):
        root = tmp_path_factory.mktemp(f"hf_{training}")
        Trainer(model=tiny_llama(), args=arguments(root), train_dataset=TokenDataset(),
                callbacks=[PalettizationTrainerCallback("w4", export_formats=(),
                                                        training=training)]).train()
        out[training] = root / "checkpoint-3"
    return out


def copy_checkpoint(source, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("config", ["w2", "w8"])
def test_hf_resume_with_another_config_fails_before_training(hf_checkpoints, tmp_path, config):
    checkpoint = hf_checkpoints["ste"]
    record = json.loads((checkpoint / CHECKPOINT_RECORD).read_text())
    assert record["step"] == 3 and "n_bits: 4" in record["config"] and record["luts"]
    steps = CountSteps()
    callback = PalettizationTrainerCallback(config, export_formats=())
    trainer = Trainer(model=tiny_llama(), args=arguments(tmp_path, max_steps=5),
                      train_dataset=TokenDataset(), callbacks=[callback, steps])
    with pytest.raises(PalettizeConfigError, match="palettized with a different config") as e:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert f"checkpoint {checkpoint}" in one_line(e) and "n_bits" in str(e.value)
    assert steps.steps == 0


def test_hf_checkpoint_without_record_is_still_checked_by_lut_shape_and_resumes(
        hf_checkpoints, tmp_path, caplog):
    checkpoint = copy_checkpoint(hf_checkpoints["ste"], tmp_path)
    (checkpoint / CHECKPOINT_RECORD).unlink()              # as an older version wrote it
    with pytest.raises(PalettizeConfigError, match=r"LUTs of model\.\S+ have shape \(\d+, 16, 1\)"):
        hf_resume(tmp_path / "w2", checkpoint, "w2")
    steps = hf_resume(tmp_path / "w4", checkpoint)          # the same config: resumes, warns once
    assert steps.steps == 2
    assert sum("cannot be verified" in r.getMessage() for r in caplog.records) == 1


def test_hf_record_catches_a_config_difference_the_shapes_do_not_show(hf_checkpoints, tmp_path):
    with pytest.raises(PalettizeConfigError, match="palettized with a different config"):
        hf_resume(tmp_path, hf_checkpoints["ste"], training="frozen")   # ste -> frozen


def overwrite_inside(path, name_filter, tmp_seed=0, size=64 * 1024) -> set[str]:
    """Overwrite ``size`` random bytes starting inside the first tensor of a safetensors file
    whose name passes ``name_filter``; returns the tensors the garbage touched."""
    raw = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    base = 8 + header_len
    spans = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
    name = next(k for k in sorted(spans, key=lambda k: spans[k][0]) if name_filter(k))
    start = base + spans[name][0]
    end = min(start + size, len(raw))
    garbage = torch.randint(0, 256, (end - start,), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(tmp_seed))
    raw[start:end] = bytes(garbage.tolist())
    path.write_bytes(bytes(raw))
    return {k for k, (a, b) in spans.items() if base + a < end and base + b > start}


@pytest.mark.parametrize(("training", "target"), [("ste", ".original"), ("frozen", ".centroids"),
                                                  ("frozen", ".packed_indices")])
def test_hf_damaged_checkpoint_is_refused_naming_the_tensor(hf_checkpoints, tmp_path, training,
                                                            target):
    checkpoint = copy_checkpoint(hf_checkpoints[training], tmp_path)
    touched = overwrite_inside(checkpoint / "model.safetensors", lambda k: k.endswith(target))
    with pytest.raises(IntegrityError, match="is damaged") as e:
        hf_resume(tmp_path / "run", checkpoint, training=training)
    message = one_line(e)
    assert any(name in message for name in touched), (message, touched)


def digits() -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN()


def lightning_trainer(root, callbacks, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3,
                   limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                   logger=False, enable_checkpointing=False, default_root_dir=str(root))
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


@pytest.fixture(scope="module")
def lightning_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("pl")
    lightning_trainer(root, [PalettizationCallback("w4", export_formats=()),
                             ModelCheckpoint(dirpath=root, filename="last")],
                      enable_checkpointing=True).fit(digits(), DigitsDataModule())
    return root / "last.ckpt"


def test_lightning_resume_with_another_config_is_still_refused(lightning_checkpoint, tmp_path):
    with pytest.raises(PalettizeConfigError, match="palettized with a different config") as e:
        lightning_trainer(tmp_path, [PalettizationCallback("w2", export_formats=())],
                          max_epochs=2).fit(digits(), DigitsDataModule(),
                                            ckpt_path=lightning_checkpoint)
    one_line(e)


def test_lightning_damaged_checkpoint_is_refused_naming_the_tensor(lightning_checkpoint, tmp_path):
    damaged = tmp_path / "damaged.ckpt"
    shutil.copy(lightning_checkpoint, damaged)
    raw = bytearray(damaged.read_bytes())
    # torch's zip stores tensors uncompressed: garbage over the bytes of the largest weight
    state = torch.load(lightning_checkpoint, weights_only=True)["state_dict"]
    key = max((k for k, v in state.items() if v.is_floating_point()),
              key=lambda k: state[k].numel())
    needle = state[key].reshape(-1)[:16].numpy().tobytes()
    start = raw.find(needle)
    assert start > 0
    size = min(64 * 1024, state[key].numel() * 4)
    garbage = torch.randint(0, 256, (size,), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    raw[start:start + size] = bytes(garbage.tolist())
    damaged.write_bytes(bytes(raw))
    pattern = "damaged: " + re.escape(key) + r" \("
    with pytest.raises(IntegrityError, match=pattern) as e:
        lightning_trainer(tmp_path, [PalettizationCallback("w4", export_formats=())],
                          max_epochs=2).fit(digits(), DigitsDataModule(), ckpt_path=damaged)
    one_line(e)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_before_kmeans_names_the_weight(tmp_path, value):
    net = digits()
    with torch.no_grad():
        net.net[2].weight[2, 1, 0, 0] = value
    callback = PalettizationCallback("w4", export_formats=())
    with pytest.raises(IntegrityError, match=r"before k-means: net\.2\.weight \(") as e:
        lightning_trainer(tmp_path, [callback]).fit(net, DigitsDataModule())
    assert ("1 NaN" if value != value else "1 Inf") in one_line(e)
    assert not callback.engine.clustered


def test_non_finite_lut_after_a_step_names_the_weight(tmp_path):
    class Diverging(DigitsCNN):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 1 else loss

    torch.manual_seed(0)
    callback = PalettizationCallback("w4", export_formats=(), training="lut")
    with pytest.raises(IntegrityError, match=r"non-finite LUT after optimizer step 2: net\.\d\.weight "
                                             r"\((trainable_lut|centroids)"):
        lightning_trainer(tmp_path, [callback]).fit(Diverging(), DigitsDataModule())


@pytest.mark.slow
def test_non_finite_weight_under_ddp_fails_every_rank_promptly(tmp_path):
    script = tmp_path / "nan_ddp.py"
    script.write_text(NAN_DDP)
    result = run_python(str(script), str(tmp_path), timeout=240)
    assert result.returncode != 0
    ranks = {r: (tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert "before k-means: net.2.weight (1 NaN" in ranks[0]
    assert "net.2.weight" in ranks[1] and "failed on rank 0" not in ranks[0]


NAN_DDP = '''
import sys, traceback
from pathlib import Path
import lightning.pytorch as pl
import torch
from coreai_palettize_plugins.demo.digits import DigitsCNN, DigitsDataModule
from coreai_palettize_plugins.lightning import PalettizationCallback

out = Path(sys.argv[1])
if __name__ == "__main__":
    torch.manual_seed(0)
    net = DigitsCNN()
    with torch.no_grad():
        net.net[2].weight[2, 1, 0, 0] = float("nan")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1,
                         limit_train_batches=2, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(out),
                         callbacks=[PalettizationCallback("w4", export_formats=())])
    try:
        trainer.fit(net, DigitsDataModule())
    except BaseException as e:
        (out / f"rank{trainer.global_rank}.txt").write_text(f"{type(e).__name__}: {e}")
        raise
'''


# ---------------------------------------------------------------------- packed artifacts

@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A packed export of a tied tiny Llama (w4, aliases for the tied lm_head)."""
    root = tmp_path_factory.mktemp("artifact")
    model = tiny_llama(tied=True)
    x = torch.randint(0, 256, (1, 8))
    engine = Palettization("w4", training="frozen")
    engine.prepare(model, (x,))
    engine.export(root, formats=["torch"])
    return root, model


def tampered(artifact, tmp_path, edit=None, tensors=None):
    root, _ = artifact
    target = tmp_path / "export"
    shutil.copytree(root, target)
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    if tensors is not None:
        state = load_file(str(target / PACKED_NAME))
        tensors(state)
        save_file(state, str(target / PACKED_NAME), metadata={"format": manifest["format"]})
        manifest["checksums"] = {k: tensor_digest(v) for k, v in state.items()}  # consistent
    if edit is not None:
        edit(manifest)
    (target / MANIFEST_NAME).write_text(json.dumps(manifest))
    return target


def entry(manifest, suffix="q_proj.weight"):
    return next(e for n, e in manifest["palettized"].items() if n.endswith(suffix))


def load_error(target) -> str:
    with pytest.raises(ArtifactError) as e:
        load_palettized(target, lambda: tiny_llama(tied=True))
    return one_line(e)


def test_intact_artifact_loads_and_matches(artifact, tmp_path):
    root, model = artifact
    loaded = load_palettized(root, lambda: tiny_llama(tied=True))
    x = torch.randint(0, 256, (2, 8))
    assert torch.equal(loaded(x).logits, model.eval()(x).logits)
    assert json.loads((root / MANIFEST_NAME).read_text())["checksums"]


@pytest.mark.parametrize("n_bits", [2, 3])
def test_tampered_n_bits_is_refused(artifact, tmp_path, n_bits):
    def edit(m):
        entry(m, "layers.0.self_attn.q_proj.weight")["n_bits"] = n_bits

    message = load_error(tampered(artifact, tmp_path, edit))
    assert MANIFEST_NAME in message and "model.layers.0.self_attn.q_proj.weight" in message
    assert "need exactly" in message


def test_an_added_alias_is_refused(artifact, tmp_path):
    def edit(m):
        m["aliases"]["model.norm.weight"] = "model.layers.0.input_layernorm.weight"

    message = load_error(tampered(artifact, tmp_path, edit))
    assert MANIFEST_NAME in message and "model.norm.weight" in message


def test_a_packed_stream_too_long_is_refused(artifact, tmp_path):
    key = "model.layers.0.mlp.up_proj.parametrizations.weight.0.indices"

    def grow(state):
        state[key] = torch.cat([state[key], torch.zeros(1000, dtype=torch.uint8)])

    message = load_error(tampered(artifact, tmp_path, tensors=grow))
    assert "model.layers.0.mlp.up_proj.weight" in message and "need exactly" in message


def test_a_wrong_lut_shape_is_refused(artifact, tmp_path):
    key = "model.layers.1.mlp.down_proj.parametrizations.weight.0.centroids"

    def reshape(state):
        state[key] = state[key][:, :8].contiguous()

    message = load_error(tampered(artifact, tmp_path, tensors=reshape))
    assert "model.layers.1.mlp.down_proj.weight" in message and "LUT shape" in message


def test_a_truncated_file_is_refused(artifact, tmp_path):
    target = tampered(artifact, tmp_path)
    data = (target / PACKED_NAME).read_bytes()
    (target / PACKED_NAME).write_bytes(data[: len(data) // 2])
    assert PACKED_NAME in load_error(target)


def test_a_flipped_byte_fails_its_checksum(artifact, tmp_path):
    target = tampered(artifact, tmp_path)
    touched = overwrite_inside(target / PACKED_NAME, lambda k: k.endswith(".centroids"), size=1)
    message = load_error(target)
    assert PACKED_NAME in message and "checksum" in message
    assert any(name in message for name in touched)


def test_an_artifact_without_checksums_loads_with_one_warning(artifact, tmp_path):
    def edit(m):
        del m["checksums"], m["example_inputs_checksums"]

    target = tampered(artifact, tmp_path, edit)
    with pytest.warns(UserWarning, match="written before per-tensor checksums"):
        load_palettized(target, lambda: tiny_llama(tied=True))


def test_lightning_checksums_catch_damage_that_stays_in_range(tmp_path):
    """Packed 4-bit indices changed to other valid indices: finite, in range, still refused."""
    root = tmp_path / "frozen"
    lightning_trainer(root, [PalettizationCallback("w4", export_formats=(), training="frozen"),
                             ModelCheckpoint(dirpath=root, filename="last")],
                      enable_checkpointing=True).fit(digits(), DigitsDataModule())
    checkpoint = root / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["callbacks"]
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    key = "net.2.parametrizations.weight.0.packed_indices"
    packed = state[key]
    raw = bytearray(checkpoint.read_bytes())
    start = raw.find(packed[:32].numpy().tobytes())
    assert start > 0
    raw[start:start + packed.numel()] = bytes((packed ^ 0x11).tolist())
    checkpoint.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=re.escape(f"is damaged: {key} differs")) as e:
        lightning_trainer(tmp_path, [PalettizationCallback("w4", export_formats=(),
                                                           training="frozen")],
                          max_epochs=2).fit(digits(), DigitsDataModule(), ckpt_path=checkpoint)
    one_line(e)
