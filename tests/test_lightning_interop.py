"""The Lightning callback beside Lightning's own tools: ModelCheckpoint, explicit resume, load_from_checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from ckpt_plugin import CheckpointNotFoundError, ConfigurationError, IncompatibleCheckpointError  # noqa: E402
from ckpt_plugin import CheckpointManager  # noqa: E402
from ckpt_plugin.lightning import AutoResumingCheckpointCallback, CheckpointCallback, load_from_checkpoint  # noqa: E402
from test_lightning import RegressionData, Regressor, fresh_model, make_trainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
LIGHTNING_NOTICES = ("was called without a model", "there is no last checkpoint available")


class Tracked(Regressor):
    """Records that ``on_load_checkpoint`` ran, and accepts any keyword (so leaked hparams would show)."""

    def __init__(self, hidden: int = 16, lr: float = 0.05, val_scores=None, **extra) -> None:  # type: ignore[no-untyped-def]
        super().__init__(hidden, lr, val_scores)
        self.extra = extra
        self.loaded_from_checkpoint = False

    def on_load_checkpoint(self, checkpoint):  # type: ignore[no-untyped-def]
        self.loaded_from_checkpoint = True


def fit(root: Path, epochs: int, callbacks: list, model=None, **fit_kwargs):  # type: ignore[no-untyped-def]
    trainer = make_trainer(root, epochs, callbacks)
    with warnings.catch_warnings(record=True) as caught:  # the filters in force, as a user has them
        trainer.fit(model if model is not None else fresh_model(0), RegressionData(), **fit_kwargs)
    return trainer, [str(warning.message) for warning in caught]


def test_a_fresh_fit_starts_fresh_and_says_so_once(tmp_path):
    _, first = fit(tmp_path, 2, [CheckpointCallback(tmp_path / "ckpt")])
    assert not [message for message in first if any(notice in message for notice in LIGHTNING_NOTICES)]
    assert not [message for message in first if "already holds" in message]

    trainer, second = fit(tmp_path, 1, [CheckpointCallback(tmp_path / "ckpt")])
    assert trainer.global_step == 6, "a second fit() without ckpt_path must not resume"
    said = [message for message in second if "already holds checkpoints" in message]
    assert len(said) == 1 and "ckpt_path='last'" in said[0] and "auto_resume=True" in said[0]
    assert not [message for message in second if any(notice in message for notice in LIGHTNING_NOTICES)]


def test_last_resumes_and_auto_resume_is_opt_in(tmp_path):
    fit(tmp_path, 2, [CheckpointCallback(tmp_path / "ckpt")])
    trainer, messages = fit(tmp_path, 3, [CheckpointCallback(tmp_path / "ckpt")], ckpt_path="last")
    assert trainer.global_step == 18 and trainer.current_epoch == 3

    callback = CheckpointCallback(tmp_path / "ckpt", auto_resume=True)
    assert isinstance(callback, AutoResumingCheckpointCallback) and callback.auto_resume
    trainer, messages = fit(tmp_path, 4, [callback])
    assert trainer.global_step == 24, "auto_resume=True continues from the latest checkpoint"
    assert not [message for message in messages if any(notice in message for notice in LIGHTNING_NOTICES)]

    trainer, _ = fit(tmp_path, 1, [CheckpointCallback(tmp_path / "fresh", auto_resume=True)])
    assert trainer.global_step == 6, "auto_resume in an empty directory starts fresh"


def test_model_checkpoint_side_by_side(tmp_path):
    """ModelCheckpoint's .ckpt files load with torch's default weights_only=True, also in Lightning's own calls."""
    ours = CheckpointCallback(tmp_path / "ckpt", metric_for_best="train_loss")
    mc = ModelCheckpoint(dirpath=tmp_path / "mc", monitor="val_loss", save_top_k=1, save_last=True)
    trainer, _ = fit(tmp_path, 3, [ours, mc])
    assert Path(mc.best_model_path).is_file()

    state = torch.load(mc.best_model_path, weights_only=True)  # what every Lightning load does by default
    assert set(state["callbacks"]["CheckpointCallback"]["rng"]) >= {"torch", "python", "numpy"}
    reloaded = Regressor.load_from_checkpoint(mc.best_model_path)
    assert torch.equal(reloaded.net[0].weight, state["state_dict"]["net.0.weight"])

    for ckpt_path in ("best", ours.best_model_path, mc.best_model_path):
        trainer.validate(fresh_model(5), RegressionData(), ckpt_path=ckpt_path, verbose=False)
        assert Path(mc.best_model_path).is_file(), f"validate(ckpt_path={ckpt_path!r}) rewound best_model_path"
        assert Path(mc.last_model_path).is_file()

    mc2 = ModelCheckpoint(dirpath=tmp_path / "mc", monitor="val_loss", save_top_k=1, save_last=True)
    resumed, _ = fit(tmp_path, 4, [CheckpointCallback(tmp_path / "ckpt", metric_for_best="train_loss"), mc2], ckpt_path="last")
    assert resumed.global_step == 24
    assert Path(mc2.best_model_path).is_file()
    assert [info.epoch for info in CheckpointManager(tmp_path / "ckpt").checkpoints()][-1] == 3


