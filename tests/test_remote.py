"""Checkpoints on object storage: every manager feature over the manifest commit, against a real S3
API server (moto over HTTP) and fsspec's ``memory://``, plus errors and injected faults."""

from __future__ import annotations

import socket
import time

import fsspec
import pytest
import torch
from core_helpers import assert_same_tree, objects, recover_now
from torch import nn

from ckpt_plugin import ArtifactRegistry, CheckpointManager, ConfigurationError, CorruptCheckpointError, StorageError
from ckpt_plugin import _savelog as savelog
from ckpt_plugin._storage import backend_of, faults, open_store
from ckpt_plugin._format.names import format_transaction_id, transaction_name


def training_state(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(8, 16)).sum().backward()
    optimizer.step()
    return model, optimizer


def prefixes(url: str) -> list[str]:
    """The checkpoint prefixes under ``url`` (the save log's ``.saves/`` is none)."""
    return sorted({name.split("/", 1)[0] for name in objects(url)} - {savelog.LOG_PREFIX})


def test_save_list_load_restore_and_retention(remote_url: str) -> None:
    manager = CheckpointManager(remote_url, max_checkpoints=2, keep_best=True, metric_for_best="loss")
    model, optimizer = training_state()
    for epoch, loss in enumerate([0.1, 0.5, 0.4, 0.3]):
        info = manager.save(model, optimizer, epoch=epoch, metrics={"loss": loss}, config={"lr": 0.01})
        assert isinstance(info.path, str) and info.path.startswith(remote_url)
        assert info.name == f"epoch_{epoch}"
    assert [c.epoch for c in manager.checkpoints()] == [0, 2, 3]  # the best is kept
    assert len(prefixes(remote_url)) == 3
    fresh = CheckpointManager(remote_url)
    checkpoint = fresh.load_latest()
    assert checkpoint["epoch"] == 3 and checkpoint["config"] == {"lr": 0.01}
    assert_same_tree(model.state_dict(), checkpoint["model"])
    assert_same_tree(optimizer.state_dict(), checkpoint["optimizer"])
    assert fresh.load_best()["epoch"] == 0
    restored, restored_optimizer = training_state(seed=1)
    assert fresh.restore(restored, restored_optimizer).epoch == 3
    assert_same_tree(model.state_dict(), restored.state_dict())
    assert_same_tree(optimizer.state_dict(), restored_optimizer.state_dict())


def test_a_re_save_writes_a_new_prefix_and_the_newest_commit_wins(remote_url: str) -> None:
    manager = CheckpointManager(remote_url, max_checkpoints=None)
    manager.save({"w": torch.zeros(3)}, epoch=1, metrics={"loss": 1.0})
    first = prefixes(remote_url)
    manager.save({"w": torch.ones(3)}, epoch=1, metrics={"loss": 0.5})
    second = prefixes(remote_url)
    assert len(first) == len(second) == 1 and first != second  # the older commit was removed
    assert torch.equal(CheckpointManager(remote_url).load(1)["model"]["w"], torch.ones(3))


def test_uncommitted_prefixes_are_invisible_and_removed_after_the_grace_period(remote_url: str) -> None:
    manager = CheckpointManager(remote_url, max_checkpoints=None)
    manager.save({"w": torch.zeros(3)}, epoch=0, metrics={"loss": 1.0})
    fs, root = fsspec.core.url_to_fs(remote_url)
    dead = f"{root}/{transaction_name('epoch_5', format_transaction_id(1, '00000000deadbeef'))}"
    fs.pipe_file(f"{dead}/model.safetensors", b"partial upload")  # a writer that died before its manifest
    assert [c.epoch for c in CheckpointManager(remote_url).checkpoints()] == [0]
    assert len(prefixes(remote_url)) == 2  # within the grace period: it may be a live writer
    reader = CheckpointManager(remote_url)
    time.sleep(0.01)
    recover_now(reader)
    assert len(prefixes(remote_url)) == 1 and [c.epoch for c in reader.checkpoints()] == [0]


def test_damaged_remote_files_are_caught_on_every_read(remote_url: str) -> None:
    manager = CheckpointManager(remote_url)
    model, optimizer = training_state()
    info = manager.save(model, optimizer, epoch=0, metrics={"loss": 1.0})
    fs, _ = fsspec.core.url_to_fs(remote_url)
    target = fs._strip_protocol(info.file("model.safetensors"))
    data = bytearray(fs.cat_file(target))
    data[-3] ^= 0xFF
    fs.pipe_file(target, bytes(data))
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        manager.load_latest()
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        manager.restore(*training_state(seed=2), atomic=True)


