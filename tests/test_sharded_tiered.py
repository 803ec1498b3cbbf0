"""Sharded checkpoints with a local tier: two FSDP2 ranks over gloo on the CPU each commit their
own shards of each save to their own ``local_dir`` and upload them, the coordinator commits the
durable copy, and restores read each rank's local shards, or the durable tier on a new machine."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from typer.testing import CliRunner

from ckpt_plugin import CheckpointManager, UploadError, cli
from sharded_workers import launch

SHARD_FILES = [
    "metadata.json", "model-r0-of-2.safetensors", "model-r1-of-2.safetensors", "optim-r0-of-2.safetensors",
    "optim-r1-of-2.safetensors", "sharding.json", "state.json", "state.safetensors",
]


def durable_names(durable) -> list[str]:
    return sorted(path.name for path in durable.iterdir() if not path.name.startswith("."))


@pytest.fixture(scope="module")
def saved_tiered(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded-tiered")
    launch("tiered_save", 2, directory, timeout=240)
    return directory


def test_each_rank_commits_to_its_own_local_dir_and_the_durable_copy_is_whole(saved_tiered):
    durable = saved_tiered / "durable"
    assert durable_names(durable) == ["epoch_1", "epoch_2", "epoch_3"]
    assert sorted(path.name for path in (durable / "epoch_3").iterdir()) == SHARD_FILES
    metadata = json.loads((durable / "epoch_3" / "metadata.json").read_text())
    assert metadata["sharding"] == {"world_size": 2}


@pytest.mark.parametrize("world", [1, 2])
def test_a_new_machine_restores_a_sharded_tiered_run_from_the_durable_tier(saved_tiered, world):
    launch("tiered_restore", world, saved_tiered)


def test_a_sharded_upload_killed_on_both_ranks_is_resumed_by_their_next_managers(tmp_path):
    with pytest.raises(Exception, match="signal|exit"):
        launch("tiered_killed", 2, tmp_path)
    durable = tmp_path / "durable"
    assert durable_names(durable) == ["epoch_1"]
    for rank in (0, 1):  # each rank's journal holds the upload, its copy the files
        assert (tmp_path / f"local-r{rank}" / ".sharded" / ".pending-uploads.jsonl").is_file()
        assert (tmp_path / f"local-r{rank}" / ".sharded" / "epoch_2" / "rank.json").is_file()
    listed = CliRunner().invoke(cli.app, ["list", str(durable), "--local-dir", str(tmp_path / "local-r1"), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: (row["copies"], row["pending"]) for row in json.loads(listed.output)["checkpoints"]}
    assert rows == {"epoch_1": (["durable", "local"], False), "epoch_2": (["local"], True)}, rows
    alone = CheckpointManager(durable, local_dir=tmp_path / "local-r0")  # one process cannot resume it alone
    assert [info.name for info in alone.pending_uploads()] == ["epoch_2"]
    with pytest.raises(UploadError, match="resumed by all ranks together"):
        alone.close()
    launch("tiered_resume", 2, tmp_path, timeout=240)
    assert durable_names(durable) == ["epoch_1", "epoch_2"]
    assert sorted(path.name for path in (durable / "epoch_2").iterdir()) == SHARD_FILES
    for rank in (0, 1):
        assert not (tmp_path / f"local-r{rank}" / ".sharded" / ".pending-uploads.jsonl").exists()
    launch("tiered_restore", 2, tmp_path, arguments=("2",))


def test_ranks_given_one_local_dir_are_refused_with_what_to_do(tmp_path):
    launch("tiered_shared_local_dir", 2, tmp_path)


def _objects(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return sorted(name[len(path) :].lstrip("/") for name in fs.find(path))


def test_a_sharded_tiered_run_drains_to_an_s3_server(s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/run/checkpoints"
    launch("tiered_remote", 2, tmp_path, timeout=300, arguments=(url,))
    found = _objects(url)
    prefixes = sorted({name.split("/", 1)[0] for name in found} - {".saves"})
    assert [prefix.split("@")[0] for prefix in prefixes] == ["epoch_1", "epoch_2"], prefixes
    for prefix in prefixes:
        assert sorted(name.split("/", 1)[1] for name in found if name.startswith(prefix + "/")) == SHARD_FILES
    assert CheckpointManager(url).latest().epoch == 2


def test_a_signed_sharded_tiered_save_verifies_on_the_durable_tier(tmp_path):
    pytest.importorskip("model_signing")
    from security_helpers import key_pair

    from ckpt_plugin import SignatureError

    private, public = key_pair(tmp_path, "owner")
    durable = tmp_path / "durable"
    launch("tiered_remote", 2, tmp_path, timeout=300, arguments=(str(durable), str(private)))
    manager = CheckpointManager(durable)
    loaded = manager.load_latest(verify_with=public)
    assert loaded["epoch"] == 2 and "model.sig" in {path.name for path in (durable / "epoch_2").iterdir()}
    shard = durable / "epoch_2" / "model-r1-of-2.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(SignatureError):
        CheckpointManager(durable).load_latest(verify_with=public)


def test_a_ranks_retention_keeps_its_pending_copies_and_the_newest(tmp_path):
    """keep_local on one rank: copies whose upload is pending stay (possibly the only copy of that
    rank's shards), the newest ``keep_local`` stay, and unsealed leftovers go."""
    from ckpt_plugin._listing import info_from_summary
    from ckpt_plugin._storage import checksum_bytes
    from ckpt_plugin._tiered.ranks import RankCopies

    copies = RankCopies(tmp_path)
    for epoch in (1, 2, 3, 4):
        name, data = f"epoch_{epoch}", b"x" * epoch
        seq = copies.journal.add(name)
        staging = copies.begin(name)
        (Path(staging.prefix) / "model-r1-of-2.safetensors").write_bytes(data)
        summary = {"epoch": epoch, "step": None, "metrics": {}, "metric_for_best": None, "mode": "min", "timestamp": 0.0,
                   "files": {"model-r1-of-2.safetensors": [len(data), checksum_bytes(data)]}, "items": ["model"]}
        copies.seal(info_from_summary(tmp_path / name, summary), 1, 2, staging)
        if epoch in (2, 3):
            copies.journal.done(name, seq)
    (copies.root / "epoch_9").mkdir()  # a save that never sealed
    copies.retain(keep_local=1)
    assert [record.name for record in copies.records()] == ["epoch_1", "epoch_4"]
    assert sorted(path.name for path in copies.root.iterdir() if not path.name.startswith(".")) == ["epoch_1", "epoch_4"]
    copies.retain(keep_local=0)
    assert [record.name for record in copies.records()] == ["epoch_1", "epoch_4"]  # both still pending