def test_load_from_checkpoint_rebuilds_module_and_datamodule(tmp_path):
    scores = [0.5, 0.1, 0.4]
    model = Tracked(hidden=12, lr=0.02, val_scores=scores)
    fit(tmp_path, 3, [CheckpointCallback(tmp_path / "ckpt", metric_for_best="val_score")], model=model)
    manager = CheckpointManager(tmp_path / "ckpt")

    best = load_from_checkpoint(Tracked, tmp_path / "ckpt")
    assert best.loaded_from_checkpoint and best.hparams.hidden == 12 and best.hparams.lr == 0.02
    assert best.extra == {}, "the datamodule's hparams must not reach the module"
    expected = manager.find(epoch=1)  # val_score 0.1
    weights = manager.load(epoch=1)["model"]
    assert torch.equal(best.net[0].weight, weights["net.0.weight"])
    assert str(expected.path).endswith("epoch_1_step_12")

    latest = load_from_checkpoint(Tracked, tmp_path / "ckpt", which="latest", lr=0.5)
    assert latest.hparams.lr == 0.5 and torch.equal(latest.net[0].weight, manager.load(epoch=2)["model"]["net.0.weight"])
    by_epoch = load_from_checkpoint(Tracked, manager.find(epoch=0).path, map_location="cpu")
    assert torch.equal(by_epoch.net[0].weight, manager.load(epoch=0)["model"]["net.0.weight"])
    assert load_from_checkpoint(Tracked, tmp_path / "ckpt", which=2).hparams.hidden == 12

    data = load_from_checkpoint(RegressionData, tmp_path / "ckpt")
    assert isinstance(data, RegressionData) and dict(data.hparams) == {"size": 192, "batch_size": 32}

    with pytest.raises(CheckpointNotFoundError, match="existing epochs"):
        load_from_checkpoint(Tracked, tmp_path / "ckpt", which=9)
    plain = CheckpointManager(tmp_path / "plain")
    plain.save(torch.nn.Linear(2, 2), epoch=0)
    with pytest.raises(IncompatibleCheckpointError, match="CheckpointCallback"):
        load_from_checkpoint(Tracked, tmp_path / "plain", which="latest")


# ------------------------------------------------------------------ the paths a Lightning user tries first


def test_load_from_checkpoint_reads_object_storage_urls(tmp_path, s3_bucket, s3_env, monkeypatch):
    url = f"s3://{s3_bucket}/run/checkpoints"
    scores = [0.5, 0.1, 0.4]
    callback = CheckpointCallback(url, metric_for_best="val_score")
    fit(tmp_path, 3, [callback], model=Tracked(hidden=12, val_scores=scores))
    manager = CheckpointManager(url)
    weights = {epoch: manager.load(epoch=epoch)["model"]["net.0.weight"] for epoch in (0, 1, 2)}

    best = load_from_checkpoint(Tracked, url)
    assert best.hparams.hidden == 12 and torch.equal(best.net[0].weight, weights[1])
    assert torch.equal(load_from_checkpoint(Tracked, url + "/", which="latest").net[0].weight, weights[2])
    one = manager.find(epoch=0)
    assert torch.equal(load_from_checkpoint(Tracked, one.location).net[0].weight, weights[0])
    assert torch.equal(load_from_checkpoint(Tracked, callback.best_model_path).net[0].weight, weights[1])

    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the storage_options say where the store is now
    options = {"endpoint_url": s3_env, "key": "testing", "secret": "testing"}
    by_options = load_from_checkpoint(Tracked, url, which=2, storage_options=options)
    assert torch.equal(by_options.net[0].weight, weights[2]) and "storage_options" not in by_options.extra
    with pytest.raises(CheckpointNotFoundError, match="holds no checkpoint yet"):
        load_from_checkpoint(Tracked, f"s3://{s3_bucket}/elsewhere", storage_options=options)
    with pytest.raises(ConfigurationError, match="storage_options only apply to URLs"):
        load_from_checkpoint(Tracked, tmp_path, storage_options=options)


