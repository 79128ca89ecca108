"""The straight-through strategy assigns once per dense-weight change (issue #10, item 2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import example_image, mixed_net

from coreai_palettize_plugins import Palettization
from coreai_palettize_plugins.core import strategies

PRESET = {"n_bits": 2, "group_size": 8}
ACCUMULATE, STEPS = 4, 3


def counting(monkeypatch) -> list[int]:
    """Count calls of ``strategies.assign_nearest`` (what both the cached and the uncached
    forward call to assign)."""
    calls = [0]
    original = strategies.assign_nearest

    def assign(module, weight):
        calls[0] += 1
        return original(module, weight)

    monkeypatch.setattr(strategies, "assign_nearest", assign)
    return calls


def accumulate(monkeypatch, *, cache: bool, training="ste", fused: bool = False):
    """``STEPS`` optimizer steps of ``ACCUMULATE`` micro-batches, an eval forward and a
    no-grad training-mode forward after each; returns outputs, assignments per step, state."""
    monkeypatch.setenv(strategies.CACHE_ENV, "1" if cache else "0")
    calls = counting(monkeypatch)
    model = mixed_net()
    engine = Palettization({"preset": PRESET, "training": training})
    engine.prepare(model, example_image(1))
    x = example_image(4 * ACCUMULATE)
    y = torch.randint(0, 16, (4 * ACCUMULATE,), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                 fused=fused)    # fused: parameters' versions do not change
    engine.start_training(0)
    outputs, per_step = [], []
    for step in range(1, STEPS + 1):
        before = calls[0]
        for xb, yb in zip(x.chunk(ACCUMULATE), y.chunk(ACCUMULATE)):
            out = model(xb)
            (F.cross_entropy(out, yb) / ACCUMULATE).backward()
            outputs.append(out.detach())
        optimizer.step()
        optimizer.zero_grad()
        engine.sync_step(step)
        model.eval()
        with torch.no_grad():
            outputs.append(model(x))                       # eval: assigns, or reuses
        model.train()
        with torch.no_grad():
            outputs.append(model(x))                       # training mode, no gradient
        per_step.append(calls[0] - before)
    engine.stop_training()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return outputs, per_step, state, len(engine.tensors())


@pytest.mark.parametrize("fused", [False, True], ids=["adam", "fused-adam"])
@pytest.mark.parametrize("training", ["ste", {"type": "ste", "lut_update_every": 2}], ids=str)
def test_one_assignment_per_optimizer_step_and_the_same_training(monkeypatch, training, fused):
    cached, per_step, state, n = accumulate(monkeypatch, cache=True, training=training,
                                            fused=fused)
    uncached, per_step_uncached, state_uncached, _ = accumulate(monkeypatch, cache=False,
                                                                training=training, fused=fused)
    # Step 1's first micro-batch assigns, the other 3 reuse it; after each optimizer step the
    # eval forward assigns the new weights once, and the no-grad forward and the next step's
    # micro-batches reuse that: exactly one assignment per weight per optimizer step (plus the
    # initial one of step 1).
    assert per_step == [2 * n] + [n] * (STEPS - 1)          # step 1 also covers after-step 1
    assert per_step_uncached == [(ACCUMULATE + 2) * n] * STEPS
    assert len(cached) == len(uncached)
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached))
    assert state.keys() == state_uncached.keys()
    assert all(torch.equal(state[k], state_uncached[k]) for k in state)


def prepared(training="ste"):
    model = mixed_net()
    engine = Palettization({"preset": PRESET, "training": training})
    engine.prepare(model, example_image(1))
    engine.start_training(0)
    return engine, engine.tensors()[0]


def fresh(t) -> torch.Tensor:
    return strategies.assign_nearest(t.fake, t.original).clone()


def test_cache_reuses_until_the_weight_changes_in_place(monkeypatch):
    engine, t = prepared()
    strategy = t.fake._training_strategy
    calls = counting(monkeypatch)
    first = strategy.train_forward(t.fake, t.original)
    again = strategy.train_forward(t.fake, t.original)
    assert calls[0] == 1 and torch.equal(first, again)
    assert first.requires_grad and first.grad_fn is not None
    cached = t.fake.__dict__[strategies._CACHE_ATTR][1]
    assert not cached.requires_grad and cached.grad_fn is None      # no graph across steps
    with torch.no_grad():
        t.original.add_(0.05 * torch.randn_like(t.original))       # an optimizer-like update
    moved = strategy.train_forward(t.fake, t.original)
    assert calls[0] == 2
    assert torch.equal(moved, fresh(t)) and t.fake.indices is None     # nothing stored
    assert not torch.equal(moved, first)
    engine.stop_training()
    assert strategies._CACHE_ATTR not in t.fake.__dict__              # freed after training


def test_cache_invalidates_after_a_lloyd_lut_update(monkeypatch):
    engine, t = prepared({"type": "ste", "lut_update_every": 1})
    strategy = t.fake._training_strategy
    with torch.no_grad():
        t.original.add_(0.1 * torch.randn_like(t.original))        # so the Lloyd step moves
    before = strategy.train_forward(t.fake, t.original)
    centroids = t.fake.centroids.clone()
    calls = counting(monkeypatch)
    engine.sync_step(1)                                 # Lloyd step: centroids move in place
    assert not torch.equal(t.fake.centroids, centroids)
    after = strategy.train_forward(t.fake, t.original)
    assert calls[0] == 1
    assert torch.equal(after, fresh(t)) and not torch.equal(after, before)
    engine.stop_training()


def test_cache_invalidates_when_new_centroids_replace_the_old(monkeypatch):
    engine, t = prepared()
    strategy = t.fake._training_strategy
    strategy.train_forward(t.fake, t.original)
    calls = counting(monkeypatch)
    t.fake.centroids = t.fake.centroids.clone() * 1.5               # re-clustering: a new tensor
    assert torch.equal(strategy.train_forward(t.fake, t.original), fresh(t))
    assert calls[0] == 2                                            # the forward, then fresh()
    engine.stop_training()


@pytest.mark.parametrize("clusters", [2, 4, 8, 16])
def test_counting_midpoints_equals_searchsorted(clusters):
    generator = torch.Generator().manual_seed(clusters)
    centroids = torch.randn(5, clusters, 1, generator=generator)
    centroids[0, 1] = centroids[0, 0]                                # a duplicate centroid
    vectors = torch.randn(5, 300, 1, generator=generator)
    order, midpoints = strategies._sorted_midpoints(centroids, vectors.device)
    vectors[:, :clusters - 1, 0] = midpoints                         # exact ties
    vectors[:, -clusters:] = centroids                               # exact centroid values
    expected = order.gather(1, torch.searchsorted(midpoints, vectors[..., 0].contiguous()))
    assert torch.equal(strategies.nearest_centroids(centroids, vectors), expected)
    distances = (vectors - centroids.transpose(1, 2)).abs()
    chosen = distances.gather(2, expected.unsqueeze(-1)).squeeze(-1)
    # a nearest centroid (up to the rounding of a midpoint, for the values on one)
    assert torch.all(chosen <= distances.min(dim=2).values + 1e-6)


def model_state_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers, each storage once, plus any tensor a fake keeps in its own
    attributes (caches): what stays resident between optimizer steps."""
    storages = {}
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        tensors += [v for v in vars(module).values() if torch.is_tensor(v)]
        tensors += [x for v in vars(module).values() if isinstance(v, tuple) for x in v
                    if torch.is_tensor(x)]
    for tensor in tensors:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def test_hf_gradient_accumulation_assigns_once_per_optimizer_step_and_stores_no_indices(
        monkeypatch, tmp_path):
    from helpers import TokenDataset, tiny_llama
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from coreai_palettize_plugins import load_palettized
    from coreai_palettize_plugins.hf import PalettizationTrainerCallback

    calls = counting(monkeypatch)
    seen: list[tuple[int, int, int]] = []
    dropped: list[int] = []

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            calls[0] = 0          # after the palettization callback's own begin-of-training work

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            dropped.append(sum(strategies._CACHE_ATTR in vars(t.fake)
                               for t in callback.engine.tensors()))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            tensors = callback.engine.tensors()
            seen.append((calls[0], sum(t.fake.indices is not None for t in tensors),
                         sum(strategies._CACHE_ATTR in vars(t.fake) for t in tensors)))

    model = tiny_llama(tied=True)
    dense_bytes = model_state_bytes(model)
    callback = PalettizationTrainerCallback("w4", training="ste", export_formats=["torch"])
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             gradient_accumulation_steps=ACCUMULATE, learning_rate=1e-3,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                             logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(blocks=24),
                      callbacks=[callback, Record()])
    trainer.train()
    n = len(callback.engine.tensors())
    assert n >= 8
    # One assignment per palettized weight per optimizer step (of 4 micro-batches each), and
    # between steps neither indices nor a cached palettized weight are resident.
    assert [c for c, _, _ in seen] == [n, 2 * n, 3 * n]
    assert [(i, c) for _, i, c in seen] == [(0, 0)] * 3
    assert dropped == [0] * 3          # the cache is freed before the optimizer step runs
    assert model_state_bytes(model) <= 1.05 * dense_bytes
    x = torch.randint(0, 256, (2, 8))
    loaded = load_palettized(tmp_path / "palettized")            # exported from derived indices
    assert torch.equal(loaded(x).logits, model.eval()(x).logits)


