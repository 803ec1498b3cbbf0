"""ckpt_plugin.hf.CheckpointCallback with a real transformers.Trainer on a tiny GPT-2 (CPU, offline)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints  # noqa: E402

from ckpt_plugin import AsyncSaveError, CheckpointManager, ConfigurationError  # noqa: E402
from ckpt_plugin.hf import CheckpointCallback, Settings, eval_metric_name  # noqa: E402
from ckpt_plugin._storage.faults import FaultyBackend  # noqa: E402

transformers.logging.set_verbosity_error()
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
EPOCHS = 4
STEPS_PER_EPOCH = 5  # 40 sequences, batch 8
TIMING_KEYS = ("runtime", "per_second")


class Tokens(torch.utils.data.Dataset):
    """Synthetic token sequences; the labels are the inputs (causal LM)."""

    def __init__(self, count: int, seed: int) -> None:
        self.ids = torch.randint(0, 128, (count, 16), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class StopAt(TrainerCallback):
    """Ends training after ``step`` optimizer steps, as an interrupted job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
    assert config.resid_pdrop > 0 and config.embd_pdrop > 0 and config.attn_pdrop > 0  # dropout is on
    return GPT2LMHeadModel(config)


def training_args(output_dir: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        save_total_limit=2,
        metric_for_best_model="loss",
        greater_is_better=False,
        load_best_model_at_end=True,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=7,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def make_trainer(
    output_dir: Path, *, seed: int = 0, stop_at: int | None = None, callback=None, compute_metrics=None, **overrides
):
    callback = callback if callback is not None else CheckpointCallback()
    callbacks = [callback] + ([StopAt(stop_at)] if stop_at else [])
    trainer = Trainer(
        model=tiny_gpt2(seed),
        args=training_args(output_dir, **overrides),
        train_dataset=Tokens(40, 1),
        eval_dataset=Tokens(16, 2),
        callbacks=callbacks,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=(lambda logits, labels: logits.argmax(-1)) if compute_metrics else None,
    )
    return trainer, callback


def scripted_metric(values):
    """A compute_metrics that reports ``values`` in turn as metric ``score``."""
    remaining = list(values)
    return lambda prediction: {"score": remaining.pop(0)}


def final_state(trainer: Trainer) -> dict:
    """Everything a resumed run must reproduce: weights, optimizer, scheduler and trainer state."""
    history = [
        {key: value for key, value in entry.items() if not any(part in key for part in TIMING_KEYS)}
        for entry in trainer.state.log_history
        if "train_loss" not in entry  # this train() call's summary; the Trainer reports it per call
    ]
    return {
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.lr_scheduler.state_dict(),
        "state": (
            trainer.state.global_step,
            trainer.state.epoch,
            trainer.state.best_metric,
            trainer.state.best_global_step,
        ),
        "log_history": history,
    }


def assert_identical(actual, expected, path="state"):
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, path
        assert torch.equal(actual, expected), f"{path} differs"
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), path
        for key in expected:
            assert_identical(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(a, e, f"{path}[{index}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def pickled_files(root: Path) -> list[Path]:
    """Files under ``root`` that are, or look like, pickles or torch.save archives."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            head = path.read_bytes()[:4]
            if (
                path.suffix in {".pt", ".pth", ".bin", ".pkl", ".pickle"}
                or head.startswith(b"PK\x03\x04")
                or head[:1] == b"\x80"
            ):
                found.append(path)
    return found


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train much faster on one thread, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted 4-epoch run per save/eval schedule, shared by the resume tests."""
    runs = {}

    def run(schedule: str):
        if schedule not in runs:
            trainer, callback = make_trainer(tmp_path_factory.mktemp(schedule), **SCHEDULES[schedule])
            trainer.train()
            runs[schedule] = (final_state(trainer), callback)
        return runs[schedule]

    return run


SCHEDULES = {
    "epoch": {},
    "steps": dict(
        eval_strategy="steps",
        save_strategy="steps",
        eval_steps=3,
        save_steps=3,
        logging_strategy="steps",
        logging_steps=3,
    ),
    "plateau": dict(
        lr_scheduler_type="reduce_lr_on_plateau", lr_scheduler_kwargs={"patience": 0, "factor": 0.5}, learning_rate=3e-3
    ),
}


# ---------------------------------------------------------------------- settings


def test_settings_default_to_the_training_arguments(tmp_path):
    args = training_args(tmp_path, save_total_limit=3, metric_for_best_model="accuracy", greater_is_better=True)
    settings = Settings.resolve(args)
    assert settings.checkpoint_dir == tmp_path
    assert settings.max_checkpoints == 3
    assert settings.keep_best is True and settings.load_best_at_end is True
    assert settings.metric_for_best == "eval_accuracy" and settings.mode == "max"
    assert settings.save_strategy == "epoch"


def test_settings_follow_the_trainers_rules_for_limits_prefixes_and_modes(tmp_path):
    unlimited = training_args(
        tmp_path,
        save_total_limit=None,
        load_best_model_at_end=False,
        metric_for_best_model=None,
        greater_is_better=None,
    )
    settings = Settings.resolve(unlimited)
    assert settings.max_checkpoints is None and settings.keep_best is False and settings.metric_for_best is None
    assert Settings.resolve(training_args(tmp_path, save_total_limit=0)).max_checkpoints is None
    steps = training_args(
        tmp_path,
        eval_strategy="steps",
        save_strategy="steps",
        save_steps=7,
        eval_steps=7,
        metric_for_best_model="eval_f1",
        greater_is_better=None,
    )
    settings = Settings.resolve(steps)
    assert (settings.save_strategy, settings.save_steps, settings.metric_for_best, settings.mode) == (
        "steps",
        7,
        "eval_f1",
        "max",
    )
    assert eval_metric_name("loss") == "eval_loss" and eval_metric_name("eval_loss") == "eval_loss"


def test_explicit_parameters_override_the_training_arguments(tmp_path):
    settings = Settings.resolve(
        training_args(tmp_path),
        checkpoint_dir=tmp_path / "elsewhere",
        max_checkpoints=None,
        keep_best=False,
        metric_for_best="accuracy",
        mode="max",
        save_strategy="steps",
        save_steps=4,
        load_best_model_at_end=False,
    )
    assert settings == Settings(tmp_path / "elsewhere", None, False, "eval_accuracy", "max", "steps", 4, False)
    assert Settings.resolve(training_args(tmp_path), metric_for_best="perplexity").mode == "max"
    assert Settings.resolve(training_args(tmp_path), metric_for_best="eval_loss").mode == "min"
    odd = training_args(tmp_path, metric_for_best_model="accuracy", greater_is_better=False)
    assert Settings.resolve(odd, metric_for_best="eval_accuracy").mode == "min", "the args' direction for their metric"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="best"), "mode"),
        (dict(save_strategy="always"), "save_strategy"),
        (dict(save_steps=0), "save_steps"),
        (dict(keep_top_k=0), "keep_top_k"),
    ],
)
def test_bad_parameters_are_refused_at_construction(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        CheckpointCallback(**kwargs)


def test_save_strategy_best_saves_each_new_best_and_the_trainer_saves_nothing(tmp_path):
    scores = [0.5, 0.3, 0.4, 0.2]
    trainer, callback = make_trainer(
        tmp_path, save_strategy="best", metric_for_best_model="score", greater_is_better=False,
        save_total_limit=None, compute_metrics=scripted_metric(scores),
    )
    trainer.train()
    assert [info.step for info in callback.manager.checkpoints()] == [5, 10, 20]
    assert (trainer.state.best_metric, trainer.state.best_global_step) == (0.2, 20)  # as the Trainer records them
    assert pickled_files(tmp_path) == [] and not [p for p in tmp_path.iterdir() if p.name.startswith("checkpoint-") and not p.is_symlink()]
    with pytest.raises(ConfigurationError, match="the Trainer judges new bests by 'eval_score'; drop metric_for_best"):
        make_trainer(tmp_path, callback=CheckpointCallback(metric_for_best="loss"), save_strategy="best", metric_for_best_model="score")


def test_the_trainers_own_preemption_checkpoint_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigurationError, match=r"drop it and pass CheckpointCallback\(save_on_preemption=True\)"):
        Settings.resolve(training_args(tmp_path, enable_jit_checkpoint=True))


