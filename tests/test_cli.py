"""The ``ckpt`` command: every command, its --json output, and its errors and exit statuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from ckpt_plugin import ArtifactRegistry, CheckpointManager, cli

REPO_ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 5, bias=False)
        self.out = nn.Linear(5, 5)
        self.head = nn.Linear(5, 5, bias=False)
        self.head.weight = self.embed.weight


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Epochs 0-3; epoch 2 has the lowest loss, epoch 3 is the latest; only ``out.bias`` changes between epochs."""
    directory = tmp_path / "checkpoints"
    manager = CheckpointManager(directory, max_checkpoints=None, metric_for_best="loss", mode="min")
    torch.manual_seed(0)
    model = TiedNet()
    for epoch, loss in enumerate([0.8, 0.5, 0.2, 0.4]):
        with torch.no_grad():
            model.out.bias.fill_(float(epoch))
        manager.save(model=model, epoch=epoch, step=10 * epoch if epoch == 3 else None,
                     metrics={"loss": loss, "accuracy": 1 - loss}, config={"model_type": "tied", "width": 5})
    return directory


def ckpt(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(cli.app, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def ckpt_json(*args: str | Path) -> object:
    code, stdout, stderr = ckpt(*args, "--json")
    assert code == 0, stderr
    return json.loads(stdout)


def flip_byte(path: Path, offset: int = -2) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------- list, show


def test_list_marks_the_best_and_the_latest(run: Path) -> None:
    listing = ckpt_json("list", run)
    rows = listing["checkpoints"]
    assert [(r["name"], r["best"], r["latest"]) for r in rows] == [
        ("epoch_0", False, False), ("epoch_1", False, False), ("epoch_2", True, False), ("epoch_3_step_30", False, True)
    ]
    assert rows[3]["step"] == 30 and rows[2]["metrics"] == {"loss": 0.2, "accuracy": 0.8}
    assert all(r["size"] > 0 for r in rows) and listing["production"] is None
    code, stdout, _ = ckpt("list", run)
    assert code == 0
    assert "best" in stdout and "latest" in stdout and "loss=0.2" in stdout and "ago" in stdout


def test_list_of_an_empty_directory(tmp_path: Path) -> None:
    code, stdout, _ = ckpt("list", tmp_path)
    assert code == 0 and "no checkpoints" in stdout


@pytest.mark.parametrize("command", [["list"], ["show", "?", "1"], ["verify"], ["diff", "?", "0", "1"], ["validate", "?", "1", "--version", "1.0.0"],
                                     ["export", "?", "1", "--to", "pt"], ["promote", "?", "1.0.0"], ["rollback"], ["versions"],
                                     ["history"]])
def test_a_missing_directory_exits_2_and_says_so(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "nowhere"
    args = [missing if part == "?" else part for part in command]
    if "?" not in command:
        args.append(missing)
    code, _, stderr = ckpt(*args)
    assert code == 2
    assert "nowhere" in stderr and ("not a directory" in stderr or "does not exist" in stderr)


def test_missing_directory_with_json_prints_the_error_as_json(tmp_path: Path) -> None:
    code, stdout, _ = ckpt("list", tmp_path / "nowhere", "--json")
    assert code == 2 and json.loads(stdout)["type"] == "CheckpointNotFoundError"


def test_show_an_epoch_the_best_and_a_version(run: Path) -> None:
    shown = ckpt_json("show", run, "1")
    assert shown["epoch"] == 1 and shown["metrics"]["loss"] == 0.5 and shown["config"]["width"] == 5
    assert set(shown["files"]) >= {"model.safetensors", "state.json"} and shown["model_tensors"] == 3
    assert shown["model_parameters"] == 25 + 25 + 5
    assert "timestamp" in shown["provenance"] and "python_version" in shown["provenance"]
    assert ckpt_json("show", run, "best")["epoch"] == 2
    assert ckpt_json("show", run, "latest")["step"] == 30
    ArtifactRegistry(run).validate(1, "1.0.0")
    shown = ckpt_json("show", run, "v1.0.0")
    assert shown["epoch"] == 1 and shown["validation"]["version"] == "1.0.0"
    code, stdout, _ = ckpt("show", run, "best")
    assert code == 0 and "epoch_2" in stdout and "model.safetensors" in stdout


def test_show_says_whether_a_checkpoint_holds_a_data_loaders_position_and_where_it_stands(run: Path, tmp_path: Path) -> None:
    torchdata = pytest.importorskip("torchdata.stateful_dataloader")
    from ckpt_plugin import _data_state as data_state

    assert ckpt_json("show", run, "1")["data_loader"] is None
    code, stdout, _ = ckpt("show", run, "1")
    assert code == 0 and "no loader position saved" in stdout

    loader = torchdata.StatefulDataLoader(range(40), batch_size=4, shuffle=True)
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    lightning = {  # the layout Lightning's checkpoint dict gives the extra item, as the Lightning callback saves it
        "loops": {"fit_loop": {"state_dict": {"combined_loader": [loader.state_dict()]}}},
        "callbacks": {"CheckpointCallback{'monitor': None}": {"mid_epoch": True, "world_size": 2}},
    }
    manager = CheckpointManager(tmp_path / "with_data", max_checkpoints=None)
    manager.save({"w": torch.zeros(1)}, epoch=0, extra={data_state.DATA_STATE_KEY: data_state.capture(loader, world_size=1)})
    manager.save({"w": torch.zeros(1)}, epoch=1, extra={"lightning": lightning})
    assert ckpt_json("show", tmp_path / "with_data", "0")["data_loader"] == {
        "saved_by": "hf", "format": 1, "world_size": 1,
        "loaders": [{"kind": "torchdata", "workers": 0, "batches": 3, "dataset_state": False, "epoch_finished": False}],
    }
    shown = ckpt_json("show", tmp_path / "with_data", "1")["data_loader"]
    assert shown["saved_by"] == "lightning" and shown["world_size"] == 2 and shown["mid_epoch"] is True
    assert shown["loaders"][0]["batches"] == 3
    code, stdout, _ = ckpt("show", tmp_path / "with_data", "0")
    assert code == 0 and '"batches": 3' in stdout and "data_loader" in stdout


@pytest.mark.parametrize("target, message", [("7", "existing epochs: 0, 1, 2, 3"), ("9.9.9", "validated versions: none"),
                                             ("first", "not an epoch number")])
def test_show_an_unknown_epoch_or_version_exits_2(run: Path, target: str, message: str) -> None:
    code, _, stderr = ckpt("show", run, target)
    assert code == 2 and message in stderr


# ---------------------------------------------------------------------- verify


def test_verify_a_healthy_directory(run: Path) -> None:
    report = ckpt_json("verify", run)
    assert report["ok"] is True and report["problems"] == []
    assert report["files"] == sum(len(json.loads((p / "metadata.json").read_text())["files"]) for p in run.iterdir() if p.is_dir())


def test_verify_names_a_flipped_byte_in_a_weight_file(run: Path) -> None:
    flip_byte(run / "epoch_1" / "model.safetensors")
    code, stdout, stderr = ckpt("verify", run)
    assert code == 1
    assert str(run / "epoch_1" / "model.safetensors") in stderr and "checksum" in stderr
    assert "1 problem" in stdout
    report = json.loads(ckpt("verify", run, "--json")[1])
    assert report["ok"] is False and [p["path"] for p in report["problems"]] == [str(run / "epoch_1" / "model.safetensors")]
    with pytest.raises(Exception, match="epoch_1/model.safetensors"):
        CheckpointManager(run).load(1)


def test_verify_catches_a_truncated_file_and_an_unreadable_checkpoint(run: Path) -> None:
    path = run / "epoch_0" / "state.json"
    path.write_bytes(path.read_bytes()[:-5])
    (run / "epoch_2" / "metadata.json").write_text("{not json")
    report = json.loads(ckpt("verify", run, "--json")[1])
    assert report["ok"] is False
    assert {Path(p["path"]).parent.name for p in report["problems"]} == {"epoch_0", "epoch_2"}


def test_verify_covers_validated_versions_and_production(run: Path, monkeypatch) -> None:
    from ckpt_plugin import _storage as storage

    monkeypatch.setattr(storage.os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(18, "no links")))
    registry = ArtifactRegistry(run)
    registry.validate(1, "1.0.0")
    registry.promote("1.0.0")
    report = ckpt_json("verify", run)
    assert report["ok"] and report["files"] > 12
    flip_byte(run.parent / "production" / "model.safetensors")
    flip_byte(registry.version_dir("1.0.0") / "state.json", offset=3)
    report = json.loads(ckpt("verify", run, "--json")[1])
    assert sorted(p["path"] for p in report["problems"]) == sorted(
        [str(run.parent / "production" / "model.safetensors"), str(registry.version_dir("1.0.0") / "state.json")]
    )


def test_progress_bar_only_for_big_reads(run: Path, monkeypatch) -> None:
    callbacks = []
    real_bars = cli.Bars.__call__

    def spy(self, label, total):  # the progress factory the command hands the registry's verify
        callback = real_bars(self, label, total)
        callbacks.append(callback)
        return callback

    monkeypatch.setattr(cli.Bars, "__call__", spy)
    assert ckpt_json("verify", run)["ok"] is True
    assert callbacks and all(callback is None for callback in callbacks)  # a few kB: no bar
    callbacks.clear()
    monkeypatch.setattr(cli, "PROGRESS_MIN_BYTES", 1)
    assert ckpt_json("verify", run)["ok"] is True
    assert callbacks and all(callable(callback) for callback in callbacks)
    with cli.Bars() as bars:
        advance = bars("reading", 1000)
        advance(400)
        assert bars._progress.tasks[0].completed == 400 and bars._progress.tasks[0].total == 1000


# ---------------------------------------------------------------------- diff


def test_diff_reports_metrics_changed_tensors_and_the_largest_difference(run: Path) -> None:
    report = ckpt_json("diff", run, "0", "latest")
    assert report["metrics"]["loss"] == {"a": 0.8, "b": 0.4}
    status = {row["name"]: row["status"] for row in report["tensors"]}
    assert status == {"embed.weight": "unchanged", "out.weight": "unchanged", "out.bias": "changed", "head.weight": "unchanged"}
    assert report["largest_abs_diff"] == {"tensor": "out.bias", "value": 3.0}
    code, stdout, _ = ckpt("diff", run, "0", "2")
    assert code == 0 and "largest absolute difference: 2 in out.bias" in stdout and "1 of 4 model tensors changed" in stdout


def test_compare_tensors_handles_shapes_dtypes_nans_and_missing_names() -> None:
    a = {"same": torch.tensor([1.0, float("nan")]), "moved": torch.tensor([1, 2], dtype=torch.int64),
         "shape": torch.zeros(2), "gone": torch.zeros(1), "count": 3}
    b = {"same": torch.tensor([1.0, float("nan")]), "moved": torch.tensor([1, -5], dtype=torch.int64),
         "shape": torch.zeros(3), "new": torch.zeros(1), "count": 4}
    rows = {row["name"]: row for row in cli.compare_tensors(a, b)}
    assert rows["same"]["status"] == "unchanged"
    assert rows["moved"] == {"name": "moved", "status": "changed", "max_abs_diff": 7.0}
    assert rows["shape"]["status"] == "reshaped" and rows["gone"]["status"] == "removed" and rows["new"]["status"] == "added"
    assert rows["count"]["status"] == "changed"
    one_side_nan = cli.compare_tensors({"x": torch.tensor([1.0])}, {"x": torch.tensor([float("nan")])})
    assert one_side_nan[0]["max_abs_diff"] == float("inf")


def test_diff_of_a_corrupt_checkpoint_fails(run: Path) -> None:
    flip_byte(run / "epoch_2" / "model.safetensors")
    code, _, stderr = ckpt("diff", run, "0", "2")
    assert code == 1 and "epoch_2/model.safetensors" in stderr


# ---------------------------------------------------------------------- validate, promote, rollback, versions, history


def test_validate_promote_rollback_history(run: Path) -> None:
    record = ckpt_json("validate", run, "best", "--version", "1.0.0", "--require", "accuracy>=0.75", "--require", "loss < 0.3")
    assert record["version"] == "1.0.0" and record["source"]["epoch"] == 2
    assert [(c["name"], c["passed"]) for c in record["checks"]] == [("accuracy >= 0.75", True), ("loss < 0.3", True)]
    code, stdout, _ = ckpt("validate", run, "1", "--bump", "minor")
    assert code == 0 and "version 1.1.0" in stdout

    assert ckpt_json("promote", run, "1.0.0")["version"] == "1.0.0"
    code, stdout, _ = ckpt("promote", run, "1.1.0")
    assert code == 0 and "production is now version 1.1.0" in stdout
    weights = load_file(run.parent / "production" / "model.safetensors")
    assert torch.equal(weights["out.bias"], torch.full((5,), 1.0))

    versions = ckpt_json("versions", run)
    assert [(v["version"], v["production"]) for v in versions] == [("1.0.0", False), ("1.1.0", True)]
    assert ckpt_json("rollback", run)["version"] == "1.0.0"
    code, _, stderr = ckpt("rollback", run)
    assert code == 1 and "nothing to roll back to" in stderr

    events = ckpt_json("history", run)
    assert [(e["event"], e["version"]) for e in events] == [
        ("validate", "1.0.0"), ("validate", "1.1.0"), ("promote", "1.0.0"), ("promote", "1.1.0"), ("rollback", "1.0.0")
    ]
    code, stdout, _ = ckpt("history", run)
    assert code == 0 and "rollback" in stdout and "epoch_2" in stdout
    code, stdout, _ = ckpt("versions", run)
    assert code == 0 and "production" in stdout
    assert "validated: 1.0.0, 1.1.0; production: 1.0.0" in ckpt("list", run)[1]


def test_a_failed_requirement_exits_1_and_validates_nothing(run: Path) -> None:
    code, _, stderr = ckpt("validate", run, "latest", "--version", "1.0.0", "--require", "accuracy>=0.9")
    assert code == 1 and "accuracy >= 0.9" in stderr and "Nothing was validated" in stderr
    code, _, stderr = ckpt("validate", run, "latest", "--version", "1.0.0", "--require", "f1>0.5")
    assert code == 2 and "metric 'f1', which" in stderr  # a metric never recorded is bad input, not a failed check
    assert not (run.parent / "validated").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--version", "abc"], "not a semantic version"),
        (["--version", "../x"], "not a semantic version"),
        (["--version", "1"], "not a semantic version"),
        (["--bump", "huge"], "bump must be one of"),
        ([], "exactly one of"),
        (["--version", "1.0.0", "--require", "accuracy is high"], "METRIC OP NUMBER"),
    ],
)
def test_validate_bad_input_exits_2(run: Path, args: list[str], message: str) -> None:
    code, _, stderr = ckpt("validate", run, "best", *args)
    assert code == 2 and message in stderr
    assert not (run.parent / "validated").exists()