def test_async_save_uploads_in_the_background(remote_url: str) -> None:
    model, optimizer = training_state()
    with CheckpointManager(remote_url, async_save=True, max_checkpoints=2, keep_best=False) as manager:
        for epoch in range(3):
            manager.save(model, optimizer, epoch=epoch, metrics={"loss": 1.0})
        manager.wait()
        assert [c.epoch for c in manager.checkpoints()] == [1, 2]
    assert_same_tree(model.state_dict(), CheckpointManager(remote_url).load_latest()["model"])


def test_incremental_reuses_unchanged_shards_server_side(remote_url: str) -> None:
    manager = CheckpointManager(remote_url, incremental=True, max_checkpoints=None)
    backbone = nn.Linear(64, 64)
    backbone.requires_grad_(False)
    model = nn.Sequential(backbone, nn.Linear(64, 2))
    manager.save(model, epoch=0, metrics={"loss": 1.0})
    spy = faults.inject(manager)
    with torch.no_grad():
        model[1].weight.add_(1.0)
    manager.save(model, epoch=1, metrics={"loss": 1.0})
    assert spy.calls["reuse"] == 1  # the frozen backbone's shard was copied, not uploaded
    fresh = CheckpointManager(remote_url)
    assert_same_tree(model.state_dict(), fresh.load(1)["model"])
    open_store(remote_url).remove("epoch_0")
    assert_same_tree(model.state_dict(), CheckpointManager(remote_url).load(1)["model"])


@pytest.mark.parametrize("budget", [0, 100, 5_000, 9_000])
def test_a_failed_upload_is_a_storage_error_and_leaves_nothing_visible(remote_url: str, budget: int) -> None:
    manager = CheckpointManager(remote_url, max_checkpoints=2)
    model, optimizer = training_state()
    for epoch in range(2):
        manager.save(model, optimizer, epoch=epoch, metrics={"loss": 1.0})
    before = objects(remote_url)
    network = faults.inject(manager, fail_after_bytes=budget, error=lambda key: faults.disk_full(key))
    with pytest.raises(StorageError, match="epoch_2"):
        manager.save(model, optimizer, epoch=2, metrics={"loss": 1.0})
    assert network.triggered
    assert objects(remote_url) == before  # the partial prefix was removed, nothing else touched
    assert [c.epoch for c in CheckpointManager(remote_url).checkpoints()] == [0, 1]


def test_a_failed_commit_leaves_the_previous_checkpoints(remote_url: str) -> None:
    manager = CheckpointManager(remote_url, max_checkpoints=None)
    manager.save({"w": torch.zeros(2)}, epoch=0, metrics={"loss": 1.0})
    # model.safetensors, state.safetensors (the RNG states), state.json, then the manifest
    spy = faults.inject(manager, fail_on={"create": 4})
    with pytest.raises(StorageError):
        manager.save({"w": torch.ones(2)}, epoch=0, metrics={"loss": 1.0})
    assert spy.triggered and spy.calls["create"] == 4
    assert torch.equal(CheckpointManager(remote_url).load(0)["model"]["w"], torch.zeros(2))


def test_a_missing_bucket_is_a_storage_error_naming_the_url(s3_env: str) -> None:
    manager = CheckpointManager("s3://no-such-bucket-here/run")
    assert manager.checkpoints() == []
    with pytest.raises(StorageError, match="no-such-bucket-here") as caught:
        manager.save({"w": torch.zeros(2)}, epoch=0, metrics={"loss": 1.0})
    assert "bucket" in str(caught.value)


def test_an_unreachable_store_is_a_storage_error(s3_env: str) -> None:
    """A real connection to a closed port on this host: refused at once, after one attempt."""
    from botocore.exceptions import EndpointConnectionError

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # held but never listening: connections to it are refused
        options = {
            "endpoint_url": f"http://127.0.0.1:{closed.getsockname()[1]}",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1, "read_timeout": 1},
        }
        started = time.monotonic()
        with pytest.raises(StorageError, match="s3://bucket/run") as caught:
            manager = CheckpointManager("s3://bucket/run", storage_options=options)
            manager.save({"w": torch.zeros(2)}, epoch=0, metrics={"loss": 1.0})
    assert time.monotonic() - started < 30  # one attempt per request, one-second connect timeout
    assert caught.value.errno
    causes = []
    cause: BaseException | None = caught.value
    while cause is not None:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    assert any(isinstance(each, (EndpointConnectionError, ConnectionRefusedError)) for each in causes), causes


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"retries": 1}, "'retries'"),  # not an S3FileSystem argument: botocore's retries go in config_kwargs
        ({"config_kwargs": {"retry": {"max_attempts": 1}}}, "'retry'"),
        ({"client_kwargs": {"regionname": "us-east-1"}}, "'regionname'"),
        ({"config_kwargs": {"retries": {"mode": "fast"}}}, "'mode'"),
        ({"endpoint_url": "localhost 9000"}, "'endpoint_url'"),
    ],
)
def test_an_invalid_storage_option_is_a_configuration_error_naming_it(s3_env: str, options: dict, named: str) -> None:
    """Refused when the manager is built, before any request, and not taken for a storage failure."""
    with pytest.raises(ConfigurationError, match=f"refused the option {named}") as caught:
        CheckpointManager("s3://bucket/run", storage_options=options)
    assert not isinstance(caught.value, StorageError)
    with pytest.raises(ConfigurationError, match=named):
        ArtifactRegistry("s3://bucket/run", storage_options=options)
    with pytest.raises(ConfigurationError, match=named):
        backend_of("s3://bucket/run", options)