def test_keep_top_k_keeps_the_k_best_and_the_latest(tmp_path):
    trainer, callback = make_trainer(
        tmp_path, callback=CheckpointCallback(max_checkpoints=1, keep_top_k=2), metric_for_best_model="score",
        greater_is_better=True, compute_metrics=scripted_metric([0.5, 0.9, 0.1, 0.2]),
    )
    trainer.train()
    assert [info.step for info in callback.manager.checkpoints()] == [5, 10, 20]  # 0.9, 0.5 and the latest
    assert callback.manager.keep_top_k == 2
    with pytest.raises(ConfigurationError, match="eval_strategy='no' never evaluates; set eval_strategy or drop the option"):
        make_trainer(tmp_path / "none", callback=CheckpointCallback(keep_top_k=2), eval_strategy="no", load_best_model_at_end=False)
    bad, _ = make_trainer(tmp_path / "bad", callback=CheckpointCallback(keep_top_k=2, metric_for_best="accuracy"))
    with pytest.raises(ConfigurationError, match=r"'eval_accuracy', which keep_top_k ranks checkpoints by, is not among the evaluation metrics \(.*eval_loss"):
        bad.train()


def test_save_steps_as_a_fraction_of_the_training_steps(tmp_path):
    trainer, callback = make_trainer(
        tmp_path, callback=CheckpointCallback(save_strategy="steps", save_steps=0.25, max_checkpoints=None),
        eval_strategy="no", load_best_model_at_end=False, logging_strategy="no",
    )
    trainer.train()
    assert [info.step for info in callback.manager.checkpoints()] == [5, 10, 15, 20]