def test_validating_a_version_twice_is_refused(run: Path) -> None:
    assert ckpt("validate", run, "1", "--version", "1.0.0")[0] == 0
    code, _, stderr = ckpt("validate", run, "2", "--version", "1.0.0")
    assert code == 1 and "immutable" in stderr


def test_promote_an_unknown_or_invalid_version_exits_2(run: Path) -> None:
    code, _, stderr = ckpt("promote", run, "3.0.0")
    assert code == 2 and "not validated" in stderr
    code, _, stderr = ckpt("promote", run, "latest")
    assert code == 2 and "not a semantic version" in stderr


def test_promote_a_corrupt_validated_version_exits_1(run: Path) -> None:
    ArtifactRegistry(run).validate(1, "1.0.0")
    flip_byte(run / "epoch_1" / "model.safetensors")  # hard-linked: the validated copy shares it
    code, _, stderr = ckpt("promote", run, "1.0.0")
    assert code == 1 and "model.safetensors" in stderr and "checksum" in stderr
    assert not (run.parent / "production").exists()


def test_registry_commands_take_explicit_directories(run: Path, tmp_path: Path) -> None:
    where = ["--validated-dir", tmp_path / "rel", "--production-dir", tmp_path / "srv"]
    assert ckpt_json("validate", run, "1", "--version", "1.0.0", *where)["version"] == "1.0.0"
    assert ckpt_json("promote", run, "1.0.0", *where)["version"] == "1.0.0"
    assert (tmp_path / "srv" / "model.json").is_file() and not (run.parent / "production").exists()
    assert [e["event"] for e in ckpt_json("history", run, *where)] == ["validate", "promote"]


