"""The public operations the ``ckpt`` command is built on: ckpt_plugin.export, ckpt_plugin.tensors
(and CheckpointManager.model_tensors), ckpt_plugin.summary, ckpt_plugin.one_checkpoint and
ckpt_plugin._local_dirs, called directly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ckpt_plugin import (
    ArtifactRegistry,
    CheckpointManager,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    Location,
    export,
    one_checkpoint,
    summary,
    tensors,
)
from ckpt_plugin import _local_dirs as local_dirs


@pytest.fixture
def manager(tmp_path: Path) -> CheckpointManager:
    """Epochs 0-2 of a small model; epoch 1 has the lowest loss; only ``out.bias`` changes."""
    manager = CheckpointManager(tmp_path / "checkpoints", max_checkpoints=None, metric_for_best="loss", mode="min")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    for epoch, loss in enumerate([0.5, 0.1, 0.3]):
        with torch.no_grad():
            model[1].bias.fill_(float(epoch))
        manager.save(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epoch=epoch,
                     metrics={"loss": loss, "eval_runtime": 1.5}, config={"model": {"model_type": "toy", "width": 4}})
    return manager


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------- model tensors


def test_model_tensors_of_latest_best_and_an_epoch(manager: CheckpointManager) -> None:
    latest, best, first = manager.model_tensors(), manager.model_tensors("best"), manager.model_tensors(0)
    assert set(latest) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert [float(m["1.bias"][0]) for m in (latest, best, first)] == [2.0, 1.0, 0.0]
    assert torch.equal(manager.model_tensors(manager.find(1))["1.bias"], best["1.bias"])
    assert all(torch.equal(latest[name], tensor) for name, tensor in manager.load_latest()["model"].items())


def test_model_tensors_map_location_and_refusals(manager: CheckpointManager, tmp_path: Path) -> None:
    moved = manager.model_tensors(map_location="meta")
    assert all(tensor.device.type == "meta" for tensor in moved.values())
    with pytest.raises(CheckpointNotFoundError):
        CheckpointManager(tmp_path / "empty").model_tensors()
    flip_byte(manager.find(2).path / "model.safetensors")
    with pytest.raises(CorruptCheckpointError):
        manager.model_tensors()
    assert manager.model_tensors(verify=False)  # read as it is when asked to


def test_shapes_files_and_comparison_without_a_manager(manager: CheckpointManager) -> None:
    info = manager.latest()
    assert tensors.model_files(info) == ["model.safetensors"]
    shapes = tensors.model_shapes(info)
    assert shapes == {"0.weight": (4, 3), "0.bias": (4,), "1.weight": (2, 4), "1.bias": (2,)}
    assert tensors.model_parameters(shapes) == 12 + 4 + 8 + 2
    rows = {row["name"]: row for row in tensors.compare_tensors(manager.model_tensors(0), manager.model_tensors(2))}
    assert rows["1.bias"] == {"name": "1.bias", "status": "changed", "max_abs_diff": 2.0}
    assert rows["0.weight"]["status"] == "unchanged"
    assert not tensors.sharded_across_ranks(nn.Linear(2, 2))


def test_read_verified_reports_the_bytes_it_checks(manager: CheckpointManager) -> None:
    seen: list[tuple[str, int, int]] = []

    def progress(label: str, total: int):  # type: ignore[no-untyped-def]
        return lambda nbytes: seen.append((label, total, nbytes))

    info = manager.latest()
    loaded = tensors.read_verified(info, ("model",), progress)
    assert set(loaded["model"]) == set(manager.model_tensors())
    assert seen and seen[0][0] == f"reading {info.name}" and sum(n for *_, n in seen) == seen[0][1]


# ---------------------------------------------------------------------- export


def test_export_writes_each_format(manager: CheckpointManager, tmp_path: Path) -> None:
    info = manager.best()
    assert export.default_output(info.name, "hf") == Path(f"{info.name}-hf")
    assert export.export(info, tmp_path / "m.safetensors", "safetensors") == []
    weights = load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(weights[name], tensor) for name, tensor in manager.model_tensors("best").items())

    assert export.export(info, tmp_path / "hf", "hf") == []
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == {"model_type": "toy", "width": 4}
    assert export.recorded_model_config(info) == {"model_type": "toy", "width": 4}

    notes = export.export(info, tmp_path / "full.pt", "pt")
    assert notes == [export.PT_WARNING]
    loaded = torch.load(tmp_path / "full.pt", weights_only=True)
    assert loaded["epoch"] == 1 and set(loaded) >= {"model", "optimizer", "metrics", "config"}
    export.export(info, tmp_path / "weights.pt", "pt", weights_only=True)
    assert set(torch.load(tmp_path / "weights.pt", weights_only=True)) == set(weights)


def test_export_refuses_what_it_cannot_write(manager: CheckpointManager, tmp_path: Path) -> None:
    info = manager.latest()
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigurationError, match="already exists"):
        export.export(info, tmp_path / "taken", "hf")
    with pytest.raises(ConfigurationError, match="onnx"):
        export.export(info, tmp_path / "model.onnx", "onnx")
    flip_byte(info.path / "model.safetensors")
    for fmt in export.FORMATS:
        with pytest.raises(CorruptCheckpointError):
            export.export(info, tmp_path / f"bad-{fmt}", fmt)
        assert not (tmp_path / f"bad-{fmt}").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "taken"]


def test_export_hf_needs_a_model_config(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "plain")
    manager.save(model=nn.Linear(2, 2), epoch=0)
    with pytest.raises(ConfigurationError, match="--config"):
        export.export(manager.latest(), tmp_path / "hf", "hf")
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "linear"}')
    export.export(manager.latest(), tmp_path / "hf", "hf", config_file=config)
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == {"model_type": "linear"}


# ---------------------------------------------------------------------- summary, one checkpoint, local dirs


def test_checkpoint_table_and_details(manager: CheckpointManager) -> None:
    registry = ArtifactRegistry(manager.checkpoint_dir)
    table = summary.checkpoint_table(registry)
    assert [row["epoch"] for row in table.rows] == [0, 1, 2]
    assert table.best == "epoch_1" and table.ranking == "loss" and table.mode == "min"
    assert table.shown == ["loss"] and table.hidden == ["eval_runtime"]
    assert table.to_json()["versions"] == [] and table.to_json()["production"] is None
    chosen = summary.checkpoint_table(registry, ["eval_runtime"])
    assert chosen.rows[0]["metrics"] == {"eval_runtime": 1.5}
    details = summary.checkpoint_details(manager.find(1))
    assert details["model_parameters"] == 26 and details["model_tensors"] == 4
    assert details["config"] == {"model": {"model_type": "toy", "width": 4}}


def test_one_checkpoint_by_its_location(manager: CheckpointManager, tmp_path: Path) -> None:
    info = one_checkpoint.info_at(manager.find(1).path)
    assert info is not None and info.name == "epoch_1"
    assert one_checkpoint.info_at(Location(tmp_path)) is None
    assert float(one_checkpoint.read_checkpoint(info, items=("model",))["model"]["1.bias"][0]) == 1.0


def test_local_dirs_publish_whole_or_not_at_all(tmp_path: Path) -> None:
    def fill(staging: Path) -> None:
        (staging / "a.txt").write_text("a")

    local_dirs.publish_dir(tmp_path, "made", fill)
    assert (tmp_path / "made" / "a.txt").read_text() == "a"

    def broken(staging: Path) -> None:
        (staging / "half").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        local_dirs.publish_dir(tmp_path, "broken", broken)
    assert sorted(os.listdir(tmp_path)) == ["made"]
    local_dirs.set_link(tmp_path / "link", tmp_path / "made")
    assert local_dirs.symlinks(tmp_path) == {"link": tmp_path / "made"}
    local_dirs.remove_link(tmp_path / "link")
    local_dirs.remove_dirs(tmp_path, lambda name, path: name == "made")
    assert [name for name in os.listdir(tmp_path) if not name.startswith(".")] == []  # removed through the trash