def test_every_auto_replaces_the_arguments_schedule_and_saves_the_final_state(tmp_path):
    often = CheckpointCallback(every="auto", mtbf="1h", min_interval=1e-6, max_interval=1e-6, max_checkpoints=None)
    trainer, callback = make_trainer(tmp_path / "often", callback=often, eval_strategy="no", load_best_model_at_end=False,
                                     logging_strategy="no")
    trainer.train()
    steps = [info.step for info in callback.manager.checkpoints()]
    assert steps == list(range(2, 21))  # due after every step (the first starts the clock), whatever save_strategy="epoch" says
    assert callback.manager.auto_interval is not None and callback.manager.auto_interval.cost is not None

    rarely = CheckpointCallback(every="auto", mtbf="1d", min_interval="1h")
    trainer, callback = make_trainer(tmp_path / "rarely", callback=rarely, eval_strategy="no", load_best_model_at_end=False,
                                     logging_strategy="no")
    trainer.train()
    assert [info.step for info in callback.manager.checkpoints()] == [20]  # none due: the final state only
    with pytest.raises(ConfigurationError, match="drop save_strategy='steps'"):
        CheckpointCallback(every="auto", save_strategy="steps")


def test_save_only_model_and_save_on_each_node(tmp_path):
    from types import SimpleNamespace

    trainer, callback = make_trainer(tmp_path, save_only_model=True, stop_at=5)
    trainer.train()
    checkpoint = callback.manager.load_latest()
    assert checkpoint["optimizer"] is None and checkpoint.get("scheduler") is None and checkpoint["model"]
    settings = Settings.resolve(training_args(tmp_path, save_on_each_node=True))
    assert settings.save_on_each_node and settings.save_only_model is False
    second_node = SimpleNamespace(process_index=4, local_process_index=0)
    assert settings.should_save(second_node) and not Settings.resolve(training_args(tmp_path)).should_save(second_node)
    assert Settings.resolve(training_args(tmp_path), save_only_model=True, save_on_each_node=False).save_only_model


def test_manager_is_exposed_once_attached_to_a_trainer(tmp_path):
    callback = CheckpointCallback()
    with pytest.raises(ConfigurationError, match="given to a Trainer"):
        _ = callback.manager
    make_trainer(tmp_path / "out", callback=callback, save_total_limit=3)
    manager = callback.manager
    assert isinstance(manager, CheckpointManager)
    assert (manager.checkpoint_dir, manager.max_checkpoints, manager.keep_best) == (tmp_path / "out", 3, True)
    assert (manager.metric_for_best, manager.mode) == ("eval_loss", "min")


def test_a_callback_added_after_construction_takes_its_settings_at_train_time(tmp_path):
    trainer, first = make_trainer(tmp_path, load_best_model_at_end=False, stop_at=5)
    trainer.remove_callback(first)
    late = CheckpointCallback(max_checkpoints=None)
    trainer.add_callback(late)
    trainer.train()
    assert [info.name for info in late.manager.checkpoints()] == ["epoch_1_step_5"]
    assert late.manager.max_checkpoints is None


