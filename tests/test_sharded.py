"""Sharded checkpoints of FSDP2 models: gloo on the CPU, ranks started with spawn, bounded waits."""

from __future__ import annotations

import json
import sys

import pytest
import safetensors.torch
import torch

from ckpt_plugin import CheckpointManager
from sharded_workers import build, check_cli_export, check_consolidated_load, check_promotion, launch, objects, train_step


@pytest.fixture(scope="module")
def saved_at_two(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded")
    launch("save_and_fail", 2, directory)
    model = build(5)  # and a checkpoint saved by one process, for the restore jobs
    optimizer, scheduler = objects(model)
    for step in (1, 2):
        train_step(model, optimizer, scheduler, step)
    CheckpointManager(directory / "plain").save(model, optimizer, epoch=2, scheduler=scheduler, metrics={"loss": 1.0})
    return directory


def test_each_rank_writes_its_own_shards_and_the_coordinator_commits(saved_at_two):
    names = sorted(p.name for p in (saved_at_two / "ckpts").iterdir() if not p.name.startswith("."))
    assert names == ["epoch_1", "epoch_2"]
    files = sorted(p.name for p in (saved_at_two / "ckpts" / "epoch_2").iterdir())
    assert files == sorted([
        "metadata.json", "sharding.json", "state.json", "state.safetensors",
        "model-r0-of-2.safetensors", "model-r1-of-2.safetensors", "optim-r0-of-2.safetensors", "optim-r1-of-2.safetensors",
    ])
    metadata = json.loads((saved_at_two / "ckpts" / "epoch_2" / "metadata.json").read_text())
    assert metadata["sharding"] == {"world_size": 2}
    assert set(metadata["files"]) == set(files) - {"metadata.json"}
    assert metadata["items"][:2] == ["model", "optimizer"]
    ranks = [safetensors.torch.load_file(str(saved_at_two / "ckpts" / "epoch_2" / f"model-r{r}-of-2.safetensors")) for r in (0, 1)]
    assert sum(t.numel() for shard in ranks for t in shard.values()) == sum(p.numel() for p in build(0).parameters())
    assert all(shard for shard in ranks), "every rank holds part of the model"


def test_one_process_loads_full_plain_tensors(saved_at_two):
    manager = CheckpointManager(saved_at_two / "ckpts")
    checkpoint = check_consolidated_load(manager, saved_at_two / "reference.safetensors")
    assert "git_hash" in checkpoint["metadata"] and checkpoint["metadata"]["timestamp"]
    fsdp1 = CheckpointManager(saved_at_two / "fsdp1").load_latest()  # saved by FSDP1 modules
    build(6).load_state_dict(fsdp1["model"], strict=True)
    assert len(fsdp1["optimizer"]["state"]) == 4


def test_restore_at_four_ranks_reshards_exactly(saved_at_two):
    """Also restores a checkpoint saved by one process into the sharded model."""
    launch("restore", 4, saved_at_two)


def test_restore_at_one_rank_reshards_exactly(saved_at_two):
    launch("restore", 1, saved_at_two)


def test_registry_promotes_consolidated_weights(saved_at_two):
    from ckpt_plugin import ArtifactRegistry

    registry = ArtifactRegistry(checkpoint_dir=saved_at_two / "ckpts")
    expected = check_promotion(registry, CheckpointManager(saved_at_two / "ckpts"))
    production = safetensors.torch.load_file(str(registry.production_dir / "model.safetensors"))
    assert production.keys() == expected.keys()
    assert all(torch.equal(production[key], value) for key, value in expected.items())


def test_model_tensors_of_a_sharded_checkpoint_are_consolidated(saved_at_two):
    manager = CheckpointManager(saved_at_two / "ckpts")
    assert manager.find(2).sharded
    full = manager.model_tensors(2, map_location="cpu")
    expected = manager.load(epoch=2)["model"]
    assert full.keys() == expected.keys() and all(torch.equal(full[key], value) for key, value in expected.items())


def test_cli_exports_one_consolidated_model_and_verifies_every_shard(saved_at_two, tmp_path):
    from typer.testing import CliRunner

    from ckpt_plugin import cli

    directory = str(saved_at_two / "ckpts")
    check_cli_export(directory, saved_at_two / "reference_lr.txt", tmp_path)
    result = CliRunner().invoke(cli.app, ["show", directory, "2", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["model_tensors"] == 4, result.output



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and sets the idle scheduling class")
def test_a_rank_exits_cleanly_right_after_a_collective_restore(tmp_path):
    """With gloo's threads starved of CPU and a normal interpreter exit: the exit hooks destroy the
    library's coordination groups before the interpreter finalizes, and no rank aborts."""
    launch("exit_after_collective", 2, tmp_path, finalize=True)
    left = {path.name: path.read_text() for path in tmp_path.glob("threads-left-*")}
    assert not left, left
