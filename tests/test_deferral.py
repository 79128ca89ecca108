"""No lazy k-means: between attach and the plugin's own clustering (or a verified restore), reading
a palettized weight returns the dense Parameter itself and never runs k-means."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
from helpers import KMeansCounter, TokenDataset, palettized_state_hash, tiny_llama
from transformers import Trainer, TrainingArguments

from coreai_palettize_plugins import Palettization
from coreai_palettize_plugins import _coreai_compat as compat
from coreai_palettize_plugins.demo.digits import DigitsCNN, DigitsDataModule
from coreai_palettize_plugins.hf import PalettizationTrainerCallback
from coreai_palettize_plugins.lightning import PalettizationCallback


def read_every_weight(model: nn.Module) -> dict[str, torch.Tensor]:
    """What user code does: ``m.weight`` of every module that has one."""
    return {name: m.weight for name, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)}


def originals(model: nn.Module) -> dict[str, torch.Tensor]:
    return {t.name: t.original for t in compat.fake_palettized_tensors(model)}


# ------------------------------------------------------------------------------------ engine


def test_reads_between_attach_and_cluster_return_the_parameter_and_run_no_kmeans(monkeypatch):
    reference = tiny_llama()
    example = reference.dummy_inputs["input_ids"][:1]
    Palettization("w4").prepare(reference, example)
    counter = KMeansCounter(monkeypatch)

    model, engine = tiny_llama(), Palettization("w4")
    engine.attach(model, example)
    tensors = engine.tensors()
    assert len(tensors) == 15 and compat.deferred(tensors)      # listed while deferred
    for t in tensors:
        assert getattr(t.module, t.attr) is t.original         # the Parameter itself
    model(example)                                             # a forward: dense, no k-means
    assert counter.calls == []
    with pytest.raises(RuntimeError, match=r"15 weight\(s\) are not clustered yet .*ensure_clustered"):
        engine.report()

    engine.ensure_clustered()
    assert len(counter.calls) == 15 and not compat.deferred(engine.tensors())
    assert palettized_state_hash(model) == palettized_state_hash(reference)
    assert engine.report().layers                              # report works once clustered


def test_a_partial_read_no_longer_looks_like_a_bad_checkpoint(monkeypatch):
    """findings q4c: reading one weight used to cluster it lazily, so ensure_clustered took the
    model for a partial checkpoint load ("the loaded checkpoint has no palettized state")."""
    reference = tiny_llama()
    example = reference.dummy_inputs["input_ids"][:1]
    Palettization("w4").prepare(reference, example)
    model, engine = tiny_llama(), Palettization("w4")
    engine.attach(model, example)
    _ = model.lm_head.weight                                   # a tie helper, a summary, ...
    counter = KMeansCounter(monkeypatch)
    engine.ensure_clustered()
    assert len(counter.calls) == 15 and not engine.restored
    assert palettized_state_hash(model) == palettized_state_hash(reference)


def test_restore_into_a_deferred_model_is_verified_and_exact_without_kmeans(monkeypatch):
    reference = tiny_llama()
    example = reference.dummy_inputs["input_ids"][:1]
    Palettization("w4").prepare(reference, example)
    counter = KMeansCounter(monkeypatch)
    model, engine = tiny_llama(seed=1), Palettization("w4")
    engine.attach(model, example)
    read_every_weight(model)
    model.load_state_dict(reference.state_dict())
    engine.ensure_clustered(expect_restored=True)
    assert counter.calls == [] and engine.restored and not compat.deferred(engine.tensors())
    reference.eval(), model.eval()
    assert torch.equal(model(example).logits, reference(example).logits)


def test_validate_for_dry_run_neither_defers_nor_touches_the_model():
    model = tiny_llama()
    Palettization("w4").validate_for(model, model.dummy_inputs["input_ids"][:1])
    assert compat.fake_palettized_tensors(model) == []


# ------------------------------------------------------------------------------------ Lightning


class GroupsFromWeights(DigitsCNN):
    """Reads every weight in ``setup`` and builds nanoGPT-style weight-decay groups from
    ``m.weight`` in ``configure_optimizers`` (both run after the callback attached, before
    ``on_fit_start`` clusters); ``reads=False`` builds the same groups from parameter names."""

    def __init__(self, reads: bool) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.reads = reads
        self.kmeans_seen: dict[str, int] = {}
        self.counter: KMeansCounter | None = None

    def _seen(self, where: str) -> None:
        if self.counter is not None:
            self.kmeans_seen[where] = len(self.counter.calls)

    def setup(self, stage: str) -> None:
        if self.reads:
            weights = read_every_weight(self)
            self.dense_reads = all(weights[n.rsplit(".", 1)[0]] is p
                                   for n, p in originals(self).items())
        self._seen("setup")

    def configure_optimizers(self):
        if self.reads:
            decay = [m.weight for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        else:
            decay = [p for n, p in self.named_parameters() if n.endswith((".weight", ".original"))]
        chosen = {id(p) for p in decay}
        rest = [p for p in self.parameters() if id(p) not in chosen]
        self._seen("configure_optimizers")
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                  {"params": rest, "weight_decay": 0.0}], lr=1e-3)

    def on_fit_start(self) -> None:  # LightningModule hooks run after the callbacks'
        self._seen("on_fit_start")


def fit_groups(tmp_path, reads: bool, counter: KMeansCounter | None = None):
    pl.seed_everything(0, verbose=False)
    net = GroupsFromWeights(reads)
    net.counter = counter
    callback = PalettizationCallback("w4", overrides={"linear": "w8"}, training="ste",
                                     export_formats=())
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=4,
                         limit_val_batches=1, enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=[callback])
    trainer.fit(net, DigitsDataModule())
    return net, trainer


def test_lightning_reads_and_weight_groups_before_fit_start_are_harmless(tmp_path, monkeypatch):
    counter = KMeansCounter(monkeypatch)
    net, trainer = fit_groups(tmp_path / "reads", reads=True, counter=counter)
    assert net.kmeans_seen == {"setup": 0, "configure_optimizers": 0, "on_fit_start": 4}
    assert net.dense_reads                                     # m.weight was the Parameter
    decay = trainer.optimizers[0].param_groups[0]["params"]
    assert len(decay) == 4
    assert all(any(p is q for q in decay) for p in originals(net).values())   # the real ones
    assert len(counter.calls) == 4

    plain, _ = fit_groups(tmp_path / "plain", reads=False)
    assert palettized_state_hash(net) == palettized_state_hash(plain)
    for (name, a), b in zip(net.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name                         # the same training as usual


# ------------------------------------------------------------------------------------ HF


def train_llama(out, reads: bool, monkeypatch=None):
    model = tiny_llama()
    callback = PalettizationTrainerCallback("w4", export_formats=())
    args = TrainingArguments(str(out), max_steps=2, per_device_train_batch_size=8,
                             learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True,
                             seed=0, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback])
    counter = KMeansCounter(monkeypatch) if monkeypatch is not None else None
    if reads:
        weights = read_every_weight(model)
        assert all(weights[n.rsplit(".", 1)[0]] is p for n, p in originals(model).items())
        assert counter.calls == []                             # reading must not cluster
    trainer.train()
    return model, counter


def test_hf_reads_between_trainer_construction_and_train_are_harmless(tmp_path, monkeypatch):
    model, counter = train_llama(tmp_path / "reads", reads=True, monkeypatch=monkeypatch)
    assert len(counter.calls) == 15                            # once each, in on_train_begin
    plain, _ = train_llama(tmp_path / "plain", reads=False)
    assert palettized_state_hash(model) == palettized_state_hash(plain)