def test_metric_for_best_none_ranks_nothing_whatever_the_arguments_say(tmp_path):
    args = training_args(tmp_path, load_best_model_at_end=False)  # metric_for_best_model="loss"
    assert Settings.resolve(args).metric_for_best == "eval_loss", "left out, the metric comes from the arguments"
    settings = Settings.resolve(args, metric_for_best=None)
    assert (settings.metric_for_best, settings.keep_best, settings.load_best_at_end) == (None, False, False)

    refusals = [
        (dict(args=training_args(tmp_path)), r"load_best_model_at_end=True \(from the TrainingArguments\) needs a best one"),
        (dict(args=args, keep_best=True), "keep_best=True needs a best one"),
        (dict(args=args, save_strategy="best"), "save_strategy='best' needs a best one"),
    ]
    for options, message in refusals:
        with pytest.raises(ConfigurationError, match="metric_for_best=None ranks no checkpoint, but " + message) as refused:
            Settings.resolve(metric_for_best=None, **options)
        advice = str(refused.value).split(";", 1)[1]
        assert "metric_for_best='eval_loss'" in advice and "None" not in advice and "=True" not in advice
    with pytest.raises(ConfigurationError, match="keep_top_k=2 .* pass metric_for_best"):
        CheckpointCallback(metric_for_best=None, keep_top_k=2)
    unranked = training_args(tmp_path, load_best_model_at_end=False, metric_for_best_model=None)
    with pytest.raises(ConfigurationError, match="keep_best=True needs a metric"):
        Settings.resolve(unranked, keep_best=True)


def test_metric_for_best_none_keeps_the_latest_checkpoints(tmp_path):
    callback = CheckpointCallback(metric_for_best=None, load_best_model_at_end=False)
    trainer, _ = make_trainer(tmp_path, callback=callback)  # the arguments name metric_for_best_model="loss"
    trainer.train()
    assert (callback.manager.metric_for_best, callback.manager.keep_best) == (None, False)
    assert [info.name for info in callback.manager.checkpoints()] == ["epoch_3_step_15", "epoch_4_step_20"]


def test_resuming_from_the_first_checkpoint_says_what_becomes_of_the_later_ones(tmp_path):
    """The guide's train(resume_from_checkpoint=str(first.path))."""
    trainer, callback = make_trainer(tmp_path, save_total_limit=3)
    trainer.train()
    first = callback.manager.checkpoints()[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=str(first.path))
    messages = [str(warning.message) for warning in caught]
    said = [message for message in messages if "later checkpoints" in message]
    assert len(said) == 1 and said[0].startswith("resuming from epoch_2_step_10")
    assert "(epoch_3_step_15, epoch_4_step_20)" in said[0] and "replaces each of them" in said[0]
    assert not [message for message in messages if "Start a new run" in message]
    assert [info.name for info in callback.manager.checkpoints()] == ["epoch_2_step_10", "epoch_3_step_15", "epoch_4_step_20"]


# ---------------------------------------------------------------------- saving


def test_the_managers_checkpoints_replace_the_trainers_own(tmp_path, monkeypatch):
    def trainer_save(*args, **kwargs):
        raise AssertionError("Trainer._save_checkpoint must never run")

    monkeypatch.setattr(Trainer, "_save_checkpoint", trainer_save)
    saves = []
    original_save = CheckpointManager.save
    monkeypatch.setattr(
        CheckpointManager, "save", lambda self, *a, **k: saves.append(k["step"]) or original_save(self, *a, **k)
    )
    trainer, callback = make_trainer(tmp_path, save_total_limit=None)
    trainer.train()

    assert saves == [5, 10, 15, 20], "one save per epoch, each written once, when the Trainer would save"
    names = sorted(entry.name for entry in tmp_path.iterdir())
    assert names == [".saves.jsonl", "checkpoint-20", "epoch_1_step_5", "epoch_2_step_10", "epoch_3_step_15", "epoch_4_step_20"]
    assert (tmp_path / "checkpoint-20").is_symlink() and os.readlink(tmp_path / "checkpoint-20") == "epoch_4_step_20"
    assert pickled_files(tmp_path) == []
    for info in callback.manager.checkpoints():
        assert sorted(path.name for path in info.path.iterdir()) == [
            "config.json",
            "generation_config.json",
            "metadata.json",
            "model.safetensors",
            "optimizer.safetensors",
            "state.json",
            "state.safetensors",
            "trainer_state.json",
        ]
        assert set(info.metrics) >= {"eval_loss", "eval_runtime", "epoch"}
        assert info.metrics["epoch"] == info.epoch
    checkpoint = callback.manager.load(epoch=2)
    assert checkpoint["metrics"]["eval_loss"] == next(
        e["eval_loss"] for e in trainer.state.log_history if e.get("step") == 10 and "eval_loss" in e
    )
    assert checkpoint["config"]["model"]["n_embd"] == 32 and checkpoint["config"]["model"]["model_type"] == "gpt2"
    assert checkpoint["config"]["training_args"]["output_dir"] == str(tmp_path)
    assert checkpoint["config"]["training_args"]["save_strategy"] == "epoch"
    assert checkpoint["scheduler"]["last_epoch"] == 10
    state = json.loads((callback.manager.find(2).path / "trainer_state.json").read_text())
    assert state["global_step"] == 10 and state["best_model_checkpoint"] is None
    assert state["log_history"][-1]["eval_loss"] == checkpoint["metrics"]["eval_loss"]