def test_storage_options_reach_the_store(s3_bucket: str, s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = {"endpoint_url": s3_env, "key": "testing", "secret": "testing"}
    manager = CheckpointManager(f"s3://{s3_bucket}/run", storage_options=options)
    manager.save({"w": torch.arange(3.0)}, epoch=0, metrics={"loss": 1.0})
    assert torch.equal(CheckpointManager(f"s3://{s3_bucket}/run", storage_options=options).load(0)["model"]["w"], torch.arange(3.0))


def test_large_files_go_up_in_parts(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckpt_plugin._storage import fsspec as remote

    monkeypatch.setattr(remote, "PART_BYTES", 5 * 1024 * 1024)  # S3's smallest part
    state = {"w": torch.randn(4 * 1024 * 1024)}  # 16 MiB: four parts
    manager = CheckpointManager(f"s3://{s3_bucket}/run")
    info = manager.save(state, epoch=0, metrics={"loss": 1.0})
    fs, _ = fsspec.core.url_to_fs(info.location)
    etag = fs.info(fs._strip_protocol(info.file("model.safetensors")))["ETag"]
    assert etag.strip('"').endswith("-4")  # a multipart upload of four parts
    assert torch.equal(CheckpointManager(f"s3://{s3_bucket}/run").load(0)["model"]["w"], state["w"])


def upload_parts_seen(monkeypatch: pytest.MonkeyPatch, touch=None) -> list[object]:
    """Record the body of every ``upload_part`` request s3fs is asked to make; ``touch(number, body)``
    may change a body first."""
    import s3fs

    bodies: list[object] = []
    call_s3 = s3fs.S3FileSystem.call_s3

    def recording(self, method, *args, **kwargs):
        if method == "upload_part":
            bodies.append(kwargs["Body"])
            if touch is not None:
                touch(kwargs["PartNumber"], kwargs["Body"])
        return call_s3(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", recording)
    return bodies


def test_parts_go_to_the_client_as_streams(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A part handed over as bytes is copied whole by the HTTP client, once or twice per request in
    flight; as a stream it is read in small chunks, and the memory of a save stays within its bound."""
    from ckpt_plugin._storage import fsspec as remote

    monkeypatch.setattr(remote, "PART_BYTES", 5 * 1024 * 1024)
    bodies = upload_parts_seen(monkeypatch)
    state = {"w": torch.randn(3 * 1024 * 1024)}  # 12 MiB: three parts
    CheckpointManager(f"s3://{s3_bucket}/run").save(state, epoch=0, metrics={"loss": 1.0})
    assert len(bodies) == 3
    assert all(hasattr(body, "read") and not isinstance(body, (bytes, bytearray, memoryview)) for body in bodies)
    assert torch.equal(CheckpointManager(f"s3://{s3_bucket}/run").load(0)["model"]["w"], state["w"])


def test_a_part_that_went_up_short_fails_the_save(s3_bucket: str, s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """s3fs retries a failed request with its body as the failure left it: a part re-sent from the
    middle of its stream goes up short. The completed object is then too small, and the save fails
    rather than commit it."""
    import boto3

    from ckpt_plugin._storage import fsspec as remote

    monkeypatch.setattr(remote, "PART_BYTES", 5 * 1024 * 1024)
    upload_parts_seen(monkeypatch, touch=lambda number, body: body.seek(1024) if number == 3 else None)
    manager = CheckpointManager(f"s3://{s3_bucket}/run")
    with pytest.raises(StorageError, match="is not .* bytes long"):
        manager.save({"w": torch.randn(3 * 1024 * 1024)}, epoch=0, metrics={"loss": 1.0})
    assert CheckpointManager(f"s3://{s3_bucket}/run").checkpoints() == []
    uploads = boto3.client("s3", endpoint_url=s3_env).list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert uploads == []


def test_an_upload_created_again_after_its_answer_was_lost_is_aborted(s3_bucket: str, s3_env: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A create_multipart_upload whose answer is lost is sent again; the upload the first one
    started, whose id the writer never learned, is aborted too."""
    import boto3
    from lost_responses import lost_responses

    from ckpt_plugin._storage import fsspec as remote

    monkeypatch.setattr(remote, "PART_BYTES", 5 * 1024 * 1024)
    state = {"w": torch.randn(3 * 1024 * 1024)}  # 12 MiB: three parts
    with lost_responses("create_multipart_upload") as lost:
        CheckpointManager(f"s3://{s3_bucket}/run").save(state, epoch=0, metrics={"loss": 1.0})
    assert len(lost) == 1, "no upload was created twice"
    assert torch.equal(CheckpointManager(f"s3://{s3_bucket}/run").load(0)["model"]["w"], state["w"])
    uploads = boto3.client("s3", endpoint_url=s3_env).list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert uploads == [], f"uploads left open: {[upload['Key'] for upload in uploads]}"


def test_local_paths_take_no_storage_options(tmp_path) -> None:
    from ckpt_plugin import ConfigurationError

    with pytest.raises(ConfigurationError, match="storage_options"):
        CheckpointManager(tmp_path, storage_options={"key": "x"})



def test_random_kill_9_during_uploads(s3_bucket: str) -> None:
    """A writer SIGKILLed at random moments while uploading (a fresh interpreter started after the
    test environment is set, so it reaches the S3 server) never leaves a listed checkpoint that
    fails to load, never loses a save that returned, and its leftovers go once recovered."""
    import random

    from spawned_workers import SpawnedWorkers
    from test_crash import assert_consistent, kill_at_random

    url = f"s3://{s3_bucket}/run/checkpoints"
    rng = random.Random(20261128)
    last_returned = -1
    saver = SpawnedWorkers()
    try:
        for _ in range(6):
            saved = kill_at_random(saver, "append", url, rng)
            if saved:
                last_returned = saved[-1]
            manager = CheckpointManager(url, max_checkpoints=3, keep_best=True, metric_for_best="loss")
            listed = manager.checkpoints()
            if last_returned >= 0:
                assert listed and listed[-1].epoch >= last_returned
            for info in listed:
                assert_consistent(manager.load(epoch=info.epoch), info.epoch)
    finally:
        saver.close()
    manager = CheckpointManager(url)
    recover_now(manager)
    committed = {info.location.rsplit("/", 1)[-1] for info in manager.checkpoints()}
    assert set(prefixes(url)) == committed  # only committed checkpoints remain


def test_a_reader_that_may_not_delete_still_lists_and_loads(remote_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-only credentials: cleaning up a superseded prefix is refused, the reader is warned and reads on."""
    manager = CheckpointManager(remote_url)
    manager.save({"w": torch.zeros(3)}, epoch=0, metrics={"loss": 1.0})
    fs, root = fsspec.core.url_to_fs(remote_url)
    [older] = [name for name in prefixes(remote_url) if name.startswith("epoch_0")]
    fs.copy(f"{root}/{older}", f"{root}-aside/{older}", recursive=True)
    manager.save({"w": torch.arange(3.0)}, epoch=0, metrics={"loss": 1.0})
    [committed] = [name for name in prefixes(remote_url) if name.startswith("epoch_0")]
    fs.copy(f"{root}-aside/{older}", f"{root}/{older}", recursive=True)  # an older commit whose cleanup was cut short
    assert sorted(name for name in prefixes(remote_url) if name.startswith("epoch_0")) == sorted([older, committed])

    def refused(self: object, key: str) -> None:
        raise StorageError(13, f"could not delete {key}: AccessDenied")

    monkeypatch.setattr("ckpt_plugin._storage.fsspec.FsspecBackend.delete", refused)
    monkeypatch.setattr("ckpt_plugin._storage.fsspec.FsspecBackend.delete_tree", refused)
    with pytest.warns(UserWarning, match="could not clean up leftovers"):
        reader = CheckpointManager(remote_url)
    assert [info.epoch for info in reader.checkpoints()] == [0]
    assert torch.equal(reader.load_latest()["model"]["w"], torch.arange(3.0))
    monkeypatch.undo()
    CheckpointManager(remote_url)  # with write access the leftover goes
    assert [name for name in prefixes(remote_url) if name.startswith("epoch_0")] == [committed]
