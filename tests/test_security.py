"""Hostile checkpoints: each test is an attack on the promise that a checkpoint can come from anyone.

The attacker can write anything into the directory and re-records every checksum (checksums give
integrity, not authenticity). Loading must execute no code, touch nothing outside the directory,
and end in a correct load or a :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from pathlib import Path

import pytest
import torch
from core_helpers import snapshot_tree, tiny_training, train_one_step
from security_helpers import edit_document, read_doc, replace_file, reseal_metadata, reseal_record, write_raw
from torch import nn

from ckpt_plugin import (
    ArtifactRegistry,
    CheckpointError,
    CheckpointManager,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    PromotionError,
    StorageError,
)
from ckpt_plugin._checkpoint import METADATA_FILE, STATE_FILE
from ckpt_plugin._io.files import copy_file
from ckpt_plugin.registry import parse_version
from ckpt_plugin._storage import FileRecord, checksum_bytes, trash


def saved_run(root: Path, epochs: int = 2, **options) -> tuple[CheckpointManager, nn.Module, torch.optim.Optimizer, object]:
    model, optimizer = tiny_training()
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    manager = CheckpointManager(root / "checkpoints", max_checkpoints=None, **options)
    for epoch in range(epochs):
        loss = train_one_step(model, optimizer)
        scheduler.step(loss)
        manager.save(model, optimizer, epoch=epoch, metrics={"loss": [0.5, 0.2, 0.4, 0.6][epoch]}, scheduler=scheduler)
    return manager, model, optimizer, scheduler


@pytest.fixture
def run(tmp_path: Path):
    return saved_run(tmp_path)


def outside_snapshot(root: Path) -> dict[str, bytes]:
    return snapshot_tree(root)


# ---------------------------------------------------------------------- paths never escape


@pytest.mark.parametrize("name", ["../secret.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ".hidden", "a\\b"])
def test_file_names_in_metadata_must_be_one_plain_component(run, tmp_path, name):
    manager = run[0]
    (tmp_path / "secret.safetensors").write_bytes(b"secret")
    directory = manager.checkpoint_dir / "epoch_1"
    reseal_metadata(directory, lambda m: m["files"].update({name: {"size": 6, "checksum": checksum_bytes(b"secret")}}))
    with pytest.warns(UserWarning, match="epoch_1"):
        assert [info.name for info in CheckpointManager(manager.checkpoint_dir).checkpoints()] == ["epoch_0"]
    with pytest.raises(CorruptCheckpointError, match="plain file name"):
        CheckpointManager(manager.checkpoint_dir).load(epoch=1)


@pytest.mark.parametrize("verify", [True, False])
def test_state_json_cannot_point_a_load_outside_the_checkpoint(run, tmp_path, verify):
    manager = run[0]
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(manager.checkpoint_dir / "epoch_0" / "model.safetensors", other / "model.safetensors")
    directory = manager.checkpoint_dir / "epoch_1"
    edit_document(directory, STATE_FILE, lambda s: s["items"]["model"].update({"file": "../../elsewhere/model.safetensors"}))
    with pytest.raises(CorruptCheckpointError, match=r"state.json.*plain file name"):
        manager.load(epoch=1, verify=verify)


def test_a_shard_index_cannot_name_a_file_outside(run):
    manager = run[0]
    directory = manager.checkpoint_dir / "epoch_1"
    index = {"metadata": {"total_size": 1}, "weight_map": {"w": "../epoch_0/model.safetensors"}}
    replace_file(directory, "model.safetensors.index.json", json.dumps(index).encode())
    edit_document(directory, STATE_FILE, lambda s: s["items"]["model"].update({"file": "model.safetensors.index.json"}))
    for verify in (True, False):
        with pytest.raises(CorruptCheckpointError, match="plain file name"):
            manager.load(epoch=1, verify=verify)


def test_validate_never_deletes_a_file_outside_the_checkpoint(run, tmp_path):
    manager = run[0]
    registry = ArtifactRegistry(manager.checkpoint_dir)
    registry.validate(0, "1.0.0")
    victim = tmp_path / "validated" / "v1.0.0" / "model.safetensors"
    history = tmp_path / "validated" / "history.jsonl"
    before = {victim: victim.read_bytes(), history: history.read_bytes()}
    directory = manager.checkpoint_dir / "epoch_1"
    for target in ("../../validated/v1.0.0/model.safetensors", "../../validated/history.jsonl"):
        data = before[tmp_path / target.removeprefix("../../")]
        reseal_metadata(directory, lambda m: m["files"].update({target: {"size": len(data), "checksum": "xxh3_64:0"}}))
        with pytest.raises(CheckpointError):
            registry.validate(1, "1.0.1")
    assert {path: path.read_bytes() for path in before} == before
    assert registry.versions() == ["1.0.0"]


def test_the_copy_helper_never_removes_a_file_it_did_not_create(tmp_path):
    source, target = tmp_path / "a", tmp_path / "b"
    source.write_bytes(b"new")
    target.write_bytes(b"precious")
    for reuse in (True, False):
        with pytest.raises(StorageError):
            copy_file(source, target, FileRecord(3, checksum_bytes(b"new")), reuse=reuse)
        assert target.read_bytes() == b"precious"


# ---------------------------------------------------------------------- codec markers are data only


@pytest.mark.parametrize(
    "planted",
    [
        {"__dtype__": "save"},
        {"__dtype__": "load"},
        {"__dtype__": "os"},
        {"__dtype__": "__builtins__"},
        {"__numpy__": "V2000000000", "value": 0},
        {"__numpy__": "object", "value": 0},
        {"__numpy__": "int8", "value": 10**30},
        {"__device__": "cuda:99999999999"},
        {"__device__": 7},
        {"__float__": "1e308"},
        {"__float__": [1]},
        {"__set__": [[1, 2]]},
        {"__dict__": [[[1], 2]]},
        {"__tensor__": ["x"]},
        {"__bytes__": "***"},
        {"__dtype__": "float32", "extra": 1},
    ],
)
def test_planted_markers_never_decode_to_anything_but_data(run, tmp_path, planted):
    """``ReduceLROnPlateau.load_state_dict`` copies its dict into ``__dict__``: a planted
    ``_is_better`` callable would run on the next ``scheduler.step()``."""
    manager, model, optimizer, scheduler = run
    directory = manager.checkpoint_dir / "epoch_1"
    edit_document(directory, STATE_FILE, lambda s: s["items"]["scheduler"]["tree"].update({"_is_better": planted}))
    before = outside_snapshot(tmp_path)
    with pytest.raises(CorruptCheckpointError, match=r"scheduler\['_is_better'\]"):
        manager.load_latest()
    with pytest.raises(CorruptCheckpointError, match=r"scheduler\['_is_better'\]"):
        manager.restore(model, optimizer, scheduler)
    assert not isinstance(getattr(scheduler, "_is_better", None), str)
    scheduler.step(0.1)  # still the real method
    assert outside_snapshot(tmp_path) == before


def test_every_torch_dtype_round_trips_and_nothing_else_is_a_dtype():
    from ckpt_plugin._format import codec

    for name, dtype in codec.DTYPES.items():
        assert isinstance(dtype, torch.dtype)
        assert codec.decode({"__dtype__": name}, {}) is dtype
    assert "save" not in codec.DTYPES and "Tensor" not in codec.DTYPES


def test_deep_nesting_is_refused_when_saved_and_when_loaded(run):
    manager, model, optimizer, _ = run
    deep: list = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(CheckpointError, match="nested more than"):
        manager.save(model, optimizer, epoch=5, extra={"deep": deep})
    directory = manager.checkpoint_dir / "epoch_1"
    replace_file(directory, STATE_FILE, b'{"items": {"extra": {"tree": ' + b"[" * 5000 + b"]" * 5000 + b"}}}")
    with pytest.raises(CorruptCheckpointError, match="nested more than"):
        manager.load(epoch=1)


# ---------------------------------------------------------------------- malformed documents


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(epoch=True),
        lambda m: m.update(epoch=1.9),
        lambda m: m.update(epoch="12"),
        lambda m: m.update(epoch=-1),
        lambda m: m.update(epoch=2**64),
        lambda m: m.update(step=[]),
        lambda m: m.update(files=[]),
        lambda m: m["files"]["model.safetensors"].update(size="12"),
        lambda m: m["files"]["model.safetensors"].update(size=-5),
        lambda m: m["files"]["model.safetensors"].pop("checksum"),
        lambda m: m.update(metrics=[1]),
        lambda m: m.update(mode="sideways"),
        lambda m: m.update(items={"a": 1}),
        lambda m: m.update(metrics={"loss": {"__float__": "nan", "x": 1}}),
    ],
)
def test_wrong_types_in_metadata_are_corrupt_checkpoint_errors_that_name_the_key(run, edit):
    manager = run[0]
    directory = manager.checkpoint_dir / "epoch_1"
    reseal_metadata(directory, edit)
    fresh = CheckpointManager(manager.checkpoint_dir)
    with pytest.warns(UserWarning, match="epoch_1"):
        assert [info.name for info in fresh.checkpoints()] == ["epoch_0"]
    with pytest.raises(CorruptCheckpointError, match=r"metadata.json.*(\$|metrics|nested)"):
        fresh.load(epoch=1)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [1.9], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 2**70]},
        {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]},
        {"dtype": "OBJ", "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1},
        "not an object",
    ],
)
def test_malformed_safetensors_headers_are_refused_as_safetensors_refuses_them(run, entry):
    manager = run[0]
    header = json.dumps({"w": entry}).encode()
    header += b" " * (-len(header) % 8)
    data = len(header).to_bytes(8, "little") + header + b"\0" * 4
    directory = manager.checkpoint_dir / "epoch_1"
    replace_file(directory, "model.safetensors", data)
    for verify in (True, False):
        with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
            manager.load(epoch=1, verify=verify)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        manager.restore(run[1], which=1)


def test_one_hostile_sibling_never_stops_the_directory(run, tmp_path):
    """An epoch_9/metadata.json of 5,000 '[' once stopped listing, loading, saving and ``ckpt list``."""
    manager, model, optimizer, _ = run
    (manager.checkpoint_dir / "epoch_9").mkdir()
    (manager.checkpoint_dir / "epoch_9" / METADATA_FILE).write_bytes(b"[" * 5000)
    fresh = CheckpointManager(manager.checkpoint_dir, max_checkpoints=2)
    with pytest.warns(UserWarning, match="epoch_9"):
        assert [info.name for info in fresh.checkpoints()] == ["epoch_0", "epoch_1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert fresh.load_latest()["epoch"] == 1
        fresh.save(model, optimizer, epoch=2, metrics={"loss": 0.1})
        assert [info.name for info in fresh.checkpoints()] == ["epoch_1", "epoch_2"]
    assert (manager.checkpoint_dir / "epoch_9" / METADATA_FILE).read_bytes() == b"[" * 5000
    from typer.testing import CliRunner

    from ckpt_plugin import cli

    result = CliRunner().invoke(cli.app, ["list", str(manager.checkpoint_dir), "--json"])
    assert result.exit_code == 0 and "epoch_2" in result.output, result.output


def test_torch_errors_on_checkpoint_content_are_incompatible_checkpoint_errors(run):
    manager = run[0]
    hooked = nn.Linear(3, 3)
    hooked.register_load_state_dict_post_hook(lambda module, keys: None)  # takes torch's own load path
    manager.save(hooked, epoch=7, metrics={"loss": 1.0})
    other = nn.Linear(4, 4)
    other.register_load_state_dict_post_hook(lambda module, keys: None)
    with pytest.raises(IncompatibleCheckpointError) as caught:
        manager.restore(other, which=7)
    assert isinstance(caught.value.__cause__, RuntimeError)


# ---------------------------------------------------------------------- records carry their own checksum


@pytest.fixture
def promoted(run, tmp_path):
    manager = run[0]
    registry = ArtifactRegistry(manager.checkpoint_dir)
    registry.validate(0, "1.0.0")
    registry.validate(1, "1.1.0")
    registry.promote("1.0.0")
    return registry


def test_a_swapped_production_record_is_refused_and_reported_by_verify(promoted, tmp_path):
    from typer.testing import CliRunner

    from ckpt_plugin import cli  # noqa: F401 - the CLI extra is installed for tests

    record = promoted.production_dir / "model.json"
    document = read_doc(record)
    other = read_doc(promoted.validated_dir / "v1.1.0" / "validation.json")
    document["files"]["model.safetensors"] = other["files"]["model.safetensors"]
    write_raw(record, json.dumps(document).encode())
    with pytest.raises(CorruptCheckpointError, match="model.json does not match its recorded checksum"):
        promoted.load_production()
    result = CliRunner().invoke(cli.app, ["verify", str(promoted.checkpoint_dir)])
    assert result.exit_code == 1, result.output


def test_an_edited_validation_record_is_refused(promoted):
    path = promoted.validated_dir / "v1.1.0" / "validation.json"
    document = read_doc(path)
    document["metrics"]["loss"] = 0.0
    write_raw(path, json.dumps(document).encode())
    with pytest.raises(CorruptCheckpointError, match="validation.json does not match its recorded checksum"):
        promoted.promote("1.1.0")
    with pytest.raises(CorruptCheckpointError):
        promoted.load("1.1.0")


def test_an_edited_listing_cache_never_changes_which_checkpoint_is_best(tmp_path):
    model, optimizer = tiny_training()
    manager = CheckpointManager(tmp_path, max_checkpoints=None, metric_for_best="loss")
    losses = [0.1] + [0.9] * 20
    for epoch, loss in enumerate(losses):
        manager.save(model, optimizer, epoch=epoch, metrics={"loss": loss})
    CheckpointManager(tmp_path).checkpoints()  # writes the cache
    cache = tmp_path / ".listing.json"
    assert cache.is_file()
    document = read_doc(cache)
    for entry in document["entries"].values():
        entry["summary"]["metrics"]["loss"] = 0.0 if entry["summary"]["epoch"] == len(losses) - 1 else 0.9
    document["entries"]["epoch_0"]["summary"]["metrics"]["loss"] = 5.0
    write_raw(cache, json.dumps(document).encode())
    again = CheckpointManager(tmp_path, max_checkpoints=2, keep_best=True, metric_for_best="loss")
    assert again.best().name == "epoch_0"
    again.save(model, optimizer, epoch=len(losses), metrics={"loss": 0.9})
    assert sorted(info.name for info in again.checkpoints()) == ["epoch_0", "epoch_20", "epoch_21"]


def test_history_lines_of_the_wrong_shape_are_skipped_with_a_warning(promoted):
    with open(promoted.validated_dir / "history.jsonl", "ab") as log:
        log.write(b'{"time": 1, "event": [], "version": null}\n' + b"[" * 5000 + b"\n")
    with pytest.warns(UserWarning, match="history.jsonl"):
        events = promoted.history()
    assert [event["event"] for event in events] == ["validate", "validate", "promote"]


# ---------------------------------------------------------------------- the served model is private


def test_the_served_model_never_changes_with_the_files_and_truncation_is_no_crash(promoted):
    served = promoted.load_production()
    before = {name: tensor.clone() for name, tensor in served["model"].items()}
    raw = promoted.checkpoint_dir / "epoch_0" / "model.safetensors"  # a hard link of the production file
    size = raw.stat().st_size
    with open(raw, "r+b") as handle:
        handle.seek(size - 64)
        handle.write(b"\xff" * 64)
    for name, tensor in served["model"].items():
        assert torch.equal(tensor, before[name]), name
    os.truncate(promoted.production_dir / "model.safetensors", 16)
    total = sum(float(tensor.double().sum()) for tensor in served["model"].values())  # no SIGBUS
    assert total == sum(float(tensor.double().sum()) for tensor in before.values())
    with pytest.raises(CorruptCheckpointError):
        promoted.load_production()


# ---------------------------------------------------------------------- recover() and links


def test_recover_leaves_names_it_did_not_generate_alone(run):
    manager = run[0]
    root = manager.checkpoint_dir
    (root / ".trash.backup").mkdir()
    (root / ".trash.backup" / "keep.txt").write_text("mine")
    (root / ".tmp.old-experiment").mkdir()
    (root / ".replaced.my.notes").write_text("notes")
    (root / ".replaced.x").write_text("x")
    CheckpointManager(root)
    assert (root / ".trash.backup" / "keep.txt").read_text() == "mine"
    assert (root / ".tmp.old-experiment").is_dir()
    assert (root / ".replaced.my.notes").read_text() == "notes"
    assert (root / ".replaced.x").read_text() == "x"


def test_deleting_a_symlinked_checkpoint_removes_the_link_never_its_target(tmp_path):
    model, optimizer = tiny_training()
    manager = CheckpointManager(tmp_path / "run", max_checkpoints=1)
    manager.save(model, optimizer, epoch=0, metrics={"loss": 1.0})
    kept = tmp_path / "kept"
    shutil.move(tmp_path / "run" / "epoch_0", kept)
    os.symlink(kept, tmp_path / "run" / "epoch_0")
    manager.save(model, optimizer, epoch=1, metrics={"loss": 0.5})
    trash.drain()
    assert [name for name in os.listdir(tmp_path / "run") if not name.startswith(".") or name.startswith((".tmp", ".trash"))] == ["epoch_1"]
    assert (kept / METADATA_FILE).is_file()


def test_a_symlinked_production_dir_is_written_through(run, tmp_path):
    manager = run[0]
    real = tmp_path / "serving" / "current"
    real.mkdir(parents=True)
    link = tmp_path / "production"
    os.symlink(real, link)
    registry = ArtifactRegistry(manager.checkpoint_dir)
    registry.validate(0, "1.0.0")
    registry.promote("1.0.0")
    assert link.is_symlink() and (real / "model.json").is_file()
    assert registry.load_production()["version"] == "1.0.0"
    trash.drain()  # the directory it replaced is removed in the background
    assert [name for name in os.listdir(real.parent) if name.startswith(".")] == []


# ---------------------------------------------------------------------- versions


@pytest.mark.parametrize("version", ["1" * 300 + ".0.0", "1.0.3.post1", "1.0", "1.0.0.dev1", "1.0.0+local", "01.0.0", "1!1.0.0"])
def test_versions_are_strict_semantic_versions(version, run):
    with pytest.raises(PromotionError, match="not a semantic version"):
        parse_version(version)
    with pytest.raises(PromotionError):
        ArtifactRegistry(run[0].checkpoint_dir).validate(0, version)


def test_the_cli_exits_2_on_a_bad_version(run):
    from typer.testing import CliRunner

    from ckpt_plugin import cli

    result = CliRunner().invoke(cli.app, ["validate", str(run[0].checkpoint_dir), "0", "--version", "1" * 300 + ".0.0"])
    assert result.exit_code == 2, result.output


# ---------------------------------------------------------------------- concurrent saves


def test_two_writers_saving_one_epoch_at_once_both_complete(tmp_path):
    model, optimizer = tiny_training()
    managers = [CheckpointManager(tmp_path, max_checkpoints=None) for _ in range(2)]
    for attempt in range(6):
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def save(manager: CheckpointManager, value: float) -> None:
            barrier.wait()
            try:
                manager.save(model, optimizer, epoch=attempt, metrics={"loss": value})
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=save, args=(m, float(i))) for i, m in enumerate(managers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        assert managers[0].load(epoch=attempt)["metrics"]["loss"] in (0.0, 1.0)
    trash.drain()  # the replaced checkpoints are removed in the background
    assert [name for name in os.listdir(tmp_path) if name.startswith((".tmp.", ".trash.", ".replaced."))] == []


def test_a_production_record_without_its_optional_config_loads(promoted):
    reseal_record(promoted.production_dir / "model.json", lambda d: d.pop("config"))
    assert promoted.load_production()["config"] is None
