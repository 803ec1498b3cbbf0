"""Incremental checkpoints: unchanged shards are hard-linked, and every checkpoint stays whole."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ckpt_plugin import CheckpointManager, ConfigurationError, CorruptCheckpointError


def frozen_backbone(seed: int = 0) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4))
    for layer in model[:3]:
        layer.requires_grad_(False)
    return model, torch.optim.Adam(model[3].parameters(), lr=0.05)


def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(5, 32)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def shard_files(path: Path) -> dict[str, os.stat_result]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return {name: os.stat(path / name) for name in sorted(set(index["weight_map"].values()))}


def shard_holding(path: Path, tensor: str) -> os.stat_result:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return os.stat(path / index["weight_map"][tensor])


def assert_matches(manager: CheckpointManager, epoch: int, expected: dict[str, torch.Tensor]) -> None:
    loaded = manager.load(epoch)["model"]
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("detection", ["checksum", "version"])
def test_frozen_shards_are_linked_not_written(tmp_path: Path, detection: str) -> None:
    model, optimizer = frozen_backbone()
    manager = CheckpointManager(tmp_path, max_checkpoints=None, incremental=True, change_detection=detection)
    step(model, optimizer)
    first = manager.save(model, optimizer, epoch=1, metrics={"loss": 1.0})
    step(model, optimizer)
    second = manager.save(model, optimizer, epoch=2, metrics={"loss": 0.5})

    frozen_before = shard_holding(first.path, "0.weight")
    frozen_after = shard_holding(second.path, "0.weight")
    assert frozen_after.st_ino == frozen_before.st_ino
    assert frozen_after.st_nlink == 2
    trained_after = shard_holding(second.path, "3.weight")
    assert trained_after.st_ino != shard_holding(first.path, "3.weight").st_ino
    assert trained_after.st_nlink == 1
    frozen_bytes = sum(p.numel() * 4 for p in model[:3].parameters())
    written = sum(st.st_size for st in shard_files(second.path).values() if st.st_nlink == 1)
    assert written < frozen_bytes / 10
    assert_matches(manager, 2, snapshot(model))
    assert second.files["model-00001-of-00002.safetensors"] == first.files["model-00001-of-00002.safetensors"]


def test_shards_follow_the_hugging_face_convention(tmp_path: Path) -> None:
    model, optimizer = frozen_backbone()
    info = CheckpointManager(tmp_path, incremental=True).save(model, optimizer, epoch=1, metrics={"loss": 1.0})
    index = json.loads((info.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    loaded: dict[str, torch.Tensor] = {}
    for shard in set(index["weight_map"].values()):
        loaded.update(load_file(info.path / shard))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value)
    trainer_utils = pytest.importorskip("transformers.trainer_utils")
    target, _ = frozen_backbone(seed=5)
    trainer_utils.load_sharded_checkpoint(target, info.path)
    for key, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_write_through_data_is_caught_by_checksums(tmp_path: Path) -> None:
    model, optimizer = frozen_backbone()
    manager = CheckpointManager(tmp_path, max_checkpoints=None, incremental=True)
    first = manager.save(model, optimizer, epoch=1, metrics={"loss": 1.0})
    before = snapshot(model)
    version = model[1].weight._version
    model[1].weight.data[0, 0] += 1.0
    assert model[1].weight._version == version  # invisible to version counters
    second = manager.save(model, optimizer, epoch=2, metrics={"loss": 1.0})
    assert shard_holding(second.path, "1.weight").st_ino != shard_holding(first.path, "1.weight").st_ino
    assert_matches(manager, 2, snapshot(model))
    assert_matches(manager, 1, before)


def test_version_counters_see_in_place_updates(tmp_path: Path) -> None:
    model, optimizer = frozen_backbone()
    manager = CheckpointManager(tmp_path, max_checkpoints=None, incremental=True, change_detection="version")
    manager.save(model, optimizer, epoch=1, metrics={"loss": 1.0})
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    manager.save(model, optimizer, epoch=2, metrics={"loss": 1.0})
    assert_matches(manager, 2, snapshot(model))


def test_deleting_the_base_keeps_later_checkpoints_whole(tmp_path: Path) -> None:
    model, optimizer = frozen_backbone()
    manager = CheckpointManager(tmp_path, max_checkpoints=2, keep_best=False, incremental=True)
    states = {}
    for epoch in range(1, 6):
        step(model, optimizer)
        manager.save(model, optimizer, epoch=epoch, metrics={"loss": 1.0 / epoch})
        states[epoch] = snapshot(model)
    assert [info.epoch for info in manager.checkpoints()] == [4, 5]
    for epoch in (4, 5):
        assert_matches(manager, epoch, states[epoch])
    manager.wait()  # pruned checkpoints are unlinked in the background
    frozen = shard_holding(tmp_path / "epoch_5", "0.weight")
    assert frozen.st_nlink == 2  # shared by epochs 4 and 5 only; epochs 1-3 were deleted
    for info in manager.checkpoints():
        for name, record in info.files.items():
            assert (info.path / name).stat().st_size == record.size


def test_restore_from_an_incremental_chain(tmp_path: Path) -> None:
    model, optimizer = frozen_backbone()
    manager = CheckpointManager(tmp_path, max_checkpoints=None, incremental=True)
    for epoch in (1, 2):
        step(model, optimizer)
        manager.save(model, optimizer, epoch=epoch, metrics={"loss": 1.0})
    target, target_optimizer = frozen_backbone(seed=9)
    manager.restore(target, target_optimizer)
    for key, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)
    assert torch.equal(
        target_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )


def test_damage_to_a_shared_shard_is_found_in_every_checkpoint(tmp_path: Path) -> None:
    model, optimizer = frozen_backbone()
    manager = CheckpointManager(tmp_path, max_checkpoints=None, incremental=True)
    for epoch in (1, 2):
        step(model, optimizer)
        manager.save(model, optimizer, epoch=epoch, metrics={"loss": 1.0})
    shared = shard_holding(tmp_path / "epoch_2", "0.weight")
    assert shared.st_nlink == 2
    path = next(p for p in (tmp_path / "epoch_2").iterdir() if p.stat().st_ino == shared.st_ino)
    with open(path, "r+b") as handle:
        handle.seek(shared.st_size - 3)
        handle.write(b"\x00\x01\x02")
    for epoch in (1, 2):
        with pytest.raises(CorruptCheckpointError, match=path.name):
            manager.load(epoch)
        with pytest.raises(CorruptCheckpointError, match=path.name):
            manager.restore(frozen_backbone()[0], which=epoch)


def test_a_new_manager_continues_the_chain(tmp_path: Path) -> None:
    model, optimizer = frozen_backbone()
    CheckpointManager(tmp_path, incremental=True).save(model, optimizer, epoch=1, metrics={"loss": 1.0})
    step(model, optimizer)
    second = CheckpointManager(tmp_path, incremental=True).save(model, optimizer, epoch=2, metrics={"loss": 1.0})
    assert shard_holding(second.path, "0.weight").st_ino == shard_holding(tmp_path / "epoch_1", "0.weight").st_ino
    assert_matches(CheckpointManager(tmp_path), 2, snapshot(model))


def test_a_replaced_base_is_not_linked(tmp_path: Path) -> None:
    model, optimizer = frozen_backbone()
    manager = CheckpointManager(tmp_path, max_checkpoints=None, incremental=True)
    manager.save(model, optimizer, epoch=1, metrics={"loss": 1.0})
    other, other_optimizer = frozen_backbone(seed=3)
    CheckpointManager(tmp_path, max_checkpoints=None).save(other, other_optimizer, epoch=1, metrics={"loss": 1.0})
    second = manager.save(model, optimizer, epoch=2, metrics={"loss": 1.0})
    assert all(st.st_nlink == 1 for st in shard_files(second.path).values())
    assert_matches(manager, 2, snapshot(model))


def test_plain_manager_reads_incremental_checkpoints_and_vice_versa(tmp_path: Path) -> None:
    model, optimizer = frozen_backbone()
    CheckpointManager(tmp_path, max_checkpoints=None).save(model, optimizer, epoch=1, metrics={"loss": 1.0})
    incremental = CheckpointManager(tmp_path, max_checkpoints=None, incremental=True)
    info = incremental.save(model, optimizer, epoch=2, metrics={"loss": 1.0})
    assert (info.path / "model.safetensors.index.json").exists()
    assert_matches(CheckpointManager(tmp_path), 2, snapshot(model))
    assert_matches(CheckpointManager(tmp_path), 1, snapshot(model))


def test_change_detection_is_validated() -> None:
    with pytest.raises(ConfigurationError, match="change_detection"):
        CheckpointManager("unused", incremental=True, change_detection="mtime")


def incremental_run(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    model, optimizer = frozen_backbone()
    directory = tmp_path / "checkpoints"
    manager = CheckpointManager(directory, max_checkpoints=None, incremental=True)
    for epoch in (1, 2):
        step(model, optimizer)
        manager.save(model, optimizer, epoch=epoch, metrics={"loss": 1.0 / epoch}, config={"model_type": "mlp"})
    return directory, snapshot(model)


def test_promotion_joins_the_shards_into_one_production_file(tmp_path: Path) -> None:
    from ckpt_plugin import ArtifactRegistry

    directory, expected = incremental_run(tmp_path)
    registry = ArtifactRegistry(checkpoint_dir=directory)
    registry.validate(2, "1.0.0", checks=[lambda checkpoint: True])
    registry.promote("1.0.0")
    weights = load_file(tmp_path / "production" / "model.safetensors")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[key], value) for key, value in expected.items())
    production = registry.load_production()
    assert all(torch.equal(production["model"][key], value) for key, value in expected.items())


def test_cli_verifies_shows_and_exports_incremental_checkpoints(tmp_path: Path) -> None:
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    from ckpt_plugin import cli

    directory, expected = incremental_run(tmp_path)
    runner = CliRunner()
    assert runner.invoke(cli.app, ["verify", str(directory)]).exit_code == 0
    assert runner.invoke(cli.app, ["show", str(directory), "2", "--json"]).exit_code == 0
    target = tmp_path / "exported"
    result = runner.invoke(cli.app, ["export", str(directory), "2", "--to", "hf", "-o", str(target)])
    assert result.exit_code == 0, result.output
    trainer_utils = pytest.importorskip("transformers.trainer_utils")
    model, _ = frozen_backbone(seed=8)
    trainer_utils.load_sharded_checkpoint(model, target)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in expected.items())

    shared = shard_holding(directory / "epoch_2", "0.weight")
    path = next(p for p in (directory / "epoch_1").iterdir() if p.stat().st_ino == shared.st_ino)
    with open(path, "r+b") as handle:
        handle.seek(shared.st_size - 2)
        handle.write(b"\xff\xfe")
    result = runner.invoke(cli.app, ["verify", str(directory)])
    assert result.exit_code != 0
    assert "epoch_1" in result.output + result.stderr and "epoch_2" in result.output + result.stderr
    weights = runner.invoke(
        cli.app, ["export", str(directory), "2", "--to", "pt", "--weights-only", "-o", str(tmp_path / "w.pt")]
    )
    assert weights.exit_code != 0


def test_extra_files_are_kept_in_incremental_checkpoints(tmp_path: Path) -> None:
    model, optimizer = frozen_backbone()
    manager = CheckpointManager(tmp_path, incremental=True)
    info = manager.save(model, optimizer, epoch=1, metrics={"loss": 1.0}, files={"trainer_state.json": b"{}"})
    assert (info.path / "trainer_state.json").read_bytes() == b"{}"
    assert info.files["trainer_state.json"].size == 2
    with pytest.raises(ConfigurationError, match="index"):
        manager.save(model, optimizer, epoch=2, metrics={"loss": 1.0}, files={"model.safetensors.index.json": b"{}"})
    assert [c.epoch for c in manager.checkpoints()] == [1]


def test_version_detection_hashes_when_a_fused_optimizer_hides_its_writes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    manager = CheckpointManager(tmp_path, max_checkpoints=None, incremental=True, change_detection="version")
    manager.save(model, optimizer, epoch=1)
    versions = [p._version for p in model.parameters()]
    model(torch.randn(5, 8)).square().mean().backward()
    optimizer.step()
    assert [p._version for p in model.parameters()] == versions  # fused kernels do not bump them
    manager.save(model, optimizer, epoch=2)
    assert_matches(manager, 2, snapshot(model))
