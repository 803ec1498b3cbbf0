"""Signatures on object storage: a checkpoint's prefix signed and verified through the backend, as
model-signing signs and verifies a directory (moto's S3 server over HTTP, and ``memory://``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch

pytest.importorskip("model_signing")

from security_helpers import key_pair
from typer.testing import CliRunner

from ckpt_plugin import CheckpointManager, SignatureError, StorageError, cli
from ckpt_plugin._format.records import METADATA_FILE
from ckpt_plugin.signing import SIGNATURE_FILE, sign_directory, sign_prefix, verify_prefix
from ckpt_plugin._storage import LOCAL, backend_of, faults


@pytest.fixture
def keys(tmp_path: Path) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
    return key_pair(tmp_path, "ours"), key_pair(tmp_path, "theirs")


def save_signed(url: str, private: Path, epochs: int = 1, **options: object) -> CheckpointManager:
    manager = CheckpointManager(url, max_checkpoints=None, signing_key=private, **options)
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(epochs):
        model.weight.data.add_(1.0)
        manager.save(model, optimizer, epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
    return manager


def test_a_signed_remote_checkpoint_verifies_and_refuses_another_key(remote_url: str, keys) -> None:
    (private, ours), (_, theirs) = keys
    manager = save_signed(remote_url, private)
    info = manager.latest()
    assert info.backend.fingerprint(info.file(SIGNATURE_FILE)) is not None
    assert SIGNATURE_FILE not in info.files  # not one of the checkpoint's recorded files
    assert manager.load_latest(verify_with=ours)["epoch"] == 0
    verify_prefix(info.backend, info.location, ours)
    with pytest.raises(SignatureError, match="does not verify"):
        manager.load_latest(verify_with=theirs)


@pytest.mark.parametrize("damage", ["tampered", "added", "removed"])
def test_a_changed_remote_checkpoint_fails_verification(remote_url: str, keys, damage: str) -> None:
    (private, ours), _ = keys
    info = save_signed(remote_url, private).latest()
    backend = info.backend
    fs, _ = fsspec.core.url_to_fs(info.location)
    if damage == "tampered":
        target = backend.path_of(info.file("state.json"))
        fs.pipe_file(target, fs.cat_file(target).replace(b"{", b"{ ", 1))
    elif damage == "added":
        fs.pipe_file(backend.path_of(info.file("notes.txt")), b"not signed")
    else:
        fs.rm_file(backend.path_of(info.file("state.safetensors")))
    with pytest.raises(SignatureError, match=info.name):
        verify_prefix(backend, info.location, ours)


def test_an_unsigned_remote_checkpoint_is_refused(remote_url: str, keys) -> None:
    (_, ours), _ = keys
    manager = CheckpointManager(remote_url)
    manager.save(torch.nn.Linear(2, 2), epoch=0)
    with pytest.raises(SignatureError, match="not signed"):
        manager.load_latest(verify_with=ours)


def test_the_signature_is_in_the_prefix_before_the_manifest_commits(keys) -> None:
    (private, ours), _ = keys
    url = "memory://signed-before-commit/run/checkpoints"
    manager = CheckpointManager(url, max_checkpoints=None, signing_key=private, incremental=True)
    seen: list[bool] = []

    def manifest_written(operation: str, key: str) -> None:
        if operation == "create" and key.endswith(f"/{METADATA_FILE}"):
            prefix = key.rsplit("/", 1)[0]
            seen.append(disk.inner.fingerprint(disk.inner.join(prefix, SIGNATURE_FILE)) is not None)

    disk = faults.inject(manager, hook=manifest_written)
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(2):  # the second save copies unchanged files
        model.weight.data.add_(1.0)
        manager.save(model, optimizer, epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
    assert seen == [True, True]
    for info in manager.checkpoints():
        verify_prefix(info.backend, info.location, ours)


def test_model_signing_verifies_a_downloaded_copy_and_its_signature_verifies_remotely(s3_bucket: str, keys, tmp_path: Path) -> None:
    """Both ways: the remote signature is model-signing's own, and model-signing's signature of a
    directory verifies once the directory is uploaded."""
    (private, ours), (_, theirs) = keys
    url = f"s3://{s3_bucket}/run/checkpoints"
    info = save_signed(url, private).latest()
    fs, _ = fsspec.core.url_to_fs(url)
    copy = tmp_path / "copy"
    fs.get(info.backend.path_of(info.location) + "/", str(copy) + "/", recursive=True)
    assert (copy / SIGNATURE_FILE).is_file() and (copy / "metadata.json").is_file()

    def model_signing_verify(public: Path) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "model_signing", "verify", "key", str(copy),
                   "--signature", str(copy / SIGNATURE_FILE), "--public_key", str(public)]
        return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)

    assert model_signing_verify(ours).returncode == 0
    assert model_signing_verify(theirs).returncode != 0

    local = tmp_path / "local"
    local.mkdir()
    (local / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    (local / "sub").mkdir()
    (local / "sub" / "config.json").write_text('{"a": 1}')
    sign_directory(local, private)
    uploaded = f"s3://{s3_bucket}/uploaded"
    fs.put(str(local) + "/", backend_of(uploaded).path_of(uploaded) + "/", recursive=True)
    backend = backend_of(uploaded)
    fs.pipe_file(backend.path_of(uploaded) + "-sibling/other.bin", b"beside the prefix, not in it")
    verify_prefix(backend, uploaded, ours)
    sign_prefix(backend, uploaded, private)  # and signed again remotely, as model-signing would
    verify_prefix(backend, uploaded, ours)


def test_sign_and_verify_prefix_delegate_to_the_directory_functions_locally(tmp_path: Path, keys) -> None:
    (private, ours), (_, theirs) = keys
    manager = CheckpointManager(tmp_path / "checkpoints")
    info = manager.save(torch.nn.Linear(2, 2), epoch=0)
    assert sign_prefix(LOCAL, info.path, private) == str(info.path / SIGNATURE_FILE)
    verify_prefix(LOCAL, info.location, ours)
    with pytest.raises(SignatureError):
        verify_prefix(LOCAL, info.path, theirs)


def test_ckpt_verify_key_checks_remote_signatures(s3_bucket: str, keys) -> None:
    (private, ours), (_, theirs) = keys
    url = f"s3://{s3_bucket}/run/checkpoints"
    save_signed(url, private, epochs=2)
    runner = CliRunner()
    result = runner.invoke(cli.app, ["verify", url, "--key", str(ours), "--json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli.app, ["verify", url, "--key", str(theirs), "--json"])
    assert result.exit_code == 1 and "does not verify" in result.output


def test_a_failed_signature_upload_leaves_nothing_visible(remote_url: str, keys) -> None:
    (private, ours), _ = keys
    manager = save_signed(remote_url, private)
    fs, path = fsspec.core.url_to_fs(remote_url)
    fs.invalidate_cache()
    before = sorted(fs.find(path))

    def drop_signature(operation: str, key: str) -> None:
        if operation == "create" and key.endswith(SIGNATURE_FILE):
            raise faults.disk_full(key)

    faults.inject(manager, hook=drop_signature)
    with pytest.raises(StorageError, match=SIGNATURE_FILE):
        manager.save(torch.nn.Linear(6, 3), epoch=1)
    fs.invalidate_cache()
    assert sorted(fs.find(path)) == before  # the prefix was removed, nothing was committed or logged
    fresh = CheckpointManager(remote_url)
    assert [info.epoch for info in fresh.checkpoints()] == [0]
    fresh.load_latest(verify_with=ours)


def test_an_asynchronous_signed_save_verifies(keys) -> None:
    (private, ours), _ = keys
    url = "memory://signed-async/run/checkpoints"
    with CheckpointManager(url, signing_key=private, async_save=True) as manager:
        manager.save(torch.nn.Linear(6, 3), epoch=0)
    assert CheckpointManager(url).load_latest(verify_with=ours)["epoch"] == 0


def test_the_registry_signs_and_verifies_versions_on_an_object_store(remote_url: str, keys) -> None:
    from ckpt_plugin import ArtifactRegistry

    (private, ours), (_, theirs) = keys
    save_signed(remote_url, private, epochs=2)
    registry = ArtifactRegistry(remote_url)
    registry.validate(1, "1.0.0", signing_key=private)
    registry.validate(0, "1.1.0")  # unsigned
    registry.verify_signature("1.0.0", ours)
    with pytest.raises(SignatureError):
        registry.verify_signature("1.0.0", theirs)
    with pytest.raises(SignatureError, match="not signed"):
        registry.promote("1.1.0", verify_with=ours)
    registry.promote("1.0.0", verify_with=ours)
    assert registry.load_production(verify_with=ours)["version"] == "1.0.0"
