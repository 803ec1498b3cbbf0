"""ArtifactRegistry.verify: a report of every checksum and signature check, returned instead of printed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from security_helpers import key_pair

from ckpt_plugin import ArtifactRegistry, CheckpointManager
from ckpt_plugin.registry import VerificationItem, VerificationReport


def _run(root: Path, epochs: int = 2) -> Path:
    manager = CheckpointManager(root / "checkpoints", max_checkpoints=None)
    for epoch in range(epochs):
        manager.save({"model": {"w": torch.full((4,), float(epoch))}}, epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
    return root / "checkpoints"


def test_a_sound_registry_verifies_every_file(tmp_path: Path) -> None:
    registry = ArtifactRegistry(_run(tmp_path))
    registry.validate(1, "1.0.0")
    registry.promote("1.0.0")
    report = registry.verify()
    assert isinstance(report, VerificationReport) and report.ok and report.problems == []
    assert report.files == len(report.items) and report.bytes > 0
    assert all(item.kind == "file" and item.ok and item.problem is None for item in report.items)
    assert any(item.name.endswith("model.safetensors") and "production" in item.name for item in report.items)


def test_damage_is_reported_per_item_not_raised(tmp_path: Path) -> None:
    registry = ArtifactRegistry(_run(tmp_path))
    registry.validate(1, "1.0.0")
    weights = Path(registry.version_dir("1.0.0")) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.unlink()
    weights.write_bytes(bytes(data))
    (tmp_path / "checkpoints" / "epoch_0" / "notes.txt").write_text("not ours")
    seen = []
    report = registry.verify(progress=lambda label, total: seen.append((label, total)) or None)
    assert not report.ok
    kinds = {(Path(item.name).name, item.kind) for item in report.problems}
    assert ("model.safetensors", "file") in kinds and ("notes.txt", "file") in kinds
    assert all(isinstance(item, VerificationItem) and item.problem for item in report.problems)
    assert seen == [("verifying", report.bytes)]


def test_an_unsigned_version_is_a_signature_problem_with_a_key(tmp_path: Path) -> None:
    pytest.importorskip("model_signing")
    _, public = key_pair(tmp_path, "ours")
    registry = ArtifactRegistry(_run(tmp_path, epochs=1))
    registry.validate(0, "1.0.0")
    report = registry.verify(public)
    [problem] = report.problems
    assert problem.kind == "signature" and "is not signed" in problem.problem
    assert registry.verify().ok
