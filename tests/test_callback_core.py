"""The callback core: both callbacks take every manager option, ``manager=``, and refuse both at once."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")
pytest.importorskip("model_signing")
pytest.importorskip("OpenSSL")

from ckpt_plugin import (  # noqa: E402
    CheckpointManager,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    EncodingError,
    IncompatibleCheckpointError,
    SignatureError,
)
from ckpt_plugin import hf, lightning  # noqa: E402
from ckpt_plugin._callback_core import ManagerOptions  # noqa: E402
from ckpt_plugin.signing import SIGNATURE_FILE  # noqa: E402
from security_helpers import key_pair  # noqa: E402

CALLBACKS = (lightning.CheckpointCallback, hf.CheckpointCallback)
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning.*", "ignore::DeprecationWarning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)


def manager_parameters() -> dict[str, inspect.Parameter]:
    parameters = dict(inspect.signature(CheckpointManager.__init__).parameters)
    del parameters["self"]
    return parameters


def test_the_options_are_the_managers_own() -> None:
    parameters = manager_parameters()
    assert ManagerOptions.names() == tuple(parameters)
    assert {name: getattr(ManagerOptions(), name) for name in parameters} == {
        name: parameter.default for name, parameter in parameters.items()
    }


@pytest.mark.parametrize("callback", CALLBACKS, ids=["lightning", "hf"])
def test_each_callback_takes_every_manager_option_and_a_manager(callback: type) -> None:
    accepted = inspect.signature(callback.__init__).parameters
    missing = sorted(set(manager_parameters()) - set(accepted))
    assert not missing, f"{callback.__module__}.CheckpointCallback does not take {missing}"
    assert "manager" in accepted


@pytest.mark.parametrize("callback", CALLBACKS, ids=["lightning", "hf"])
def test_a_manager_with_manager_options_is_refused_naming_them(tmp_path: Path, callback: type) -> None:
    manager = CheckpointManager(tmp_path / "ckpt")
    with pytest.raises(
        ConfigurationError, match=r"^signing_key and collective_timeout configure the manager .* with manager=, pass them to CheckpointManager"
    ):
        callback(manager=manager, signing_key=tmp_path / "key.pem", collective_timeout=5.0)
    with pytest.raises(ConfigurationError, match="manager must be a CheckpointManager, not str"):
        callback(manager="checkpoints")


def test_lightning_signs_with_signing_key_and_uses_a_given_manager(tmp_path: Path) -> None:
    from test_lightning import RegressionData, fresh_model, make_trainer

    (private, public), (_, theirs) = key_pair(tmp_path, "ours"), key_pair(tmp_path, "theirs")
    callback = lightning.CheckpointCallback(tmp_path / "signed", signing_key=private)
    make_trainer(tmp_path, 1, [callback]).fit(fresh_model(0), RegressionData())
    assert_signed(callback.manager, public, theirs)

    given = CheckpointManager(tmp_path / "given", max_checkpoints=None, metric_for_best="val_loss", signing_key=private)
    callback = lightning.CheckpointCallback(manager=given)
    assert callback.manager is given
    make_trainer(tmp_path, 2, [callback]).fit(fresh_model(0), RegressionData())
    assert [info.epoch for info in given.checkpoints()] == [0, 1]
    assert_signed(given, public, theirs)


def test_hf_signs_with_signing_key_and_uses_a_given_manager(tmp_path: Path) -> None:
    from test_hf import make_trainer

    (private, public), (_, theirs) = key_pair(tmp_path, "ours"), key_pair(tmp_path, "theirs")
    trainer, callback = make_trainer(
        tmp_path / "out", callback=hf.CheckpointCallback(signing_key=private), num_train_epochs=1
    )
    trainer.train()
    assert_signed(callback.manager, public, theirs)

    given = CheckpointManager(tmp_path / "given", max_checkpoints=None, metric_for_best="eval_loss", keep_best=True, signing_key=private)
    callback = hf.CheckpointCallback(manager=given)
    assert callback.manager is given
    trainer, _ = make_trainer(tmp_path / "out2", callback=callback, num_train_epochs=2)
    trainer.train()
    assert callback.settings is not None and callback.settings.checkpoint_dir == given.checkpoint_dir
    assert [info.epoch for info in given.checkpoints()] == [1, 2]
    assert_signed(given, public, theirs)


def test_hf_refuses_a_given_manager_ranking_by_a_name_the_trainer_never_reports(tmp_path: Path) -> None:
    from test_hf import make_trainer

    callback = hf.CheckpointCallback(manager=CheckpointManager(tmp_path / "given", metric_for_best="loss"))
    with pytest.raises(ConfigurationError, match="build it with metric_for_best='eval_loss'"):
        make_trainer(tmp_path / "out", callback=callback)


def assert_signed(manager: CheckpointManager, public: Path, theirs: Path) -> None:
    latest = manager.latest()
    assert latest is not None and (Path(latest.path) / SIGNATURE_FILE).is_file()
    assert manager.load_latest(verify_with=public)["epoch"] == latest.epoch
    with pytest.raises(SignatureError):
        manager.load_latest(verify_with=theirs)


# ------------------------------------------------------------- the manager's operations the callbacks use


def test_acknowledged_later_checkpoints_are_not_warned_about_again(tmp_path: Path) -> None:
    from core_helpers import tiny_training

    model, _ = tiny_training()
    manager = CheckpointManager(tmp_path, max_checkpoints=None)
    manager.save(model, epoch=2)
    manager.acknowledge_later_checkpoints()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manager.save(model, epoch=1)
    other = CheckpointManager(tmp_path, max_checkpoints=None)
    with pytest.warns(UserWarning, match="already holds later checkpoints"):
        other.save(model, epoch=0)


def test_read_file_and_foreign_files_check_what_the_checkpoint_records(tmp_path: Path) -> None:
    from core_helpers import tiny_training

    model, _ = tiny_training()
    manager = CheckpointManager(tmp_path)
    info = manager.save(model, epoch=0, files={"notes.json": b'{"a": 1}'})
    assert manager.read_file(info, "notes.json") == b'{"a": 1}'
    with pytest.raises(CheckpointNotFoundError, match="records no file 'other.json'"):
        manager.read_file(info, "other.json")
    assert manager.foreign_files(info) == []
    (Path(info.path) / "rng_state.pth").write_bytes(b"planted")
    assert manager.foreign_files(info) == ["rng_state.pth"]
    (Path(info.path) / "notes.json").write_bytes(b'{"a": 2}')
    with pytest.raises(CorruptCheckpointError):
        manager.read_file(info, "notes.json")


def test_check_config_refuses_what_a_checkpoint_cannot_record(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.check_config({"lr": 0.1, "layers": [1, 2]})
    with pytest.raises(EncodingError, match="config"):
        manager.check_config({"loss": object()})


def test_load_state_into_names_the_checkpoint_the_target_refuses(tmp_path: Path) -> None:
    from core_helpers import tiny_training

    model, _ = tiny_training()
    manager = CheckpointManager(tmp_path)
    info = manager.save(model, epoch=0)
    state = manager.read(info, items=("model",))["model"]
    manager.load_state_into(model, "model", state, info)
    with pytest.raises(IncompatibleCheckpointError, match=r"the model state in .*epoch_0 cannot be loaded"):
        manager.load_state_into(torch.nn.Linear(3, 3), "model", state, info)
