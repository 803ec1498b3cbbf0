"""ArtifactRegistry: validation gates, semantic versions, validated copies, production, rollback, audit log."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import zlib
from pathlib import Path

import filelock
import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file
from torch import nn

from ckpt_plugin import (
    ArtifactRegistry,
    CheckpointManager,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    PromotionError,
)
from ckpt_plugin import _storage as storage
from ckpt_plugin.registry import next_version, parse_version
from ckpt_plugin._storage import checksum_bytes, trash

LOSSES = [0.9, 0.3, 0.5, 0.6]  # epoch 1 is the best by loss; epoch 3 the latest
REPO_ROOT = Path(__file__).resolve().parents[1]


class TiedNet(nn.Module):
    """A tiny model with tied weights, as language models have."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 6, bias=False)
        self.hidden = nn.Linear(6, 6)
        self.head = nn.Linear(6, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(x))))


def model_for_epoch(epoch: int) -> TiedNet:
    torch.manual_seed(epoch)
    return TiedNet()


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A checkpoint directory with epochs 0-3 (distinct weights per epoch), as a training run leaves it."""
    directory = tmp_path / "checkpoints"
    manager = CheckpointManager(directory, max_checkpoints=None, metric_for_best="loss", mode="min")
    for epoch, loss in enumerate(LOSSES):
        model = model_for_epoch(epoch)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.ones(2, 6)).sum().backward()
        optimizer.step()
        manager.save(model=model, optimizer=optimizer, epoch=epoch,
                     metrics={"loss": loss, "accuracy": 1 - loss / 2}, config={"width": 6})
    return directory


def registry_of(run: Path, **options) -> ArtifactRegistry:
    return ArtifactRegistry(checkpoint_dir=run, **options)


def flip_byte(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------- choosing the checkpoint


def test_best_uses_the_metric_and_mode_recorded_in_the_checkpoints(run: Path) -> None:
    record = registry_of(run).validate(epoch="best", version="1.0.0")
    assert record["source"]["epoch"] == 1
    assert record["metric_for_best"] == "loss" and record["mode"] == "min"


def test_metric_and_mode_override_the_recorded_ones(run: Path) -> None:
    registry = registry_of(run)
    assert registry.validate("best", "1.0.0", metric="loss", mode="max")["source"]["epoch"] == 0
    assert registry.validate("best", "1.1.0", metric="accuracy", mode="max")["source"]["epoch"] == 1


def test_latest_and_an_epoch_number(run: Path) -> None:
    registry = registry_of(run)
    assert registry.validate("latest", "1.0.0")["source"]["epoch"] == 3
    assert registry.validate(2, "1.1.0")["source"]["epoch"] == 2


def test_unknown_epoch_names_the_existing_ones(run: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="existing epochs: 0, 1, 2, 3"):
        registry_of(run).validate(epoch=42, version="1.0.0")
    with pytest.raises(ConfigurationError, match="epoch must be"):
        registry_of(run).validate(epoch="newest", version="1.0.0")


def test_missing_checkpoint_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        ArtifactRegistry(tmp_path / "nowhere").validate(version="1.0.0")
    assert not (tmp_path / "validated").exists()


# ---------------------------------------------------------------------- checks


def test_checks_get_the_loaded_checkpoint_and_every_result_is_recorded(run: Path) -> None:
    seen = {}

    def weights_are_finite(checkpoint: dict) -> bool:
        seen.update(checkpoint)
        return all(torch.isfinite(t).all() for t in checkpoint["model"].values())

    record = registry_of(run).validate(
        "best", "1.0.0",
        checks=[weights_are_finite, lambda c: c["metrics"]["accuracy"] >= 0.8, lambda c: c["metrics"]["loss"]],
    )
    assert torch.equal(seen["model"]["hidden.weight"], CheckpointManager(run).load(1)["model"]["hidden.weight"])
    assert seen["epoch"] == 1 and seen["config"] == {"width": 6}
    assert [(c["name"], c["passed"]) for c in record["checks"]] == [
        ("weights_are_finite", True), ("check 2 (lambda)", True), ("check 3 (lambda)", True)
    ]
    assert record["checks"][2]["detail"] == "0.3"  # a truthy non-bool is recorded as it was returned
    stored = json.loads((run.parent / "validated" / "v1.0.0" / "validation.json").read_text())
    assert stored["checks"] == record["checks"]


def test_named_checks_from_a_mapping(run: Path) -> None:
    record = registry_of(run).validate("best", "1.0.0", checks={"accuracy at least 0.8": lambda c: c["metrics"]["accuracy"] >= 0.8})
    assert record["checks"] == [{"name": "accuracy at least 0.8", "passed": True, "detail": None}]


@pytest.mark.parametrize(
    "check, reason",
    [(lambda c: c["metrics"]["accuracy"] >= 0.99, "check 2 \\(lambda\\)"), (lambda c: c["metrics"]["f1"] > 0, "KeyError: 'f1'")],
)
def test_a_failed_gate_raises_and_writes_nothing(run: Path, check, reason: str) -> None:
    registry = registry_of(run)
    before = sorted(p.relative_to(run.parent) for p in run.parent.rglob("*"))
    with pytest.raises(PromotionError, match=reason):
        registry.validate("best", "1.0.0", checks=[lambda c: True, check])
    assert sorted(p.relative_to(run.parent) for p in run.parent.rglob("*")) == before
    assert registry.versions() == [] and registry.history() == []


def test_a_check_that_is_not_callable_is_refused_up_front(run: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a callable"):
        registry_of(run).validate("best", "1.0.0", checks=[0.9])


# ---------------------------------------------------------------------- versions


@pytest.mark.parametrize("bad", ["abc", "1", "1.0", "../x", "1.0.0/../../etc", "", "1.0.0+local", "1!1.0.0", 100])
def test_invalid_versions_are_rejected_before_the_disk_is_touched(tmp_path: Path, bad) -> None:
    registry = ArtifactRegistry(tmp_path / "missing-run")  # a missing directory would fail any later step
    with pytest.raises(PromotionError, match="not a semantic version"):
        registry.validate(version=bad)
    with pytest.raises(PromotionError, match="not a semantic version"):
        registry.promote(bad)
    assert list(tmp_path.iterdir()) == []


def test_versions_compare_semantically(run: Path) -> None:
    registry = registry_of(run)
    for epoch, version in [(0, "1.9.0"), (1, "1.10.0"), (2, "1.2.0rc1"), (3, "1.2.0")]:
        registry.validate(epoch, version)
    assert registry.versions() == ["1.2.0rc1", "1.2.0", "1.9.0", "1.10.0"]
    assert registry.validate(3, bump="minor")["version"] == "1.11.0"
    assert registry.validate(3, bump="patch")["version"] == "1.11.1"
    assert registry.validate(3, bump="major")["version"] == "2.0.0"


def test_next_version_from_nothing_and_from_the_highest() -> None:
    assert [str(next_version([], bump)) for bump in ("major", "minor", "patch")] == ["1.0.0", "0.1.0", "0.0.1"]
    assert str(next_version([Version("1.9.3"), Version("1.10.0")], "patch")) == "1.10.1"
    assert str(parse_version("v2.0.0")) == "2.0.0"
    with pytest.raises(ConfigurationError):
        next_version([], "huge")


def test_version_or_bump_exactly_one(run: Path) -> None:
    with pytest.raises(ConfigurationError, match="exactly one"):
        registry_of(run).validate("best")
    with pytest.raises(ConfigurationError, match="exactly one"):
        registry_of(run).validate("best", "1.0.0", bump="minor")


def test_a_validated_version_is_immutable(run: Path) -> None:
    registry = registry_of(run)
    registry.validate(1, "1.0.0")
    before = registry.validation("1.0.0")
    with pytest.raises(PromotionError, match="immutable"):
        registry.validate(3, "1.0.0")
    with pytest.raises(PromotionError, match="immutable"):
        registry.validate(3, "v1.0.0")  # the same version, spelled differently
    assert registry.validation("1.0.0") == before
    assert registry.load("1.0.0")["epoch"] == 1


# ---------------------------------------------------------------------- validated copies


def test_validated_versions_survive_deleting_the_raw_checkpoints(run: Path) -> None:
    registry = registry_of(run)
    registry.validate(1, "1.0.0")
    expected = CheckpointManager(run).load(1)
    shutil.rmtree(run)
    loaded = registry.load("1.0.0")
    assert loaded["version"] == "1.0.0" and loaded["epoch"] == 1
    for key, tensor in expected["model"].items():
        assert torch.equal(loaded["model"][key], tensor)
    assert loaded["model"]["head.weight"] is loaded["model"]["embed.weight"]
    assert loaded["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]


def test_validated_versions_survive_retention(run: Path) -> None:
    registry = registry_of(run)
    registry.validate(2, "1.0.0")
    manager = CheckpointManager(run, max_checkpoints=1, keep_best=False)
    manager.save(model=model_for_epoch(9), epoch=9, metrics={"loss": 0.1})
    assert [info.epoch for info in manager.checkpoints()] == [9]
    assert registry.load("1.0.0")["epoch"] == 2


def test_files_are_hard_linked_and_checksums_carried_over(run: Path) -> None:
    registry = registry_of(run)
    record = registry.validate(1, "1.0.0")
    source = run / "epoch_1"
    copy = registry.version_dir("1.0.0")
    metadata = json.loads((source / "metadata.json").read_text())
    assert {name: r for name, r in record["files"].items() if name != "metadata.json"} == metadata["files"]
    assert record["source"]["checksum"] == checksum_bytes((source / "metadata.json").read_bytes())
    assert os.stat(source / "model.safetensors").st_ino == os.stat(copy / "model.safetensors").st_ino


def test_files_are_copied_where_hard_links_are_refused(run: Path, monkeypatch) -> None:
    def no_links(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(storage.os, "link", no_links)
    registry = registry_of(run)
    registry.validate(1, "1.0.0")
    copy = registry.version_dir("1.0.0") / "model.safetensors"
    assert os.stat(copy).st_ino != os.stat(run / "epoch_1" / "model.safetensors").st_ino
    assert torch.equal(registry.load("1.0.0")["model"]["hidden.bias"], CheckpointManager(run).load(1)["model"]["hidden.bias"])


def test_a_corrupt_raw_checkpoint_is_never_validated(run: Path) -> None:
    flip_byte(run / "epoch_1" / "model.safetensors")
    registry = registry_of(run)
    with pytest.raises(CorruptCheckpointError, match="epoch_1/model.safetensors"):
        registry.validate(1, "1.0.0")
    assert registry.versions() == []


def test_a_flipped_byte_in_a_validated_copy_is_caught_on_load(run: Path, monkeypatch) -> None:
    monkeypatch.setattr(storage.os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EXDEV, "no")))
    registry = registry_of(run)
    registry.validate(1, "1.0.0")
    flip_byte(registry.version_dir("1.0.0") / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="v1.0.0/model.safetensors"):
        registry.load("1.0.0")
    with pytest.raises(CorruptCheckpointError, match="v1.0.0/model.safetensors"):
        registry.promote("1.0.0")
    assert registry.production() is None
    assert CheckpointManager(run).load(1)["epoch"] == 1  # the raw checkpoint (a separate copy) is intact


def test_unknown_version_names_the_validated_ones(run: Path) -> None:
    registry = registry_of(run)
    registry.validate(1, "1.0.0")
    with pytest.raises(CheckpointNotFoundError, match="validated versions: 1.0.0"):
        registry.load("2.0.0")
    with pytest.raises(CheckpointNotFoundError, match="validated versions: 1.0.0"):
        registry.promote("2.0.0")


# ---------------------------------------------------------------------- production


def test_promote_writes_plain_safetensors_and_a_model_card(run: Path) -> None:
    registry = registry_of(run)
    assert registry.production() is None and registry.load_production() is None
    registry.validate(1, "1.0.0", checks=[lambda c: True])
    registry.promote("1.0.0")
    production = run.parent / "production"
    assert sorted(os.listdir(production)) == ["model.json", "model.safetensors"]
    weights = load_file(production / "model.safetensors")
    expected = CheckpointManager(run).load(1)["model"]
    assert set(weights) == {"embed.weight", "hidden.weight", "hidden.bias"}  # the tied head is stored once
    for name, tensor in weights.items():
        assert torch.equal(tensor, expected[name])
    card = registry.production()
    assert card["version"] == "1.0.0"
    assert card["source"]["epoch"] == 1 and card["source"]["path"] == str((run / "epoch_1").resolve())
    assert card["metrics"] == {"loss": 0.3, "accuracy": 0.85}
    assert card["checks"] == [{"name": "check 1 (lambda)", "passed": True, "detail": None}]
    assert card["files"]["model.safetensors"]["checksum"] == checksum_bytes((production / "model.safetensors").read_bytes())
    assert card["tied"] == {"head.weight": "embed.weight"}
    assert card["promoted_by"] == {"user": card["promoted_by"]["user"], "host": socket.gethostname()}
    assert card["promoted_by"]["user"] and card["promoted_at"] >= card["validated_at"]
    assert card["config"] == {"width": 6}
    on_disk = json.loads((production / "model.json").read_text())
    assert on_disk["version"] == "1.0.0"


def test_load_production_predicts_like_the_trained_model(run: Path) -> None:
    registry = registry_of(run)
    registry.validate("best", "1.0.0")
    registry.promote("1.0.0")
    production = registry.load_production()
    assert production["version"] == "1.0.0" and production["epoch"] == 1 and production["config"] == {"width": 6}
    model = TiedNet()
    assert model.load_state_dict(production["model"], strict=True)
    reference = TiedNet()
    reference.load_state_dict(CheckpointManager(run).load(1)["model"])
    x = torch.randn(3, 6)
    assert torch.equal(model(x), reference(x))


def test_production_is_independent_of_the_validated_copy(run: Path) -> None:
    registry = registry_of(run)
    registry.validate(1, "1.0.0")
    registry.promote("1.0.0")
    shutil.rmtree(run)
    shutil.rmtree(registry.version_dir("1.0.0"))
    assert registry.load_production()["version"] == "1.0.0"


def test_a_flipped_byte_in_production_is_caught_on_load(run: Path) -> None:
    registry = registry_of(run)
    registry.validate(1, "1.0.0")
    registry.promote("1.0.0")
    flip_byte(run.parent / "production" / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="production/model.safetensors"):
        registry.load_production()


def test_promoting_the_version_in_production_changes_nothing(run: Path) -> None:
    registry = registry_of(run)
    registry.validate(1, "1.0.0")
    first = registry.promote("1.0.0")
    assert registry.promote("1.0.0") == first
    assert [event["event"] for event in registry.history()] == ["validate", "promote"]


def test_rollback_goes_back_one_promotion_at_a_time(run: Path) -> None:
    registry = registry_of(run)
    with pytest.raises(PromotionError, match="nothing is in production"):
        registry.rollback()
    for epoch, version in [(0, "1.0.0"), (1, "1.1.0"), (2, "2.0.0")]:
        registry.validate(epoch, version)
        registry.promote(version)
    assert registry.production()["previous_versions"] == ["1.0.0", "1.1.0"]
    assert registry.rollback()["version"] == "1.1.0"
    assert registry.load_production()["epoch"] == 1
    assert registry.rollback()["version"] == "1.0.0"
    with pytest.raises(PromotionError, match="nothing to roll back to"):
        registry.rollback()
    assert registry.load_production()["epoch"] == 0


def test_switching_production_without_renameat2(run: Path, monkeypatch) -> None:
    monkeypatch.setattr(storage.local, "_exchange", lambda first, second: False)
    registry = registry_of(run)
    registry.validate(0, "1.0.0")
    registry.validate(1, "1.1.0")
    registry.promote("1.0.0")
    registry.promote("1.1.0")
    assert registry.load_production()["epoch"] == 1
    trash.drain(60)  # the replaced production directory is deleted in the background
    assert sorted(os.listdir(run.parent)) == ["checkpoints", "production", "validated"]


def test_explicit_directories(run: Path, tmp_path: Path) -> None:
    registry = ArtifactRegistry(run, validated_dir=tmp_path / "store" / "releases", production_dir=tmp_path / "serve" / "model")
    registry.validate(1, "1.0.0")
    registry.promote("1.0.0")
    assert (tmp_path / "store" / "releases" / "v1.0.0" / "validation.json").is_file()
    assert (tmp_path / "serve" / "model" / "model.safetensors").is_file()
    with pytest.raises(ConfigurationError, match="three different directories"):
        ArtifactRegistry(run, validated_dir=tmp_path / "x", production_dir=tmp_path / "x")


# ---------------------------------------------------------------------- history


def test_history_records_every_event_with_its_source_and_who(run: Path) -> None:
    registry = registry_of(run)
    registry.validate(0, "1.0.0")
    registry.validate(1, "1.1.0")
    registry.promote("1.0.0")
    registry.promote("1.1.0")
    registry.rollback()
    events = registry.history()
    assert [(e["event"], e["version"]) for e in events] == [
        ("validate", "1.0.0"), ("validate", "1.1.0"), ("promote", "1.0.0"), ("promote", "1.1.0"), ("rollback", "1.0.0")
    ]
    assert [e.get("previous") for e in events[2:]] == [None, "1.0.0", "1.1.0"]
    for event in events:
        epoch = 0 if event["version"] == "1.0.0" else 1
        source = run / f"epoch_{epoch}"
        assert event["source"]["path"] == str(source.resolve()) and event["source"]["epoch"] == epoch
        assert event["source"]["checksum"] == checksum_bytes((source / "metadata.json").read_bytes())
        assert event["user"] and event["host"] == socket.gethostname() and event["time"].endswith("+00:00")
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)


def test_history_is_append_only_json_lines(run: Path) -> None:
    registry = registry_of(run)
    log = run.parent / "validated" / "history.jsonl"
    registry.validate(0, "1.0.0")
    first = log.read_bytes()
    registry.promote("1.0.0")
    assert log.read_bytes().startswith(first)
    assert [json.loads(line)["event"] for line in log.read_text().splitlines()] == ["validate", "promote"]


def test_history_survives_a_torn_line(run: Path) -> None:
    registry = registry_of(run)
    registry.validate(0, "1.0.0")
    with open(run.parent / "validated" / "history.jsonl", "ab") as log:
        log.write(b'{"time": "2026-')  # a writer died mid-line
    with pytest.warns(UserWarning, match="line 2"):
        assert [e["event"] for e in registry.history()] == ["validate"]
    registry.promote("1.0.0")
    with pytest.warns(UserWarning, match="line 2"):
        assert [e["event"] for e in registry.history()] == ["validate", "promote"]


# ---------------------------------------------------------------------- concurrency

PROMOTER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from ckpt_plugin import ArtifactRegistry
    root, go, versions = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    registry = ArtifactRegistry(root / "checkpoints")
    (root / f"ready-{os.getpid()}").touch()
    while not go.exists():
        time.sleep(0.001)
    for version in versions:
        registry.promote(version)
    """
)

