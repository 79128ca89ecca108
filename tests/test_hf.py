"""PalettizationTrainerCallback with a real Hugging Face Trainer and a tiny Llama (CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import KMeansCounter, TokenDataset, palettized_state_hash, tiny_llama
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from coreai_palettize_plugins import load_palettized
from coreai_palettize_plugins.export.writer import AIMODEL_NAME, PACKED_NAME
from coreai_palettize_plugins.hf import PalettizationTrainerCallback


def arguments(out, **kwargs) -> TrainingArguments:
    options = dict(max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3, save_steps=3,
                   logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                   save_strategy="steps")
    options.update(kwargs)
    return TrainingArguments(str(out), **options)


class RecordLogs(TrainerCallback):
    """Stands in for a report_to backend: records every on_log payload."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_train_export_reload_and_metrics(tmp_path, monkeypatch):
    counter = KMeansCounter(monkeypatch)
    model, data = tiny_llama(), TokenDataset()
    callback = PalettizationTrainerCallback("w4", overrides={"linear": "w8"},
                                            modules={"lm_head": "w4"})
    backend = RecordLogs()
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=data,
                      callbacks=[callback, backend])
    assert len(callback.engine.tensors()) == 15 and counter.calls == []   # structure only
    assert callback.attach_to_trainer(trainer) is callback   # optional, harmless: Trainer.log
    trainer.train()
    # The export traced one train-dataset sample (through the data collator).
    assert torch.equal(callback.engine.example_inputs[0], data[0]["input_ids"][None])

    assert len(counter.calls) == 15
    assert callback.engine.step == trainer.state.global_step == 6
    assert callback.export_result.errors == {}
    export = tmp_path / "palettized"
    assert (export / AIMODEL_NAME / "main.mlirb").is_file()
    assert (export / "config.json").is_file()
    loaded = load_palettized(export)                     # no code: built from config.json
    x = torch.randint(0, 256, (2, 16))
    model.eval()
    assert (loaded(x).logits - model(x).logits).abs().max().item() == 0.0
    assert type(loaded).__name__ == "LlamaForCausalLM"

    logged = [entry for entry in backend.logs if "palettize/bits_per_weight" in entry]
    assert len(logged) == 2 and logged[0]["palettize/compression_ratio"] > 2.5
    assert any("palettize/bits_per_weight" in h for h in trainer.state.log_history)


