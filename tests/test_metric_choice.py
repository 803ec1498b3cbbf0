"""Which metrics a listing or a plot shows: the ranking metric first, no runtime counters unless asked."""

from __future__ import annotations

import pytest

from ckpt_plugin.errors import ConfigurationError
from ckpt_plugin._metric_choice import choose, is_counter, parse_names

HF_EVAL = ["eval_loss", "eval_accuracy", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch"]
HF_TRAIN = ["train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss",
            "train_tokens_per_second", "eval_model_preparation_time", "num_input_tokens_seen"]


def test_the_trainers_counters_are_counters_and_model_metrics_are_not() -> None:
    assert [name for name in HF_EVAL + HF_TRAIN if not is_counter(name)] == ["eval_loss", "eval_accuracy", "train_loss"]
    assert not any(is_counter(name) for name in ("loss", "val_loss", "runtime_error_rate", "grad_norm", "learning_rate"))


def test_the_ranking_metric_comes_first_and_counters_are_hidden() -> None:
    assert choose(HF_EVAL, "eval_accuracy") == (["eval_accuracy", "eval_loss"], HF_EVAL[2:])
    assert choose(["b", "a"], None) == (["b", "a"], [])
    assert choose(["loss", "epoch"], "epoch") == (["epoch", "loss"], [])  # a counter that ranks is shown
    assert choose(["loss"], "accuracy") == (["loss"], [])


def test_requested_metrics_are_shown_in_their_order_and_unknown_ones_refused() -> None:
    assert choose(HF_EVAL, "eval_loss", ["eval_runtime", "eval_loss"]) == (
        ["eval_runtime", "eval_loss"], ["eval_accuracy", "eval_samples_per_second", "eval_steps_per_second", "epoch"])
    with pytest.raises(ConfigurationError, match=r"'acuracy'.*recorded metrics are: eval_loss, eval_accuracy"):
        choose(HF_EVAL, "eval_loss", ["acuracy"])


def test_parse_names() -> None:
    assert parse_names(None) is None
    assert parse_names(" eval_loss, accuracy ,eval_loss") == ["eval_loss", "accuracy"]
    with pytest.raises(ConfigurationError, match="names no metric"):
        parse_names(",")
