"""The listing cache: a new process lists from it, and never believes a stale or damaged entry."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ckpt_plugin import CheckpointManager
from ckpt_plugin._listing import CACHE_FILE, REWRITE_AFTER_READS


def populate(root: Path, count: int) -> CheckpointManager:
    model = nn.Linear(2, 2)
    manager = CheckpointManager(root, max_checkpoints=None, save_rng=False)
    for epoch in range(count):
        manager.save(model, epoch=epoch, metrics={"loss": float(count - epoch), "odd": float("nan")})
    return manager


def listed(root: Path) -> list[tuple[int, float]]:
    return [(info.epoch, info.metrics["loss"]) for info in CheckpointManager(root).checkpoints()]


def test_a_new_manager_writes_and_then_uses_the_cache(tmp_path: Path) -> None:
    count = REWRITE_AFTER_READS + 4
    populate(tmp_path, count)
    assert not (tmp_path / CACHE_FILE).exists()
    expected = [(epoch, float(count - epoch)) for epoch in range(count)]
    assert listed(tmp_path) == expected
    assert (tmp_path / CACHE_FILE).exists()
    fresh = CheckpointManager(tmp_path).checkpoints()
    assert [(info.epoch, info.metrics["loss"]) for info in fresh] == expected
    best = CheckpointManager(tmp_path).best()
    assert best is not None and best.epoch == count - 1


def test_cached_infos_equal_parsed_ones(tmp_path: Path) -> None:
    populate(tmp_path, REWRITE_AFTER_READS + 2)
    parsed = CheckpointManager(tmp_path).checkpoints()
    cached = CheckpointManager(tmp_path).checkpoints()
    for a, b in zip(parsed, cached, strict=True):
        assert (a.path, a.epoch, a.step, a.files, a.items, a.timestamp, a.mode) == (
            b.path,
            b.epoch,
            b.step,
            b.files,
            b.items,
            b.timestamp,
            b.mode,
        )
        assert a.metrics["loss"] == b.metrics["loss"] and b.metrics["odd"] != b.metrics["odd"]


def test_a_replaced_checkpoint_is_read_again(tmp_path: Path) -> None:
    populate(tmp_path, REWRITE_AFTER_READS + 2)
    listed(tmp_path)
    CheckpointManager(tmp_path, max_checkpoints=None).save(nn.Linear(2, 2), epoch=3, metrics={"loss": -1.0})
    assert dict(listed(tmp_path))[3] == -1.0


def test_a_damaged_or_foreign_cache_is_ignored(tmp_path: Path) -> None:
    populate(tmp_path, REWRITE_AFTER_READS + 2)
    expected = listed(tmp_path)
    (tmp_path / CACHE_FILE).write_text("{not json")
    assert listed(tmp_path) == expected
    document = json.loads((tmp_path / CACHE_FILE).read_text())
    for entry in document["entries"].values():
        entry["summary"] = {"epoch": "nonsense"}
    (tmp_path / CACHE_FILE).write_text(json.dumps(document))
    assert listed(tmp_path) == expected


def test_the_cache_is_not_a_checkpoint(tmp_path: Path) -> None:
    manager = populate(tmp_path, REWRITE_AFTER_READS + 2)
    listed(tmp_path)
    retained = CheckpointManager(tmp_path, max_checkpoints=2)
    retained.save(nn.Linear(2, 2), epoch=100, metrics={"loss": 5.0})
    assert [info.epoch for info in CheckpointManager(tmp_path).checkpoints()] == [REWRITE_AFTER_READS + 1, 100]
    assert (tmp_path / CACHE_FILE).exists()
    assert torch.is_tensor(manager.load_latest()["model"]["weight"])