# ---------------------------------------------------------------------- export


def test_export_hf_writes_a_save_pretrained_folder(run: Path, tmp_path: Path) -> None:
    target = tmp_path / "exported"
    result = ckpt_json("export", run, "best", "--to", "hf", "--output", target)
    assert result["output"] == str(target) and result["notes"] == []
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    assert json.loads((target / "config.json").read_text()) == {"model_type": "tied", "width": 5}
    weights = load_file(target / "model.safetensors")
    expected = CheckpointManager(run).load(2)["model"]
    assert set(weights) == {"embed.weight", "out.weight", "out.bias"}
    assert all(torch.equal(weights[name], expected[name]) for name in weights)
    assert os.stat(target / "model.safetensors").st_ino != os.stat(run / "epoch_2" / "model.safetensors").st_ino


def test_export_hf_with_a_given_config(run: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "gpt2"}')
    ckpt_json("export", run, "1", "--to", "hf", "-o", tmp_path / "out", "--config", config)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"model_type": "gpt2"}


def test_export_pt_for_legacy_tools(run: Path, tmp_path: Path) -> None:
    full, weights = tmp_path / "full.pt", tmp_path / "weights.pt"
    ckpt_json("export", run, "2", "--to", "pt", "-o", full)
    ckpt_json("export", run, "2", "--to", "pt", "-o", weights, "--weights-only")
    expected = CheckpointManager(run).load(2)
    loaded = torch.load(full, weights_only=True)
    assert loaded["epoch"] == 2 and loaded["metrics"] == expected["metrics"] and loaded["config"] == expected["config"]
    state = torch.load(weights, weights_only=True)
    model = TiedNet()
    model.load_state_dict(state, strict=True)
    assert model.head.weight is model.embed.weight
    assert all(torch.equal(state[name], tensor) for name, tensor in expected["model"].items())
    assert all(torch.equal(loaded["model"][name], tensor) for name, tensor in expected["model"].items())


