"""Distributed palettization on real 2-process gloo groups (Lightning DDP and HF under torchrun)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
from helpers import palettized_state_hash, run_python, tiny_llama

from coreai_palettize_plugins import Palettization
from coreai_palettize_plugins.demo.digits import DigitsCNN
from coreai_palettize_plugins.engine.distributed import agree, plan_owners

SCRIPTS = Path(__file__).resolve().parent / "ddp_scripts"


def test_greedy_bin_packing_balances_by_size():
    assert plan_owners([10, 1, 1, 8], 2, "sharded") == [0, 1, 1, 1]
    assert plan_owners([5, 5, 5, 5], 2, "sharded") == [0, 1, 0, 1]
    assert plan_owners([5, 5, 5], 3, "rank0") == [0, 0, 0]
    assert plan_owners([7, 3], 1, "sharded") == [0, 0]
    loads = [0, 0, 0]
    sizes = [64, 33, 32, 31, 20, 12, 9, 4]
    for size, owner in zip(sizes, plan_owners(sizes, 3, "sharded")):
        loads[owner] += size
    assert max(loads) - min(loads) <= 12


def test_agree_without_process_group_reraises_the_original():
    with pytest.raises(ValueError, match="boom"), agree("k-means"):
        raise ValueError("boom")


def reference_hash(training: str = "frozen") -> str:
    """Single-process prepare of the model the Lightning script builds (``--training frozen``
    by default there: a compact base, packed indices)."""
    pl.seed_everything(0, verbose=False)
    model = DigitsCNN()
    Palettization("w4", overrides={"linear": "w8"}, training=training).prepare(
        model, model.example_input_array)
    return palettized_state_hash(model)


def lightning_ddp(out: Path, *args: str, timeout: int = 240) -> tuple[subprocess.CompletedProcess,
                                                                      list[dict]]:
    result = run_python(str(SCRIPTS / "lightning_ddp.py"), "--out", str(out), *args,
                        timeout=timeout)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) if (out / f"rank{r}.json").exists()
             else {} for r in (0, 1)]
    return result, ranks


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rank0", "sharded"])
def test_lightning_ddp_clusters_once_and_every_rank_is_identical(tmp_path, mode):
    result, ranks = lightning_ddp(tmp_path, "--mode", mode)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = reference_hash()
    for facts in ranks:
        assert facts["hash_after_prepare"] == expected        # bit-identical to 1 process
        assert facts["hash_at_end"] == expected                # frozen LUTs/indices kept
        assert facts["global_step"] == facts["engine_step"] == 12
    owners = ranks[0]["owners"]
    assert owners == ranks[1]["owners"]
    for rank, facts in enumerate(ranks):                      # only the owner ran k-means
        assert sorted(facts["kmeans_at_prepare"]) == sorted(n for n, o in owners.items() if o == rank)
    if mode == "rank0":
        assert set(owners.values()) == {0} and ranks[1]["kmeans_at_prepare"] == []
    else:
        assert set(owners.values()) == {0, 1}
    assert [facts["exported"] for facts in ranks] == [True, False]   # exported once
    assert (tmp_path / "export" / "palettized.safetensors").is_file()
    assert ranks[0]["bytes_per_weight"] < 1.1                 # uint8 indices + LUTs


@pytest.mark.slow
def test_lightning_ddp_with_pat_schedule_reclusters_once_at_switch_on(tmp_path):
    result, ranks = lightning_ddp(tmp_path, "--start-step", "3", "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ranks[0]["hash_at_end"] == ranks[1]["hash_at_end"]
    assert ranks[0]["hash_at_end"] != ranks[0]["hash_after_prepare"]  # re-clustered at step 3
    total = ranks[0]["kmeans_total"] + ranks[1]["kmeans_total"]
    assert sorted(total) == sorted(2 * ["net.0.weight", "net.2.weight", "net.5.weight",
                                        "net.7.weight"])     # prepare + switch-on, once each
    assert ranks[0]["global_step"] == 6


@pytest.mark.slow
def test_failure_on_one_rank_stops_every_rank_promptly(tmp_path):
    start = time.monotonic()
    result = run_python(str(SCRIPTS / "lightning_ddp.py"), "--out", str(tmp_path),
                        env={"FAIL_ON_RANK": "1"}, timeout=90)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 60
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Rank 1 raises its own error; rank 0 names rank 1 and the original error with its cause.
    assert ranks[1]["error"] == "RuntimeError: Centroid calculation failed for weight 'net.0.weight'"
    assert ranks[0]["error"] == (
        "RuntimeError: palettize: k-means failed on rank 1: RuntimeError: Centroid calculation "
        "failed for weight 'net.0.weight' <- ValueError: injected k-means failure on net.0.weight")
    time.sleep(1)
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""                      # no rank left hanging


@pytest.mark.slow
def test_lightning_ddp_resume_restores_every_rank_without_kmeans(tmp_path):
    full, full_ranks = lightning_ddp(tmp_path / "full", "--epochs", "3")
    assert full.returncode == 0, full.stderr[-3000:]
    resumed, ranks = lightning_ddp(tmp_path / "resumed", "--epochs", "3", "--ckpt",
                                   str(tmp_path / "full/ckpt/epoch=0.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for facts in ranks:
        assert facts["kmeans_total"] == []
        assert facts["hash_after_prepare"] == full_ranks[0]["hash_after_prepare"]
        assert facts["global_step"] == 18
    a = (tmp_path / "full/export/palettized.safetensors").read_bytes()
    b = (tmp_path / "resumed/export/palettized.safetensors").read_bytes()
    assert a == b


@pytest.mark.slow
def test_ranks_with_different_settings_use_rank_zero_config(tmp_path):
    result, ranks = lightning_ddp(tmp_path, "--rank1-preset", "w6", "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [facts["settings_preset"] for facts in ranks] == ["w4", "w4"]
    assert ranks[0]["hash_after_prepare"] == ranks[1]["hash_after_prepare"] == reference_hash()
    assert "rank 1 had different settings (preset); using rank 0's" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_hf_trainer_under_torchrun(tmp_path):
    def torchrun(out: Path, *extra: str) -> list[dict]:
        result = run_python("-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={_free_port()}", str(SCRIPTS / "hf_torchrun.py"),
                            "--out", str(out), *extra, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    ranks = torchrun(tmp_path / "run")
    model = tiny_llama()
    Palettization("w4").prepare(model, model.dummy_inputs["input_ids"][:1])
    expected = palettized_state_hash(model)
    for facts in ranks:
        assert facts["hash_after_prepare"] == expected
        assert facts["global_step"] == facts["engine_step"] == 4
    end = ranks[0]["hash_at_end"]                   # the default ste trained the palettized weights
    assert end != expected and ranks[1]["hash_at_end"] == end
    assert len(ranks[0]["kmeans_at_prepare"]) + len(ranks[1]["kmeans_at_prepare"]) == 15
    assert ranks[0]["kmeans_at_prepare"] and ranks[1]["kmeans_at_prepare"]
    assert [facts["exported"] for facts in ranks] == [True, False]

    resumed = torchrun(tmp_path / "resumed", "--resume", str(tmp_path / "run/checkpoint-2"))
    for facts in resumed:
        assert facts["kmeans_total"] == [] and facts["hash_at_end"] == end   # bit-exact resume


@pytest.mark.slow
def test_kmeans_worker_pool_matches_sequential():
    def prepared(workers: int) -> str:
        pl.seed_everything(0, verbose=False)
        model = DigitsCNN()
        Palettization("w4", overrides={"linear": "w8"}, num_workers=workers).prepare(
            model, model.example_input_array)
        return palettized_state_hash(model)

    assert prepared(2) == prepared(1)


@pytest.mark.slow
def test_lightning_ddp_reads_before_fit_start_cluster_each_weight_once_across_ranks(tmp_path):
    """A module reading every weight in ``setup`` and building weight-decay groups from
    ``m.weight``: no rank clusters lazily; the sharded plan still runs each k-means once."""
    result = run_python(str(SCRIPTS / "lightning_ddp_reads.py"), "--out", str(tmp_path),
                        timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for facts in ranks:
        assert facts["kmeans_in_setup"] == [] and facts["setup_reads_dense"]
        assert facts["kmeans_in_configure_optimizers"] == [] and facts["decay_holds_originals"]
        assert facts["hash_after_prepare"] == reference_hash("ste")  # the script's default
    assert ranks[0]["hash_at_end"] == ranks[1]["hash_at_end"] != reference_hash("ste")  # trained
    weights = ["net.0.weight", "net.2.weight", "net.5.weight", "net.7.weight"]
    assert sorted(ranks[0]["kmeans_total"] + ranks[1]["kmeans_total"]) == weights  # once each
    assert ranks[0]["kmeans_total"] and ranks[1]["kmeans_total"]                  # sharded
