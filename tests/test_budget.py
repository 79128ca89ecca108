"""``palettize.budget``: per-layer bits for a whole-model bits-per-weight target."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
import yaml
from helpers import KMeansCounter, run_python, tiny_llama

from coreai_palettize_plugins import Palettization
from coreai_palettize_plugins.accuracy.budget import TOLERANCE
from coreai_palettize_plugins.accuracy.knapsack import solve
from coreai_palettize_plugins.recipes import load_recipe
from coreai_palettize_plugins.settings.schema import PalettizeConfigError, PalettizeSettings

INPUTS = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
CHOICES = [2, 3, 4, 8]
# tiny_llama: 14 Linear weights in the blocks + lm_head + the embedding (8-bit base, a
# module-state spec): all 16 join the allocation.
BASE = {"preset": "w4", "overrides": {"embedding": "w8"}, "training": "ste"}


def engine_for(bits: float, cache=None, model=None, **fields) -> Palettization:
    budget = {"bits_per_weight": bits, "choices": CHOICES, "cache": str(cache) if cache else None}
    engine = Palettization({**BASE, **fields}, budget=budget)
    engine.attach(model if model is not None else tiny_llama(), INPUTS)
    return engine


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    return tmp_path_factory.mktemp("budget") / "errors.json"


@pytest.fixture(scope="module")
def clustered(cache_file):
    engine = engine_for(3.5, cache_file)
    engine.ensure_clustered()
    return engine


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("budget, key, words", [
    ({"bits_per_weight": 1.5, "choices": [2, 4]}, "budget.bits_per_weight", "below the smallest"),
    ({"bits_per_weight": 9, "choices": [2, 4, 8]}, "budget.bits_per_weight", "above the largest"),
    ({"bits_per_weight": 3, "choices": []}, "budget.choices", "non-empty"),
    ({"bits_per_weight": 3, "choices": [2, 5]}, "budget.choices", "1, 2, 3, 4, 6, 8"),
    ({"bits_per_weight": 3, "granularity": ["grouped"]}, "budget.granularity", "per_tensor"),
    ({"bits_per_weight": 3, "bpw": 3}, "budget.bpw", "bits_per_weight"),
    ({"choices": [2, 4]}, "budget.bits_per_weight", "required"),
    (3.5, "budget", "mapping"),
])
def test_bad_budgets_are_one_line_errors_naming_the_key(budget, key, words):
    with pytest.raises(PalettizeConfigError) as info:
        PalettizeSettings.resolve("w4", budget=budget)
    message = str(info.value)
    assert info.value.key == key and "\n" not in message and words in message, message


def test_a_target_the_model_cannot_reach_fails_before_any_clustering(monkeypatch):
    engine = engine_for(2.0)  # LUTs, norms: even every weight at 2 bits stays above 2.0
    counter = KMeansCounter(monkeypatch)
    with pytest.raises(PalettizeConfigError, match=r"budget\.bits_per_weight: 2\.0 is below the "
                       r"smallest whole-model bits per weight .* valid: \d\.\d+ or more"):
        engine.ensure_clustered()
    assert not engine.clustered and all(not t.initialized for t in engine.tensors())
    assert counter.calls == []  # the floor depends on shapes only: not even the trial runs


def test_budget_goes_through_recipes_and_names_the_recipe_key():
    recipe = load_recipe("tiny-llama-offline", ["+palettize.budget.bits_per_weight=3.5"])
    assert recipe.palettize["budget"]["bits_per_weight"] == 3.5
    with pytest.raises(PalettizeConfigError,
                       match=r"recipe\.palettize\.budget\.choices: invalid n_bits 5"):
        load_recipe("tiny-llama-offline", ["+palettize.budget={bits_per_weight: 3, choices: [5]}"])


def test_hydra_base_has_a_budget_key():
    from omegaconf import OmegaConf

    node = OmegaConf.structured(PalettizeSettings)
    assert node.budget is None
    merged = OmegaConf.merge(node, {"budget": {"bits_per_weight": 3.5}})
    settings = PalettizeSettings.resolve(merged)
    assert settings.budget["bits_per_weight"] == 3.5 and settings.budget["choices"] == [2, 3, 4,
                                                                                         6, 8]


# ---------------------------------------------------------------------------- allocator


def test_knapsack_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        n, k = rng.randint(1, 5), rng.randint(1, 4)
        costs = [[rng.randint(1, 30) for _ in range(k)] for _ in range(n)]
        errors = [[rng.random() for _ in range(k)] for _ in range(n)]
        budget = rng.randint(0, 100)
        feasible = [combo for combo in itertools.product(range(k), repeat=n)
                    if sum(costs[i][c] for i, c in enumerate(combo)) <= budget]
        got = solve(costs, errors, budget, unit=1)
        if not feasible:
            assert got is None
            continue
        best = min(sum(errors[i][c] for i, c in enumerate(combo)) for combo in feasible)
        assert sum(costs[i][c] for i, c in enumerate(got)) <= budget
        assert sum(errors[i][c] for i, c in enumerate(got)) == pytest.approx(best, abs=1e-12)


def test_bucketed_knapsack_never_exceeds_the_budget():
    rng = random.Random(1)
    for _ in range(100):
        costs = [[rng.randint(100, 10_000) for _ in range(4)] for _ in range(30)]
        errors = [[rng.random() for _ in range(4)] for _ in range(30)]
        budget = rng.randint(30 * 100, 30 * 10_000)
        got = solve(costs, errors, budget, unit=97)
        if got is not None:
            assert sum(costs[i][c] for i, c in enumerate(got)) <= budget


# ---------------------------------------------------------------------------- the engine


def test_allocation_meets_the_target_as_the_report_counts_it(clustered):
    allocation, report = clustered.allocation, clustered.report()
    assert report.bits_per_weight == pytest.approx(allocation.achieved, abs=1e-12)
    assert 3.5 - TOLERANCE <= report.bits_per_weight <= 3.5
    bits = {layer.name: layer.n_bits for layer in report.layers}
    assert {x.name: x.n_bits for x in allocation.layers}.items() <= bits.items()
    assert len(set(bits.values())) > 1  # really mixed
    assert allocation.fixed == {}                       # the embedding joins the allocation
    assert {x.name for x in allocation.layers} == set(bits) and len(bits) == 16
    assert report.budget["target_bits_per_weight"] == 3.5
    assert report.to_dict()["budget"]["achieved_bits_per_weight"] == allocation.achieved
    assert report.metrics()["palettize/budget_achieved_bpw"] == allocation.achieved
    assert clustered.state_dict()["budget"]["layers"]  # checkpoints carry it (resume)


def test_each_layer_gets_the_error_of_its_choice_from_coreai_opt_kmeans(clustered):
    """The recorded error of each layer equals the squared error of the clustered weight."""
    for t in clustered.tensors():
        chosen = next((x for x in clustered.allocation.layers if x.name == t.name), None)
        if chosen is None:
            continue
        q = t.fake.hard_assign(t.original.detach())
        error = float((t.original.detach().double() - q.double()).pow(2).sum())
        # rel 1e-4: the trial ran coreai-opt's own assignment; an ste weight's fake assigns by
        # midpoints (the same nearest centroid up to float ties at a boundary).
        assert error == pytest.approx(chosen.error, rel=1e-4)   # another n_bits: far more


def test_a_new_target_reuses_the_cache_and_runs_no_trial_kmeans(clustered, cache_file,
                                                                  monkeypatch):
    entries = json.loads(cache_file.read_text())["layers"]
    assert len(entries) == 16 and all(len(e) == 1 + len(CHOICES) for e in entries.values())
    counter = KMeansCounter(monkeypatch)
    engine = engine_for(3.25, cache_file)
    engine.ensure_clustered()
    assert engine.allocation.kmeans_runs == 0
    assert len(counter.calls) == len(engine.tensors())  # only the final clustering
    assert 3.25 - TOLERANCE <= engine.report().bits_per_weight <= 3.25
    assert engine.allocation.total_error > clustered.allocation.total_error


def test_changed_weights_invalidate_their_cache_entries(clustered, cache_file, monkeypatch):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    counter = KMeansCounter(monkeypatch)
    engine_for(3.5, cache_file, model=model).allocate_budget()
    assert counter.calls == ["model.layers.0.mlp.up_proj.weight"] * len(CHOICES)


def test_explicit_modules_win_over_the_budget():
    engine = engine_for(3.5, modules={"lm_head": "w3"})
    allocation = engine.allocate_budget()
    assert "lm_head.weight" in allocation.fixed and "explicit modules" in \
        allocation.fixed["lm_head.weight"]
    assert all(x.name != "lm_head.weight" for x in allocation.layers)
    assert allocation.achieved <= 3.5
    engine.ensure_clustered()
    head = next(r for r in engine.report().layers if r.name == "lm_head.weight")
    assert head.n_bits == 3 and engine.report().bits_per_weight == allocation.achieved


def test_sensitivities_weight_the_objective():
    engine = engine_for(3.5)
    plain = {x.name: x.n_bits for x in engine.allocate_budget().layers}
    victim = min(plain, key=plain.get)  # a layer the plain error gives the fewest bits
    sens = {t.name: torch.full_like(t.original, 1e-6) for t in engine.tensors()}
    sens[victim] = torch.full_like(sens[victim], 1e6)
    weighted = {x.name: x.n_bits for x in engine.allocate_budget(sens).layers}
    assert weighted[victim] > plain[victim]


def test_granularity_may_vary_per_layer():
    budget = {"bits_per_weight": 3.5, "choices": [2, 3, 4], "granularity": ["base", "per_tensor"]}
    engine = Palettization(BASE, budget=budget)
    engine.attach(tiny_llama(), INPUTS)
    engine.ensure_clustered()
    chosen = {x.name: x.layout for x in engine.allocation.layers}
    assert "per-tensor" in chosen.values()  # the base is g16: the layout was chosen too
    report = engine.report()
    assert report.bits_per_weight == pytest.approx(engine.allocation.achieved, abs=1e-12)
    assert report.bits_per_weight <= 3.5
    assert {r.name: r.granularity for r in report.layers if r.name in chosen} == chosen


def test_the_written_block_reproduces_the_config(clustered, tmp_path):
    path = tmp_path / "allocation.yaml"
    path.write_text(clustered.allocation.to_yaml())
    block = yaml.safe_load(path.read_text())["modules"]
    replay = Palettization(BASE, modules=block)
    assert replay.settings.budget is None
    model = tiny_llama()
    replay.attach(model, INPUTS)
    assert replay.config.to_dict() == clustered.config.to_dict()
    replay.ensure_clustered()
    assert ({r.name: (r.n_bits, r.granularity) for r in replay.report().layers}
            == {r.name: (r.n_bits, r.granularity) for r in clustered.report().layers})
    assert replay.report().bits_per_weight == clustered.report().bits_per_weight


def test_export_writes_the_block_and_report_json_has_the_budget(clustered, tmp_path):
    result = clustered.export(tmp_path / "export", formats=["torch"])
    report = json.loads((result.directory / "report.json").read_text())
    assert report["budget"]["target_bits_per_weight"] == 3.5
    assert report["budget"]["achieved_bits_per_weight"] == report["bits_per_weight"]
    block = yaml.safe_load((result.directory / "budget_modules.yaml").read_text())["modules"]
    assert block == clustered.allocation.modules_block()


def test_resuming_with_another_budget_target_is_refused(clustered):
    engine = engine_for(3.25)
    with pytest.raises(PalettizeConfigError, match=r"palettize\.budget: the checkpoint was "
                       r"palettized with a 3\.5 bits/weight budget"):
        engine.load_state_dict(clustered.state_dict())


@pytest.mark.slow
def test_cli_budget_prints_the_table_and_writes_the_block(tmp_path):
    out = tmp_path / "allocation.yaml"
    result = run_python("-m", "coreai_palettize_plugins", "budget", "tiny-llama-offline",
                        "--bits", "3.5", "--choices", "2,4", "-o", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    head = result.stdout.splitlines()[0]
    achieved = float(head.split("achieved ")[1].split()[0])
    assert 3.5 - TOLERANCE <= achieved <= 3.5
    assert "model.layers.0.self_attn.q_proj.weight" in result.stdout
    block = yaml.safe_load(out.read_text())["modules"]
    assert block["lm_head"] == "w8"  # the recipe's explicit module comes first and wins
    assert {v["n_bits"] for k, v in block.items() if k != "lm_head"} == {2, 4}
    bad = run_python("-m", "coreai_palettize_plugins", "budget", "tiny-llama-offline",
                     "--bits", "1", timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: palettize.budget.bits_per_weight: 1.0 is below the smallest choice")


@pytest.mark.slow
def test_two_rank_ddp_gets_one_allocation_and_resume_runs_no_kmeans(tmp_path):
    """Lightning DDP, 2 gloo processes: rank 0 runs the trial k-means, both ranks apply the
    same allocation; resuming from the checkpoint restores it without any k-means."""
    from pathlib import Path

    script = str(Path(__file__).resolve().parent / "ddp_scripts" / "lightning_budget.py")

    def run(out, *args):
        result = run_python(script, "--out", str(out), *args, timeout=300)
        ranks = [json.loads((out / f"rank{r}.json").read_text())
                 if (out / f"rank{r}.json").exists() else {} for r in (0, 1)]
        return result, ranks

    result, ranks = run(tmp_path / "first")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ranks[0]["allocation"]["layers"] == ranks[1]["allocation"]["layers"]
    assert ranks[0]["hash_after_prepare"] == ranks[1]["hash_after_prepare"]
    assert ranks[0]["report_bits"] == ranks[1]["report_bits"]
    assert 3.5 - TOLERANCE <= ranks[0]["report_bpw"] == ranks[1]["report_bpw"] <= 3.5
    tensors = len(ranks[0]["report_bits"])
    assert ranks[0]["allocation"]["kmeans_runs"] == tensors * 5  # trial runs on rank 0 only
    assert len(ranks[1]["kmeans_at_prepare"]) <= tensors  # its share of the final clustering
    assert len(ranks[0]["kmeans_at_prepare"]) + len(ranks[1]["kmeans_at_prepare"]) == \
        tensors * 6

    ckpt = tmp_path / "first" / "ckpt" / "epoch=0.ckpt"
    result, resumed = run(tmp_path / "resumed", "--epochs", "2", "--ckpt", str(ckpt))
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert resumed[rank]["kmeans_total"] == []
        assert resumed[rank]["allocation"] == ranks[0]["allocation"]
        assert resumed[rank]["report_bits"] == ranks[0]["report_bits"]


@pytest.mark.slow
def test_hydra_app_takes_a_budget_and_rejects_a_bad_one_in_one_line(tmp_path):
    shown = run_python("examples/train.py", "palettize.budget={bits_per_weight: 3.5}",
                       "--cfg", "job", timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "  budget:\n    bits_per_weight: 3.5\n" in shown.stdout
    run_dir = tmp_path / "run"
    bad = run_python("examples/train.py", "palettize.budget={bits_per_weight: 1, choices: [2, 4]}",
                     f"hydra.run.dir={run_dir}", timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "error: palettize.budget.bits_per_weight: 1 is below the smallest choice (2 bits); "
        "valid: 2 to 4"]
    assert not run_dir.exists()


@pytest.mark.slow
def test_hf_trainer_budget_exports_reloads_and_resumes_without_kmeans(tmp_path, monkeypatch):
    """HF Trainer: the allocation is applied at on_train_begin, the packed artifact reloads to the
    same outputs, and a resume (allocation recomputed from the cache) runs no k-means."""
    from helpers import TokenDataset
    from transformers import Trainer, TrainingArguments

    from coreai_palettize_plugins import load_palettized
    from coreai_palettize_plugins.export.writer import PACKED_NAME
    from coreai_palettize_plugins.hf import PalettizationTrainerCallback

    cache = tmp_path / "errors.json"

    def run(out, resume=None):
        callback = PalettizationTrainerCallback(
            {**BASE, "budget": {"bits_per_weight": 3.5, "choices": CHOICES, "cache": str(cache)}},
            export_formats=["torch"])
        args = TrainingArguments(str(out), max_steps=4, per_device_train_batch_size=8,
                                 learning_rate=1e-3, save_steps=2, report_to=[], use_cpu=True,
                                 disable_tqdm=True, seed=0, save_strategy="steps")
        trainer = Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(),
                          callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return callback, trainer

    callback, trainer = run(tmp_path / "full")
    assert 3.5 - TOLERANCE <= callback.report.bits_per_weight <= 3.5
    assert callback.report.budget["achieved_bits_per_weight"] == callback.report.bits_per_weight
    loaded = load_palettized(tmp_path / "full" / "palettized")
    x = torch.randint(0, 256, (2, 16))
    trainer.model.eval()
    assert (loaded(x).logits - trainer.model(x).logits).abs().max().item() == 0.0

    counter = KMeansCounter(monkeypatch)
    resumed, _ = run(tmp_path / "resumed", resume=str(tmp_path / "full/checkpoint-2"))
    assert counter.calls == [] and resumed.engine.allocation.kmeans_runs == 0
    assert ((tmp_path / "full/palettized" / PACKED_NAME).read_bytes()
            == (tmp_path / "resumed/palettized" / PACKED_NAME).read_bytes())
