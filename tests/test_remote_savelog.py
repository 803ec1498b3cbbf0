"""The save log on object storage: one object per save under ``.saves/``, read back oldest first,
never mistaken for a checkpoint or a dead writer's leftovers, and plotted by ``ckpt plot URL``."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pytest
import torch
from typer.testing import CliRunner

from ckpt_plugin import ArtifactRegistry, CheckpointManager, cli
from ckpt_plugin import _savelog as savelog
from ckpt_plugin._storage import backend_of
from ckpt_plugin._storage.fsspec import ManifestStore


def log_objects(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    try:
        return sorted(name.rsplit("/", 1)[-1] for name in fs.find(f"{path}/{savelog.LOG_PREFIX}"))
    except FileNotFoundError:
        return []


def saved_run(url: str, epochs: int = 4, **options: object) -> CheckpointManager:
    manager = CheckpointManager(url, max_checkpoints=1, **options)
    model = torch.nn.Linear(3, 2)
    for epoch in range(epochs):
        manager.save(model, epoch=epoch, step=10 * epoch, metrics={"val_loss": 1.0 / (epoch + 1), "nan": float("nan")})
    return manager


def test_every_save_is_one_object_read_back_oldest_first_after_retention(remote_url: str) -> None:
    manager = saved_run(remote_url)
    assert [info.epoch for info in manager.checkpoints()] == [3]
    names = log_objects(remote_url)
    assert len(names) == 4 and all(name.endswith(".json") for name in names)
    assert [name.split("-")[1] for name in names] == [f"epoch_{e}_step_{10 * e}" for e in range(4)]
    entries = savelog.read(remote_url, backend_of(remote_url))
    assert [(entry["epoch"], entry["step"]) for entry in entries] == [(e, 10 * e) for e in range(4)]
    assert entries[1]["metrics"] == {"val_loss": 0.5}  # NaN recorded as null, then dropped on read


def test_recover_and_listing_leave_the_log_alone(remote_url: str) -> None:
    saved_run(remote_url, epochs=2)
    before = log_objects(remote_url)
    store = ManifestStore(remote_url, grace_seconds=0)  # every uncommitted prefix counts as dead
    store.recover()
    assert [entry.name for entry in store.visible()] == ["epoch_1_step_10"]
    assert log_objects(remote_url) == before
    reader = CheckpointManager(remote_url)  # opening a manager recovers too
    assert [info.name for info in reader.checkpoints()] == ["epoch_1_step_10"]
    assert log_objects(remote_url) == before


def test_concurrent_writers_never_overwrite_each_other(remote_url: str) -> None:
    info = saved_run(remote_url, epochs=1).latest()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda _: savelog.append(remote_url, info, backend=info.backend), range(16)))
    assert len(log_objects(remote_url)) == 17
    assert len(savelog.read(remote_url, info.backend)) == 17


def test_damaged_objects_are_skipped_with_one_warning_and_a_copied_local_log_is_read_first(remote_url: str) -> None:
    saved_run(remote_url, epochs=2)
    backend = backend_of(remote_url)
    fs, path = fsspec.core.url_to_fs(remote_url)
    fs.pipe_file(f"{path}/{savelog.LOG_PREFIX}/0000000000000000-bad-00.json", b'{"name": "x", "epoch": "one"}')
    fs.pipe_file(f"{path}/{savelog.LOG_PREFIX}/ffffffffffffffff-torn-00.json", b'{"event": "save", "name": "epo')
    old = {"event": "save", "name": "epoch_0_step_0", "epoch": 0, "step": 0, "metrics": {"val_loss": 9.0}}
    fs.pipe_file(f"{path}/{savelog.LOG_FILE}", json.dumps(old).encode() + b"\nnot json\n")
    with pytest.warns(UserWarning, match=r"line\(s\) 2 of .*object\(s\) 0000000000000000-bad-00.json, ffffffffffffffff-torn-00.json") as caught:
        entries = savelog.read(remote_url, backend)
    assert len(caught) == 1
    assert [(entry["name"], entry["metrics"]["val_loss"]) for entry in entries] == [
        ("epoch_0_step_0", 9.0), ("epoch_0_step_0", 1.0), ("epoch_1_step_10", 0.5)
    ]


def test_ckpt_plot_reads_a_bucket_with_storage_options(s3_bucket: str, s3_env: str, monkeypatch, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    url = f"s3://{s3_bucket}/run/checkpoints"
    saved_run(url)
    registry = ArtifactRegistry(url)
    registry.validate("latest", "1.0.0")
    registry.promote("1.0.0")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the option says where the store is
    output = tmp_path / "run.png"
    result = CliRunner().invoke(cli.app, ["plot", url, "-o", str(output), "--storage-option", f"endpoint_url={s3_env}", "--json"])
    assert result.exit_code == 0, result.output
    marks = json.loads(result.stdout)
    assert marks["kept"] == ["epoch_3_step_30"]
    assert marks["pruned"] == ["epoch_0_step_0", "epoch_1_step_10", "epoch_2_step_20"]
    assert marks["latest"] == "epoch_3_step_30" and output.stat().st_size > 0
    assert marks["validated"] == {"1.0.0": "epoch_3_step_30"}
    assert marks["production"] == {"version": "1.0.0", "checkpoint": "epoch_3_step_30"}
    bad = CliRunner().invoke(cli.app, ["plot", url, "-o", str(output), "--storage-option", "endpoint_url"])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output


def test_a_downloaded_bucket_log_reads_locally_too(remote_url: str, tmp_path: Path) -> None:
    """A run copied from a bucket to a directory keeps its history (and a local log stays the
    single-file ``.saves.jsonl``)."""
    saved_run(remote_url, epochs=2)
    fs, path = fsspec.core.url_to_fs(remote_url)
    copy = tmp_path / "copy"
    fs.get(f"{path}/{savelog.LOG_PREFIX}/", str(copy / savelog.LOG_PREFIX) + "/", recursive=True)
    assert [entry["epoch"] for entry in savelog.read(copy)] == [0, 1]
    local = CheckpointManager(copy)
    local.save(torch.nn.Linear(3, 2), epoch=2)
    assert (copy / savelog.LOG_FILE).is_file() and len(list((copy / savelog.LOG_PREFIX).iterdir())) == 2
    assert [entry["epoch"] for entry in savelog.read(copy)] == [2, 0, 1]  # the lines come first
