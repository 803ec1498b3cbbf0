"""Which recorded metrics ``ckpt list`` and ``ckpt plot`` show, and in which order. No I/O.

The ranking metric (``metric_for_best``) comes first, then the other metrics as recorded. The
counters a Hugging Face ``Trainer`` adds to every evaluation and training log (``eval_runtime``,
``eval_samples_per_second``, ``eval_steps_per_second``, ``train_runtime``, ``total_flos``,
``epoch``, ...) measure the machine, not the model, so they are hidden unless asked for by name
(``--metrics eval_loss,eval_runtime``); ``--json`` always holds every metric.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import ConfigurationError

COUNTER_SUFFIXES = (
    "_runtime",
    "_samples_per_second",
    "_steps_per_second",
    "_tokens_per_second",
    "_model_preparation_time",
    "_jit_compilation_time",
)
"""Name endings of the runtime and throughput counters of the Hugging Face ``Trainer``."""
COUNTER_NAMES = frozenset({"epoch", "total_flos", "num_input_tokens_seen"})
"""Counters logged under their own names: the epoch as a float, the FLOPs and tokens so far."""


def is_counter(name: str) -> bool:
    """Whether ``name`` is a runtime, throughput or progress counter rather than a model metric."""
    return name in COUNTER_NAMES or name.endswith(COUNTER_SUFFIXES)


def parse_names(text: str | None, option: str = "--metrics") -> list[str] | None:
    """``"eval_loss, accuracy"`` as ``["eval_loss", "accuracy"]``; None when not given."""
    if text is None:
        return None
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise ConfigurationError(f"{option} {text!r} names no metric; write the names with commas, such as {option} loss,accuracy")
    return names


def choose(
    recorded: Iterable[str], ranking: str | None = None, requested: Sequence[str] | None = None, option: str = "--metrics"
) -> tuple[list[str], list[str]]:
    """The metrics to show, in order, and the recorded ones left out.

    Without ``requested``: the ranking metric first, then every other recorded metric in the
    order given, counters (:func:`is_counter`) left out unless one is the ranking metric. With
    ``requested``: exactly those, in that order; a name that is not recorded is a
    :class:`ConfigurationError` that lists the recorded ones.
    """
    names = list(dict.fromkeys(recorded))
    if requested is not None:
        unknown = [name for name in requested if name not in names]
        if unknown:
            raise ConfigurationError(
                f"{option} names {', '.join(map(repr, unknown))}, which no checkpoint records; "
                f"the recorded metrics are: {', '.join(names) or 'none'}"
            )
        return list(requested), [name for name in names if name not in requested]
    first = [ranking] if ranking in names else []
    shown = first + [name for name in names if name != ranking and not is_counter(name)]
    return shown, [name for name in names if name not in shown]


__all__ = ["COUNTER_NAMES", "COUNTER_SUFFIXES", "choose", "is_counter", "parse_names"]
