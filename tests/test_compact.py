"""The compact base (``palettize.compact``): frozen/lut weights drop their dense weight after
k-means; export, resume, DDP, the report and dtypes keep working (real Lightning + HF Trainers)."""

from __future__ import annotations

import json
import socket

import lightning.pytorch as pl
import pytest
import torch
from helpers import KMeansCounter, TokenDataset, palettized_state_hash, run_python, tiny_llama
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Trainer, TrainerCallback, TrainingArguments

from coreai_palettize_plugins import Palettization, load_palettized
from coreai_palettize_plugins import _coreai_compat as compat
from coreai_palettize_plugins.engine.compact import compact_state_bytes
from coreai_palettize_plugins.export.artifact import pack_indices
from coreai_palettize_plugins.export.writer import PACKED_NAME
from coreai_palettize_plugins.hf import PalettizationTrainerCallback
from coreai_palettize_plugins.lightning import PalettizationCallback
from coreai_palettize_plugins.settings.schema import PalettizeConfigError

X = torch.arange(32).reshape(2, 16) * 7 % 256


def logits(model: torch.nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x).logits


def compact_count(engine: Palettization) -> int:
    return sum(compat.is_compact(t.fake) for t in engine.tensors())


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_packing_is_the_artifacts_and_round_trips(width):
    values = torch.randint(0, 2**width, (37, 5), dtype=torch.uint8)
    packed = compat.pack_bits(values, width)
    assert torch.equal(packed, pack_indices(values, width))
    assert torch.equal(compat.unpack_bits(packed, width, values.numel()), values.reshape(-1))
    assert [compat.storage_width(n) for n in (1, 2, 3, 4, 6, 8)] == [1, 2, 4, 4, 8, 8]


@pytest.mark.parametrize("training", ["frozen", "lut"])
def test_compact_model_equals_dense_one_and_holds_less(training):
    models, engines = {}, {}
    for compact in (False, True):
        models[compact] = tiny_llama(tied=True)
        engines[compact] = Palettization("w4", overrides={"linear": "w2"}, training=training,
                                         compact=compact)
        engines[compact].prepare(models[compact], X[:1])
    assert compact_count(engines[True]) == 15 and compact_count(engines[False]) == 0
    assert torch.equal(logits(models[True]), logits(models[False]))
    assert all(t.parameter.numel() == 0 for t in engines[True].tensors())
    assert compact_state_bytes(models[True]) < 0.15 * compact_state_bytes(models[False])
    assert engines[True].report().to_dict() == engines[False].report().to_dict()
    # the hand-built compact state loads into a fresh compact model (strict) without k-means
    fresh = tiny_llama(tied=True, seed=3)
    Palettization("w4", overrides={"linear": "w2"}, training=training).prepare(
        fresh, X[:1], state_dict=models[True].state_dict())
    assert torch.equal(logits(fresh), logits(models[True]))


def test_dense_checkpoint_resumes_compact_and_compact_one_refuses_compact_false(monkeypatch):
    dense = tiny_llama(tied=True)
    Palettization("w4", training="frozen", compact=False).prepare(dense, X[:1])
    counter = KMeansCounter(monkeypatch)
    resumed = tiny_llama(tied=True, seed=1)
    engine = Palettization("w4", training="frozen")
    engine.prepare(resumed, X[:1], state_dict=dense.state_dict())
    counter = counter.calls
    assert counter == [] and compact_count(engine) == 15
    assert torch.equal(logits(resumed), logits(dense))

    with pytest.raises(PalettizeConfigError, match=r"palettize\.compact: .*compact=true"):
        Palettization("w4", training="frozen", compact=False).prepare(
            tiny_llama(tied=True), X[:1], state_dict=resumed.state_dict())
    with pytest.raises(PalettizeConfigError, match=r"palettize\.compact: must be true or false"):
        Palettization("w4", compact="yes")


def test_ste_keeps_its_dense_weight():
    model = tiny_llama()
    engine = Palettization("w4", training="ste")
    engine.prepare(model, X[:1])
    assert compact_count(engine) == 0 and all(t.parameter.numel() for t in engine.tensors())


# ---------------------------------------------------------------------------- Lightning


class LlamaLM(pl.LightningModule):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = tiny_llama(tied=True).to(dtype)
        self.example_input_array = X[:1]

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(TokenDataset(blocks=8), batch_size=4)  # 2 steps/epoch