def test_fit_ckpt_path_takes_the_checkpoint_dir_and_resumes_from_its_latest(tmp_path):
    fit(tmp_path, 2, [CheckpointCallback(tmp_path / "ckpt")])
    trainer, _ = fit(tmp_path, 3, [CheckpointCallback(tmp_path / "ckpt")], ckpt_path=str(tmp_path / "ckpt"))
    assert (trainer.global_step, trainer.current_epoch) == (18, 3), "resumed after epoch 1, as ckpt_path='last' does"
    trainer, _ = fit(tmp_path, 4, [CheckpointCallback(tmp_path / "ckpt")], ckpt_path=tmp_path / "ckpt")
    assert trainer.global_step == 24

    with pytest.raises(CheckpointNotFoundError, match=r"holds no checkpoint yet.*ckpt_path='last'"):
        fit(tmp_path, 1, [CheckpointCallback(tmp_path / "empty")], ckpt_path=str(tmp_path / "empty"))


def test_with_the_callback_lightning_adds_no_model_checkpoint_and_writes_no_ckpt_file(tmp_path):
    """What the guide says to do instead of enable_checkpointing=False, which Lightning refuses."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    callback = CheckpointCallback(tmp_path / "ckpt")
    trainer, _ = fit(tmp_path, 1, [callback])
    assert trainer.checkpoint_callbacks == [callback]
    assert not list(tmp_path.rglob("*.ckpt"))
    with pytest.raises(MisconfigurationException, match="enable_checkpointing=False"):
        pl.Trainer(enable_checkpointing=False, callbacks=[CheckpointCallback(tmp_path / "ckpt")])


def test_metric_for_best_none_ranks_nothing_and_keeps_the_latest(tmp_path):
    callback = CheckpointCallback(tmp_path / "ckpt", max_checkpoints=2, metric_for_best=None)
    assert (callback.manager.keep_best, callback.manager.metric_for_best, callback.monitor) == (False, None, None)
    fit(tmp_path, 3, [callback], model=Tracked())  # logs train_loss and val_loss, no metric named "loss"
    assert [info.name for info in callback.manager.checkpoints()] == ["epoch_1_step_12", "epoch_2_step_18"]
    assert callback.best_model_path == callback.last_model_path == str(callback.manager.latest().path)
    latest = load_from_checkpoint(Tracked, tmp_path / "ckpt")  # "best" of a run that ranked nothing: the latest
    assert torch.equal(latest.net[0].weight, callback.manager.load(epoch=2)["model"]["net.0.weight"])


def test_keep_best_follows_metric_for_best_unless_given(tmp_path):
    assert CheckpointCallback(tmp_path).manager.keep_best, "the default ranks by val_loss and keeps its best"
    assert CheckpointCallback(tmp_path, metric_for_best="val_score", mode="max").manager.keep_best
    assert not CheckpointCallback(tmp_path, keep_best=False).manager.keep_best
    with pytest.raises(ConfigurationError, match="metric_for_best=None ranks none") as refused:
        CheckpointCallback(tmp_path, metric_for_best=None, keep_best=True)
    advice = str(refused.value).split(";", 1)[1]
    assert "metric_for_best='val_loss'" in advice and "None" not in advice and "keep_best=True" not in advice
    with pytest.raises(ConfigurationError, match="keep_top_k=2 .* pass metric_for_best"):
        CheckpointCallback(tmp_path, metric_for_best=None, keep_top_k=2)


def test_resuming_from_an_earlier_checkpoint_says_what_becomes_of_the_later_ones(tmp_path):
    callback = CheckpointCallback(tmp_path / "ckpt", max_checkpoints=3)
    fit(tmp_path, 3, [callback])
    first = callback.manager.checkpoints()[0]
    _, messages = fit(tmp_path, 3, [CheckpointCallback(tmp_path / "ckpt", max_checkpoints=3)], ckpt_path=str(first.path))
    said = [message for message in messages if "later checkpoints" in message]
    assert len(said) == 1 and said[0].startswith("resuming from epoch_0_step_6")
    assert "epoch_1_step_12, epoch_2_step_18" in said[0] and "replaces each of them" in said[0]
    assert not [message for message in messages if "Start a new run" in message]
