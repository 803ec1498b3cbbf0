"""The signed bytes are the authority: with ``verify_with`` every value a load returns, and every
choice it makes, comes from bytes the signature covers; caches only ever speed things up."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

pytest.importorskip("model_signing")

from security_helpers import key_pair, reseal_record

from ckpt_plugin import ArtifactRegistry, CheckpointManager, CheckpointNotFoundError, SignatureError, signing
from ckpt_plugin import _listing as listing
from ckpt_plugin._checkpoint import METADATA_FILE
from ckpt_plugin._format import documents
from ckpt_plugin._io.files import write_tensor_file
from ckpt_plugin._storage import checksum_bytes, faults

LOSSES = (0.5, 0.9, 0.3)
"""Per epoch: epoch 2 is both the latest and the best."""


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return key_pair(tmp_path, "ours")


def weights_of(epoch: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((3, 2), float(epoch)), "bias": torch.full((3,), float(epoch))}


def save_run(root: Path | str, private: Path | None, **options: Any) -> CheckpointManager:
    manager = CheckpointManager(root, max_checkpoints=None, signing_key=private, save_rng=False, **options)
    for epoch, loss in enumerate(LOSSES):
        manager.save(weights_of(epoch), epoch=epoch, metrics={"loss": loss}, config={"epoch": epoch})
    return manager


def forge_listing(root: Path, name: str, edit: Callable[[dict[str, Any]], None]) -> None:
    """Write ``.listing.json`` as someone who may write the directory would: an entry for ``name``
    whose identity matches its ``metadata.json`` but whose summary says what ``edit`` makes it say."""
    info = next(info for info in CheckpointManager(root, max_checkpoints=None).checkpoints() if info.name == name)
    summary = listing.summary(info)
    edit(summary)
    entries = listing.load(root)
    entries[name] = (listing.identity(Path(info.location) / METADATA_FILE), summary)
    listing.save(root, entries)


def claim_epoch_99(summary: dict[str, Any]) -> None:
    summary.update(epoch=99, metrics={"loss": 0.0001})


# ------------------------------------------------------------------ finding 1: the listing cache


def test_a_forged_listing_cache_chooses_nothing_a_signed_load_returns(tmp_path: Path, keys) -> None:
    private, public = keys
    save_run(tmp_path, private)
    forge_listing(tmp_path, "epoch_1", claim_epoch_99)

    with pytest.warns(UserWarning, match="listing cache"):
        latest = CheckpointManager(tmp_path).load_latest(verify_with=public)
    assert (latest["epoch"], latest["metrics"]["loss"]) == (2, LOSSES[2])
    assert torch.equal(latest["model"]["weight"], weights_of(2)["weight"])

    best = CheckpointManager(tmp_path).load_best(verify_with=public)
    assert (best["epoch"], best["metrics"], best["config"]) == (2, {"loss": LOSSES[2]}, {"epoch": 2})
    assert torch.equal(best["model"]["weight"], weights_of(2)["weight"])

    with pytest.raises(CheckpointNotFoundError):
        CheckpointManager(tmp_path).load(99, verify_with=public)
    one = CheckpointManager(tmp_path).load(1, verify_with=public)
    assert (one["epoch"], one["metrics"]["loss"]) == (1, LOSSES[1])


def test_a_forged_listing_cache_never_makes_retention_delete_the_best(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, max_checkpoints=1, keep_best=True, save_rng=False)
    manager.save(weights_of(0), epoch=0, metrics={"loss": 0.1})  # the true best
    manager.save(weights_of(1), epoch=1, metrics={"loss": 0.9})
    manager.save(weights_of(2), epoch=2, metrics={"loss": 0.8})
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("epoch_")) == ["epoch_0", "epoch_2"]
    forge_listing(tmp_path, "epoch_2", lambda summary: summary.update(metrics={"loss": 0.0001}))

    later = CheckpointManager(tmp_path, max_checkpoints=1, keep_best=True, save_rng=False)
    later.save(weights_of(3), epoch=3, metrics={"loss": 0.7})
    assert (tmp_path / "epoch_0").is_dir()
    assert later.best().name == "epoch_0"


# ------------------------------------------------------------------ identity


def test_a_signed_checkpoint_copied_under_another_name_is_not_that_checkpoint(tmp_path: Path, keys) -> None:
    private, public = keys
    save_run(tmp_path, private)
    shutil.copytree(tmp_path / "epoch_1", tmp_path / "epoch_7")
    forge_listing(tmp_path, "epoch_7", lambda summary: summary.update(epoch=7))

    with pytest.raises(CheckpointNotFoundError):
        CheckpointManager(tmp_path).load(7, verify_with=public)
    latest = CheckpointManager(tmp_path).load_latest(verify_with=public)
    assert latest["epoch"] == 2 and latest["metadata"]["path"] == str(tmp_path / "epoch_2")
    one = CheckpointManager(tmp_path).load(1, verify_with=public)
    assert one["epoch"] == 1 and one["metadata"]["path"] == str(tmp_path / "epoch_1")


# ------------------------------------------------------------------ finding 3: one read


def test_files_swapped_after_verification_never_load(tmp_path: Path, keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attacker replaces the weights once the signature has been checked, and makes the listing
    cache record the replacement's checksum. Whatever instant the swap lands at, what loads is the
    signed weights, or nothing."""
    private, public = keys
    save_run(tmp_path, private)
    directory = tmp_path / "epoch_2"
    forged = tmp_path / "forged.safetensors"
    write_tensor_file(forged, {"weight": torch.full((3, 2), -1.0), "bias": torch.full((3,), -1.0)})
    data = forged.read_bytes()
    forge_listing(
        tmp_path, "epoch_2", lambda summary: summary["files"].update({"model.safetensors": [len(data), checksum_bytes(data)]})
    )
    swapped: list[str] = []

    def swap(reason: str) -> None:
        if not swapped:
            os.replace(forged, directory / "model.safetensors")
            swapped.append(reason)

    verify_prefix = signing.verify_prefix

    def verify_then_swap(*args: Any, **kwargs: Any) -> None:
        verify_prefix(*args, **kwargs)
        swap("after verify_prefix")

    monkeypatch.setattr(signing, "verify_prefix", verify_then_swap)
    manager = CheckpointManager(tmp_path)
    faults.inject(manager, hook=lambda operation, key: swap(key) if key.endswith("state.json") else None)
    try:
        loaded = manager.load_latest(verify_with=public)
    except SignatureError:
        return  # the swap landed before the single read of the weights: refused
    assert swapped
    assert torch.equal(loaded["model"]["weight"], weights_of(2)["weight"])