def test_step_saves_without_evaluation_follow_save_steps(tmp_path):
    trainer, callback = make_trainer(
        tmp_path,
        eval_strategy="no",
        save_strategy="steps",
        save_steps=3,
        logging_strategy="steps",
        logging_steps=3,
        load_best_model_at_end=False,
        save_total_limit=None,
    )
    trainer.train()
    assert [info.step for info in callback.manager.checkpoints()] == [3, 6, 9, 12, 15, 18, 20]
    assert all(info.metrics == {} for info in callback.manager.checkpoints())
    state = json.loads((callback.manager.find(1, 9).path / "trainer_state.json").read_text())
    assert state["log_history"][-1]["step"] == 9 and "loss" in state["log_history"][-1], (
        "the step's log is in its state"
    )
    assert pickled_files(tmp_path) == []


def test_explicit_directory_and_schedule_work_when_the_trainer_saves_nothing(tmp_path):
    callback = CheckpointCallback(checkpoint_dir=tmp_path / "ckpts", max_checkpoints=1, save_strategy="epoch")
    trainer, _ = make_trainer(
        tmp_path / "out", callback=callback, save_strategy="no", load_best_model_at_end=False, stop_at=10
    )
    trainer.train()
    assert [info.name for info in callback.manager.checkpoints()] == ["epoch_2_step_10"]
    assert get_last_checkpoint(str(tmp_path / "out")) == str(tmp_path / "out" / "checkpoint-10")
    assert (
        Path(get_last_checkpoint(str(tmp_path / "out"))).resolve() == (tmp_path / "ckpts" / "epoch_2_step_10").resolve()
    )
    resumed, _ = make_trainer(
        tmp_path / "out",
        callback=CheckpointCallback(checkpoint_dir=tmp_path / "ckpts", save_strategy="epoch"),
        save_strategy="no",
        load_best_model_at_end=False,
        seed=3,
    )
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 20


# ---------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "schedule, stop_at, resume_from",
    [
        ("epoch", 10, "latest"),
        ("epoch", 10, "path"),
        ("steps", 9, "latest"),
        ("plateau", 10, "latest"),
    ],
)
def test_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(
    tmp_path, uninterrupted, schedule, stop_at, resume_from
):
    expected, _ = uninterrupted(schedule)
    first, callback = make_trainer(tmp_path, stop_at=stop_at, **SCHEDULES[schedule])
    first.train()
    assert callback.manager.latest().step == stop_at
    del first

    resumed, callback = make_trainer(
        tmp_path, seed=1, **SCHEDULES[schedule]
    )  # other initial weights: all must come from the checkpoint
    target = True if resume_from == "latest" else str(callback.manager.latest().path)
    resumed.train(resume_from_checkpoint=target)

    assert_identical(final_state(resumed), expected)
    model = resumed.model
    assert model.lm_head.weight is model.transformer.wte.weight, "GPT-2's lm_head stays tied"
    assert pickled_files(tmp_path) == []


def test_resume_restores_rng_so_dropout_masks_match(tmp_path, uninterrupted, monkeypatch):
    """The same resume without the RNG restore diverges: the test above would notice a lost RNG state."""
    expected, _ = uninterrupted("epoch")
    first, _ = make_trainer(tmp_path, stop_at=10)
    first.train()
    monkeypatch.setattr("ckpt_plugin.hf.restore_rng_state", lambda state: None)
    resumed, _ = make_trainer(tmp_path, seed=1)
    resumed.train(resume_from_checkpoint=True)
    actual = final_state(resumed)
    assert actual["state"][0] == expected["state"][0]
    assert not all(torch.equal(actual["model"][key], expected["model"][key]) for key in expected["model"])


