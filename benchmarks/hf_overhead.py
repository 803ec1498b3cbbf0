"""Wall time and disk use of Trainer runs: CheckpointCallback against the Trainer's own checkpoints.

    HF_HUB_OFFLINE=1 python benchmarks/hf_overhead.py [--rounds 3] [--layers 4] [--width 256] [--epochs 3]
                                                      [--async-save | --compare-async] [--incremental]
                                                      [--hook-epochs 20] [--hooks-only]

Both sides run the same ``TrainingArguments`` (save and evaluate every epoch, ``save_total_limit=2``,
``load_best_model_at_end``) on the same GPT-2 built from a config. The Trainer's side writes its own
``checkpoint-N`` directories (safetensors weights plus pickled optimizer, scheduler, RNG and args);
the other side adds ``CheckpointCallback``, so the manager writes every checkpoint instead. After one
warm-up run of each, the rounds alternate between the two; the script prints the median wall time of
``trainer.train()`` for each, their ratio (callback / Trainer, target <= 1.0), the same ratio in
CPU time of the process (steadier than wall time on a shared machine), the median time of a resume
(``train(resume_from_checkpoint=True)`` from the last epoch's checkpoint, which trains no more
steps), the median time spent inside the saves themselves (``Trainer._save_checkpoint`` against
``CheckpointManager.save``), and the bytes left on disk. With ``load_best_model_at_end`` the manager
keeps the ``save_total_limit`` most recent checkpoints plus the best, where the Trainer counts the
best among them, so bytes per checkpoint are printed too. ``--async-save`` and ``--incremental`` pass
those options to the callback, and ``--compare-async`` runs the callback both without and with
``async_save`` in the same rounds. With ``async_save`` the time inside saves is the time training was
blocked, and the wall time of ``train()`` includes waiting for the last save at the end.

Then it measures what the callback costs when it does not save: a run of ``--hook-epochs`` epochs
that evaluates and logs but saves only at its last step, with every hook of ``CheckpointCallback``
and of the Trainer's own ``DefaultFlowCallback`` (which decides when to log, evaluate and save)
timed as the Trainer calls it. It prints the median, over the epochs without a save, of the summed
hook time per epoch and per step, against the same figures for ``DefaultFlowCallback`` and against
the epoch's wall time (target: < 1 ms per epoch).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import machine, whole_number  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    DefaultFlowCallback,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ckpt_plugin import CheckpointManager  # noqa: E402
from ckpt_plugin.hf import CheckpointCallback  # noqa: E402

SAVE_SECONDS = [0.0]


def timed(function):
    """``function``, adding the seconds each call takes to ``SAVE_SECONDS``."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SAVE_SECONDS[0] += time.perf_counter() - start

    return wrapper


class Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int, length: int, vocab: int, seed: int) -> None:
        self.ids = torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


TRAINER, SYNC, ASYNC = "trainer", "sync", "async"  # the Trainer's own saving, or the callback's


def build(output_dir: Path, options: argparse.Namespace, side: str, **overrides) -> Trainer:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=options.layers, n_embd=options.width, n_head=4, vocab_size=options.vocab, n_positions=64
    )
    settings = dict(
        output_dir=str(output_dir),
        num_train_epochs=options.epochs,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    settings.update(overrides)
    callbacks = (
        []
        if side == TRAINER
        else [CheckpointCallback(async_save=side == ASYNC, incremental=options.incremental)]
    )
    return Trainer(
        model=GPT2LMHeadModel(config),
        args=TrainingArguments(**settings),
        train_dataset=Tokens(32, 32, options.vocab, seed=1),
        eval_dataset=Tokens(8, 32, options.vocab, seed=2),
        callbacks=callbacks,
    )


def disk_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file() and not path.is_symlink())


def checkpoint_count(root: Path) -> int:
    return sum(
        1 for path in root.iterdir() if path.is_dir() and not path.is_symlink() and not path.name.startswith(".")
    )


def one_round(
    workdir: Path, options: argparse.Namespace, side: str
) -> tuple[float, float, int, float, int, float]:
    """Train from scratch, then resume from the end.

    Returns (train seconds, resume seconds, bytes on disk, seconds inside saves, checkpoints kept,
    CPU seconds of the training process during train).
    """
    output_dir = workdir / side
    shutil.rmtree(output_dir, ignore_errors=True)
    trainer = build(output_dir, options, side)
    SAVE_SECONDS[0] = 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    trained, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    saving = SAVE_SECONDS[0]
    size = disk_bytes(output_dir)
    kept = checkpoint_count(output_dir)
    resumer = build(output_dir, options, side)
    start = time.perf_counter()
    resumer.train(resume_from_checkpoint=True)
    resumed = time.perf_counter() - start
    return trained, resumed, size, saving, kept, cpu