READER = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from ckpt_plugin import ArtifactRegistry
    root, go, done = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    registry = ArtifactRegistry(root / "checkpoints")
    registry.load_production()
    (root / "ready-reader").touch()
    while not go.exists():
        time.sleep(0.001)
    loads = 0
    while not done.exists() or loads == 0:
        production = registry.load_production()
        expected = registry.load(production["version"])["model"]
        for name, tensor in expected.items():
            assert torch.equal(production["model"][name], tensor), (production["version"], name)
        loads += 1
    print(loads)
    """
)


def _python(script: str, *args: Path | str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_promoting_at_once_leave_production_whole(run: Path) -> None:
    registry = registry_of(run)
    for epoch, version in enumerate(["1.0.0", "1.1.0", "1.2.0", "1.3.0"]):
        registry.validate(epoch, version)
    registry.promote("1.0.0")
    go, done = run.parent / "go", run.parent / "done"
    promoters = [
        _python(PROMOTER, run.parent, go, *(["1.1.0", "1.2.0"] * 4)),
        _python(PROMOTER, run.parent, go, *(["1.3.0", "1.0.0"] * 4)),
    ]
    reader = _python(READER, run.parent, go, done)
    deadline = time.monotonic() + 120
    while len(list(run.parent.glob("ready-*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # all three are loaded and waiting: the promotions overlap
    for process in promoters:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    done.touch()
    loads, stderr = reader.communicate(timeout=120)
    assert reader.returncode == 0, stderr
    assert int(loads) >= 1

    production = registry.load_production()
    assert production["version"] in {"1.0.0", "1.2.0"}  # each promoter ends on one of these
    expected = registry.load(production["version"])["model"]
    assert all(torch.equal(production["model"][name], tensor) for name, tensor in expected.items())
    promotions = [event for event in registry.history() if event["event"] == "promote"]
    # the first promotion and all 16 requests: no request finds its own version already in production
    assert len(promotions) == 17
    chain = [event["version"] for event in promotions]
    assert [event["previous"] for event in promotions[1:]] == chain[:-1]
    assert registry.production()["previous_versions"][-1] == chain[-2]
    assert sorted(os.listdir(run.parent / "production")) == ["model.json", "model.safetensors"]
    assert not [name for name in os.listdir(run.parent) if name.startswith(".")]  # no staging left behind


def test_a_held_lock_times_out_with_a_clear_error(run: Path) -> None:
    registry = registry_of(run, lock_timeout=0.2)
    registry.validate(0, "1.0.0")
    with filelock.FileLock(str(run.parent / "validated" / ".registry.lock")):
        with pytest.raises(PromotionError, match="registry lock"):
            _in_another_thread(lambda: registry.promote("1.0.0"))
    assert registry.production() is None


def _in_another_thread(function):
    """Run ``function`` in a new thread (a FileLock is reentrant within its own thread) and re-raise."""
    import threading

    failure: list[BaseException] = []

    def target() -> None:
        try:
            function()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            failure.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def test_progress_reports_every_byte_read(run: Path) -> None:
    reads: dict[str, list[int]] = {}

    def progress(label: str, total: int):
        reads[label] = [total]
        return reads[label].append

    registry = registry_of(run)
    size = CheckpointManager(run).find(1).size
    registry.validate(1, "1.0.0", progress=progress)
    registry.promote("1.0.0", progress=progress)
    model_size = registry.validation("1.0.0")["files"]["model.safetensors"]["size"]
    assert reads["validating epoch_1"][0] == 2 * size == sum(reads["validating epoch_1"][1:])
    assert reads["promoting 1.0.0"][0] == model_size == sum(reads["promoting 1.0.0"][1:])


def test_a_damaged_model_card_is_reported_and_replaced_by_the_next_promotion(run: Path) -> None:
    registry = registry_of(run)
    registry.validate(0, "1.0.0")
    registry.validate(1, "1.1.0")
    registry.promote("1.0.0")
    (run.parent / "production" / "model.json").write_text('{"version": "1.0')
    with pytest.raises(CorruptCheckpointError, match="model.json is not valid JSON"):
        registry.production()
    with pytest.raises(CorruptCheckpointError, match="model.json is not valid JSON"):
        registry.rollback()
    with pytest.warns(UserWarning, match="replacing a damaged production model"):
        registry.promote("1.1.0")
    assert registry.load_production()["version"] == "1.1.0"
    assert registry.history()[-1]["previous"] is None


# ---------------------------------------------------------------------- writability probes of dead writers


def _exited_pid() -> int:
    """The pid of a process that has exited (and been reaped): a writer killed while probing."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    return child.pid