def test_resuming_from_a_damaged_checkpoint_raises_instead_of_training_on(tmp_path):
    first, callback = make_trainer(tmp_path, stop_at=10)
    first.train()
    optimizer_file = callback.manager.latest().path / "optimizer.safetensors"
    data = bytearray(optimizer_file.read_bytes())
    data[-1] ^= 0xFF
    optimizer_file.write_bytes(bytes(data))
    resumed, _ = make_trainer(tmp_path, seed=1)
    with pytest.raises(Exception, match="optimizer.safetensors"):
        resumed.train(resume_from_checkpoint=True)


# ---------------------------------------------------------------------- asynchronous and incremental saves


@pytest.mark.parametrize(
    "options",
    [dict(async_save=True), dict(incremental=True), dict(async_save=True, incremental=True)],
    ids=["async", "incremental", "async-incremental"],
)
def test_async_and_incremental_runs_resume_bitwise_identical(tmp_path, uninterrupted, options):
    expected, _ = uninterrupted("epoch")  # written with plain synchronous saves
    first, callback = make_trainer(tmp_path, stop_at=10, callback=CheckpointCallback(**options))
    first.train()
    assert callback.manager.async_save == options.get("async_save", False)
    assert [info.step for info in callback.manager.checkpoints()] == [5, 10]
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    if options.get("incremental"):
        assert (callback.manager.latest().path / "model.safetensors.index.json").is_file()
    del first

    resumed, callback = make_trainer(tmp_path, seed=1, callback=CheckpointCallback(**options))
    resumed.train(resume_from_checkpoint=True)
    assert_identical(final_state(resumed), expected)
    assert resumed.model.lm_head.weight is resumed.model.transformer.wte.weight
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-20")
    assert pickled_files(tmp_path) == []


class LinkProbe(TrainerCallback):
    """Records the ``checkpoint-*`` links while each save is held in the background, then lets it go on."""

    def __init__(self, output_dir: Path, gate: threading.Semaphore) -> None:
        self.output_dir = output_dir
        self.gate = gate
        self.seen: list[tuple[int, dict[str, bool], bool]] = []

    def on_evaluate(self, args, state, control, **kwargs):
        # CheckpointCallback ran first: this step's save is in flight, held before its first tensor file.
        links = {
            name: (self.output_dir / name / "metadata.json").is_file()
            for name in os.listdir(self.output_dir)
            if name.startswith("checkpoint-")
        }
        in_flight_visible = any(
            name.startswith("epoch_") and name.endswith(f"_step_{state.global_step}")
            for name in os.listdir(self.output_dir)
        )
        self.seen.append((state.global_step, links, in_flight_visible))
        self.gate.release()


def test_async_link_only_ever_points_at_a_committed_checkpoint(tmp_path):
    gate = threading.Semaphore(0)

    def held_write(operation, key):
        if operation == "create" and Path(key).name == "model.safetensors":
            assert gate.acquire(timeout=60), "the save was never released"

    callback = CheckpointCallback(async_save=True)
    probe = LinkProbe(tmp_path, gate)
    trainer, _ = make_trainer(tmp_path, callback=callback)
    callback.manager.route_storage(lambda backend: FaultyBackend(backend, hook=held_write))
    trainer.add_callback(probe)
    trainer.train()

    assert probe.seen == [
        (5, {}, False),
        (10, {"checkpoint-5": True}, False),  # the save of step 10 is not committed: the link stays on step 5
        (15, {"checkpoint-10": True}, False),
        (20, {"checkpoint-15": True}, False),
    ]
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("checkpoint-")) == ["checkpoint-20"]
    assert os.readlink(tmp_path / "checkpoint-20") == "epoch_4_step_20"


def test_a_failed_background_save_is_raised_when_training_ends(tmp_path):
    def failing_write(operation, key):
        if operation == "create" and "epoch_4_step_20" in str(Path(key).parent):
            raise RuntimeError("the disk went away")

    trainer, callback = make_trainer(tmp_path, callback=CheckpointCallback(async_save=True))
    callback.manager.route_storage(lambda backend: FaultyBackend(backend, hook=failing_write))
    with pytest.raises(AsyncSaveError, match="the disk went away"):
        trainer.train()
    assert trainer.state.global_step == 20
    steps = [info.step for info in callback.manager.checkpoints()]
    assert steps[-2:] == [10, 15] and 20 not in steps
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-15")
    assert not any(name.startswith(".tmp.") for name in os.listdir(tmp_path))
    callback.manager.wait()  # raised once, then the manager is usable again


