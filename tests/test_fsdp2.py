"""FSDP2 (``fully_shard``) on real 2-process gloo groups: the engine API under torchrun and
Lightning's ModelParallelStrategy, against a single process on the same weights and batch."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch
from helpers import count_kmeans, lut_hash, run_python, tiny_llama
from safetensors.torch import load_file

from coreai_palettize_plugins import Palettization
from coreai_palettize_plugins.core.checks import PalettizeConfigError
from coreai_palettize_plugins.engine.distributed import check_parallelism
from coreai_palettize_plugins.settings.schema import PalettizeSettings

SCRIPTS = Path(__file__).resolve().parent / "ddp_scripts"
sys.path.insert(0, str(SCRIPTS))
from _fsdp2_models import (  # noqa: E402
    ENGINE_MODULES,
    TinyLlamaModule,
    accuracy_settings,
    calibration_data,
    global_batch,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


# ------------------------------------------------------------------ refusals (no processes)


@pytest.mark.parametrize(("fields", "key"), [
    ({"training": "frozen"}, "training"), ({"training": "lut"}, "training"),
    ({"adapters": {"r": 4}}, "adapters"), ({"distillation": {"weight": 1.0}}, "distillation"),
])
def test_model_parallel_refuses_what_fsdp2_does_not_support(fields, key):
    settings = PalettizeSettings.resolve("w4", **fields)
    with pytest.raises(PalettizeConfigError, match=rf"palettize\.{key}.*supported: "
                       r"palettize\.training=ste"):
        check_parallelism(settings, "model_parallel", what="the ModelParallelStrategy")


def test_model_parallel_with_ste_passes_and_fsdp1_deepspeed_name_the_supported_path():
    settings = PalettizeSettings.resolve("w4")
    assert check_parallelism(settings, "model_parallel", what="the ModelParallelStrategy") is False
    accuracy = PalettizeSettings.resolve("w4", calibration={"samples": 2},
                                         budget={"bits_per_weight": 4.0})
    assert check_parallelism(accuracy, "model_parallel", what="the ModelParallelStrategy") is False
    for kind in ("fsdp", "deepspeed"):
        with pytest.raises(PalettizeConfigError, match=r"use FSDP2 .*ModelParallelStrategy"):
            check_parallelism(settings, kind, what=kind)


# ------------------------------------------------------------------ engine API, own loop


def _single_process_step(lr: float, intermediate: int = 128, **fields) -> tuple[torch.nn.Module, str]:
    """What the engine script does on 2 ranks, in one process on the whole global batch."""
    model = tiny_llama(intermediate_size=intermediate)
    x = global_batch()
    engine = Palettization("w4", modules=ENGINE_MODULES, export_formats=[], **fields)
    engine.prepare(model, {"input_ids": x[:1]})
    luts = lut_hash(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    engine.start_training(0)
    model(input_ids=x, labels=x).loss.backward()
    engine.before_optimizer_step()
    optimizer.step()
    engine.after_optimizer_step(1)
    engine.stop_training()
    return model, luts


@pytest.mark.slow
def test_engine_fully_shard_loop_matches_one_process(tmp_path, monkeypatch):
    """prepare-structure -> fully_shard -> k-means on shards (w4 groups: local; per-tensor
    lm_head: gathered to its owner) -> one SGD step -> full state and export on rank 0."""
    result = run_python("-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", str(SCRIPTS / "fsdp2_engine.py"),
                        "--out", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = _ranks(tmp_path)
    reference, luts = _single_process_step(lr=2.0)
    assert ranks[0]["lut_hash"] == ranks[1]["lut_hash"] == luts        # bit-identical LUTs
    assert ranks[0]["stats_mode"] == "fsdp2 (14 local, 1 gathered)"
    kmeans = [facts["kmeans"] for facts in ranks]
    assert kmeans[0].count("lm_head.weight") + kmeans[1].count("lm_head.weight") == 1
    for names in kmeans:                        # every rank clusters its rows of each w4 weight
        assert len([n for n in names if n != "lm_head.weight"]) == 14

    # Gradient parity: the sharded step equals one process on the global batch (a gloo
    # reduce-scatter that summed instead of averaging would double the update).
    state = torch.load(tmp_path / "full_state.pt", weights_only=True)
    before = tiny_llama().state_dict()
    ours = reference.state_dict()
    checked = 0
    for name, value in state.items():
        if name.endswith(".original"):
            dense = name.replace(".parametrizations.weight.original", ".weight")
            update = ours[name] - before[dense]
            assert update.abs().max() > 1e-3, name       # a real step: >> the tolerance below
            torch.testing.assert_close(value, ours[name], atol=1e-6, rtol=1e-5, msg=name)
            checked += 1
    assert checked == 15

    # The full state dict loads into a single process, without k-means.
    calls: list[object] = []
    count_kmeans(calls.append, monkeypatch.setattr)
    model = tiny_llama()
    x = torch.randint(0, 256, (1, 16))
    Palettization("w4", modules={"lm_head": "w8"}, export_formats=[]).prepare(
        model, {"input_ids": x}, state_dict=state)
    assert calls == []
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, reference(input_ids=x).logits,
                                   atol=1e-4, rtol=1e-4)
    assert [facts["exported"] for facts in ranks] == [True, False]
    assert (tmp_path / "export" / "palettized.safetensors").is_file()


@pytest.mark.slow
def test_engine_meta_build_shard_then_load_matches_one_process(tmp_path):
    """torchtune's pattern: build on the meta device, attach (no memory), fully_shard,
    to_empty, load the full dense state dict from rank 0 (``engine.map_dense_state_dict`` names
    it for the structure; a strict load), k-means on the shards: LUTs and the step equal one
    process's on the same weights."""
    result = run_python("-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", str(SCRIPTS / "fsdp2_engine.py"),
                        "--out", str(tmp_path), "--build", "meta", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = _ranks(tmp_path)
    assert all(facts["on_meta_after_shard"] for facts in ranks)
    reference, luts = _single_process_step(lr=2.0)
    assert ranks[0]["lut_hash"] == ranks[1]["lut_hash"] == luts
    assert ranks[0]["stats_mode"] == "fsdp2 (14 local, 1 gathered)"
    state = torch.load(tmp_path / "full_state.pt", weights_only=True)
    ours = reference.state_dict()
    originals = [name for name in state if name.endswith(".original")]
    assert len(originals) == 15
    for name in originals:
        torch.testing.assert_close(state[name], ours[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_groups_straddling_the_shard_boundary_are_clustered_on_the_shards(tmp_path):
    """MLP width 176: gate/up have 88 rows per rank, 5.5 LUT groups of 16. Rank 0 clusters
    its 5 whole groups plus the one it completes with rank 1's first 8 rows; rank 1 the other
    5. No weight of them is gathered, and the LUTs equal one process's."""
    result = run_python("-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", str(SCRIPTS / "fsdp2_engine.py"),
                        "--out", str(tmp_path), "--intermediate", "176", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = _ranks(tmp_path)
    _, luts = _single_process_step(lr=2.0, intermediate=176)
    assert ranks[0]["lut_hash"] == ranks[1]["lut_hash"] == luts
    assert ranks[0]["stats_mode"] == "fsdp2 (14 local, 1 gathered)"   # lm_head (w8) only
    for names in (facts["kmeans"] for facts in ranks):
        assert "model.layers.0.mlp.gate_proj.weight" in names


@pytest.mark.slow
@pytest.mark.parametrize(("training", "adapters"), [("frozen", 0), ("lut", 0), ("frozen", 4)])
def test_packed_strategies_clustered_before_sharding_match_one_process(tmp_path, training,
                                                                        adapters):
    """``frozen``/``lut`` on the compact base, and LoRA adapters on it: k-means (and the compact
    base, the adapters) before ``fully_shard``, whose shards then hold what still trains (the
    LUT Parameters, the adapters, the dense layers); the packed indices and LUTs are buffers
    replicated on every rank. One SGD step equals one process's on the global batch; LoRA
    trains the adapters only. Clustering after sharding is refused, naming this order."""
    flags = ["--training", training, *(["--adapters", str(adapters)] if adapters else [])]
    result = run_python("-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", str(SCRIPTS / "fsdp2_engine.py"),
                        "--out", str(tmp_path), "--cluster", "before-shard", *flags, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = _ranks(tmp_path)
    fields = {"training": training, **({"adapters": {"r": adapters}} if adapters else {})}
    reference, luts = _single_process_step(lr=2.0, **fields)
    assert ranks[0]["lut_hash"] == ranks[1]["lut_hash"] == luts       # k-means: bit-identical
    assert ranks[0]["lut_hash_at_end"] == ranks[1]["lut_hash_at_end"]  # (lut: trained, below)
    assert ranks[0]["replicated_bytes"] > 0           # packed indices + LUTs on every rank
    state = torch.load(tmp_path / "full_state.pt", weights_only=True)
    ours, before = reference.state_dict(), tiny_llama().state_dict()
    moved = []
    for name, value in ours.items():
        if not value.is_floating_point() or value.numel() == 0:
            continue
        torch.testing.assert_close(state[name], value, atol=1e-6, rtol=1e-5, msg=name)
        initial = before.get(name)
        if initial is None or initial.shape != value.shape or not torch.equal(initial, value):
            moved.append(name)
    trained = [n for n in moved if "lora_" in n] if adapters else [
        n for n in moved if "trainable_lut" in n or n.startswith(("model.embed", "model.norm"))]
    assert trained, moved
    if adapters:  # only the adapters train: every dense tensor keeps its initial value
        assert not [n for n in moved if n in before], moved
    assert (tmp_path / "export" / "palettized.safetensors").is_file()

    if (training, adapters) != ("frozen", 0):
        return
    refused = run_python("-m", "torch.distributed.run", "--nproc_per_node=2",
                         f"--master_port={_free_port()}", str(SCRIPTS / "fsdp2_engine.py"),
                         "--out", str(tmp_path / "after"), *flags, timeout=300)
    assert refused.returncode != 0
    assert "cluster before sharding instead: Palettization.prepare" in refused.stderr


def _single_process_accuracy(samples: int, bits: float, path: Path | None
                             ) -> Palettization:
    """The engine script's calibration/budget run, in one process on the same data."""
    model = tiny_llama()
    engine = Palettization("w4", modules=ENGINE_MODULES, export_formats=[],
                           **accuracy_settings(samples, str(path) if path else None, bits))
    engine.calibration_data = lambda: calibration_data(model)
    engine.prepare(model, {"input_ids": global_batch()[:1]})
    return engine


@pytest.mark.slow
@pytest.mark.parametrize("ranks_n", [2, 1])
def test_engine_calibration_and_budget_on_shards_match_one_process(tmp_path, ranks_n):
    """``palettize.calibration`` and ``budget`` under fully_shard: per-batch squared gradients
    reduce-scattered to the shards (3 batches on 2 ranks: rank 1 runs a zero-weighted pad batch),
    the budget's trial k-means on each rank's share of whole weights, sensitivity-weighted
    k-means on the shards. The sensitivities file, the allocation and the LUTs equal one
    process's bit for bit; a second run loads its rows of the file (no forward, no trial k-means
    changes the result). One rank (a 1-device mesh: DTensors, no peer) takes the same path."""
    def run(out: Path) -> list[dict]:
        result = run_python("-m", "torch.distributed.run", f"--nproc_per_node={ranks_n}",
                            f"--master_port={_free_port()}", str(SCRIPTS / "fsdp2_engine.py"),
                            "--out", str(out), "--calibration", "3", "--budget", "7.6",
                            "--calibration-path", str(tmp_path / "sens.pt"), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks_n)]

    ranks = run(tmp_path / "computed")
    reference = _single_process_accuracy(3, 7.6, tmp_path / "reference_sens.pt")
    _, uncalibrated = _single_process_step(lr=2.0)
    luts = lut_hash(reference.model)
    assert luts != uncalibrated                                    # the sensitivities mattered
    assert [facts["lut_hash"] for facts in ranks] == [luts] * ranks_n
    for facts in ranks:
        assert facts["calibration"]["batches"] == 3
        assert facts["calibration"]["world_size"] == ranks_n
        assert facts["allocation"]["layers"] == reference.allocation.to_dict()["layers"]
    assert {x.n_bits for x in reference.allocation.layers} == {2, 4}  # a real choice was made
    saved, expected = (torch.load(tmp_path / name, weights_only=True)["sensitivities"]
                       for name in ("sens.pt", "reference_sens.pt"))
    assert saved.keys() == expected.keys() and len(saved) == 15
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name

    if ranks_n == 1:
        return
    loaded = run(tmp_path / "loaded")
    assert [facts["calibration"]["source"] for facts in loaded] == ["loaded"] * ranks_n
    assert [facts["lut_hash"] for facts in loaded] == [luts] * ranks_n


def test_sharded_sensitivities_normalize_as_the_whole_tensor():
    """Each shard normalized with the whole tensor's peak and smallest non-zero value equals
    the whole tensor normalized (zeros raised to that value)."""
    from coreai_palettize_plugins.accuracy.calibration import kmeans_weights

    whole = torch.rand(10, 6) * 3
    whole[7:] = 0                                   # the second shard: only zeros in 3 rows
    whole[1, 2] = 0
    reference = kmeans_weights(whole)
    peak = whole.max().item()
    scaled = whole / torch.tensor(peak)
    floor = scaled[scaled > 0].min().item()
    shards = [kmeans_weights(part, peak, floor) for part in whole.split(5)]
    assert torch.equal(torch.cat(shards), reference)
    assert torch.equal(kmeans_weights(whole[7:], peak, floor), reference[7:])


def test_budget_ignores_placeholder_luts_and_reshapes_them():
    """Lightning's ModelParallelStrategy gives each weight a zero placeholder LUT (a sharded
    checkpoint restores only into existing keys): the budget must not read them as a restored
    allocation, and the weights it gives another width get a placeholder of the new shape."""
    from coreai_palettize_plugins.engine import allocation
    from coreai_palettize_plugins.engine.fsdp import placeholder_centroids

    engine = Palettization("w4", budget={"bits_per_weight": 6.8, "choices": [2, 4, 8]},
                           export_formats=[])
    model = tiny_llama()
    engine.attach(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    placeholder_centroids(engine.tensors())
    scope = allocation.scope(model, engine.settings, engine.tied)
    from coreai_palettize_plugins.accuracy import budget
    assert budget.allocation_from_state(scope, engine.settings.budget) is None
    engine.cluster()
    widths = {t.name: t.fake.n_bits for t in engine.tensors()}
    assert set(widths.values()) - {4}                               # some weight changed width
    for t in engine.tensors():
        assert t.fake.centroids.shape[1] == 2 ** widths[t.name] and t.initialized


def test_meta_built_model_must_be_materialized_before_kmeans():
    """Attached on the meta device, k-means before ``to_empty`` + load is a one-line error
    naming the fix; afterwards the engine re-initializes the flags ``to_empty`` left empty."""
    engine = Palettization("w4", export_formats=[])
    with torch.device("meta"):
        model = tiny_llama()
    engine.attach(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    with pytest.raises(PalettizeConfigError, match=r"still on the meta device .*to_empty"):
        engine.ensure_clustered()
    model.to_empty(device="cpu")
    dense = tiny_llama().state_dict()
    mapped = engine.map_dense_state_dict(dense)
    assert "model.layers.0.mlp.up_proj.parametrizations.weight.original" in mapped
    assert "model.layers.0.mlp.up_proj.weight" not in mapped
    model.load_state_dict(mapped)                                   # strict: every key there
    for module in model.modules():
        if hasattr(module, "observer_enabled"):
            module.observer_enabled.fill_(7)                        # what to_empty may leave
    rotary = model.model.rotary_emb
    for name, buffer in type(rotary)(rotary.config).named_buffers():
        getattr(rotary, name).copy_(buffer)
    engine.ensure_clustered()
    reference = tiny_llama()
    Palettization("w4", export_formats=[]).prepare(
        reference, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    assert lut_hash(model) == lut_hash(reference)
    assert all(int(m.observer_enabled[0]) == 0 for m in model.modules()
               if hasattr(m, "observer_enabled"))
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, reference(input_ids=x).logits)


# ------------------------------------------------------------------ Lightning ModelParallel


def _lightning(out: Path, *args: str) -> list[dict]:
    result = run_python(str(SCRIPTS / "lightning_fsdp2.py"), "--out", str(out), *args,
                        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return _ranks(out)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "palettized.safetensors")


@pytest.mark.slow
def test_lightning_model_parallel_lr0_export_equals_one_process(tmp_path):
    """Default ``PalettizationCallback("w4")`` (ste) under FSDP2: LUTs bit-identical to one
    process, k-means on each rank's shard only, and with lr 0 the packed artifact is identical."""
    ranks = _lightning(tmp_path / "run", "--lr", "0", "--steps", "2")
    module = TinyLlamaModule()
    engine = Palettization("w4", export_formats=["torch"])
    engine.prepare(module, {"input_ids": torch.randint(0, 256, (1, 16))})
    for facts in ranks:
        assert facts["lut_hash_at_start"] == facts["lut_hash_at_end"] == lut_hash(module)
        assert facts["global_step"] == facts["engine_step"] == 2
        assert len(facts["kmeans_total"]) == 15       # its rows of every weight, once
    assert [facts["exported"] for facts in ranks] == [True, False]
    expected = _tensors(engine.export(tmp_path / "single").directory)
    exported = _tensors(tmp_path / "run" / "export")
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name
    report = json.loads((tmp_path / "run" / "export" / "report.json").read_text())
    assert report == json.loads((tmp_path / "single" / "report.json").read_text())


@pytest.mark.slow
def test_lightning_model_parallel_resume_is_exact_without_kmeans(tmp_path):
    ranks = _lightning(tmp_path / "run", "--steps", "4")
    resumed = _lightning(tmp_path / "resumed", "--steps", "4",
                         "--ckpt", str(tmp_path / "run" / "ckpt" / "step=2.ckpt"))
    for facts, before in zip(resumed, ranks):
        assert facts["kmeans_total"] == []                       # restored, not re-clustered
        assert facts["lut_hash_at_start"] == before["lut_hash_at_start"]
        assert facts["global_step"] == facts["engine_step"] == 4
    uninterrupted, exported = (_tensors(tmp_path / d / "export") for d in ("run", "resumed"))
    assert exported.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.slow
def test_lightning_model_parallel_calibration_budget_match_one_process_and_resume(tmp_path):
    """``PalettizationCallback("w4", calibration=..., budget=...)`` under the
    ModelParallelStrategy: the calibration batches come from the train dataloader (3 samples in
    batches of 2: one batch per rank), the allocation and LUTs equal a one-process Lightning
    run's, and a resume from the sharded checkpoint (its LUTs of the allocated widths) runs no
    k-means and exports the uninterrupted run's tensors."""
    flags = ("--calibration", "3", "--budget", "7.6", "--steps", "4")
    ranks = _lightning(tmp_path / "run", *flags)
    single = _lightning_single(tmp_path / "single", *flags)
    module = TinyLlamaModule()
    Palettization("w4").prepare(module, {"input_ids": torch.randint(0, 256, (1, 16))})
    assert single["lut_hash_at_start"] != lut_hash(module)         # calibrated and allocated
    for facts in ranks:
        assert facts["lut_hash_at_start"] == single["lut_hash_at_start"]
        assert facts["allocation"]["layers"] == single["allocation"]["layers"]
        assert facts["calibration"]["batches"] == single["calibration"]["batches"] == 2
    widths = {x["n_bits"] for x in single["allocation"]["layers"]}
    assert widths == {2, 4}

    resumed = _lightning(tmp_path / "resumed", *flags,
                         "--ckpt", str(tmp_path / "run" / "ckpt" / "step=2.ckpt"))
    for facts in resumed:
        assert facts["kmeans_total"] == []                    # no k-means, no trial k-means
        assert facts["lut_hash_at_start"] == single["lut_hash_at_start"]
        assert facts["allocation"]["layers"] == single["allocation"]["layers"]
    uninterrupted, exported = (_tensors(tmp_path / d / "export") for d in ("run", "resumed"))
    assert exported.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(exported[name], tensor), name


def _lightning_single(out: Path, *args: str) -> dict:
    result = run_python(str(SCRIPTS / "lightning_fsdp2.py"), "--out", str(out), "--devices", "1",
                        *args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "rank0.json").read_text())


def test_budget_resume_loads_into_placeholders_of_another_width(monkeypatch):
    """HF FSDP2 resumes through ``load_state_dict`` (accelerate's full state dict): placeholder
    LUTs of the base width take the loaded allocation's shapes; nothing is clustered again."""
    from coreai_palettize_plugins.engine.fsdp import placeholder_centroids

    budget = {"bits_per_weight": 6.8, "choices": [2, 4, 8]}
    inputs = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    trained = tiny_llama()
    first = Palettization("w4", budget=budget, export_formats=[])
    first.prepare(trained, inputs)
    assert {x.n_bits for x in first.allocation.layers} == {2, 4}
    resumed = Palettization("w4", budget=budget, export_formats=[])
    model = tiny_llama()
    resumed.attach(model, inputs)
    placeholder_centroids(resumed.tensors())
    model.load_state_dict(trained.state_dict())
    calls: list[object] = []
    count_kmeans(calls.append, monkeypatch.setattr)
    resumed.ensure_clustered(expect_restored=True)
    assert calls == [] and resumed.restored
    assert lut_hash(model) == lut_hash(trained)
    assert ([(x.name, x.n_bits) for x in resumed.allocation.layers]
            == [(x.name, x.n_bits) for x in first.allocation.layers])


def test_placeholders_a_state_dict_load_marked_clustered_are_clustered_on_a_fresh_run():
    """accelerate's ``cpu_ram_efficient_loading`` broadcasts rank 0's state dict at wrap time,
    placeholder LUTs included, and coreai-opt marks every loaded LUT clustered: on a fresh run
    (HF ``global_step == 0``) those all-zero LUTs are forgotten, and k-means runs."""
    from coreai_palettize_plugins.engine.fsdp import forget_placeholders, placeholder_centroids

    inputs = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    engine = Palettization("w4", export_formats=[])
    model = tiny_llama()
    engine.attach(model, inputs)
    placeholder_centroids(engine.tensors())
    model.load_state_dict(model.state_dict())                  # as accelerate's broadcast
    assert all(t.initialized for t in engine.tensors())       # coreai-opt took them as LUTs
    assert sorted(forget_placeholders(engine.tensors())) == sorted(
        t.name for t in engine.tensors())
    engine.ensure_clustered()
    reference = tiny_llama()
    Palettization("w4", export_formats=[]).prepare(reference, inputs)
    assert lut_hash(model) == lut_hash(reference)
    assert forget_placeholders(engine.tensors()) == []        # real LUTs are never forgotten
