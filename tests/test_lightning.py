"""ckpt_plugin.lightning: saving, resuming, "best", retention, DDP and LightningCLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from ckpt_plugin import (  # noqa: E402
    AsyncSaveError,
    CheckpointManager,
    ConfigurationError,
    EncodingError,
    IncompatibleCheckpointError,
)
from ckpt_plugin.lightning import CheckpointCallback, ManagerCheckpointIO  # noqa: E402
from ckpt_plugin._storage.faults import FaultyBackend  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning.*", "ignore::DeprecationWarning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)


class Regressor(pl.LightningModule):
    """A tiny model with dropout and an epoch-wise LR schedule; ``val_scores`` scripts the validation metric."""

    def __init__(self, hidden: int = 16, lr: float = 0.05, val_scores: list[float] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs).squeeze(1)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        inputs, targets = batch
        loss = nn.functional.mse_loss(self(inputs), targets)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        inputs, targets = batch
        self.log("val_loss", nn.functional.mse_loss(self(inputs), targets))
        if self.hparams.val_scores is not None:
            self.log("val_score", self.hparams.val_scores[self.current_epoch])

    def test_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        inputs, targets = batch
        self.log("test_loss", nn.functional.mse_loss(self(inputs), targets))

    def predict_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self(batch[0])

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)}


class RegressionData(pl.LightningDataModule):
    """Synthetic data; the training order is shuffled by the global generator, so resuming needs the RNG."""

    def __init__(self, size: int = 192, batch_size: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(size, 8, generator=generator)
        self.targets = self.inputs @ torch.randn(8, generator=generator)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.inputs, self.targets), batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.inputs[:64], self.targets[:64]), batch_size=32)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader


class StatefulData(RegressionData):
    """The same data through torchdata's ``StatefulDataLoader``, whose position Lightning checkpoints."""

    def train_dataloader(self) -> DataLoader:
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(TensorDataset(self.inputs, self.targets), batch_size=self.hparams.batch_size, shuffle=True)


class Opaque:
    """A hyper-parameter value that JSON cannot hold (but pickle could, so Lightning keeps it)."""