def test_checkpoint_report_and_export_get_exact_derived_indices(tmp_path):
    from helpers import tiny_llama

    from coreai_palettize_plugins import load_palettized

    model = tiny_llama(tied=True)
    engine = Palettization({"preset": PRESET, "training": "ste"})
    x = torch.randint(0, 256, (2, 8))
    engine.prepare(model, x)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine.start_training(0)
    for step in (1, 2):
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        engine.after_optimizer_step(step)
    tensors = engine.tensors()
    assert all(t.fake.indices is None for t in tensors)
    state = model.state_dict()
    assert all(t.fake.indices is None for t in tensors)              # derived, not kept
    for t in tensors:
        indices = state[f"{t.state_prefix}0.indices"]
        assert indices.dtype == torch.uint8
        # the indices of the current weights: they rebuild exactly the eval forward's weight
        rebuilt = t.fake._palettize(t.fake.lut, indices, t.original)
        assert torch.equal(rebuilt, strategies.assign_nearest(t.fake, t.original))
    for alias, source in engine.tied.items():                       # one tensor for a tie
        assert state[f"{alias}0.indices"] is state[f"{source}0.indices"]
    engine.stop_training()
    report = engine.report()                  # SQNR of the weights the derived indices give
    assert [layer.name for layer in report.layers] == [t.name for t in tensors]
    assert all(layer.sqnr_db > 0 for layer in report.layers)
    model.eval()
    expected = model(x).logits
    resumed = tiny_llama(tied=True, seed=1)
    Palettization({"preset": PRESET, "training": "ste"}).prepare(resumed, x, state_dict=state)
    assert torch.equal(resumed.eval()(x).logits, expected)         # exact resume
    engine.export(tmp_path, formats=["torch"])
    loaded = load_palettized(tmp_path, lambda: tiny_llama(tied=True, seed=2))
    assert torch.equal(loaded(x).logits, expected)
    assert all(t.fake.indices is None and strategies._CACHE_ATTR not in vars(t.fake)
               for t in tensors)                    # after training: nothing kept either