def test_export_never_overwrites_and_catches_corruption(run: Path, tmp_path: Path) -> None:
    existing = tmp_path / "taken.pt"
    existing.write_bytes(b"keep me")
    code, _, stderr = ckpt("export", run, "1", "--to", "pt", "-o", existing)
    assert code == 2 and "already exists" in stderr and existing.read_bytes() == b"keep me"
    flip_byte(run / "epoch_1" / "model.safetensors")
    for fmt in ("pt", "hf"):
        code, _, stderr = ckpt("export", run, "1", "--to", fmt, "-o", tmp_path / f"bad-{fmt}")
        assert code == 1 and "epoch_1/model.safetensors" in stderr
        assert not (tmp_path / f"bad-{fmt}").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "taken.pt"]


def test_export_rejects_an_unknown_format(run: Path) -> None:
    code, _, stderr = ckpt("export", run, "1", "--to", "onnx")
    assert code == 2 and "onnx" in stderr


# ---------------------------------------------------------------------- the installed entry point


def test_module_entry_point_exit_statuses(run: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "ckpt_plugin.cli"]
    done = subprocess.run([*command, "verify", str(run)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    flip_byte(run / "epoch_3_step_30" / "model.safetensors")
    done = subprocess.run([*command, "verify", str(run)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "epoch_3_step_30/model.safetensors" in done.stderr


def test_messages_with_brackets_are_printed_verbatim(tmp_path: Path) -> None:
    missing = tmp_path / "[bold]runs[/bold]"
    code, _, stderr = ckpt("list", missing)
    assert code == 2 and "[bold]runs[/bold]" in stderr


# ---------------------------------------------------------------------- object storage


def test_list_show_verify_diff_and_export_take_object_store_urls(tmp_path: Path, s3_bucket: str) -> None:
    import fsspec

    url = f"s3://{s3_bucket}/run/checkpoints"
    manager = CheckpointManager(url, max_checkpoints=None)
    model = nn.Linear(4, 3)
    for epoch, loss in enumerate([0.5, 0.3]):
        with torch.no_grad():
            model.weight.add_(1.0)
        manager.save(model, epoch=epoch, metrics={"loss": loss}, config={"model_type": "toy", "hidden": 4})
    listed = ckpt_json("list", url)
    assert [row["epoch"] for row in listed["checkpoints"]] == [0, 1] and listed["versions"] == []
    shown = ckpt_json("show", url, "best")
    assert shown["epoch"] == 1 and shown["path"].startswith(url) and shown["model_parameters"] == 15
    assert ckpt_json("verify", url)["ok"]
    changed = ckpt_json("diff", url, "0", "1")
    assert changed["metrics"]["loss"] == {"a": 0.5, "b": 0.3} and changed["changed"] == 1
    assert ckpt_json("versions", url) == []
    code, _, stderr = ckpt("export", url, "latest", "--to", "hf", "--output", tmp_path / "hf")
    assert code == 0, stderr
    assert torch.equal(load_file(tmp_path / "hf" / "model.safetensors")["weight"], model.weight)
    validated = ckpt_json("validate", url, "0", "--version", "1.0.0")
    assert validated["version"] == "1.0.0" and validated["source"]["epoch"] == 0
    assert ckpt_json("validate", url, "best", "--bump", "minor")["version"] == "1.1.0"
    code, _, stderr = ckpt("validate", url, "best", "--version", "1.0.0")
    assert code == 1 and "already validated" in stderr
    code, stdout, stderr = ckpt("promote", url, "1.0.0")
    assert code == 0 and "1.0.0" in stdout, stderr
    code, stdout, stderr = ckpt("promote", url, "1.1.0")
    assert code == 0, stderr
    versions = ckpt_json("versions", url)
    assert [(v["version"], v["production"]) for v in versions] == [("1.0.0", False), ("1.1.0", True)]
    assert ckpt_json("rollback", url)["version"] == "1.0.0"
    assert [event["event"] for event in ckpt_json("history", url)] == ["validate", "validate", "promote", "promote", "rollback"]
    verified = ckpt_json("verify", url)
    assert verified["ok"] and verified["files"] > 2 * len(manager.checkpoints()[0].files)

    fs, _ = fsspec.core.url_to_fs(url)
    target = fs._strip_protocol(manager.latest().file("model.safetensors"))
    data = bytearray(fs.cat_file(target))
    data[-2] ^= 0x55
    fs.pipe_file(target, bytes(data))
    code, stdout, _ = ckpt("verify", url, "--json")
    assert code == 1 and "model.safetensors" in stdout


def test_every_url_command_takes_storage_options_instead_of_the_environment(
    tmp_path: Path, s3_bucket: str, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{s3_bucket}/run/checkpoints"
    manager = CheckpointManager(url, max_checkpoints=None)
    model = nn.Linear(4, 3)
    for epoch in range(2):
        manager.save(model, epoch=epoch, metrics={"loss": 1.0 - epoch / 10})
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    store = ["--storage-option", f"endpoint_url={s3_env}", "--storage-option", "key=testing",
             "--storage-option", "secret=testing"]
    assert [row["epoch"] for row in ckpt_json("list", url, *store)["checkpoints"]] == [0, 1]
    assert ckpt_json("show", url, "latest", *store)["epoch"] == 1
    assert ckpt_json("diff", url, "0", "1", *store)["changed"] == 0
    assert ckpt_json("validate", url, "latest", "--version", "1.0.0", *store)["version"] == "1.0.0"
    assert ckpt_json("validate", url, "0", "--version", "0.9.0", *store)["version"] == "0.9.0"
    assert ckpt_json("promote", url, "0.9.0", *store)["version"] == "0.9.0"
    assert ckpt_json("promote", url, "1.0.0", *store)["version"] == "1.0.0"
    assert ckpt_json("rollback", url, *store)["version"] == "0.9.0"
    assert [v["version"] for v in ckpt_json("versions", url, *store)] == ["0.9.0", "1.0.0"]
    assert [event["event"] for event in ckpt_json("history", url, *store)][-1] == "rollback"
    assert ckpt_json("verify", url, *store)["ok"]
    code, _, stderr = ckpt("export", url, "latest", "--to", "safetensors", "-o", tmp_path / "m.safetensors", *store)
    assert code == 0, stderr
    assert torch.equal(load_file(tmp_path / "m.safetensors")["weight"], model.weight)
    code, _, stderr = ckpt("list", tmp_path, "--storage-option", "key=x")
    assert code == 2 and "only applies to URLs" in stderr


# ---------------------------------------------------------------------- Hugging Face runs in the listing


@pytest.fixture
def hf_run(tmp_path: Path) -> Path:
    """Metrics as the Hugging Face Trainer records them: the model's, its runtime counters, the epoch."""
    directory = tmp_path / "hf"
    manager = CheckpointManager(directory, max_checkpoints=None, metric_for_best="eval_loss")
    for epoch in (1, 2):
        manager.save(nn.Linear(2, 2), epoch=epoch, step=8 * epoch,
                     metrics={"eval_runtime": 0.31, "eval_samples_per_second": 412.5, "eval_steps_per_second": 51.6,
                              "epoch": float(epoch), "eval_accuracy": 0.5 * epoch, "eval_loss": 1.0 / epoch})
    return directory


def test_list_shows_the_ranking_metric_first_and_hides_runtime_counters(hf_run: Path) -> None:
    code, stdout, _ = ckpt("list", hf_run)
    assert code == 0
    rows = [line for line in stdout.splitlines() if "eval_loss=" in line]
    assert len(rows) == 2 and all(row.index("eval_loss=") < row.index("eval_accuracy=") for row in rows)
    assert "eval_runtime=" not in stdout and "epoch=" not in stdout
    assert "best: eval_loss, min" in stdout
    assert "not shown: eval_runtime, eval_samples_per_second, eval_steps_per_second, epoch" in stdout
    assert ckpt_json("list", hf_run)["checkpoints"][0]["metrics"]["eval_runtime"] == 0.31  # --json has them all


def test_list_metrics_chooses_what_is_shown(hf_run: Path) -> None:
    code, stdout, _ = ckpt("list", hf_run, "--metrics", "eval_runtime,eval_loss")
    assert code == 0 and "eval_runtime=0.31  eval_loss=0.5" in stdout and "eval_accuracy=" not in stdout
    rows = ckpt_json("list", hf_run, "--metrics", "eval_accuracy")["checkpoints"]
    assert [row["metrics"] for row in rows] == [{"eval_accuracy": 0.5}, {"eval_accuracy": 1.0}]
    code, _, stderr = ckpt("list", hf_run, "--metrics", "acuracy")
    assert code == 2 and "'acuracy'" in stderr and "eval_loss" in stderr
    code, _, stderr = ckpt("list", hf_run, "--metrics", " , ")
    assert code == 2 and "names no metric" in stderr


def test_list_prints_thousands_of_rows_as_aligned_columns(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    manager = CheckpointManager(directory, max_checkpoints=None)
    for epoch in range(3):
        manager.save(nn.Linear(2, 2), epoch=epoch, step=None if epoch < 2 else 1000, metrics={"loss": 1.0 / (epoch + 1)})
    code, stdout, _ = ckpt("list", directory)
    assert code == 0
    lines = stdout.splitlines()
    header = next(line for line in lines if "epoch" in line and "metrics" in line)
    body = [line for line in lines if "loss=" in line]
    assert len(body) == 3 and all(line.index("loss=") == header.index("metrics") for line in body)
    assert body[-1].startswith("best latest") and not any(line.endswith(" ") for line in lines)