class Interrupt(pl.Callback):
    """Kills the run at the start of ``epoch``, the way a preempted job dies mid-training."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("interrupted")


def make_trainer(root: Path, max_epochs: int, callbacks: list, **kwargs) -> pl.Trainer:  # type: ignore[type-arg]
    return pl.Trainer(
        default_root_dir=root,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        **kwargs,
    )


def fresh_model(seed: int, **hparams) -> Regressor:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    return Regressor(**hparams)


def run_interrupted(checkpoint_dir: Path, root: Path, stop_at: int, **callback_args) -> None:  # type: ignore[no-untyped-def]
    model = fresh_model(0, **callback_args.pop("hparams", {}))
    trainer = make_trainer(root, 100, [CheckpointCallback(checkpoint_dir, **callback_args), Interrupt(stop_at)])
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.fit(model, RegressionData())


SAVE_MODES = pytest.mark.parametrize(
    "save_mode", [{}, {"async_save": True}, {"incremental": True}], ids=["sync", "async", "incremental"]
)


@SAVE_MODES
def test_resume_from_last_is_bitwise_identical(tmp_path: Path, save_mode: dict) -> None:  # type: ignore[type-arg]
    reference = fresh_model(0)
    reference_trainer = make_trainer(tmp_path, 6, [CheckpointCallback(tmp_path / "reference", max_checkpoints=2)])
    reference_trainer.fit(reference, RegressionData())

    run_interrupted(tmp_path / "run", tmp_path, stop_at=4, max_checkpoints=2, **save_mode)
    torch.manual_seed(1234)  # the interrupted process's generators are lost with it
    resumed = fresh_model(99)  # different initial weights: everything must come from the checkpoint
    trainer = make_trainer(tmp_path, 6, [CheckpointCallback(tmp_path / "run", max_checkpoints=2, **save_mode)])
    trainer.fit(resumed, RegressionData(), ckpt_path="last")

    assert trainer.global_step == reference_trainer.global_step
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    expected_optimizer = reference_trainer.optimizers[0].state_dict()
    actual_optimizer = trainer.optimizers[0].state_dict()
    assert actual_optimizer["param_groups"] == expected_optimizer["param_groups"]
    for index, state in expected_optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(value, actual_optimizer["state"][index][key]), (index, key)
    expected_scheduler = reference_trainer.lr_scheduler_configs[0].scheduler.state_dict()
    assert trainer.lr_scheduler_configs[0].scheduler.state_dict() == expected_scheduler
    assert [p.name for p in sorted((tmp_path / "run").iterdir()) if not p.name.startswith(".")] == ["epoch_4_step_30", "epoch_5_step_36"]


def test_best_is_loaded_for_validate_test_and_predict(tmp_path: Path) -> None:
    scores = [0.5, 0.1, 0.4, 0.3, 0.35]
    callback = CheckpointCallback(tmp_path / "ckpt", max_checkpoints=2, metric_for_best="val_score", mode="min")
    make_trainer(tmp_path, 5, [callback]).fit(fresh_model(0, val_scores=scores), RegressionData())
    assert callback.best_model_path.endswith("epoch_1_step_12")
    best_weights = callback.manager.find(epoch=1).path / "model.safetensors"
    expected = safetensors_torch.load_file(best_weights)

    for run in ("validate", "test", "predict"):
        model = fresh_model(7, val_scores=scores)
        trainer = make_trainer(tmp_path, 5, [CheckpointCallback(tmp_path / "ckpt", metric_for_best="val_score", mode="min")])
        getattr(trainer, run)(model, RegressionData(), ckpt_path="best")
        for name, tensor in expected.items():
            assert torch.equal(model.state_dict()[name], tensor), (run, name)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_retention_counts_across_interrupted_and_resumed_run(tmp_path: Path, async_save: bool) -> None:
    scores = [0.9, 0.2, 0.5, 0.6, 0.7, 0.8, 0.4]
    settings = {"max_checkpoints": 2, "keep_best": True, "metric_for_best": "val_score", "mode": "min", "async_save": async_save}
    run_interrupted(tmp_path / "ckpt", tmp_path, stop_at=4, hparams={"val_scores": scores}, **settings)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith("."))
    assert names == ["epoch_1_step_12", "epoch_2_step_18", "epoch_3_step_24"]

    callback = CheckpointCallback(tmp_path / "ckpt", **settings)
    make_trainer(tmp_path, 7, [callback]).fit(fresh_model(3, val_scores=scores), RegressionData(), ckpt_path="last")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith("."))
    assert names == ["epoch_1_step_12", "epoch_5_step_36", "epoch_6_step_42"]
    assert callback.checkpoint_names == names


class RecordNames(pl.Callback):
    """Records the callback's list of checkpoints at each epoch's start, while the last save may still be in flight."""

    def __init__(self, checkpoint_callback: CheckpointCallback) -> None:
        self.checkpoint_callback = checkpoint_callback
        self.names: list[list[str]] = []

    def on_train_epoch_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.names.append(list(self.checkpoint_callback.checkpoint_names))


def test_async_names_are_the_checkpoints_once_committed(tmp_path: Path) -> None:
    scores = [0.9, 0.2, 0.5, 0.6, 0.7]
    callback = CheckpointCallback(tmp_path / "ckpt", max_checkpoints=2, metric_for_best="val_score", async_save=True)
    recorder = RecordNames(callback)
    make_trainer(tmp_path, 5, [callback, recorder]).fit(fresh_model(0, val_scores=scores), RegressionData())
    assert recorder.names + [callback.checkpoint_names] == [
        [],
        ["epoch_0_step_6"],
        ["epoch_0_step_6", "epoch_1_step_12"],
        ["epoch_1_step_12", "epoch_2_step_18"],
        ["epoch_1_step_12", "epoch_2_step_18", "epoch_3_step_24"],
        ["epoch_1_step_12", "epoch_3_step_24", "epoch_4_step_30"],
    ]
    assert [info.name for info in callback.manager.checkpoints()] == callback.checkpoint_names
    assert callback.best_model_path.endswith("epoch_1_step_12")


def test_async_background_failure_surfaces_at_the_end_of_fit(tmp_path: Path) -> None:
    def fails_after_epoch_0(operation: str, key: str) -> None:
        staging = Path(key).parent.name  # .tmp.epoch_1_step_12.<random> while epoch 1 is written
        if operation == "create" and "epoch_" in staging and "epoch_0_" not in staging:
            raise OSError(28, "No space left on device")

    def failing(callback: CheckpointCallback) -> CheckpointCallback:
        callback.manager.route_storage(lambda backend: FaultyBackend(backend, hook=fails_after_epoch_0))
        return callback

    callback = failing(CheckpointCallback(tmp_path / "ckpt", async_save=True))
    with pytest.raises(AsyncSaveError, match="No space left on device"):
        make_trainer(tmp_path, 2, [callback]).fit(fresh_model(0), RegressionData())
    assert [info.name for info in callback.manager.checkpoints()] == callback.checkpoint_names == ["epoch_0_step_6"]
    callback.manager.load_latest()  # the committed checkpoint is intact

    # when training itself fails, a failed background save is reported without hiding that error
    callback = failing(CheckpointCallback(tmp_path / "ckpt2", async_save=True))
    with pytest.warns(UserWarning, match="No space left on device"), pytest.raises(RuntimeError, match="interrupted"):
        make_trainer(tmp_path, 5, [callback, Interrupt(2)]).fit(fresh_model(0), RegressionData())
    assert [info.name for info in callback.manager.checkpoints()] == ["epoch_0_step_6"]


def test_an_epoch_that_does_not_save_lists_and_reads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckpt_plugin import _metadata as metadata
    from ckpt_plugin._storage import LocalStore

    callback = CheckpointCallback(tmp_path / "ckpt", every_n_epochs=100, async_save=True)
    calls: list[str] = []
    listing = LocalStore.visible
    monkeypatch.setattr(LocalStore, "visible", lambda store: calls.append("list") or listing(store))
    monkeypatch.setattr(metadata, "git_provenance", lambda cwd: calls.append("git") or {})

    class Watch(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            calls.clear()  # resolving ckpt_path when fit starts may list the directory, once

        def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            calls.append("end")

    make_trainer(tmp_path, 3, [callback, Watch()]).fit(fresh_model(0), RegressionData())
    assert calls == ["end"]
    assert callback.checkpoint_names == [] and callback.manager.checkpoints() == []


def test_nothing_on_disk_is_pickled(tmp_path: Path) -> None:
    callback = CheckpointCallback(tmp_path / "ckpt", max_checkpoints=3)
    make_trainer(tmp_path, 2, [callback]).fit(fresh_model(0), RegressionData())
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert files and not [path for path in files if path.suffix in {".ckpt", ".pt", ".pth", ".pkl"}]
    for path in files:
        head = path.read_bytes()[:4]
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", path  # pickle or torch.save zip
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":  # the save log
            assert all(isinstance(json.loads(line), dict) for line in path.read_text().splitlines())
        else:
            assert path.suffix == ".safetensors", path
            safetensors_torch.load_file(path)


def test_checkpoint_contents(tmp_path: Path) -> None:
    model = fresh_model(0)
    callback = CheckpointCallback(manager=CheckpointManager(tmp_path / "ckpt", max_checkpoints=None, metric_for_best="val_loss"), every_n_epochs=2)
    trainer = make_trainer(tmp_path, 4, [callback])
    trainer.fit(model, RegressionData(batch_size=64))
    assert [info.name for info in callback.manager.checkpoints()] == ["epoch_1_step_6", "epoch_3_step_12"]

    checkpoint = callback.manager.load_latest()
    assert checkpoint["config"] == {"hidden": 16, "lr": 0.05, "val_scores": None, "datamodule": {"size": 192, "batch_size": 64}}
    assert set(checkpoint["metrics"]) == {"train_loss", "val_loss"}
    assert checkpoint["metrics"]["val_loss"] == pytest.approx(trainer.callback_metrics["val_loss"].item())
    plain = safetensors_torch.load_file(Path(checkpoint["metadata"]["path"]) / "model.safetensors")
    assert plain.keys() == model.state_dict().keys()
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.load_state_dict(checkpoint["optimizer"])  # a plain PyTorch optimizer state
    lightning_state = checkpoint["extra"]["lightning"]
    assert lightning_state["hyper_parameters"]["hidden"] == 16
    assert "fit_loop" in lightning_state["loops"]


def test_fit_without_ckpt_path_continues_from_the_latest(tmp_path: Path) -> None:
    make_trainer(tmp_path, 2, [CheckpointCallback(tmp_path / "ckpt")]).fit(fresh_model(0), RegressionData())
    trainer = make_trainer(tmp_path, 3, [CheckpointCallback(tmp_path / "ckpt")])
    trainer.fit(fresh_model(1), RegressionData())
    assert trainer.global_step == 18  # 6 steps of epoch 2 on top of the 12 restored
    assert [info.name for info in CheckpointManager(tmp_path / "ckpt").checkpoints()][-1] == "epoch_2_step_18"


def test_io_plugin_defers_other_paths_and_protects_checkpoints(tmp_path: Path) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str]] = []

        def save_checkpoint(self, checkpoint, path, storage_options=None):  # type: ignore[no-untyped-def]
            self.calls.append(("save", str(path)))

        def load_checkpoint(self, path, map_location=None, weights_only=None):  # type: ignore[no-untyped-def]
            self.calls.append(("load", str(path)))
            return {}

        def remove_checkpoint(self, path):  # type: ignore[no-untyped-def]
            self.calls.append(("remove", str(path)))

    manager = CheckpointManager(tmp_path / "ckpt", metric_for_best=None)
    info = manager.save(model={"w": torch.ones(2)}, epoch=0)
    fallback = Recorder()
    io = ManagerCheckpointIO(manager, fallback=fallback)  # type: ignore[arg-type]
    io.save_checkpoint({"state_dict": {}}, tmp_path / "other.ckpt")
    io.load_checkpoint(tmp_path / "other.ckpt")
    io.remove_checkpoint(tmp_path / "other.ckpt")
    other = str(tmp_path / "other.ckpt")
    assert fallback.calls == [("save", other), ("load", other), ("remove", other)]
    with pytest.raises(ConfigurationError, match="retention"):
        io.remove_checkpoint(info.path)
    with pytest.raises(IncompatibleCheckpointError, match="not written by ckpt_plugin.lightning"):
        io.load_checkpoint(info.path)  # a plain manager checkpoint holds no trainer state
    assert info.path.is_dir()


def test_unknown_mode_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="mode must be 'min' or 'max'"):
        CheckpointCallback(tmp_path, mode="lowest")
    with pytest.raises(ConfigurationError, match="every_n_epochs"):
        CheckpointCallback(tmp_path, every_n_epochs=-1)
    with pytest.raises(ConfigurationError, match=r"with manager=, pass them to CheckpointManager"):
        CheckpointCallback(manager=CheckpointManager(tmp_path), async_save=True)


def test_unknown_metric_is_a_clear_error(tmp_path: Path) -> None:
    callback = CheckpointCallback(tmp_path / "ckpt", metric_for_best="val_acc", mode="max")
    with pytest.raises(ConfigurationError, match=r"metric_for_best='val_acc' is not among the logged metrics \(train_loss, val_loss\)"):
        make_trainer(tmp_path, 2, [callback]).fit(fresh_model(0), RegressionData())
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())


def test_hyperparameters_json_cannot_hold_are_named(tmp_path: Path) -> None:
    class WithObject(Regressor):
        def __init__(self, helper: object = None) -> None:
            super().__init__()
            self.save_hyperparameters()

    callback = CheckpointCallback(tmp_path / "ckpt")
    with pytest.raises(EncodingError, match=r"config\['helper'\].*save_hyperparameters\(ignore="):
        make_trainer(tmp_path, 1, [callback]).fit(WithObject(helper=Opaque()), RegressionData())


def test_callback_state_json_cannot_hold_is_named(tmp_path: Path) -> None:
    class HoldsObject(pl.Callback):
        def state_dict(self) -> dict:  # type: ignore[type-arg]
            return {"handle": Opaque()}

    callback = CheckpointCallback(tmp_path / "ckpt")
    with pytest.raises(EncodingError, match=r"extra\['lightning'\]\['callbacks'\]\['[^']*HoldsObject'\]\['handle'\]"):
        make_trainer(tmp_path, 1, [callback, HoldsObject()]).fit(fresh_model(0), RegressionData())
    assert callback.manager.checkpoints() == []


@pytest.mark.slow
def test_ddp_two_processes(tmp_path: Path) -> None:
    """Rank zero alone writes, both ranks list the same checkpoints, resume works and errors never hang."""
    script = REPO / "tests" / "lightning_ddp_script.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "PYTHONWARNINGS": "ignore"}

    def run(phase: str, checkpoint_dir: Path) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
        return subprocess.run(
            [sys.executable, str(script), phase, str(checkpoint_dir), str(tmp_path)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )

    def reports(fit: str) -> list[dict]:  # type: ignore[type-arg]
        return [json.loads((tmp_path / f"{fit}-rank{rank}.json").read_text()) for rank in (0, 1)]

    done = run("train", tmp_path / "ckpt")  # fits 3 epochs, then resumes from "last" to 5
    assert done.returncode == 0, done.stderr[-3000:]
    trained = reports("train")
    assert [report["backend"] for report in trained] == ["gloo", "gloo"]
    assert [report["saves"] for report in trained] == [3, 0]
    for report in trained:
        assert report["broadcast_names"] == report["listed_names"] == trained[0]["listed_names"]
        assert len(report["listed_names"]) == 2
    resumed = reports("resume")
    assert [report["saves"] for report in resumed] == [2, 0]
    assert [report["first_step"] for report in resumed] == [12, 12]
    for report in resumed:
        assert report["broadcast_names"] == report["listed_names"] == ["epoch_3_step_16", "epoch_4_step_20"]

    done = run("preempt", tmp_path / "preempt")  # only rank zero is signalled, during step 5: both stop after it
    assert done.returncode == 0, done.stderr[-3000:]
    for report in reports("preempt"):
        assert (report["error"], report["global_step"]) == ("SIGTERMException", 6)
        assert report["listed_names"] == report["broadcast_names"] == ["epoch_0_step_4", "epoch_1_step_6"]
    assert [report["first_step"] for report in reports("preempt-resume")] == [6, 6]
    assert [report["global_step"] for report in reports("preempt-resume")] == [12, 12]

    done = run("bad-metric", tmp_path / "bad")  # rank zero refuses to save: every rank must fail, none may hang
    assert done.returncode != 0
    failed = [tmp_path / f"bad-metric-rank{rank}.json" for rank in (0, 1)]
    if not failed[0].exists():
        # Lightning's observer in the launching process (rank zero) kills it with SIGKILL within 5 s
        # of another rank's failure; on a busy host that can come before rank zero wrote its report.
        assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
        failed = failed[1:]
    for report in (json.loads(path.read_text()) for path in failed):
        assert "ConfigurationError" in report["error"] and "never_logged" in report["error"]


def test_lightning_cli_yaml(tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  default_root_dir: {tmp_path}
  max_epochs: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: ckpt_plugin.lightning.CheckpointCallback
      init_args:
        checkpoint_dir: {tmp_path / "ckpt"}
        max_checkpoints: 1
        keep_best: false
        metric_for_best: val_loss
        mode: min
        every_n_epochs: 1
model:
  hidden: 8
"""
    )
    cli = LightningCLI(Regressor, RegressionData, args=["fit", "--config", str(config)], save_config_kwargs={"overwrite": True})
    callback = cli.trainer.checkpoint_callback
    assert isinstance(callback, CheckpointCallback)
    assert (callback.manager.max_checkpoints, callback.manager.keep_best, callback.manager.mode) == (1, False, "min")
    assert [info.name for info in callback.manager.checkpoints()] == ["epoch_1_step_12"]
    assert callback.manager.load_latest()["config"]["hidden"] == 8


