"""ckpt_plugin._data_state: a loader's position as JSON and tensors, checked against the world size;
and the Hugging Face callback's resume with and without a stateful loader (in process)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from ckpt_plugin import CheckpointManager, EncodingError, IncompatibleCheckpointError
from ckpt_plugin import _data_state as data_state

torchdata = pytest.importorskip("torchdata.stateful_dataloader")

SAMPLES = 40


def loader(workers: int = 0) -> torchdata.StatefulDataLoader:
    torch.manual_seed(0)
    return torchdata.StatefulDataLoader(range(SAMPLES), batch_size=4, shuffle=True, num_workers=workers)


def test_a_stateful_loaders_position_round_trips_through_a_checkpoint_as_json_and_tensors(tmp_path: Path) -> None:
    order = [batch.tolist() for batch in loader()]
    first = loader()
    iterator = iter(first)
    head = [next(iterator).tolist() for _ in range(3)]
    saved = data_state.capture(first, world_size=1)
    manager = CheckpointManager(tmp_path, max_checkpoints=None)
    info = manager.save({"w": torch.zeros(1)}, extra={data_state.DATA_STATE_KEY: saved})
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))

    second = loader()
    restored = manager.read(info, items=("extra",))["extra"][data_state.DATA_STATE_KEY]
    data_state.restore(second, restored, world_size=1, path=info.path)
    assert head + [batch.tolist() for batch in second] == order


def test_a_plain_loader_is_not_stateful_and_captures_nothing() -> None:
    plain = torch.utils.data.DataLoader(range(8), batch_size=2)
    assert not data_state.is_stateful(plain)
    assert data_state.capture(plain, world_size=1) is None


class Opaque:
    def state_dict(self) -> dict:
        return {"position": 3, "handle": object()}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_a_state_that_only_pickle_could_hold_is_refused_naming_the_value() -> None:
    with pytest.raises(EncodingError, match=r"\['handle'\] is a object.*without pickle"):
        data_state.capture(Opaque(), world_size=1)


def test_a_mid_epoch_state_is_refused_at_another_world_size_with_the_choices() -> None:
    saved = data_state.capture(loader(), world_size=2)
    with pytest.raises(IncompatibleCheckpointError, match=r"by 2 process\(es\), and this run has 1.*resume with 2.*end of an epoch"):
        data_state.restore(loader(), saved, world_size=1, path="ckpt")


def test_a_state_of_an_unknown_format_is_refused() -> None:
    with pytest.raises(IncompatibleCheckpointError, match="format 9"):
        data_state.restore(loader(), {"format": 9, "state": {}}, world_size=1, path="ckpt")


# ------------------------------------------------------------------ the Hugging Face callback, in process


def hf_run(output: Path, *, stateful: bool, stop_at: int | None, resume: bool) -> tuple[list, list[str]]:
    pytest.importorskip("transformers")
    import exactly_once_worker as worker
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ckpt_plugin.hf import CheckpointCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if stop_at is not None and state.global_step == stop_at:
                control.should_training_stop = True

    args = TrainingArguments(
        output_dir=str(output), per_device_train_batch_size=4, num_train_epochs=1, save_strategy="steps",
        save_steps=5, logging_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=3,
    )
    model = worker.Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=worker.Ids(), callbacks=[CheckpointCallback(), StopAt()])
    trainer.accelerator.dataloader_config.use_stateful_dataloader = stateful
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=True if resume else None)
    assert trainer.args.ignore_data_skip is False  # put back once the resumed epoch began
    return model.seen, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))


@pytest.mark.parametrize("stateful", [True, False])
def test_hf_resume_skips_nothing_with_a_stateful_loader_and_says_what_the_skip_costs_without(
    tmp_path: Path, on_path: None, stateful: bool
) -> None:
    full, _ = hf_run(tmp_path / "full", stateful=stateful, stop_at=None, resume=False)
    head, _ = hf_run(tmp_path / "run", stateful=stateful, stop_at=5, resume=False)
    tail, messages = hf_run(tmp_path / "run", stateful=stateful, stop_at=None, resume=True)
    assert head + tail == full
    replay = [message for message in messages if "replays" in message]
    if stateful:
        assert replay == []
    else:
        assert len(replay) == 1 and "first 5 batches" in replay[0] and "use_stateful_dataloader = True" in replay[0]


# ------------------------------------------------------------------ the Lightning callback


def test_lightning_refuses_a_mid_epoch_state_saved_at_another_world_size(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from ckpt_plugin.lightning import CheckpointCallback

    callback = CheckpointCallback(tmp_path / "checkpoints", metric_for_best=None)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[callback], default_root_dir=tmp_path)
    callback.setup(trainer, pl.LightningModule(), "fit")
    saved = callback.state_dict()
    assert saved["world_size"] == 1
    callback.load_state_dict({**saved, "mid_epoch": False, "world_size": 2})  # an epoch's end: any world size
    with pytest.raises(IncompatibleCheckpointError, match=r"by 2 process\(es\), and this run has 1"):
        callback.load_state_dict({**saved, "mid_epoch": True, "world_size": 2})


def test_lightning_keeps_a_datamodules_own_state_in_the_checkpoint(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from ckpt_plugin.lightning import CheckpointCallback

    class Data(pl.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.position = 0
            self.loaded: dict | None = None

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            self.position += 7
            data = torch.utils.data.TensorDataset(torch.randn(8, 2), torch.randn(8, 1))
            return torch.utils.data.DataLoader(data, batch_size=4)

        def state_dict(self) -> dict:
            return {"position": self.position, "weights": torch.arange(3)}

        def load_state_dict(self, state: dict) -> None:
            self.loaded = state

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(epochs: int, data: Data, ckpt_path: str | None) -> None:
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[CheckpointCallback(tmp_path / "checkpoints", metric_for_best=None)],
        )
        trainer.fit(Module(), data, ckpt_path=ckpt_path)

    fit(1, Data(), None)
    resumed = Data()
    fit(2, resumed, "last")
    assert resumed.loaded is not None and resumed.loaded["position"] == 7
    assert torch.equal(resumed.loaded["weights"], torch.arange(3))


def lightning_fit_without_length(root: Path, every_n_train_steps: int) -> tuple[CheckpointManager, list[str]]:
    """Two epochs of 12 batches from an iterable dataset without ``__len__`` (Lightning reads a batch ahead)."""
    pl = pytest.importorskip("lightning.pytorch")
    import exactly_once_worker as worker
    from ckpt_plugin.lightning import CheckpointCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = worker.Recorder()

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return self.model(**batch)["loss"]

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):  # type: ignore[no-untyped-def]
            return torchdata.StatefulDataLoader(worker.IterIds(), batch_size=worker.BATCH)

    callback = CheckpointCallback(root / "checkpoints", metric_for_best=None, every_n_train_steps=every_n_train_steps,
                                  every_n_epochs=None, max_checkpoints=None)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Module())
    return callback.manager, [str(w.message) for w in caught]


def saved_dataset_position(manager: CheckpointManager, step: int) -> int:
    info = next(info for info in manager.checkpoints() if info.step == step)
    lightning = manager.read(info, items=("extra",))["extra"]["lightning"]
    return lightning["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["dataset_state"]["position"]


def test_lightning_saves_the_position_after_the_last_batch_trained_when_the_loader_has_no_length(
    tmp_path: Path, on_path: None
) -> None:
    manager, messages = lightning_fit_without_length(tmp_path, 5)
    assert saved_dataset_position(manager, 5) == 5 * 4  # Lightning's own state has read the sixth batch (24)
    assert saved_dataset_position(manager, 10) == 10 * 4
    assert not [message for message in messages if "batch ahead" in message]


def test_lightning_warns_that_a_save_after_a_later_epochs_first_batch_is_one_batch_ahead(tmp_path: Path, on_path: None) -> None:
    from ckpt_plugin._lightning_loaders import LOOKAHEAD_WARNING

    manager, messages = lightning_fit_without_length(tmp_path, 13)  # the second epoch's first batch
    assert saved_dataset_position(manager, 13) == 2 * 4
    assert messages.count(LOOKAHEAD_WARNING) == 1
