"""Sharded checkpoints on object storage: every rank of an FSDP2 job writes its own shards under
one prefix of an S3 API server (moto over HTTP), the coordinator commits with the manifest last,
and any world size, or one plain process, reads them back exactly."""

from __future__ import annotations

import json
import uuid

import fsspec
import pytest
import safetensors.torch
import torch

from ckpt_plugin import CheckpointManager
from sharded_workers import check_cli_export, check_consolidated_load, check_promotion, launch

SHARD_FILES = [
    "metadata.json", "model-r0-of-2.safetensors", "model-r1-of-2.safetensors", "optim-r0-of-2.safetensors",
    "optim-r1-of-2.safetensors", "sharding.json", "state.json", "state.safetensors",
]


@pytest.fixture(scope="module")
def saved_remote(s3_endpoint, tmp_path_factory):
    """A bucket on the test server, the AWS environment pointing at it (inherited by the spawned
    ranks), and a checkpoint run saved there by two ranks."""
    import boto3

    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", s3_endpoint)):
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            patch.delenv(name, raising=False)
        bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
        directory = tmp_path_factory.mktemp("sharded-remote")
        url = f"s3://{bucket}/run/checkpoints"
        launch("remote_save", 2, directory, arguments=(url,))
        yield directory, url


def _objects(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return sorted(name[len(path) :].lstrip("/") for name in fs.find(path))


def test_every_rank_writes_under_one_prefix_and_the_manifest_commits(saved_remote):
    _, url = saved_remote
    found = _objects(url)
    prefixes = sorted({name.split("/", 1)[0] for name in found} - {".saves"})  # the save log sits beside them
    assert [prefix.split("@")[0] for prefix in prefixes] == ["epoch_1", "epoch_2"], prefixes  # the failed epoch 3 left nothing
    for prefix in prefixes:
        assert sorted(name.split("/", 1)[1] for name in found if name.startswith(prefix + "/")) == SHARD_FILES
    with fsspec.open(f"{url}/{prefixes[-1]}/metadata.json", "rb") as handle:
        metadata = json.loads(handle.read())
    assert metadata["sharding"] == {"world_size": 2}
    assert set(metadata["files"]) == set(SHARD_FILES) - {"metadata.json"}
    with fsspec.open(f"{url}/{prefixes[-1]}/model-r1-of-2.safetensors", "rb") as handle:
        assert safetensors.torch.load(handle.read()), "rank 1 holds part of the model"


def test_one_process_consolidates_from_the_url_exactly(saved_remote):
    directory, url = saved_remote
    checkpoint = check_consolidated_load(CheckpointManager(url), directory / "reference.safetensors")
    assert checkpoint["metadata"]["path"].startswith(f"{url}/epoch_2@")


def test_restore_from_the_url_at_one_rank_reshards_exactly(saved_remote):
    directory, url = saved_remote
    launch("remote_restore", 1, directory, arguments=(url,))


def test_restore_from_the_url_at_four_ranks_reshards_exactly(saved_remote):
    directory, url = saved_remote
    launch("remote_restore", 4, directory, arguments=(url,))


def test_cli_exports_a_consolidated_model_from_the_url(saved_remote, tmp_path):
    directory, url = saved_remote
    check_cli_export(url, directory / "reference_lr.txt", tmp_path)


def test_the_registry_promotes_consolidated_weights_on_the_store(saved_remote, s3_endpoint):
    """With the store configured by storage_options alone (no endpoint or keys in the environment)."""
    from ckpt_plugin import ArtifactRegistry

    _, url = saved_remote
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            patch.delenv(name)
        check_promotion(ArtifactRegistry(url, storage_options=options), CheckpointManager(url, storage_options=options))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_signed_sharded_checkpoint_verifies_and_tampering_is_caught(where, saved_remote, tmp_path):
    """The coordinator signs every rank's shards, on a local disk and on the store; a changed shard
    fails the signature."""
    pytest.importorskip("model_signing")
    from security_helpers import key_pair

    from ckpt_plugin import SignatureError

    _, url = saved_remote
    private, public = key_pair(tmp_path, "owner")
    location = f"{url.rsplit('/', 1)[0]}/signed-{uuid.uuid4().hex[:6]}" if where == "s3" else str(tmp_path / "signed")
    launch("signed_save", 2, tmp_path, arguments=(location, str(private)))
    manager = CheckpointManager(location)
    loaded = manager.load_latest(verify_with=public)
    reference = safetensors.torch.load_file(str(tmp_path / "signed_reference.safetensors"))
    assert all(torch.equal(loaded["model"][key.removeprefix("model/")], value)
               for key, value in reference.items() if key.startswith("model/"))
    shard = manager.latest().file("model-r1-of-2.safetensors")
    fs, path = fsspec.core.url_to_fs(shard)
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0x01
    fs.rm_file(path)
    fs.pipe_file(path, bytes(data))
    with pytest.raises(SignatureError):
        CheckpointManager(location).load_latest(verify_with=public)