# ------------------------------------------------------------------ finding 2: production


@pytest.fixture(params=["local", "s3"])
def run_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "run" / "checkpoints")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/run-{uuid.uuid4().hex[:6]}/checkpoints"


def forge_production(registry: ArtifactRegistry, edit: Callable[[dict[str, Any]], None]) -> None:
    target = registry.backend.join(str(registry.production_dir), "model.json")
    if not registry.remote:
        reseal_record(Path(target), edit)
        return
    fs, path = fsspec.core.url_to_fs(target)
    document = json.loads(fs.cat_file(path))
    edit(document)
    fs.pipe_file(path, json.dumps(documents.seal({k: v for k, v in document.items() if k != documents.SEAL_KEY})).encode())


def test_load_production_returns_only_what_the_version_signed(run_url: str, keys) -> None:
    private, public = keys
    save_run(run_url, private, metric_for_best="loss")
    registry = ArtifactRegistry(run_url)
    registry.validate(2, "1.0.0", signing_key=private, checks={"ok": lambda checkpoint: True})
    registry.promote("1.0.0", verify_with=public)

    def forge(document: dict[str, Any]) -> None:
        document["config"] = {"epoch": 1234}
        document["metrics"] = {"loss": 0.0001}
        document["checks"] = [{"name": "forged", "passed": True, "detail": None}]
        document["source"]["epoch"] = 99
        document["previous_versions"] = ["6.6.6"]

    forge_production(registry, forge)
    loaded = registry.load_production(verify_with=public)
    signed = registry.validation("1.0.0")
    assert loaded["version"] == "1.0.0"
    assert (loaded["epoch"], loaded["metrics"], loaded["config"]) == (2, {"loss": LOSSES[2]}, {"epoch": 2})
    assert loaded["metadata"]["checks"] == signed["checks"] and loaded["metadata"]["source"]["epoch"] == 2
    assert "6.6.6" not in json.dumps(loaded["metadata"], default=str)
    assert torch.equal(loaded["model"]["weight"], weights_of(2)["weight"])