@pytest.mark.parametrize(("tied", "training"), [(False, "frozen"), (True, "frozen"), (True, "lut")])
def test_resume_is_byte_identical_without_kmeans(tmp_path, monkeypatch, tied, training):
    def run(out, resume=None):
        callback = PalettizationTrainerCallback("w4", export_formats=["torch"], training=training)
        trainer = Trainer(model=tiny_llama(tied), args=arguments(out), train_dataset=TokenDataset(),
                          callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return callback, trainer

    _, full_trainer = run(tmp_path / "full")
    if training == "lut":  # created in on_init_end, so the optimizer built in train() has them
        optimized = {id(p) for g in full_trainer.optimizer.param_groups for p in g["params"]}
        luts = [p for n, p in full_trainer.model.named_parameters() if n.endswith("trainable_lut")]
        assert len(luts) == 15 and all(id(p) in optimized for p in luts)
    if tied:  # the tied lm_head/embedding is stored once in HF checkpoints
        keys = load_file(str(tmp_path / "full/checkpoint-3/model.safetensors"))
        # (a compact weight's emptied dense ``original`` is a zero-size tensor HF may keep)
        assert not [k for k in keys if k.startswith("lm_head.") and keys[k].numel()]
        assert model_has_shared_palettized_weight(full_trainer.model)
    counter = KMeansCounter(monkeypatch)
    _, resumed_trainer = run(tmp_path / "resumed", resume=str(tmp_path / "full/checkpoint-3"))
    assert counter.calls == []
    assert palettized_state_hash(resumed_trainer.model) == palettized_state_hash(full_trainer.model)
    first = (tmp_path / "full/palettized" / PACKED_NAME).read_bytes()
    second = (tmp_path / "resumed/palettized" / PACKED_NAME).read_bytes()
    assert first == second


def model_has_shared_palettized_weight(model) -> bool:
    lm_head = model.lm_head.parametrizations.weight
    embed = model.model.embed_tokens.parametrizations.weight
    return lm_head.original is embed.original and lm_head[0] is embed[0]


def test_partial_checkpoint_fails_loudly(tmp_path):
    callback = PalettizationTrainerCallback("w4", export_formats=(), training="frozen")
    Trainer(model=tiny_llama(), args=arguments(tmp_path / "a", max_steps=3),
            train_dataset=TokenDataset(), callbacks=[callback]).train()
    weights = tmp_path / "a/checkpoint-3/model.safetensors"
    state = load_file(str(weights))
    del state["model.layers.1.mlp.down_proj.parametrizations.weight.0.centroids"]
    del state["model.layers.0.self_attn.q_proj.parametrizations.weight.0.packed_indices"]
    save_file(state, str(weights), metadata={"format": "pt"})

    again = PalettizationTrainerCallback("w4", export_formats=(), training="frozen")
    trainer = Trainer(model=tiny_llama(), args=arguments(tmp_path / "b"),
                      train_dataset=TokenDataset(), callbacks=[again])
    with pytest.raises(RuntimeError, match=r"no palettized state .* for 2 weight\(s\): "
                       r"model\.layers\.0\.self_attn\.q_proj\.weight, "
                       r"model\.layers\.1\.mlp\.down_proj\.weight"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a/checkpoint-3"))


class RecordSchedule(TrainerCallback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, bool]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        fake = model.model.layers[0].mlp.up_proj.parametrizations.weight[0]
        self.seen.append((state.global_step, bool(fake.fake_palett_enabled[0])))


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    callback = PalettizationTrainerCallback("w4", export_formats=(), schedule={"start_step": 3})
    record = RecordSchedule()
    trainer = Trainer(model=tiny_llama(), train_dataset=TokenDataset(),
                      args=arguments(tmp_path, gradient_accumulation_steps=4, max_steps=5,
                                     per_device_train_batch_size=2, save_strategy="no"),
                      callbacks=[callback, record])
    trainer.train()
    assert callback.engine.step == 5
    assert [step for step, _ in record.seen] == [1, 2, 3, 4, 5]      # 20 micro-batches
    assert [enabled for _, enabled in record.seen] == [False, False, True, True, True]


def test_metrics_reach_report_to_backends_with_the_callback_alone(tmp_path, caplog):
    """Reporting callbacks come before user callbacks in the Trainer's handler, so the metrics
    must be their own on_log event, as Trainer.log makes it: a real report_to backend
    (TensorBoard-like recorder placed first) sees them, with no extra call and no warning."""
    backend, callback = RecordLogs(), PalettizationTrainerCallback("w8", export_formats=())
    trainer = Trainer(model=tiny_llama(), args=arguments(tmp_path, max_steps=2, save_strategy="no"),
                      train_dataset=TokenDataset(), callbacks=[backend, callback])
    assert trainer.callback_handler.callbacks.index(backend) < \
        trainer.callback_handler.callbacks.index(callback)
    with caplog.at_level("WARNING", logger="coreai_palettize_plugins.hf"):
        trainer.train()
    logged = [entry for entry in backend.logs if "palettize/bits_per_weight" in entry]
    assert len(logged) == 1 and logged[0]["palettize/compression_ratio"] > 1.5
    history = [h for h in trainer.state.log_history if "palettize/bits_per_weight" in h]
    assert len(history) == 1 and history[0]["step"] == 0
    assert [r.getMessage() for r in caplog.records] == []


def test_fsdp1_and_what_fsdp2_cannot_run_are_refused_from_the_arguments(tmp_path):
    """FSDP version 1 is refused; accelerate's FSDP2 (transformers' default version) runs with
    ``ste`` and builds the structure with placeholder LUTs a sharded checkpoint loads into
    (the run itself needs a GPU: accelerate takes no FSDP on the CPU); ``frozen`` under FSDP2
    is refused naming the supported settings."""
    from coreai_palettize_plugins import PalettizeConfigError

    callback = PalettizationTrainerCallback("w4")
    args = SimpleNamespace(fsdp="full_shard", fsdp_config={"version": 1}, deepspeed=None,
                           world_size=2, ddp_find_unused_parameters=None, output_dir=str(tmp_path))
    with pytest.raises(PalettizeConfigError, match=r"^palettize: FSDP \(fsdp_config version 1\) "
                       r"is not supported.*use FSDP2"):
        callback.on_init_end(args, None, None, model=tiny_llama())
    assert not callback.engine.attached
    args.fsdp_config = {}                                            # version 2, the default
    frozen = PalettizationTrainerCallback("w4", training="frozen")
    with pytest.raises(PalettizeConfigError, match=r"accelerate FSDP2.*supported: "
                       r"palettize\.training=ste"):
        frozen.on_init_end(args, None, None, model=tiny_llama())
    callback.on_init_end(args, None, None, model=tiny_llama())
    assert callback.engine.attached and not callback.engine.clustered
    assert all(t.fake.centroids is not None and not t.initialized
               for t in callback.engine.tensors())
    warm_up = PalettizationTrainerCallback("w4", schedule={"start_step": 3}, training="frozen")
    args = SimpleNamespace(fsdp=None, deepspeed=None, world_size=2, ddp_find_unused_parameters=False)
    with pytest.raises(PalettizeConfigError, match="ddp_find_unused_parameters=True"):
        warm_up.on_init_end(args, None, None, model=tiny_llama())


def test_callback_added_after_init_via_attach_to_trainer(tmp_path):
    trainer = Trainer(model=tiny_llama(), args=arguments(tmp_path, max_steps=2, save_strategy="no"),
                      train_dataset=TokenDataset())
    callback = PalettizationTrainerCallback("w8", export_formats=())
    callback.attach_to_trainer(trainer)
    assert callback in trainer.callback_handler.callbacks
    assert callback.engine.attached and not callback.engine.clustered
    trainer.train()
    assert callback.engine.clustered and callback.engine.step == 2


class Streamed(torch.utils.data.IterableDataset):
    """A train dataset without ``__getitem__`` (streaming)."""

    def __iter__(self):
        data = TokenDataset()
        return (data[i] for i in range(len(data)))


def test_an_unindexable_dataset_exports_the_structure_inputs_and_says_so(tmp_path, caplog):
    callback = PalettizationTrainerCallback("w8", export_formats=["torch"])
    trainer = Trainer(model=tiny_llama(), train_dataset=Streamed(), callbacks=[callback],
                      args=arguments(tmp_path, max_steps=2, save_strategy="no"))
    with caplog.at_level("WARNING", logger="coreai_palettize_plugins.hf"):
        trainer.train()
    assert any("cannot be indexed" in r.getMessage() for r in caplog.records)
    assert set(callback.export_result.written) == {"torch"}
