"""Wall time and disk use of Trainer runs: CheckpointCallback against the Trainer's own checkpoints.

    HF_HUB_OFFLINE=1 python benchmarks/hf_overhead.py [--rounds 3] [--layers 4] [--width 256] [--epochs 3]

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
best among them, so bytes per checkpoint are printed too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

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


def build(output_dir: Path, options: argparse.Namespace, with_callback: bool) -> Trainer:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=options.layers, n_embd=options.width, n_head=4, vocab_size=options.vocab, n_positions=64
    )
    args = TrainingArguments(
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
    return Trainer(
        model=GPT2LMHeadModel(config),
        args=args,
        train_dataset=Tokens(32, 32, options.vocab, seed=1),
        eval_dataset=Tokens(8, 32, options.vocab, seed=2),
        callbacks=[CheckpointCallback()] if with_callback else [],
    )


def disk_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file() and not path.is_symlink())


def checkpoint_count(root: Path) -> int:
    return sum(
        1 for path in root.iterdir() if path.is_dir() and not path.is_symlink() and not path.name.startswith(".")
    )


def one_round(
    workdir: Path, options: argparse.Namespace, with_callback: bool
) -> tuple[float, float, int, float, int, float]:
    """Train from scratch, then resume from the end.

    Returns (train seconds, resume seconds, bytes on disk, seconds inside saves, checkpoints kept,
    CPU seconds of the training process during train).
    """
    output_dir = workdir / ("callback" if with_callback else "trainer")
    shutil.rmtree(output_dir, ignore_errors=True)
    trainer = build(output_dir, options, with_callback)
    SAVE_SECONDS[0] = 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    trained, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    saving = SAVE_SECONDS[0]
    size = disk_bytes(output_dir)
    kept = checkpoint_count(output_dir)
    resumer = build(output_dir, options, with_callback)
    start = time.perf_counter()
    resumer.train(resume_from_checkpoint=True)
    resumed = time.perf_counter() - start
    return trained, resumed, size, saving, kept, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared machine)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    options = parser.parse_args()
    if options.rounds < 3:
        sys.exit("use at least 3 rounds: the figures are medians")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    Trainer._save_checkpoint = timed(Trainer._save_checkpoint)
    CheckpointManager.save = timed(CheckpointManager.save)
    torch.set_num_threads(options.threads)
    workdir = options.dir or Path(tempfile.mkdtemp(prefix="ckpt_hf_bench_"))

    params = sum(p.numel() for p in build(workdir / "probe", options, False).model.parameters())
    print(
        f"GPT-2 with {params / 1e6:.2f}M parameters, {options.epochs} epochs, a save and an evaluation every "
        f"epoch, save_total_limit=2, load_best_model_at_end; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    one_round(workdir, options, False)  # warm-up
    one_round(workdir, options, True)
    results: dict[bool, list[tuple[float, float, int, float, int, float]]] = {False: [], True: []}
    for _ in range(options.rounds):
        for with_callback in (False, True):
            results[with_callback].append(one_round(workdir, options, with_callback))

    def median(side: bool, index: int) -> float:
        return statistics.median(result[index] for result in results[side])

    for side, label in ((False, "Trainer's own checkpoints"), (True, "CheckpointCallback")):
        kept, size = int(median(side, 4)), int(median(side, 2))
        rounds = ", ".join(f"{result[0]:.3f}" for result in results[side])
        print(
            f"{label:<26} train {median(side, 0):7.3f} s (saves {median(side, 3):6.3f} s)   "
            f"resume {median(side, 1):6.3f} s   on disk {size:>11,} bytes in {kept} checkpoints "
            f"({size // max(kept, 1):,} per checkpoint)   [train rounds: {rounds}]"
        )
    print(f"wall-time ratio, train (callback / Trainer): {median(True, 0) / median(False, 0):.3f}   (target <= 1.0)")
    print(
        f"CPU-time ratio, train (callback / Trainer): {median(True, 5) / median(False, 5):.3f}   (steadier when busy)"
    )
    print(f"time inside saves, ratio (manager / Trainer): {median(True, 3) / median(False, 3):.3f}")
    print(f"wall-time ratio, resume (callback / Trainer): {median(True, 1) / median(False, 1):.3f}")
    per_checkpoint = (median(True, 2) / max(median(True, 4), 1)) / (median(False, 2) / max(median(False, 4), 1))
    total = median(True, 2) / median(False, 2)
    print(f"disk ratio (callback / Trainer): {total:.3f} in all, {per_checkpoint:.3f} per checkpoint")
    if options.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
