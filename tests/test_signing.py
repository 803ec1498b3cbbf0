"""Optional signatures (OpenSSF model-signing, private-key signing, offline)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("model_signing")
pytest.importorskip("OpenSSL")

from typer.testing import CliRunner

from ckpt_plugin import ArtifactRegistry, CheckpointManager, SignatureError
from ckpt_plugin import cli
from ckpt_plugin.signing import SIGNATURE_FILE
from core_helpers import tiny_training, train_one_step
from security_helpers import key_pair, read_doc, reseal_record, write_raw


@pytest.fixture
def keys(tmp_path):
    return key_pair(tmp_path, "ours"), key_pair(tmp_path, "theirs")


@pytest.fixture
def signed(tmp_path, keys):
    (private, _), _ = keys
    model, optimizer = tiny_training()
    manager = CheckpointManager(tmp_path / "checkpoints", max_checkpoints=None, signing_key=private)
    for epoch in range(2):
        train_one_step(model, optimizer)
        manager.save(model, optimizer, epoch=epoch, metrics={"loss": 1.0 - epoch})
    registry = ArtifactRegistry(tmp_path / "checkpoints")
    registry.validate(0, "1.0.0", signing_key=private)
    registry.validate(1, "1.1.0", signing_key=private)
    registry.validate(1, "1.2.0")  # unsigned
    return manager, registry


def test_manager_checkpoints_are_signed_and_verified(signed, keys):
    manager, _ = signed
    (_, ours), (_, theirs) = keys
    assert (manager.checkpoint_dir / "epoch_1" / SIGNATURE_FILE).is_file()
    assert manager.load_latest(verify_with=ours)["epoch"] == 1
    with pytest.raises(SignatureError):
        manager.load_latest(verify_with=theirs)
    directory = manager.checkpoint_dir / "epoch_1"
    metadata = read_doc(directory / "metadata.json")
    metadata["metrics"] = {"loss": {"__float__": "nan"}}
    from ckpt_plugin._checkpoint import metadata_checksum

    metadata["metadata_checksum"] = metadata_checksum(metadata)
    write_raw(directory / "metadata.json", json.dumps(metadata).encode())
    with pytest.raises(SignatureError, match="epoch_1"):
        manager.load(epoch=1, verify_with=ours)


def test_promote_and_load_production_refuse_what_the_key_did_not_sign(signed, keys):
    _, registry = signed
    (_, ours), (_, theirs) = keys
    registry.promote("1.0.0", verify_with=ours)
    assert registry.load_production(verify_with=ours)["version"] == "1.0.0"
    with pytest.raises(SignatureError):
        registry.load_production(verify_with=theirs)
    with pytest.raises(SignatureError, match="not signed"):
        registry.promote("1.2.0", verify_with=ours)
    with pytest.raises(SignatureError):
        registry.promote("1.1.0", verify_with=theirs)
    assert registry.production()["version"] == "1.0.0"


def test_a_production_record_swapped_to_other_weights_fails_verification(signed, keys):
    _, registry = signed
    (_, ours), _ = keys
    registry.promote("1.0.0", verify_with=ours)
    other = read_doc(registry.validated_dir / "v1.1.0" / "validation.json")["files"]["model.safetensors"]
    os.unlink(registry.production_dir / "model.safetensors")
    os.link(registry.validated_dir / "v1.1.0" / "model.safetensors", registry.production_dir / "model.safetensors")
    reseal_record(registry.production_dir / "model.json", lambda d: d["files"].update({"model.safetensors": other}))
    assert registry.load_production()["version"] == "1.0.0"  # checksums alone are fooled
    with pytest.raises(SignatureError, match="not the signed weights"):
        registry.load_production(verify_with=ours)


def test_ckpt_verify_key(signed, keys):
    manager, registry = signed
    (_, ours), (_, theirs) = keys
    registry.promote("1.1.0", verify_with=ours)
    runner = CliRunner()
    result = runner.invoke(cli.app, ["verify", str(manager.checkpoint_dir), "--key", str(ours), "--json"])
    assert result.exit_code == 1  # version 1.2.0 is unsigned
    assert "v1.2.0 is not signed" in result.output and "v1.1.0" not in result.output
    (registry.validated_dir / "v1.2.0" / "validation.json").unlink()
    assert runner.invoke(cli.app, ["verify", str(manager.checkpoint_dir), "--key", str(ours)]).exit_code == 0
    assert runner.invoke(cli.app, ["verify", str(manager.checkpoint_dir), "--key", str(theirs)]).exit_code == 1


def test_a_signed_checkpoints_data_loader_state_is_covered_by_the_signature(tmp_path, keys):
    """The loader's position lives in state.json and state.safetensors, whose checksums the signed
    metadata records: rewriting it (and every checksum, as an attacker can) fails verification."""
    torchdata = pytest.importorskip("torchdata.stateful_dataloader")
    from ckpt_plugin import _data_state as data_state
    from security_helpers import edit_document

    (private, ours), _ = keys
    loader = torchdata.StatefulDataLoader(range(40), batch_size=4, shuffle=True)
    batches = iter(loader)
    next(batches), next(batches)
    model, optimizer = tiny_training()
    manager = CheckpointManager(tmp_path / "checkpoints", max_checkpoints=None, signing_key=private)
    info = manager.save(model, optimizer, epoch=0, extra={data_state.DATA_STATE_KEY: data_state.capture(loader, world_size=1)})
    assert manager.load_latest(verify_with=ours)["extra"][data_state.DATA_STATE_KEY]["state"]["_num_yielded"] == 2

    def skip_ahead(state):  # resume further into the epoch: samples would be dropped
        state["items"]["extra"]["tree"][data_state.DATA_STATE_KEY]["state"]["_num_yielded"] = 9

    edit_document(info.path, "state.json", skip_ahead)
    assert manager.load_latest()["extra"][data_state.DATA_STATE_KEY]["state"]["_num_yielded"] == 9  # checksums agree
    with pytest.raises(SignatureError, match="epoch_0"):
        manager.load_latest(verify_with=ours)