def lightning_fit(out, training, *, ckpt_path=None, formats=("torch",)):
    callback = PalettizationCallback("w4", training=training, export_dir=out / "export",
                                     export_formats=list(formats))
    pl.seed_everything(0, verbose=False)
    module = LlamaLM()
    trainer = pl.Trainer(default_root_dir=out, max_epochs=2, accelerator="cpu",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback, ModelCheckpoint(dirpath=out / "ckpt",
                                                              every_n_epochs=1, save_top_k=-1)])
    trainer.fit(module, ckpt_path=ckpt_path)
    return callback, module


@pytest.mark.slow
@pytest.mark.parametrize("training", ["frozen", "lut"])
def test_lightning_export_is_exact_and_resume_restores_without_kmeans(tmp_path, monkeypatch,
                                                                      training):
    formats = ("torch", "coreai") if training == "frozen" else ("torch",)
    full, full_module = lightning_fit(tmp_path / "full", training, formats=formats)
    assert compact_count(full.engine) == 15
    result = full.export_result
    assert result.errors == {} and result.rebuilt_max_abs_diff == 0.0
    if "coreai" in formats:
        assert result.coreai_graph_max_abs_diff == 0.0
    loaded = load_palettized(tmp_path / "full/export", LlamaLM)
    assert torch.equal(logits(loaded.model), logits(full_module.model))

    counter = KMeansCounter(monkeypatch)
    resumed, resumed_module = lightning_fit(tmp_path / "resumed", training,
                                            ckpt_path=tmp_path / "full/ckpt/epoch=0-step=2.ckpt")
    assert counter.calls == [] and resumed.engine.restored and compact_count(resumed.engine) == 15
    assert palettized_state_hash(resumed_module) == palettized_state_hash(full_module)
    assert torch.equal(logits(resumed_module.model), logits(full_module.model))
    assert ((tmp_path / "full/export" / PACKED_NAME).read_bytes()
            == (tmp_path / "resumed/export" / PACKED_NAME).read_bytes())


# ---------------------------------------------------------------------------- HF + dtypes


class NoFloat32Weights(TorchDispatchMode):
    """Records every op output in float32 shaped like a palettized weight."""

    def __init__(self, shapes: set[tuple[int, ...]]) -> None:
        super().__init__()
        self.shapes, self.seen = shapes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float32
                    and tuple(t.shape) in self.shapes):
                self.seen.append((str(func), tuple(t.shape)))
        return out