HOOKS = tuple(name for name in vars(TrainerCallback) if name.startswith("on_"))
STEP_HOOK = re.compile(r"on_(step|substep|pre_optimizer|optimizer)")
Event = tuple[str, float, float]  # hook name, start time, seconds spent in it


def instrument(callback: TrainerCallback, log: list[Event]) -> None:
    """Time every hook of ``callback`` as the Trainer calls it, appending to ``log``."""
    for name in HOOKS:
        hook = getattr(callback, name)

        def timed_hook(*args, _hook=hook, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _hook(*args, **kwargs)
            finally:
                log.append((_name, start, time.perf_counter() - start))

        setattr(callback, name, timed_hook)


def epochs_of(log: list[Event]) -> list[list[Event]]:
    """The events of each epoch: from its ``on_epoch_begin`` to the next one (its evaluation included)."""
    epochs: list[list[Event]] = []
    for event in log:
        if event[0] == "on_epoch_begin":
            epochs.append([])
        if epochs and event[0] != "on_train_end":
            epochs[-1].append(event)
    return epochs


def hook_round(workdir: Path, options: argparse.Namespace) -> tuple[float, float, float, float, int]:
    """One run that saves only at its last step. Returns the medians over epochs without a save of
    (callback seconds per epoch, DefaultFlowCallback seconds per epoch, epoch wall seconds,
    callback seconds per optimizer step) and the number of such epochs."""
    output_dir = workdir / "hooks"
    shutil.rmtree(output_dir, ignore_errors=True)
    steps_per_epoch = 32 // 8
    trainer = build(
        output_dir,
        options,
        options.sides[0],
        num_train_epochs=options.hook_epochs,
        save_strategy="steps",
        save_steps=steps_per_epoch * options.hook_epochs,
        logging_strategy="steps",
        logging_steps=2,
        load_best_model_at_end=False,
        metric_for_best_model="loss",
    )
    ours: list[Event] = []
    theirs: list[Event] = []
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, CheckpointCallback))
    flow = next(c for c in trainer.callback_handler.callbacks if isinstance(c, DefaultFlowCallback))
    instrument(callback, ours)
    instrument(flow, theirs)
    saving_steps: set[int] = set()
    original_save = callback._save

    def recorded_save(args, state, *rest, **kwargs):
        saving_steps.add(state.global_step)
        return original_save(args, state, *rest, **kwargs)

    callback._save = recorded_save
    trainer.train()
    epochs, flow_epochs = epochs_of(ours), epochs_of(theirs)
    assert len(epochs) == len(flow_epochs) == options.hook_epochs
    quiet = [index for index in range(len(epochs)) if (index + 1) * steps_per_epoch not in saving_steps]
    assert len(quiet) == options.hook_epochs - 1, "only the last epoch saves"
    walls = [epochs[index + 1][0][1] - epochs[index][0][1] for index in quiet if index + 1 < len(epochs)]
    per_step = [
        sum(seconds for name, _, seconds in epochs[index] if STEP_HOOK.match(name)) / steps_per_epoch
        for index in quiet
    ]
    return (
        statistics.median(sum(event[2] for event in epochs[index]) for index in quiet),
        statistics.median(sum(event[2] for event in flow_epochs[index]) for index in quiet),
        statistics.median(walls),
        statistics.median(per_step),
        len(quiet),
    )


