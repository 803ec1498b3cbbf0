"""Only what ckpt_plugin created is ever deleted.

Foreign objects and files whose names come close to the library's own (``X@Y`` names, transaction
ids one character off, hidden names of almost the staging form) are planted beside the checkpoints,
the validated versions and production, on an object store (the moto S3 server and ``memory://``)
and on a local disk. Retention, ``recover()`` with no grace period, re-saves of an epoch, promotion
and rollback all run over them, and every one survives byte for byte, while the library's own
leftovers of the same places are still cleaned up. Checkpoints written by release 0.2, whose
transaction prefixes had a looser form, still load.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import fsspec
import pytest
import torch
from core_helpers import recover_now

from ckpt_plugin import ArtifactRegistry, CheckpointManager, ForeignFileError
from ckpt_plugin._checkpoint import METADATA_CHECKSUM_KEY, metadata_checksum
from ckpt_plugin._format.names import format_transaction_id, parse_transaction_name, transaction_name
from ckpt_plugin._storage import open_store

JAN_2026 = 1_767_225_600 * 10**9
OURS = format_transaction_id(JAN_2026, "0123456789abcdef")
"""A transaction id of the library's own form (planted only where the library's leftovers are meant)."""

NEAR_MISS_IDS = [
    "manual-backup",
    "v1",
    "example.com",
    "2024",
    "20260101T000000.000000000Z-xyz",  # not hex
    "20260101T000000.00000000Z-0123456789abcdef",  # eight digits of nanoseconds
    "2026011T000000.000000000Z-0123456789abcdef",  # seven digits of date
    "20260101T000000.000000000Z-0123456789abcde",  # fifteen hex digits
    "20260101T000000.000000000Z-0123456789abcdef0",  # seventeen
    "20260101T000000.000000000Z-0123456789ABCDEF",  # upper-case hex
    "20260101t000000.000000000z-0123456789abcdef",  # lower-case T and Z
    "20260230T000000.000000000Z-0123456789abcdef",  # no such day
    "20260101T000000.000000000Z-0123456789abcdef\n",  # a trailing newline
    "20260101T000000.000000000Z-0123456789abcdef-old",
    "０20260101T000000.000000000Z-0123456789abcdef",  # a full-width digit
    "0187a3c5e1f2a4b0c9d2e1f",  # 0.2's form, one digit short
    "0187A3C5E1F2A4B0C9D2E1F0",  # 0.2's form in upper case
]

CHECKPOINT_PLANTS = {
    **{f"epoch_1@{bad}/model.safetensors": b"not ours" for bad in NEAR_MISS_IDS},
    "epoch_1@manual-backup/README.txt": b"my backup of epoch 1",
    "dataset@v1/part-0.bin": b"data v1",
    "dataset@v1/metadata.json": b'{"rows": 1}',  # committed-looking, and older than v2
    "dataset@v2/metadata.json": b'{"rows": 2}',
    "alice@example.com/notes.txt": b"alice's notes",
    f"epoch_01@{OURS}/model.safetensors": b"not a checkpoint name",
    f"Epoch_1@{OURS}/model.safetensors": b"not a checkpoint name",
    f"epoch_1_step_@{OURS}/model.safetensors": b"not a checkpoint name",
    "epoch_1@0187a3c5e1f2a4b0c9d2e1f0/model.safetensors": b"0.2's form without a manifest: never ours to delete",
}
VALIDATED_PLANTS = {
    "archive@2024/report.pdf": b"%PDF report",
    "notes@team.txt": b"team notes",
    "v1.0.0@manual/notes.txt": b"notes on 1.0.0",
    f"v01.0.0@{OURS}/model.safetensors": b"not a canonical version",
    f"v1.0.0@{OURS.upper()}/model.safetensors": b"upper case",
    f"v1.0.0@{OURS}-old/model.safetensors": b"a suffix",
    "history@old/1.json": b"{}",
}
PRODUCTION_PLANTS = {
    "notes@team.txt": b"team notes",
    "model@backup.safetensors": b"a backup",
    f"model@{OURS}.safetensors.bak": b"a suffix",
    f"model@{OURS.upper()}.safetensors": b"upper case",
    f"weights@{OURS}.safetensors": b"another stem",
    "model@0187a3c5e1f2a4b0c9d2e1f0.safetensors": b"0.2's form, named by no pointer",
}


def storable(url: str, plants: dict[str, bytes]) -> dict[str, bytes]:
    """The plants the store at ``url`` can hold: s3fs strips a trailing newline from a key, so
    that near miss is planted on ``memory://`` and on a local disk only."""
    return {name: data for name, data in plants.items() if not (url.startswith("s3://") and "\n" in name)}