# ---------------------------------------------------------------------- best model and the Trainer's traps


def test_load_best_model_at_end_leaves_the_managers_best_weights(tmp_path):
    trainer, callback = make_trainer(
        tmp_path,
        metric_for_best_model="score",
        greater_is_better=True,
        compute_metrics=scripted_metric([0.2, 0.9, 0.5, 0.1]),
    )
    trainer.train()
    best = callback.manager.best()
    assert best.name == "epoch_2_step_10" and best.metrics["eval_score"] == 0.9
    best_weights = callback.manager.load_best()["model"]
    final_weights = callback.manager.load_latest()["model"]
    model_weights = trainer.model.state_dict()
    assert all(torch.equal(model_weights[key], best_weights[key]) for key in best_weights)
    assert not all(torch.equal(model_weights[key], final_weights[key]) for key in final_weights)
    assert trainer.model.lm_head.weight is trainer.model.transformer.wte.weight
    assert trainer.state.best_metric == 0.9 and trainer.state.best_global_step == 10


def test_trap_save_total_limit_1_with_load_best_keeps_the_run_resumable(tmp_path):
    """The Trainer deletes its latest checkpoint here; the manager keeps the best and the latest."""
    trainer, callback = make_trainer(
        tmp_path,
        save_total_limit=1,
        metric_for_best_model="score",
        greater_is_better=True,
        compute_metrics=scripted_metric([0.2, 0.9, 0.5, 0.1]),
    )
    trainer.train()
    assert [info.name for info in callback.manager.checkpoints()] == ["epoch_2_step_10", "epoch_4_step_20"]
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-20")
    resumed, _ = make_trainer(
        tmp_path,
        seed=1,
        save_total_limit=1,
        metric_for_best_model="score",
        greater_is_better=True,
        compute_metrics=scripted_metric([0.3]),
        num_train_epochs=5,
    )
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 25


def test_trap_the_trainers_rotation_never_deletes_the_managers_checkpoints(tmp_path):
    trainer, callback = make_trainer(tmp_path, save_total_limit=None, load_best_model_at_end=False)
    trainer.train()
    before = [info.name for info in callback.manager.checkpoints()]
    rotate_checkpoints(str(tmp_path), save_total_limit=1, use_mtime=False)
    rotate_checkpoints(
        str(tmp_path), save_total_limit=1, best_model_checkpoint=str(tmp_path / "checkpoint-20"), use_mtime=False
    )
    assert (
        [info.name for info in callback.manager.checkpoints()]
        == before
        == [
            "epoch_1_step_5",
            "epoch_2_step_10",
            "epoch_3_step_15",
            "epoch_4_step_20",
        ]
    )


def test_trap_moving_output_dir_keeps_resume_and_best_working(tmp_path, uninterrupted):
    expected, _ = uninterrupted("epoch")
    first, _ = make_trainer(tmp_path / "before", stop_at=10)
    first.train()
    shutil.move(tmp_path / "before", tmp_path / "after")
    for path in (tmp_path / "after").rglob("trainer_state.json"):
        assert str(tmp_path) not in path.read_text(), "no absolute path is recorded"

    resumed, callback = make_trainer(tmp_path / "after", seed=1)
    resumed.train(resume_from_checkpoint=True)
    assert_identical(final_state(resumed)["model"], expected["model"])  # the best weights, found in the new place
    assert callback.manager.best().path.parent == tmp_path / "after"