def test_lightning_gradient_accumulation_assigns_once_per_optimizer_step(monkeypatch, tmp_path):
    import lightning.pytorch as pl

    from coreai_palettize_plugins.demo.digits import DigitsCNN, DigitsDataModule
    from coreai_palettize_plugins.lightning import PalettizationCallback

    calls = counting(monkeypatch)
    seen: list[tuple[int, int, int]] = []

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            calls[0] = 0

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            cached = sum(strategies._CACHE_ATTR in vars(t.fake) for t in callback.engine.tensors())
            seen.append((trainer.global_step, calls[0], cached))

    pl.seed_everything(0, verbose=False)
    callback = PalettizationCallback({"preset": PRESET, "training": "ste"}, export_formats=())
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=12,
                         limit_val_batches=0, accumulate_grad_batches=ACCUMULATE, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[callback, Record()],
                         default_root_dir=tmp_path)
    trainer.fit(DigitsCNN(), DigitsDataModule())
    n = len(callback.engine.tensors())
    # 12 micro-batches, 3 optimizer steps: one assignment per weight per step, and the cached
    # palettized weights are gone before each optimizer step runs.
    assert seen == [(0, n, 0), (1, 2 * n, 0), (2, 3 * n, 0)]
    assert all(t.fake.indices is None for t in callback.engine.tensors())


