"""Tiered checkpoints: the pending journal, the upload of one checkpoint, the uploader, retention
across tiers and reads from the fastest copy that verifies, against real stores (a local directory
as the fast tier; ``memory://`` and the moto S3 server as the durable one)."""

from __future__ import annotations

import errno
import threading
import uuid
import warnings
from pathlib import Path

import pytest
import torch

from ckpt_plugin import _retention as retention
from ckpt_plugin._tiered import PendingJournal, Tiers, list_committed
from ckpt_plugin._tiered.journal import JOURNAL_FILE
from ckpt_plugin._tiered.keep import local_to_delete, retired_names
from ckpt_plugin._tiered.upload import durable_copy, upload
from ckpt_plugin.errors import CorruptCheckpointError, StorageError, UploadError
from ckpt_plugin._format import documents
from ckpt_plugin._format.records import METADATA_FILE
from ckpt_plugin._io.info import CheckpointInfo
from ckpt_plugin._io.writer import take_snapshot, write_snapshot
from ckpt_plugin._reading import read_checkpoint
from ckpt_plugin._storage import LocalStore, open_store, with_backend
from ckpt_plugin._storage.faults import FaultyBackend

from core_helpers import assert_same_tree


def state(version: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64, 64), float(version)), "b": torch.arange(7, dtype=torch.float64) + version}


def save_local(tiers: Tiers, epoch: int, *, loss: float | None = None) -> CheckpointInfo:
    """What a tiered save does: journal entry, local commit, then the upload starts."""
    snapshot = take_snapshot(
        {"model": state(epoch)}, epoch=epoch, step=None, metrics={"loss": loss if loss is not None else 1.0 / (epoch + 1)},
        config=None, metric_for_best="loss", mode="min", provenance={},
    )
    seq = tiers.before_commit(snapshot.name)
    info = write_snapshot(tiers.local, snapshot)
    tiers.after_commit(info, seq)
    return info


def make_tiers(tmp_path: Path, durable_url: str, *, faulty: FaultyBackend | None = None, **options) -> Tiers:
    local = LocalStore(tmp_path / "local")
    local.ensure_writable()
    durable = open_store(durable_url)
    if faulty is not None:
        faulty.inner = durable.backend
        durable = with_backend(durable, faulty)
    options.setdefault("backoff", 0.01)
    return Tiers(local, durable, **options)


@pytest.fixture
def memory_url() -> str:
    return f"memory://tiered-{uuid.uuid4().hex[:12]}/run/checkpoints"


def wait_after_recovery(tiers: Tiers) -> None:
    """Wait for the uploads once the store works again; a retry that failed before it recovered is
    still reported once."""
    try:
        tiers.uploader.wait(timeout=30)
    except UploadError:
        tiers.uploader.wait(timeout=30)


def names(infos: list[CheckpointInfo]) -> list[str]:
    return [info.name for info in infos]


# ---------------------------------------------------------------------------------- the journal


def test_journal_replays_pending_saves_in_order_and_skips_a_torn_line(tmp_path: Path) -> None:
    journal = PendingJournal(tmp_path)
    first = journal.add("epoch_1")
    journal.add("epoch_2")
    journal.add("epoch_3")
    journal.done("epoch_1", first)
    with open(tmp_path / JOURNAL_FILE, "ab") as log:
        log.write(b'{"uploaded":"epoch_2","se')  # a writer killed mid-line
    assert [name for name, _ in PendingJournal(tmp_path).pending()] == ["epoch_2", "epoch_3"]


def test_journal_keeps_a_save_made_again_while_its_older_save_uploads(tmp_path: Path) -> None:
    journal = PendingJournal(tmp_path)
    older = journal.add("epoch_1")
    newer = journal.add("epoch_1")
    journal.done("epoch_1", older)  # the older save's upload finished
    assert PendingJournal(tmp_path).pending() == [("epoch_1", newer)]
    journal.done("epoch_1", newer)
    assert not (tmp_path / JOURNAL_FILE).exists()  # nothing pending: no journal left behind
    assert PendingJournal(tmp_path).pending() == []


# ---------------------------------------------------------------------------------- one upload