def _probe_leftover(directory: Path, pid: int) -> Path:
    """The writability probe a writer with ``pid`` on this host makes in ``directory``, left there."""
    host = format(zlib.crc32(socket.gethostname().encode()), "08x")
    probe = directory / f".tmp.{host}.{pid}.{uuid.uuid4().hex[:12]}.probe"
    probe.mkdir(parents=True)
    return probe


def test_probe_leftovers_of_dead_writers_are_removed_on_the_next_open(run: Path) -> None:
    """A kill inside a writability probe (promote probes the production directory's parent, which
    the registry otherwise only cleans for ``production``) leaves a hidden directory; opening the
    registry or the manager removes it, and a live writer's probe stays."""
    registry = registry_of(run)
    registry.validate(1, "1.0.0")
    dead = _exited_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        in_run, in_validated, in_checkpoints = (_probe_leftover(place, dead) for place in
                                                (run.parent, registry.validated_dir, run))
        live_probe = _probe_leftover(run.parent, live.pid)
        registry_of(run)
        assert not in_run.exists() and not in_validated.exists()
        CheckpointManager(run)
        assert not in_checkpoints.exists()
        again = _probe_leftover(run.parent, dead)
        registry.promote("1.0.0")  # a promotion cleans the production parent's probes too
        assert not again.exists()
        assert live_probe.exists()
    finally:
        live.kill()
        live.wait(timeout=60)