def counting_nearest(monkeypatch) -> list[int]:
    """Count nearest-centroid assignments (both the training and the eval cache call it)."""
    calls = [0]
    original = strategies.nearest_centroids

    def nearest(centroids, vectors):
        calls[0] += 1
        return original(centroids, vectors)

    monkeypatch.setattr(strategies, "nearest_centroids", nearest)
    return calls


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_eval_after_training_assigns_once_until_the_weight_changes(monkeypatch, mode):
    """After ``finish`` (and before any training) eval forwards reuse one assignment per weight,
    held as one byte per weight; a changed weight or LUT is re-assigned (issue #21)."""
    engine, t = prepared()
    x = example_image(4)
    with torch.no_grad():
        model_out = t.fake.hard_assign(t.original).clone()
    engine.stop_training()
    n = len(engine.tensors())
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    model = engine.model.eval()
    calls = counting_nearest(monkeypatch)
    with context():
        outputs = [model(x) for _ in range(3)]
    assert calls[0] == n
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])
    cached = t.fake.__dict__[strategies._EVAL_ATTR][1]
    assert cached.dtype == torch.uint8 and cached.numel() == t.original.numel()
    assert torch.equal(t.fake.hard_assign(t.original), model_out)
    monkeypatch.setenv(strategies.CACHE_ENV, "0")
    with torch.no_grad():
        assert torch.equal(model(x), outputs[0])                 # same as re-assigning
    monkeypatch.setenv(strategies.CACHE_ENV, "1")
    with torch.no_grad():
        t.original.add_(0.05 * torch.randn_like(t.original))
    before = calls[0]
    with context():
        model(x)
    assert calls[0] == before + 1                               # only the changed weight
    assert torch.equal(t.fake.hard_assign(t.original), fresh(t))


def test_lightning_validation_in_inference_mode_reuses_the_step_assignment(monkeypatch):
    """Lightning validates under ``torch.inference_mode``: the palettized weight built there is a
    normal tensor, cached, and reused by the next training step (no assignment per forward)."""
    monkeypatch.setenv(strategies.CACHE_ENV, "1")
    engine, t = prepared()
    model, x = engine.model, example_image(4)
    model(x).sum().backward()                                   # a training step
    engine.before_optimizer_step()
    with torch.no_grad():
        t.original.add_(0.05 * torch.randn_like(t.original))
    engine.sync_step(1)
    calls = counting(monkeypatch)
    model.eval()
    with torch.inference_mode():
        first = model(x)
        second = model(x)
    assert torch.equal(first, second)
    n = len(engine.tensors())
    assert calls[0] == n
    model.train()
    model(x).sum().backward()                                   # the next step reuses it
    assert calls[0] == n
    engine.stop_training()
