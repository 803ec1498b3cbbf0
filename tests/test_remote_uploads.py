"""Multipart uploads on S3 through a network that resets connections: a save either commits and
loads, or raises a StorageError, and in both cases every multipart upload it started is completed or
aborted (none stays open, holding storage that no listing shows).

A fault-injecting TCP proxy (:mod:`tcp_proxy`) sits between s3fs and the moto S3 server. The open
uploads are listed straight from the server, never through the proxy.
"""

from __future__ import annotations

import time

import boto3
import pytest
import torch
from core_helpers import recover_now
from tcp_proxy import FaultyProxy

from ckpt_plugin import ArtifactRegistry, CheckpointManager, CheckpointError, StorageError
from ckpt_plugin._format.names import format_transaction_id, transaction_name
from ckpt_plugin._storage import conditional
from ckpt_plugin._storage import fsspec as object_storage
from ckpt_plugin._storage.fsspec import FsspecBackend

PART = 256 * 1024


def use_parts(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """Parts of ``size`` bytes (the server is told to accept them), and server-side copies of more
    than one part made part by part."""
    import moto.s3.models

    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", size)
    for name in ("PART_BYTES", "COPY_PART_BYTES", "SINGLE_COPY_MAX_BYTES"):
        monkeypatch.setattr(object_storage, name, size)


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> int:
    """Parts of 256 KiB, so that a file of the weights below takes six."""
    use_parts(monkeypatch, PART)
    return PART


def open_uploads(endpoint: str, bucket: str) -> list[str]:
    """The keys of the multipart uploads of ``bucket`` neither completed nor aborted, asked of the server directly."""
    client = boto3.client("s3", endpoint_url=endpoint)
    return sorted(upload["Key"] for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def proxied(proxy: FaultyProxy, attempts: int) -> dict[str, object]:
    """Storage options that reach the store through ``proxy``, with ``attempts`` tries per request."""
    return {
        "endpoint_url": proxy.url,
        "key": "testing",
        "secret": "testing",
        "config_kwargs": {
            "retries": {"max_attempts": attempts, "mode": "standard"}, "connect_timeout": 5, "read_timeout": 10,
        },
    }


def server_port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def weights_of(epoch: int, part: int = PART) -> torch.Tensor:
    return torch.full((part + part // 2,), float(epoch))  # 1.5 parts of floats: six parts of bytes


@pytest.mark.parametrize(
    ("reset_probability", "attempts", "part", "saves"),
    [(0.02, 4, PART, 30), (0.05, 3, 6 * PART, 10)],
    ids=["retried", "failing"],
)
def test_saves_through_a_resetting_network_leave_no_upload_open(
    s3_bucket: str, s3_env: str, monkeypatch: pytest.MonkeyPatch, reset_probability: float, attempts: int, part: int,
    saves: int,
) -> None:
    """With large parts and few retries some saves fail (a part keeps failing), while the small
    requests that abort an upload get through: every save that failed left nothing open either."""
    use_parts(monkeypatch, part)
    url = f"s3://{s3_bucket}/run/checkpoints"
    returned: list[int] = []
    failed: list[int] = []
    with FaultyProxy("127.0.0.1", server_port(s3_env), reset_probability=reset_probability, seed=7) as proxy:
        manager = CheckpointManager(url, max_checkpoints=None, storage_options=proxied(proxy, attempts))
        for epoch in range(saves):
            try:
                manager.save({"w": weights_of(epoch, part)}, epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
            except StorageError:
                failed.append(epoch)
            else:
                returned.append(epoch)
        assert proxy.resets > 0, "the network never failed: the test proves nothing"
    assert open_uploads(s3_env, s3_bucket) == []
    assert sorted(returned + failed) == list(range(saves))
    reader = CheckpointManager(url)
    assert [info.epoch for info in reader.checkpoints()] == returned
    for epoch in returned:
        assert torch.equal(reader.load(epoch)["model"]["w"], weights_of(epoch, part))
    if reset_probability > 0.05:
        assert failed, "no save failed: the abort path was not exercised"


def test_server_side_copies_through_a_resetting_network_leave_no_upload_open(
    s3_bucket: str, s3_env: str, small_parts: int
) -> None:
    """Validating copies a checkpoint's files on the server, part by part beyond one part's size."""
    url = f"s3://{s3_bucket}/run/checkpoints"
    direct = CheckpointManager(url, max_checkpoints=None)
    for epoch in range(3):
        direct.save({"w": weights_of(epoch)}, epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
    validated: list[str] = []
    with FaultyProxy("127.0.0.1", server_port(s3_env), reset_probability=0.05, seed=11) as proxy:
        registry = ArtifactRegistry(url, storage_options=proxied(proxy, 2))
        for number in range(12):
            version = f"1.{number}.0"
            try:
                registry.validate(number % 3, version)
            except CheckpointError:
                continue
            validated.append(version)
        assert proxy.resets > 0
    assert open_uploads(s3_env, s3_bucket) == []
    registry = ArtifactRegistry(url)
    assert registry.versions() == validated
    for version in validated:
        epoch = registry.validation(version)["source"]["epoch"]
        assert torch.equal(registry.load(version)["model"]["w"], weights_of(epoch))


def test_recover_aborts_uploads_dead_writers_left_under_prefixes_of_ours_only(s3_bucket: str, s3_env: str) -> None:
    url = f"s3://{s3_bucket}/run/checkpoints"
    manager = CheckpointManager(url, max_checkpoints=None)
    info = manager.save({"w": torch.zeros(3)}, epoch=0, metrics={"loss": 1.0})
    client = boto3.client("s3", endpoint_url=s3_env)
    committed = info.location.split(f"{s3_bucket}/", 1)[1]
    dead = f"run/checkpoints/{transaction_name('epoch_1', format_transaction_id(time.time_ns(), '00000000deadbeef'))}"
    keys = {
        "orphan": f"{committed}/model.safetensors",  # under a committed prefix: no live writer completes it
        "dead": f"{dead}/model.safetensors",  # a writer killed mid-upload, before its manifest
        "foreign": "run/checkpoints/dataset@v1/part-0.bin",
        "near miss": "run/checkpoints/epoch_1@20260101T000000.000000000Z-0123456789ABCDEF/model.safetensors",
    }
    for key in keys.values():
        client.create_multipart_upload(Bucket=s3_bucket, Key=key)
    CheckpointManager(url)  # opening recovers: within the grace period only the orphan can go
    assert open_uploads(s3_env, s3_bucket) == sorted([keys["dead"], keys["foreign"], keys["near miss"]])
    time.sleep(1.1)  # the server records when an upload began to the second
    recover_now(manager)
    assert open_uploads(s3_env, s3_bucket) == sorted([keys["foreign"], keys["near miss"]])


def test_a_conditional_write_whose_answer_was_lost_is_not_taken_for_a_conflict(s3_bucket: str, s3_env: str) -> None:
    """The client retries a request whose answer was lost, and S3 refuses the retry of a conditional
    write that took effect (the object changed: by that write). A registry that took the refusal
    for a lost race would delete the version it had just claimed, or the weights production now
    names. The refusal is checked by reading back: the write's own bytes there mean it took effect."""
    backend = FsspecBackend(f"s3://{s3_bucket}/run/validated")
    key = f"s3://{s3_bucket}/run/validated/v1.0.0.json"
    conditional.write(backend, key, b'{"location": "mine"}', None)
    conditional.write(backend, key, b'{"location": "mine"}', None)  # the retry: refused, yet the bytes are this write's
    with pytest.raises(conditional.WriteConflict):
        conditional.write(backend, key, b'{"location": "theirs"}', None)
    read = conditional.read(backend, key)
    conditional.write(backend, key, b'{"version": 2}', read)
    conditional.write(backend, key, b'{"version": 2}', read)
    with pytest.raises(conditional.WriteConflict):
        conditional.write(backend, key, b'{"version": 3}', read)
    assert conditional.read(backend, key).data == b'{"version": 2}'