def plant(base: str, plants: dict[str, bytes]) -> None:
    fs, root = fsspec.core.url_to_fs(base)
    for name, data in plants.items():
        fs.pipe_file(f"{root}/{name}", data)


def assert_intact(base: str, plants: dict[str, bytes]) -> None:
    fs, root = fsspec.core.url_to_fs(base)
    fs.invalidate_cache()
    missing = [name for name in plants if not fs.exists(f"{root}/{name}")]
    assert missing == [], f"foreign objects were deleted: {missing}"
    assert {name: fs.cat_file(f"{root}/{name}") for name in plants} == plants


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return fs.exists(path)


def weights(epoch: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), float(epoch))}


def object_names(url: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return sorted({path[len(root) + 1 :].split("/", 1)[0] for path in fs.find(root)})


# ---------------------------------------------------------------------- object stores


def test_foreign_objects_survive_retention_recover_resaves_promote_and_rollback(remote_url: str) -> None:
    run = remote_url.rsplit("/", 1)[0]
    manager = CheckpointManager(remote_url, max_checkpoints=1, keep_best=False)
    manager.save(weights(1), epoch=1, metrics={"loss": 1.0})
    [committed] = [name for name in object_names(remote_url) if name.startswith("epoch_1@")]
    fs, root = fsspec.core.url_to_fs(remote_url)
    copies = {}
    for name in ("epoch_1@copy", transaction_name("epoch_1", OURS)):  # whole copies of a checkpoint
        fs.copy(f"{root}/{committed}", f"{root}/{name}", recursive=True)
        copies.update({f"{name}/{path.rsplit('/', 1)[-1]}": fs.cat_file(path) for path in fs.find(f"{root}/{name}")})
    planted = storable(remote_url, CHECKPOINT_PLANTS)
    plant(remote_url, planted)
    plant(f"{run}/validated", VALIDATED_PLANTS)
    plant(f"{run}/production", PRODUCTION_PLANTS)
    dead = f"{remote_url}/{transaction_name('epoch_5', OURS)}"
    plant(dead, {"model.safetensors": b"a writer that died before its manifest"})
    everything = {**planted, **copies}

    for epoch in (1, 2, 2, 3, 3):  # retention and re-saves of an epoch
        manager.save(weights(epoch), epoch=epoch, metrics={"loss": 1.0 / epoch})
    assert [info.name for info in manager.checkpoints()] == ["epoch_3"]
    recover_now(manager)  # every uncommitted prefix of ours counts as dead
    assert not exists(dead), "the library's own leftover was not cleaned up"
    assert_intact(remote_url, everything)

    registry = ArtifactRegistry(remote_url)
    registry._places.grace_seconds = -1
    unclaimed = f"{registry.validated_dir}/{transaction_name('v7.0.0', OURS)}"
    unpointed = f"{registry.production_dir}/model@{OURS}.safetensors"
    plant(unclaimed, {"model.safetensors": b"a validation that died before its claim"})
    plant(registry.production_dir, {f"model@{OURS}.safetensors": b"a promotion that died before its switch"})
    every_registry_change(registry)
    assert not exists(unclaimed) and not exists(unpointed), "the registry's own leftovers were not cleaned up"
    assert_intact(remote_url, everything)
    assert_intact(registry.validated_dir, VALIDATED_PLANTS)
    assert_intact(registry.production_dir, PRODUCTION_PLANTS)
    assert torch.equal(CheckpointManager(remote_url).load(3)["model"]["w"], weights(3)["w"])


def test_a_copy_of_a_checkpoint_under_a_name_of_our_form_is_never_listed_nor_deleted(remote_url: str) -> None:
    """A manifest names its own transaction: a copy elsewhere, even under a newer id of the library's
    form, is not the checkpoint (it is warned about) and is never deleted."""
    manager = CheckpointManager(remote_url, max_checkpoints=None)
    manager.save(weights(1), epoch=1, metrics={"loss": 1.0})
    fs, root = fsspec.core.url_to_fs(remote_url)
    [committed] = [name for name in object_names(remote_url) if name.startswith("epoch_1@")]
    newer = transaction_name("epoch_1", format_transaction_id(time.time_ns() + 10**12, "fedcba9876543210"))
    fs.copy(f"{root}/{committed}", f"{root}/{newer}", recursive=True)
    reader = CheckpointManager(remote_url)
    assert [info.location.rsplit("/", 1)[-1] for info in reader.checkpoints()] == [committed]
    recover_now(reader)
    reader.save(weights(2), epoch=1, metrics={"loss": 0.5})  # a re-save supersedes the original only
    names = object_names(remote_url)
    assert newer in names and committed not in names
    assert torch.equal(CheckpointManager(remote_url).load(1)["model"]["w"], weights(2)["w"])


# ---------------------------------------------------------------------- checkpoints of release 0.2


def as_release_02(url: str, info_location: str, legacy_id: str, name: str | None = None) -> str:
    """Move the checkpoint at ``info_location`` to a prefix of 0.2's form, with a manifest as 0.2
    wrote it (no ``transaction``); returns the new prefix's name."""
    fs, root = fsspec.core.url_to_fs(url)
    source = fs._strip_protocol(info_location)
    entry = f"{name or source.rsplit('/', 1)[-1].split('@')[0]}@{legacy_id}"
    for path in fs.find(source):
        data = fs.cat_file(path)
        if path.endswith("/metadata.json"):
            document = json.loads(data)
            del document["transaction"], document[METADATA_CHECKSUM_KEY]
            document[METADATA_CHECKSUM_KEY] = metadata_checksum(document)
            data = json.dumps(document).encode()
        fs.pipe_file(f"{root}/{entry}/{path.rsplit('/', 1)[-1]}", data)
    fs.rm(source, recursive=True)
    return entry


def test_checkpoints_of_release_02_still_load_and_are_deleted_only_when_listed(remote_url: str) -> None:
    manager = CheckpointManager(remote_url, max_checkpoints=None)
    saved = manager.save(weights(1), epoch=1, metrics={"loss": 1.0})
    old = as_release_02(remote_url, saved.location, "0187a3c5e1f2a4b0c9d2e1f0")
    wrong = as_release_02(remote_url, manager.save(weights(2), epoch=2, metrics={"loss": 1.0}).location,
                          "0187a3c5e1f2a4b0c9d2e1f1", name="epoch_7")  # epoch 2's manifest under epoch_7
    unfinished = "epoch_4@0187a3c5e1f2a4b0c9d2e1f2"
    plant(f"{remote_url}/{unfinished}", {"model.safetensors": b"a 0.2 writer that died"})
    assert parse_transaction_name(old, legacy=True).legacy

    with pytest.warns(UserWarning, match="epoch_7"):
        reader = CheckpointManager(remote_url, max_checkpoints=1, keep_best=False)
        assert [info.name for info in reader.checkpoints()] == ["epoch_1"]
    assert torch.equal(reader.load(1)["model"]["w"], weights(1)["w"])
    recover_now(reader)
    reader.save(weights(3), epoch=3, metrics={"loss": 0.1})  # retention deletes the 0.2 checkpoint it listed
    names = object_names(remote_url)
    assert old not in names
    assert wrong in names and unfinished in names  # not clearly checkpoints: left alone


def test_a_re_save_replaces_a_checkpoint_of_release_02(remote_url: str) -> None:
    manager = CheckpointManager(remote_url, max_checkpoints=None)
    saved = manager.save(weights(1), epoch=1, metrics={"loss": 1.0})
    old = as_release_02(remote_url, saved.location, "0187a3c5e1f2a4b0c9d2e1f0")
    CheckpointManager(remote_url, max_checkpoints=None).save(weights(2), epoch=1, metrics={"loss": 0.5})
    assert old not in object_names(remote_url)
    assert torch.equal(CheckpointManager(remote_url).load(1)["model"]["w"], weights(2)["w"])


# ---------------------------------------------------------------------- local directories


LOCAL_RUN_PLANTS = [
    "epoch_1@manual-backup/README.txt",
    "dataset@v1/part-0.bin",
    "alice@example.com/notes.txt",
    "production@old/model.safetensors",
    ".tmp.notes/x",
    ".trash.backup/x",
    ".tmp.0000000g.123.0123456789ab.epoch_1/x",  # not a host tag
    ".tmp.deadbeef.123.0123456789AB.epoch_1/x",  # upper case
    ".tmp.deadbeef.123.0123456789ab.epoch_1\n/x",  # a trailing newline
    ".tmp.deadbeef.12345678901.0123456789ab.epoch_1/x",  # a pid too long
    ".trash.0123456789ab/x",  # no entry named
    ".trash.0123456789abc.epoch_1/x",
    ".replaced.0123456789ab/x",
    ".replaced.0123456789ab.\n/x",
]


def plant_files(root: Path, names: list[str]) -> dict[str, bytes]:
    planted = {}
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
        planted[name] = name.encode()
    return planted


def assert_files_intact(root: Path, planted: dict[str, bytes]) -> None:
    missing = [name for name in planted if not (root / name).is_file()]
    assert missing == [], f"foreign files were deleted: {missing}"
    assert {name: (root / name).read_bytes() for name in planted} == planted


def test_foreign_files_survive_locally(tmp_path: Path) -> None:
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    manager = CheckpointManager(checkpoints, max_checkpoints=1, keep_best=False)
    manager.save(weights(0), epoch=0, metrics={"loss": 1.0})
    in_run = plant_files(run, LOCAL_RUN_PLANTS)
    in_checkpoints = plant_files(checkpoints, LOCAL_RUN_PLANTS)
    in_validated = plant_files(run / "validated", [
        "archive@2024/report.pdf", "notes@team.txt", "v1.0.0@manual/notes.txt", ".tmp.notes/x", ".trash.backup/x",
    ])
    old = os.path.getmtime(run)
    os.utime(run / ".tmp.0000000g.123.0123456789ab.epoch_1", (old - 10**6, old - 10**6))  # aged, yet not ours

    for epoch in (1, 2, 2, 3, 3):
        manager.save(weights(epoch), epoch=epoch, metrics={"loss": 1.0 / epoch})
    open_store(checkpoints).recover()
    registry = ArtifactRegistry(checkpoints)
    every_registry_change(registry)
    assert_files_intact(run, in_run)
    assert_files_intact(checkpoints, in_checkpoints)
    assert_files_intact(run / "validated", in_validated)


def test_a_promotion_never_replaces_files_it_did_not_write_in_production(tmp_path: Path) -> None:
    checkpoints = tmp_path / "run" / "checkpoints"
    manager = CheckpointManager(checkpoints, max_checkpoints=None)
    for epoch in (0, 1):
        manager.save(weights(epoch), epoch=epoch, metrics={"loss": 1.0})
    registry = ArtifactRegistry(checkpoints)
    registry.validate(0, "1.0.0")
    registry.validate(1, "2.0.0")
    registry.validate(1, "3.0.0")
    registry.promote("1.0.0")
    registry.promote("2.0.0")
    notes = plant_files(registry.production_dir, ["notes@team.txt"])
    for change in (lambda: registry.promote("3.0.0"), registry.rollback):
        with pytest.raises(ForeignFileError, match="notes@team.txt"):
            change()
        assert_files_intact(registry.production_dir, notes)
        assert registry.production()["version"] == "2.0.0"
    (registry.production_dir / "notes@team.txt").rename(tmp_path / "notes@team.txt")
    registry.rollback()
    assert registry.production()["version"] == "1.0.0"
    assert [(event["event"], event["version"]) for event in registry.history()][-1] == ("rollback", "1.0.0")


def every_registry_change(registry: ArtifactRegistry) -> None:
    """Validate two versions of epoch 3, promote both, roll back: every operation that cleans up."""
    registry.validate(3, "1.0.0")
    registry.validate(3, "2.0.0")
    registry.promote("1.0.0")
    registry.promote("2.0.0")
    registry.rollback()
    assert registry.production()["version"] == "1.0.0"