CRASHING_RUN = textwrap.dedent(
    """
    import os, signal, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import torch
    torch.set_num_threads(1)
    import ckpt_plugin._io.writer as writer
    from test_hf import make_trainer
    from pathlib import Path
    from ckpt_plugin.hf import CheckpointCallback

    real_write = writer.write_tensor_file
    def write_then_die(path, tensors, metadata=None, **options):
        record = real_write(path, tensors, metadata, **options)
        path = Path(path)
        if "epoch_3_step_15" in str(path.parent) and path.name == "optimizer.safetensors":
            os.kill(os.getpid(), signal.SIGKILL)  # the job dies in the middle of a save
        return record
    writer.write_tensor_file = write_then_die
    make_trainer(Path({output!r}), callback=CheckpointCallback(async_save={async_save!r}))[0].train()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_trap_a_crash_during_a_save_leaves_auto_resume_working(tmp_path, uninterrupted, async_save):
    """Killed in the middle of writing epoch 3 (on the background thread for an asynchronous save)."""
    expected, _ = uninterrupted("epoch")
    script = CRASHING_RUN.format(root=str(ROOT), tests=str(TESTS), output=str(tmp_path), async_save=async_save)
    child = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, timeout=300
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    assert any(name.startswith(".tmp.") for name in os.listdir(tmp_path)), "the save died half-way"
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")

    resumed, callback = make_trainer(tmp_path, seed=1)
    resumed.train(resume_from_checkpoint=True)
    assert_identical(final_state(resumed), expected)
    assert not any(name.startswith(".tmp.") for name in os.listdir(tmp_path)), (
        "the dead save's leftovers are cleaned up"
    )


def test_checkpoints_on_object_storage_resume_bitwise_identical(tmp_path, uninterrupted, s3_bucket):
    """checkpoint_dir on S3, output_dir local for the Trainer's logs: resume_from_checkpoint=True on a
    fresh output_dir finds the latest remote checkpoint through its resume marker."""
    expected, _ = uninterrupted("epoch")
    url = f"s3://{s3_bucket}/run/checkpoints"
    first, callback = make_trainer(tmp_path / "first", stop_at=10, callback=CheckpointCallback(checkpoint_dir=url))
    first.train()
    assert [info.step for info in callback.manager.checkpoints()] == [5, 10]
    assert callback.manager.latest().location.startswith(url)
    assert sorted(os.listdir(tmp_path / "first")) == ["checkpoint-10"]  # one marker, no weights
    del first

    shutil.copytree(tmp_path / "first", tmp_path / "second")  # the job restarts with the marker
    resumed, callback = make_trainer(tmp_path / "second", seed=1, callback=CheckpointCallback(checkpoint_dir=url))
    resumed.train(resume_from_checkpoint=True)
    assert_identical(final_state(resumed), expected)
    assert get_last_checkpoint(str(tmp_path / "second")) == str(tmp_path / "second" / "checkpoint-20")
    assert pickled_files(tmp_path) == []


@pytest.mark.slow
def test_sigterm_preempts_a_training_process_which_then_resumes_bitwise_identical(tmp_path, uninterrupted):
    """The job is signalled during step 7 (mid-epoch 2), saves after it, stops, and resumes exactly."""
    expected, _ = uninterrupted("epoch")
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(TESTS / "preemption_script.py"), "hf", str(tmp_path), "6"],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 120
            while not (tmp_path / "at-step").exists():
                assert child.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "the job never reached the step"
                time.sleep(0.05)
            child.send_signal(signal.SIGTERM)
            (tmp_path / "signal-sent").write_text("")
            assert child.wait(timeout=120) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)
    manager = CheckpointManager(tmp_path, max_checkpoints=None)
    assert [info.step for info in manager.checkpoints()] == [5, 7]  # the epoch and the preempted step
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-7")

    resumed, _ = make_trainer(tmp_path, seed=1)
    resumed.train(resume_from_checkpoint=True)
    actual = final_state(resumed)
    for key in ("model", "optimizer", "scheduler", "state"):
        assert_identical(actual[key], expected[key], key)
    # The Trainer restarts its running training-loss sum at a mid-epoch resume (its own checkpoints
    # do the same), so only the training loss logged for the interrupted epoch may differ.
    without_train_loss = [{k: v for k, v in entry.items() if k != "loss"} for entry in expected["log_history"]]
    assert [{k: v for k, v in entry.items() if k != "loss"} for entry in actual["log_history"]] == without_train_loss


def test_preemption_restores_the_previous_handlers(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))

    class Send(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    try:
        trainer, callback = make_trainer(tmp_path, callback=CheckpointCallback(save_on_preemption=True, async_save=True))
        trainer.add_callback(Send())
        with pytest.warns(UserWarning, match="received SIGUSR1: saved a checkpoint at step 3"):
            trainer.train()
        assert trainer.state.global_step == 3 and [info.step for info in callback.manager.checkpoints()] == [3]
        assert seen == []
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.slow
def test_under_ddp_a_signal_to_rank_zero_stops_every_rank_after_the_same_step(tmp_path):
    """Two processes on CPU (gloo) under torch.distributed.run; only rank zero is signalled, during step 5."""
    child = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(TESTS / "hf_ddp_script.py"), str(tmp_path)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr.decode()[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report == {"world_size": 2, "global_step": 5, "checkpoints": ["epoch_1_step_3", "epoch_1_step_5"]}