@pytest.mark.parametrize("remote_url", ["memory", "s3"], indirect=True)
def test_upload_commits_a_verified_copy_manifest_last(tmp_path: Path, remote_url: str) -> None:
    local = LocalStore(tmp_path / "local")
    local.ensure_writable()
    snapshot = take_snapshot({"model": state(3)}, epoch=3, step=None, metrics={"loss": 0.5}, config={"lr": 0.1},
                             metric_for_best="loss", mode="min", provenance={})
    info = write_snapshot(local, snapshot)
    durable = open_store(remote_url)
    copy = upload(info, durable)
    assert names(list_committed(durable)) == ["epoch_3"]
    assert copy.files == info.files and copy.metrics == info.metrics
    manifest = documents.load_json(durable.backend.read_bytes(copy.file(METADATA_FILE)), "manifest")
    assert manifest["transaction"] == copy.location.rsplit("@", 1)[1]
    assert_same_tree(read_checkpoint(info)["model"], read_checkpoint(copy)["model"])
    assert durable_copy(info, durable) == copy  # a second run finds it and uploads nothing


def test_upload_of_a_damaged_local_copy_commits_nothing(tmp_path: Path, memory_url: str) -> None:
    local = LocalStore(tmp_path / "local")
    local.ensure_writable()
    snapshot = take_snapshot({"model": state(1)}, epoch=1, step=None, metrics={}, config=None,
                             metric_for_best=None, mode="min", provenance={})
    info = write_snapshot(local, snapshot)
    damaged = Path(info.file("model.safetensors"))
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    durable = open_store(memory_url)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        upload(info, durable)
    assert list(durable.backend.walk(durable.root)) == []  # type: ignore[attr-defined]


def test_an_upload_failing_before_its_manifest_leaves_nothing_visible_and_a_retry_completes(tmp_path: Path, memory_url: str) -> None:
    faulty = FaultyBackend(None, fail_on={"close": 2})  # type: ignore[arg-type]
    tiers = make_tiers(tmp_path, memory_url, faulty=faulty, attempts=3)
    save_local(tiers, 1)
    tiers.uploader.wait(timeout=30)
    assert faulty.triggered
    assert names(tiers.durable_listing()) == ["epoch_1"]
    prefixes = {key.split("/")[0] for key in tiers.durable.backend.walk(tiers.durable.root)}  # type: ignore[attr-defined]
    assert len(prefixes) == 1  # the failed attempt's prefix was removed


# ---------------------------------------------------------------------------------- the uploader


def test_uploads_run_in_save_order_and_save_returns_before_its_upload(tmp_path: Path, memory_url: str) -> None:
    release = threading.Event()
    order: list[str] = []

    def slow(operation: str, key: str) -> None:
        if operation == "create" and key.endswith(METADATA_FILE):
            release.wait(30)
            order.append(key.rsplit("/", 2)[-2].split("@")[0])

    tiers = make_tiers(tmp_path, memory_url, faulty=FaultyBackend(None, hook=slow))  # type: ignore[arg-type]
    for epoch in range(3):
        save_local(tiers, epoch)
    assert names(tiers.pending()) == ["epoch_0", "epoch_1", "epoch_2"]
    assert names(tiers.durable_listing()) == []
    release.set()
    tiers.uploader.wait(timeout=30)
    assert order == ["epoch_0", "epoch_1", "epoch_2"]
    assert tiers.pending() == []


def test_a_persistent_failure_is_raised_once_and_the_upload_resumes(tmp_path: Path, memory_url: str) -> None:
    faulty = FaultyBackend(None, fail_after_bytes=0)  # type: ignore[arg-type]
    tiers = make_tiers(tmp_path, memory_url, faulty=faulty, attempts=3)
    save_local(tiers, 1)
    with pytest.raises(UploadError, match="epoch_1") as raised:
        tiers.uploader.wait(timeout=30)
    assert faulty.calls["create"] >= 3  # retried before giving up
    assert "no space left" in str(raised.value.__cause__)
    assert names(tiers.pending()) == ["epoch_1"]  # still pending, still local
    faulty.budget = None  # the store recovers
    wait_after_recovery(tiers)
    assert names(tiers.durable_listing()) == ["epoch_1"] and tiers.pending() == []