class StepProbe(TrainerCallback):
    def __init__(self, engine: Palettization) -> None:
        self.engine, self.compact_at = engine, {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.compact_at[state.global_step] = compact_count(self.engine)


def hf_args(out, **kwargs) -> TrainingArguments:
    options = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=2,
                   report_to=[], use_cpu=True, disable_tqdm=True, seed=0, save_strategy="steps",
                   logging_strategy="no")
    options.update(kwargs)
    return TrainingArguments(str(out), **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", ["frozen", "lut"])
def test_half_models_keep_their_dtype_and_never_upcast_a_weight(tmp_path, training, dtype):
    model = tiny_llama(tied=True).to(dtype)
    callback = PalettizationTrainerCallback("w4", training=training, export_formats=["torch"])
    trainer = Trainer(model=model, args=hf_args(tmp_path, max_steps=2, save_strategy="no"),
                      train_dataset=TokenDataset(), callbacks=[callback])
    trainer.train()
    engine = callback.engine
    assert compact_count(engine) == 15
    floats = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    assert {t.dtype for t in floats} == {dtype}
    for t in engine.tensors():
        assert t.fake.rebuild().dtype == dtype and t.original.dtype == dtype
    shapes = {tuple(t.original.shape) for t in engine.tensors()}
    model.train()
    with NoFloat32Weights(shapes) as mode:
        model(input_ids=X, labels=X).loss.backward()
    assert mode.seen == []
    assert callback.export_result.errors == {}
    assert callback.export_result.rebuilt_max_abs_diff == 0.0


@pytest.mark.slow
def test_hf_warmup_compacts_when_palettization_turns_on_and_resumes(tmp_path, monkeypatch):
    def run(out, resume=None):
        callback = PalettizationTrainerCallback("w4", training="frozen", export_formats=["torch"],
                                                schedule={"start_step": 2})
        probe = StepProbe(callback.engine)
        trainer = Trainer(model=tiny_llama(tied=True), args=hf_args(out), callbacks=[callback, probe],
                          train_dataset=TokenDataset())
        trainer.train(resume_from_checkpoint=resume)
        return callback, probe, trainer

    full, probe, trainer = run(tmp_path / "full")
    assert probe.compact_at == {0: 0, 1: 0, 2: 15, 3: 15}
    assert full.export_result.rebuilt_max_abs_diff == 0.0
    loaded = load_palettized(tmp_path / "full/palettized", lambda: tiny_llama(tied=True, seed=4))
    assert torch.equal(logits(loaded), logits(trainer.model))

    counter = KMeansCounter(monkeypatch)          # checkpoint-2: palettization just turned on
    resumed, _, resumed_trainer = run(tmp_path / "resumed", str(tmp_path / "full/checkpoint-2"))
    assert compact_count(resumed.engine) == 15 and resumed.engine.restored
    assert len(counter.calls) == 0
    assert torch.equal(logits(resumed_trainer.model), logits(trainer.model))


# ---------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("training", ["frozen", "lut"])
def test_two_rank_ddp_gives_identical_compact_models(tmp_path, training):
    from pathlib import Path

    script = Path(__file__).resolve().parent / "ddp_scripts" / "compact_ddp.py"
    result = run_python("-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", str(script), "--out", str(tmp_path),
                        "--training", training, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = tiny_llama(tied=True)
    Palettization("w4", training=training).prepare(single, single.dummy_inputs["input_ids"][:1])
    for facts in ranks:
        assert facts["compact_at_begin"] == facts["compact_at_end"] == 15
        assert facts["dense_elements_at_begin"] == facts["dense_elements_at_end"] == 0
        assert facts["palettized_hash_at_begin"] == palettized_state_hash(single)
    assert len(ranks[0]["kmeans_at_prepare"]) + len(ranks[1]["kmeans_at_prepare"]) == 15
    assert ranks[0]["state_hash"] == ranks[1]["state_hash"]
    assert ranks[0]["logits_hash"] == ranks[1]["logits_hash"]


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(24, 40)
        self.b = torch.nn.Linear(40, 12)
        self.conv = torch.nn.Conv1d(12, 8, 3)

    def forward(self, x):
        return self.conv(self.b(self.a(x)).transpose(1, 2))


@pytest.mark.parametrize("spec", [
    {"n_bits": 3, "granularity": "per_grouped_channel", "axis": 0, "group_size": 4},
    {"n_bits": 2, "granularity": "per_grouped_channel", "axis": 1, "group_size": 4},
    {"n_bits": 6, "granularity": "per_tensor", "enable_per_channel_scale": True},
    {"n_bits": 1, "granularity": "per_tensor"},
    {"n_bits": 4, "granularity": "per_grouped_channel", "axis": 1, "group_size": 2},
    {"n_bits": 2, "granularity": "per_grouped_channel", "axis": 1, "group_size": 2},  # 8-bit held
])
@pytest.mark.parametrize("training", ["frozen", "lut"])
def test_every_layout_rebuilds_exactly_and_trains(spec, training):
    x = torch.randn(2, 5, 24)
    models, engines = {}, {}
    for compact in (False, True):
        models[compact] = Mlp()
        engines[compact] = Palettization(
            {"preset": spec}, overrides={"conv1d": spec}, training=training, compact=compact)
        engines[compact].prepare(models[compact], x)
    assert compact_count(engines[True]) == 3
    width = compat.storage_width(spec["n_bits"])
    if spec.get("axis") == 1 and spec["group_size"] % (8 // width):
        width = 8  # a byte would straddle two LUTs: held at 8 bits
    for t in engines[True].tensors():
        assert t.fake.compact_width == width
        assert t.fake.packed_indices.numel() == -(-t.original.numel() * width // 8)
    with torch.no_grad():
        assert torch.equal(models[True](x), models[False](x))
    for t, dense in zip(engines[True].tensors(), engines[False].tensors()):
        assert torch.equal(t.fake.indices, dense.fake.indices)      # unpacked == coreai-opt's
    # one training step of each: the same gradients reach the same parameters
    for compact, model in models.items():
        engines[compact].start_training()
        model(x).square().mean().backward()
    grads = {c: {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
             for c, m in models.items()}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name])