def test_resume_from_last_on_object_storage_is_bitwise_identical(tmp_path: Path, remote_url: str) -> None:
    url = remote_url
    reference = fresh_model(0)
    reference_trainer = make_trainer(tmp_path, 4, [CheckpointCallback(tmp_path / "reference", max_checkpoints=2)])
    reference_trainer.fit(reference, RegressionData())
    run_interrupted(url, tmp_path, stop_at=2, max_checkpoints=2)
    torch.manual_seed(1234)
    resumed = fresh_model(99)
    callback = CheckpointCallback(url, max_checkpoints=2)
    trainer = make_trainer(tmp_path, 4, [callback])
    trainer.fit(resumed, RegressionData(), ckpt_path="last")
    assert trainer.global_step == reference_trainer.global_step
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert [info.name for info in callback.manager.checkpoints()] == ["epoch_2_step_18", "epoch_3_step_24"]
    assert callback.last_model_path.startswith(url)


# ------------------------------------------------------------------ the options of ModelCheckpoint


class StopAtStep(pl.Callback):
    """Kills the run when optimizer step ``step`` is about to start (mid-epoch)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step:
            raise RuntimeError("interrupted")


def assert_same_weights(actual: nn.Module, expected: nn.Module) -> None:
    for name, tensor in expected.state_dict().items():
        assert torch.equal(tensor, actual.state_dict()[name]), name


def test_mid_epoch_checkpoints_resume_bitwise_identical_with_a_stateful_dataloader(tmp_path: Path) -> None:
    reference = fresh_model(0)
    reference_trainer = make_trainer(tmp_path, 3, [CheckpointCallback(tmp_path / "reference", every_n_train_steps=4)])
    reference_trainer.fit(reference, StatefulData())

    with pytest.raises(RuntimeError, match="interrupted"):
        make_trainer(tmp_path, 3, [CheckpointCallback(tmp_path / "run", every_n_train_steps=4), StopAtStep(10)]).fit(
            fresh_model(0), StatefulData()
        )
    callback = CheckpointCallback(tmp_path / "run", every_n_train_steps=4)
    assert [info.name for info in callback.manager.checkpoints()] == ["epoch_0_step_4", "epoch_1_step_8"]
    loops = callback.manager.load_latest()["extra"]["lightning"]["loops"]["fit_loop"]
    assert loops["epoch_loop.batch_progress"]["current"]["processed"] == 2  # two batches into epoch 1
    torch.manual_seed(1234)
    resumed = fresh_model(99)
    trainer = make_trainer(tmp_path, 3, [callback])
    trainer.fit(resumed, StatefulData(), ckpt_path="last")
    assert trainer.global_step == reference_trainer.global_step == 18
    assert_same_weights(resumed, reference)
    assert [info.step for info in callback.manager.checkpoints()][-2:] == [12, 16]


def test_time_interval_and_validation_end_schedules(tmp_path: Path) -> None:
    every_step = CheckpointCallback(tmp_path / "time", max_checkpoints=None, train_time_interval=timedelta(0))
    make_trainer(tmp_path, 1, [every_step]).fit(fresh_model(0), RegressionData())
    assert [info.step for info in every_step.manager.checkpoints()] == [1, 2, 3, 4, 5, 6]

    hourly = CheckpointCallback(tmp_path / "hourly", max_checkpoints=None, train_time_interval=timedelta(hours=1))
    make_trainer(tmp_path, 2, [hourly]).fit(fresh_model(0), RegressionData())
    assert hourly.manager.checkpoints() == []

    # validation every other epoch: ModelCheckpoint's rule saves at the end of each validation
    at_validation = CheckpointCallback(tmp_path / "val", max_checkpoints=None)
    make_trainer(tmp_path, 4, [at_validation], check_val_every_n_epoch=2).fit(fresh_model(0), RegressionData())
    assert [info.epoch for info in at_validation.manager.checkpoints()] == [1, 3]
    forced = CheckpointCallback(tmp_path / "forced", max_checkpoints=None, save_on_train_epoch_end=True)
    make_trainer(tmp_path, 4, [forced], check_val_every_n_epoch=2).fit(fresh_model(0), RegressionData())
    assert [info.epoch for info in forced.manager.checkpoints()] == [0, 1, 2, 3]


def test_keep_top_k_keeps_the_k_best_and_the_latest(tmp_path: Path) -> None:
    scores = [0.5, 0.1, 0.4, 0.3, 0.35]
    callback = CheckpointCallback(tmp_path / "ckpt", max_checkpoints=1, keep_top_k=2, metric_for_best="val_score")
    make_trainer(tmp_path, 5, [callback]).fit(fresh_model(0, val_scores=scores), RegressionData())
    assert [info.epoch for info in callback.manager.checkpoints()] == [1, 3, 4]
    never = CheckpointCallback(tmp_path / "never", keep_top_k=2, metric_for_best="val_acc")
    with pytest.raises(ConfigurationError, match=r"'val_acc', which keep_top_k=2 ranks checkpoints by, is not among the logged metrics \(train_loss, val_loss\)"):
        make_trainer(tmp_path, 2, [never]).fit(fresh_model(0), RegressionData())


def test_weights_only_checkpoints_serve_evaluation_but_refuse_to_resume(tmp_path: Path) -> None:
    callback = CheckpointCallback(tmp_path / "ckpt", save_weights_only=True)
    make_trainer(tmp_path, 2, [callback]).fit(fresh_model(0), RegressionData())
    checkpoint = callback.manager.load_latest()
    assert checkpoint["optimizer"] is None and checkpoint.get("scheduler") is None and checkpoint["model"]
    assert "callbacks" not in checkpoint["extra"]["lightning"]
    model = fresh_model(5)
    make_trainer(tmp_path, 2, [CheckpointCallback(tmp_path / "ckpt")]).validate(model, RegressionData(), ckpt_path="last")
    assert torch.equal(model.state_dict()["net.0.weight"], checkpoint["model"]["net.0.weight"])
    with pytest.raises(IncompatibleCheckpointError, match="save_weights_only=True.*cannot resume training"):
        make_trainer(tmp_path, 3, [CheckpointCallback(tmp_path / "ckpt")]).fit(fresh_model(5), RegressionData(), ckpt_path="last")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(every_n_train_steps=10, train_time_interval=timedelta(hours=1)), "every_n_train_steps=10 and train_time_interval=.* keep one and drop the other"),
        (dict(every_n_epochs=2, every_n_train_steps=10), "every_n_epochs=2 and every_n_train_steps=10 are exclusive"),
        (dict(keep_top_k=3, metric_for_best=None), "keep_top_k=3 .* pass metric_for_best or drop keep_top_k"),
        (dict(train_time_interval=3600), "must be a datetime.timedelta"),
        (dict(every_n_train_steps=-1), "every_n_train_steps must be a whole number"),
        (dict(save_on_train_epoch_end="yes"), "save_on_train_epoch_end"),
    ],
)
def test_conflicting_options_are_refused_at_construction(tmp_path: Path, options: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigurationError, match=message):
        CheckpointCallback(tmp_path, **options)


class SendSignal(pl.Callback):
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_preemption_saves_stops_and_restores_the_previous_handlers(tmp_path: Path) -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        callback = CheckpointCallback(tmp_path / "ckpt", save_on_preemption=True, async_save=True)
        trainer = make_trainer(tmp_path, 5, [callback, SendSignal(8, signal.SIGUSR1)])
        with pytest.warns(UserWarning, match="received SIGUSR1: saved a checkpoint at step 9"), pytest.raises(SystemExit):
            trainer.fit(fresh_model(0), RegressionData())
        assert trainer.global_step == 9  # the step running when the signal came was finished
        assert [info.name for info in callback.manager.checkpoints()] == ["epoch_0_step_6", "epoch_1_step_9"]
        assert seen == []  # the callback had the signal during training
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]  # and the handler found before fit is back
    finally:
        signal.signal(signal.SIGUSR1, previous)
    # the same command, rerun with auto_resume, continues from the preempted step
    first_steps: list[int] = []

    class FirstStep(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            first_steps.append(trainer.global_step)

    rerun = make_trainer(tmp_path, 5, [CheckpointCallback(tmp_path / "ckpt", auto_resume=True), FirstStep()])
    rerun.fit(fresh_model(1), RegressionData())
    assert (first_steps, rerun.global_step) == ([9], 30)


@pytest.mark.slow
def test_sigterm_preempts_a_training_process_which_then_resumes_bitwise_identical(tmp_path: Path) -> None:
    reference = fresh_model(0)
    reference_trainer = make_trainer(tmp_path, 3, [CheckpointCallback(tmp_path / "reference")])
    reference_trainer.fit(reference, StatefulData())

    job = tmp_path / "job"
    job.mkdir()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with open(job / "stderr.txt", "wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "preemption_script.py"), "lightning", str(job), "8"],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 120
            while not (job / "at-step").exists():
                assert child.poll() is None, (job / "stderr.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "the job never reached the step"
                time.sleep(0.05)
            child.send_signal(signal.SIGTERM)
            (job / "signal-sent").write_text("")
            assert child.wait(timeout=120) == 0, (job / "stderr.txt").read_text()[-3000:]
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)
    callback = CheckpointCallback(job / "ckpt")
    assert [info.name for info in callback.manager.checkpoints()] == ["epoch_0_step_6", "epoch_1_step_8"]

    torch.manual_seed(1234)
    resumed = fresh_model(99)
    trainer = make_trainer(tmp_path, 3, [callback])
    trainer.fit(resumed, StatefulData(), ckpt_path="last")
    assert trainer.global_step == reference_trainer.global_step
    assert_same_weights(resumed, reference)


def test_every_auto_saves_at_the_measured_interval_and_the_final_state(tmp_path: Path) -> None:
    often = CheckpointCallback(tmp_path / "often", max_checkpoints=None, every="auto", mtbf="1h", min_interval=1e-6, max_interval=1e-6)
    trainer = make_trainer(tmp_path, 2, [often])
    trainer.fit(fresh_model(0), RegressionData())
    steps = [info.step for info in often.manager.checkpoints()]
    assert len(steps) >= 10 and steps[-1] == trainer.global_step == 12  # about every step, and the last one
    assert often.manager.auto_interval is not None and often.manager.auto_interval.cost is not None

    rarely = CheckpointCallback(tmp_path / "rarely", every="auto", mtbf="1d", min_interval="1h")
    trainer = make_trainer(tmp_path, 2, [rarely])
    trainer.fit(fresh_model(0), RegressionData())
    assert [info.step for info in rarely.manager.checkpoints()] == [12]  # none due: the final state only


def test_every_auto_refuses_a_fixed_schedule_beside_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="drop every_n_epochs=2"):
        CheckpointCallback(tmp_path, every="auto", every_n_epochs=2)
    with pytest.raises(ConfigurationError, match="only applies with every='auto'"):
        CheckpointCallback(tmp_path, mtbf="6h")
    with pytest.raises(ConfigurationError, match="every must be 'auto'"):
        CheckpointCallback(tmp_path, every="hourly")
    with pytest.raises(ConfigurationError, match="min_interval must be"):
        CheckpointCallback(tmp_path, every="auto", min_interval="soon")