def test_backpressure_waits_for_the_oldest_upload(tmp_path: Path, memory_url: str) -> None:
    release = threading.Event()
    tiers = make_tiers(tmp_path, memory_url,
                       faulty=FaultyBackend(None, hook=lambda op, key: op == "create" and release.wait(30)))  # type: ignore[arg-type]
    save_local(tiers, 0)
    save_local(tiers, 1)
    assert tiers.uploader.wait_for_room(1, timeout=0.3) is False  # two pending, room for one: it waits
    release.set()
    assert tiers.uploader.wait_for_room(1, timeout=30) is True


def test_a_damaged_local_copy_is_reported_and_dropped_from_the_journal(tmp_path: Path, memory_url: str) -> None:
    release = threading.Event()
    tiers = make_tiers(tmp_path, memory_url,
                       faulty=FaultyBackend(None, hook=lambda op, key: op == "create" and release.wait(30)))  # type: ignore[arg-type]
    info = save_local(tiers, 0)
    damaged = Path(info.file("model.safetensors"))
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0x01
    damaged.write_bytes(bytes(data))
    release.set()
    with pytest.raises(UploadError) as raised:
        tiers.uploader.wait(timeout=30)
    assert isinstance(raised.value.__cause__, CorruptCheckpointError)
    assert tiers.pending() == [] and names(tiers.durable_listing()) == []


# ---------------------------------------------------------------------------------- retention


def test_local_retention_keeps_pending_and_the_newest_and_never_the_only_copy() -> None:
    found = [CheckpointInfo(path=Path(f"/x/epoch_{e}"), epoch=e, step=None, metrics={}) for e in range(6)]
    doomed = local_to_delete(found, pending={"epoch_1"}, durable={"epoch_0", "epoch_1", "epoch_2", "epoch_4", "epoch_5"},
                             keep_local=2)
    assert names(doomed) == ["epoch_0", "epoch_2"]  # epoch_3 has no durable copy; epoch_4, 5 are the newest
    policies = retention.policies_for(2, False, None, "min")
    assert retired_names(found, policies) == {"epoch_0", "epoch_1", "epoch_2", "epoch_3"}
    assert names(local_to_delete(found, pending=(), durable=(), keep_local=1, retired={"epoch_3"})) == ["epoch_3"]


def test_retention_across_tiers_while_uploads_fail(tmp_path: Path, memory_url: str) -> None:
    faulty = FaultyBackend(None, fail_after_bytes=0)  # type: ignore[arg-type]
    policies = retention.policies_for(2, False, None, "min")
    tiers = make_tiers(tmp_path, memory_url, faulty=faulty, attempts=1, keep_local=1, policies=policies)
    for epoch in range(4):
        save_local(tiers, epoch)
        with pytest.raises(UploadError):
            tiers.uploader.wait(timeout=30)
    assert names(tiers.local_listing()) == ["epoch_0", "epoch_1", "epoch_2", "epoch_3"]  # every one is the only copy
    faulty.budget = None
    wait_after_recovery(tiers)
    assert names(tiers.durable_listing()) == ["epoch_2", "epoch_3"]  # max_checkpoints=2 on the durable tier
    assert names(tiers.local_listing()) == ["epoch_3"]  # keep_local=1
    assert tiers.copies() == {"epoch_3": ("local", "durable"), "epoch_2": ("durable",)}


def test_keep_best_on_the_durable_tier(tmp_path: Path, memory_url: str) -> None:
    policies = retention.policies_for(1, True, "loss", "min")
    tiers = make_tiers(tmp_path, memory_url, keep_local=1, policies=policies)
    for epoch, loss in enumerate([0.5, 0.1, 0.4, 0.3]):
        save_local(tiers, epoch, loss=loss)
    tiers.uploader.wait(timeout=30)
    assert names(tiers.durable_listing()) == ["epoch_1", "epoch_3"]
    assert names(tiers.local_listing()) == ["epoch_3"]


# ---------------------------------------------------------------------------------- loading