def report_hooks(workdir: Path, options: argparse.Namespace) -> None:
    hook_round(workdir, options)  # warm-up
    rounds = [hook_round(workdir, options) for _ in range(options.rounds)]

    def median(index: int) -> float:
        return statistics.median(result[index] for result in rounds)

    ours, flow, wall, step = median(0), median(1), median(2), median(3)
    print(
        f"hooks of an epoch without a save ({32 // 8} steps, a log every 2 steps, an evaluation; median of "
        f"{rounds[0][4]} epochs, median of {options.rounds} rounds):"
    )
    print(
        f"  CheckpointCallback {ours * 1e3:.4f} ms per epoch ({step * 1e6:.1f} us per step)   "
        f"DefaultFlowCallback {flow * 1e3:.4f} ms   epoch wall time {wall * 1e3:.1f} ms"
    )
    print(
        f"  callback epoch cost: {ours * 1e3:.4f} ms (target < 1 ms); ratio to DefaultFlowCallback {ours / flow:.2f}, "
        f"share of the epoch {ours / wall:.5f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=whole_number(3), default=3)
    parser.add_argument("--layers", type=whole_number(), default=4)
    parser.add_argument("--width", type=whole_number(4, multiple_of=4), default=256)
    parser.add_argument("--vocab", type=whole_number(), default=4096)
    parser.add_argument("--epochs", type=whole_number(), default=3)
    parser.add_argument(
        "--threads", type=whole_number(), default=1, help="torch CPU threads (1 is steadiest on a shared machine)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--async-save", action="store_true", help="CheckpointCallback(async_save=True)")
    parser.add_argument(
        "--compare-async", action="store_true", help="run the callback both without and with async_save"
    )
    parser.add_argument("--incremental", action="store_true", help="CheckpointCallback(incremental=True)")
    parser.add_argument(
        "--hook-epochs",
        type=whole_number(3, or_zero=True),
        default=20,
        help="epochs of the hook-cost run (0 skips it; otherwise at least 3)",
    )
    parser.add_argument("--hooks-only", action="store_true", help="measure only the cost of hooks that do not save")
    options = parser.parse_args()
    print(machine())
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    Trainer._save_checkpoint = timed(Trainer._save_checkpoint)
    CheckpointManager.save = timed(CheckpointManager.save)
    torch.set_num_threads(options.threads)
    workdir = options.dir or Path(tempfile.mkdtemp(prefix="ckpt_hf_bench_"))

    options.sides = [SYNC, ASYNC] if options.compare_async else [ASYNC] if options.async_save else [SYNC]
    params = sum(p.numel() for p in build(workdir / "probe", options, TRAINER).model.parameters())
    print(
        f"GPT-2 with {params / 1e6:.2f}M parameters, {options.epochs} epochs, a save and an evaluation every "
        f"epoch, save_total_limit=2, load_best_model_at_end; callback async_save: {' and '.join(options.sides)}, "
        f"incremental={options.incremental}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"load average {' '.join(f'{load:.1f}' for load in os.getloadavg())} on {os.cpu_count()} cores"
    )
    if options.hooks_only:
        report_hooks(workdir, options)
        return
    sides = [TRAINER, *options.sides]
    for side in sides:
        one_round(workdir, options, side)  # warm-up
    results: dict[str, list[tuple[float, float, int, float, int, float]]] = {side: [] for side in sides}
    for _ in range(options.rounds):
        for side in sides:
            results[side].append(one_round(workdir, options, side))

    def median(side: str, index: int) -> float:
        return statistics.median(result[index] for result in results[side])

    labels = {TRAINER: "Trainer's own checkpoints", SYNC: "CheckpointCallback", ASYNC: "CheckpointCallback async"}
    for side in sides:
        label = labels[side]
        kept, size = int(median(side, 4)), int(median(side, 2))
        rounds = ", ".join(f"{result[0]:.3f}" for result in results[side])
        print(
            f"{label:<26} train {median(side, 0):7.3f} s (saves {median(side, 3):6.3f} s)   "
            f"resume {median(side, 1):6.3f} s   on disk {size:>11,} bytes in {kept} checkpoints "
            f"({size // max(kept, 1):,} per checkpoint)   [train rounds: {rounds}]"
        )
    for side in options.sides:
        name = "callback" if side == SYNC else "callback async"
        base = TRAINER
        print(f"-- {labels[side]} against the Trainer's own saving")
        print(f"wall-time ratio, train ({name} / Trainer): {median(side, 0) / median(base, 0):.3f}   (target <= 1.0)")
        print(
            f"CPU-time ratio, train ({name} / Trainer): {median(side, 5) / median(base, 5):.3f}   (steadier when busy)"
        )
        print(f"time training is blocked in saves, ratio ({name} / Trainer): {median(side, 3) / median(base, 3):.3f}")
        print(f"wall-time ratio, resume ({name} / Trainer): {median(side, 1) / median(base, 1):.3f}")
        per_checkpoint = (median(side, 2) / max(median(side, 4), 1)) / (median(base, 2) / max(median(base, 4), 1))
        total = median(side, 2) / median(base, 2)
        print(f"disk ratio ({name} / Trainer): {total:.3f} in all, {per_checkpoint:.3f} per checkpoint")
    if options.hook_epochs:
        report_hooks(workdir, options)
    if options.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
