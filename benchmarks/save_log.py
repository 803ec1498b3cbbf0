"""What the history behind `ckpt plot` and the Hugging Face config files add to a save.

    PYTHONPATH=. python benchmarks/save_log.py [--rounds 15] [--mib 4]

Every committed save appends one fsynced line to ``.saves.jsonl``, and every Hugging Face callback
save also writes ``config.json`` and ``generation_config.json``. Both are measured against a save
without them, in interleaved rounds (median of ``--rounds``, after a warm-up), on a small model
(``--mib`` of fp32 weights, so that the fixed costs of a save are not hidden by the data).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from unittest import mock

import torch

from _common import machine, whole_number
from ckpt_plugin import CheckpointManager
from ckpt_plugin import _savelog as savelog


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=whole_number(), default=15)
    parser.add_argument("--mib", type=whole_number(), default=4)
    args = parser.parse_args()
    print(machine())
    side = int((args.mib * 2**20 / 4) ** 0.5)
    model = torch.nn.Linear(side, side)
    files: dict[str, bytes] = {}
    try:
        import transformers

        from ckpt_plugin.hf import pretrained_files

        transformers.logging.set_verbosity_error()
        gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128))
        make_files: Callable[[], dict[str, bytes]] | None = lambda: pretrained_files(gpt2)  # noqa: E731
    except ImportError:
        make_files = None
    with tempfile.TemporaryDirectory() as root:
        plain = CheckpointManager(f"{root}/plain", max_checkpoints=2)
        logged = CheckpointManager(f"{root}/logged", max_checkpoints=2)
        with_files = CheckpointManager(f"{root}/files", max_checkpoints=2)
        times: dict[str, list[float]] = {"plain": [], "logged": [], "logged + config files": []}
        for epoch in range(args.rounds + 1):
            with mock.patch.object(savelog, "append"):  # the save before the log existed
                t_plain = timed(lambda: plain.save(model, epoch=epoch, metrics={"loss": 1.0}))
            t_logged = timed(lambda: logged.save(model, epoch=epoch, metrics={"loss": 1.0}))
            if make_files is not None:
                t_files = timed(lambda: with_files.save(model, epoch=epoch, metrics={"loss": 1.0}, files=make_files()))
            if epoch:  # the first round warms up
                times["plain"].append(t_plain)
                times["logged"].append(t_logged)
                if make_files is not None:
                    times["logged + config files"].append(t_files)
        files = make_files() if make_files is not None else {}
    base = statistics.median(times["plain"])
    print(f"save of a {args.mib} MiB model, median of {args.rounds} interleaved rounds")
    for name, samples in times.items():
        if samples:
            median = statistics.median(samples)
            print(f"  {name:<24} {median * 1e3:8.2f} ms   ratio to plain {median / base:5.2f}")
    if files:
        print(f"  config files: {', '.join(f'{name} {len(data)} B' for name, data in files.items())}")


if __name__ == "__main__":
    main()