def test_a_damaged_local_copy_falls_back_to_the_durable_one_with_one_warning(tmp_path: Path, memory_url: str) -> None:
    tiers = make_tiers(tmp_path, memory_url)
    info = save_local(tiers, 2)
    tiers.uploader.wait(timeout=30)
    damaged = Path(info.file("model.safetensors"))
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    [chosen] = tiers.checkpoints()
    assert chosen.location == info.location  # the local copy is listed first
    with pytest.warns(UserWarning, match="durable copy") as caught:
        loaded = tiers.read(chosen, read_checkpoint)
        tiers.read(chosen, read_checkpoint)
    assert len([w for w in caught if "durable copy" in str(w.message)]) == 1
    assert_same_tree(state(2), loaded["model"])


def test_an_empty_local_dir_reads_from_the_durable_tier(tmp_path: Path, memory_url: str) -> None:
    tiers = make_tiers(tmp_path, memory_url)
    save_local(tiers, 4)
    tiers.uploader.wait(timeout=30)
    fresh = make_tiers(tmp_path / "new-machine", memory_url)
    [chosen] = fresh.checkpoints()
    assert chosen.location.startswith("memory://")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_tree(state(4), fresh.read(chosen, read_checkpoint)["model"])


def test_local_dir_on_dev_shm(memory_url: str) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    root = shm / f"ckpt-tiered-{uuid.uuid4().hex[:12]}"
    try:
        tiers = make_tiers(root, memory_url, keep_local=1)
        for epoch in range(3):
            save_local(tiers, epoch)
        tiers.uploader.wait(timeout=30)
        assert names(tiers.local_listing()) == ["epoch_2"]
        assert names(tiers.durable_listing()) == ["epoch_0", "epoch_1", "epoch_2"]
        assert_same_tree(state(2), tiers.read(tiers.checkpoints()[-1], read_checkpoint)["model"])
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("durable_kind", ["memory", "directory"])
def test_a_signed_checkpoint_is_signed_again_on_the_durable_tier(tmp_path: Path, memory_url: str, durable_kind: str) -> None:
    pytest.importorskip("model_signing")
    from security_helpers import key_pair

    from ckpt_plugin import signing
    from ckpt_plugin.errors import ConfigurationError

    private, public = key_pair(tmp_path, "ours")
    local = LocalStore(tmp_path / "local")
    local.ensure_writable()
    snapshot = take_snapshot({"model": state(5)}, epoch=5, step=None, metrics={"loss": 0.2}, config=None,
                             metric_for_best="loss", mode="min", provenance={})
    info = write_snapshot(local, snapshot, before_commit=signing.signer(private))
    durable = open_store(memory_url if durable_kind == "memory" else str(tmp_path / "durable"))
    durable.ensure_writable()
    with pytest.raises(ConfigurationError, match="signing_key"):
        upload(info, durable)
    assert list_committed(durable) == []
    copy = upload(info, durable, signing_key=private)
    signing.verify_prefix(durable.backend, copy.location, public)
    checkpoint = read_checkpoint(read_info_signed(copy, public))
    assert_same_tree(state(5), checkpoint["model"])


def read_info_signed(info: CheckpointInfo, public: Path) -> CheckpointInfo:
    """``info`` read from bytes its signature covers (as a load with ``verify_with`` reads it)."""
    from ckpt_plugin import signing
    from ckpt_plugin._io.reader import read_info

    return read_info(info.location, signing.read_signed(info.backend, info.location, public))


def test_an_unreachable_durable_tier_lists_the_local_copies_with_one_warning(tmp_path: Path, memory_url: str) -> None:
    def unreachable() -> list[CheckpointInfo]:
        raise StorageError(errno.ECONNREFUSED, "could not list memory://...: connection refused")

    tiers = make_tiers(tmp_path, memory_url, durable_listing=unreachable)
    snapshot = take_snapshot({"model": state(1)}, epoch=1, step=None, metrics={}, config=None,
                             metric_for_best=None, mode="min", provenance={})
    write_snapshot(tiers.local, snapshot)
    with pytest.warns(UserWarning, match="cannot be listed") as caught:
        assert names(tiers.checkpoints()) == ["epoch_1"]
        assert names(tiers.checkpoints()) == ["epoch_1"]
    assert len(caught) == 1
