"""Export: packed artifact round trip, .aimodel, report, atomicity, per-format failures."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from helpers import example_image, mixed_net

from coreai_palettize_plugins import Palettization, load_palettized
from coreai_palettize_plugins.export.writer import (
    AIMODEL_NAME,
    MANIFEST_NAME,
    PACKED_NAME,
    atomic_directory,
    pack_indices,
    unpack_indices,
)


@pytest.mark.parametrize("n_bits", [1, 2, 3, 4, 6, 8])
def test_pack_unpack_round_trip(n_bits):
    values = torch.randint(0, 2**n_bits, (7, 13, 3), dtype=torch.uint8)
    packed = pack_indices(values, n_bits)
    assert packed.numel() == -(-values.numel() * n_bits // 8)      # exactly n bits per index
    assert torch.equal(unpack_indices(packed, n_bits, values.shape), values)


@pytest.mark.parametrize("preset", [
    "w4",
    {"n_bits": 3, "group_size": 8},
    {"n_bits": 2, "enable_per_channel_scale": True},
    {"n_bits": 6, "lut_dtype": "int8"},
    {"n_bits": 4, "granularity": "per_grouped_channel", "axis": 1, "group_size": 16},
])
def test_export_round_trip_matches_prepared_model(tmp_path, preset):
    model = mixed_net()
    engine = Palettization({"preset": preset}, overrides={"linear": "w8"})
    engine.prepare(model, example_image())
    x = example_image(4)
    expected = model.eval()(x)

    result = engine.export(tmp_path / "out")
    assert result.errors == {}
    assert set(result.written) == {"coreai", "torch"}
    assert (tmp_path / "out" / AIMODEL_NAME / "main.mlirb").is_file()

    for finalize in (True, False):
        loaded = load_palettized(tmp_path / "out", mixed_net, finalize=finalize)
        assert (loaded(x) - expected).abs().max().item() == 0.0
    plain = load_palettized(tmp_path / "out", mixed_net())
    assert type(plain.fc) is nn.Linear                          # finalized: plain modules

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["extra"]["rebuilt_model_max_abs_diff"] == 0.0
    assert report["extra"]["coreai_graph_max_abs_diff"] == 0.0
    assert {layer["name"] for layer in report["layers"]} >= {"conv1d.weight", "fc.weight"}
    assert (tmp_path / "out" / "report.md").read_text().startswith("# Palettization report")


def test_packed_artifact_is_n_bit(tmp_path):
    from safetensors.torch import load_file

    model = mixed_net()
    engine = Palettization({"preset": {"n_bits": 2, "group_size": 8}})
    engine.prepare(model, example_image())
    engine.export(tmp_path / "out", formats=["torch"])
    stored = load_file(str(tmp_path / "out" / PACKED_NAME))
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    for entry in manifest["palettized"].values():
        packed = stored[f"{entry['prefix']}0.indices"]
        numel = torch.Size(entry["indices_shape"]).numel()
        assert packed.dtype == torch.uint8 and packed.numel() == numel * 2 // 8
        assert f"{entry['prefix']}original" not in stored           # no dense master weights
    assert not (tmp_path / "out" / AIMODEL_NAME).exists()


def test_report_sizes_and_aimodel_near_floor(tmp_path):
    from coreai_palettize_plugins.demo.digits import DigitsCNN

    model = DigitsCNN()
    engine = Palettization("w4", overrides={"linear": "w8"})
    engine.prepare(model, model.example_input_array)
    result = engine.export(tmp_path / "out")
    report = result.report
    floor = report.palettized_bytes
    # (the palettized model holds no dense weights: compact base; count an unprepared copy)
    assert report.dense_bytes == sum(p.numel() * 4 for p in DigitsCNN().parameters())
    assert result.artifact_bytes["coreai"] <= 1.05 * floor
    assert result.artifact_bytes["coreai"] < report.dense_fp16_bytes
    assert result.extra()["coreai_artifact_bytes"] == result.artifact_bytes["coreai"]
    assert 4.0 < report.bits_per_weight < 8.5


class DataDependent(nn.Module):
    """A model torch.export cannot trace (branch on a tensor value)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            return h * 2
        return h


def test_untraceable_model_names_format_and_cause_and_writes_the_rest(tmp_path, caplog):
    torch.manual_seed(0)
    model = DataDependent()
    engine = Palettization("w4")
    engine.prepare(model, torch.randn(1, 16))
    result = engine.export(tmp_path / "out")
    assert "torch" in result.written and "coreai" not in result.written
    assert result.errors["coreai"].startswith("RuntimeError: torch.export could not trace DataDependent")
    assert not (tmp_path / "out" / AIMODEL_NAME).exists()
    assert (tmp_path / "out" / PACKED_NAME).is_file()
    assert "format 'coreai' could not be written" in caplog.text
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "torch.export" in report["extra"]["coreai_error"]
    loaded = load_palettized(tmp_path / "out", DataDependent)
    x = torch.randn(3, 16)
    assert torch.equal(loaded(x), model.eval()(x))


def test_strict_export_raises_before_writing_anything(tmp_path):
    from coreai_palettize_plugins import ExportError

    torch.manual_seed(0)
    engine = Palettization("w4")
    engine.prepare(DataDependent(), torch.randn(1, 16))
    with pytest.raises(ExportError, match=r"coreai: RuntimeError: torch\.export could not trace"):
        engine.export(tmp_path / "out", strict=True)
    assert not (tmp_path / "out" / PACKED_NAME).exists()          # nothing replaced or added


def test_failed_export_leaves_earlier_artifact_and_no_partial_dir(tmp_path):
    model = mixed_net()
    engine = Palettization("w4", overrides={"linear": "w8"})
    engine.prepare(model, example_image())
    out = tmp_path / "out"
    engine.export(out, formats=["torch"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_factory():
        raise RuntimeError("disk on fire")

    engine._model_factory = broken_factory
    with pytest.raises(RuntimeError, match="disk on fire"):
        engine.export(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]         # no .partial left over


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "a"
    with atomic_directory(target) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(ValueError), atomic_directory(target) as tmp:
        (tmp / "x").write_text("2")
        raise ValueError
    assert (target / "x").read_text() == "1"
    (target / "user.txt").write_text("mine")
    with atomic_directory(target) as tmp:
        (tmp / "y").write_text("3")
    # the previous export's "x" is replaced by this one's files; the user's file stays
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".")) == [
        "palettize_export.json", "user.txt", "y"]
    assert [p.name for p in target.iterdir() if p.name.startswith(".")] == [
        ".palettize-export.lock"]
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
