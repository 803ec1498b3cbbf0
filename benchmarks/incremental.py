"""Incremental checkpoints: bytes written and save time against a full checkpoint of the same state.

    PYTHONPATH=. python benchmarks/incremental.py [--mib 320] [--rounds 5]

The model is a stack of ``2048 x 2048`` linear layers, about ``--mib`` MiB, in which every layer
but one is frozen: 95% of the parameters. Each round takes one Adam step on the trainable layer and
then saves the same state twice, once with a plain manager (a full checkpoint) and once with an
``incremental=True`` manager whose previous checkpoint is the one of the last round. Bytes written
are the sizes of the new checkpoint's files that are not hard links to an older one.

Cases: the model weights alone, and the model with its Adam state (whose moments change at every
step, so they are always written: with 5% trainable they alone are 10% of the model's bytes), each
with ``change_detection="checksum"`` and ``"version"``. One warm-up round, then the medians of
``--rounds`` rounds and their ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import existing_dir, machine, whole_number
from torch import nn

from ckpt_plugin import CheckpointInfo, CheckpointManager


def build(mib: int, width: int = 2048) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers = max(2, round(mib * 2**20 / (width * width * 4)))
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    for layer in model[:-1]:
        layer.requires_grad_(False)
    optimizer = torch.optim.Adam(model[-1].parameters(), lr=1e-3)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(8, model[0].in_features)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def written_bytes(info: CheckpointInfo) -> int:
    """Bytes of the checkpoint's files that were written for it (not links to an older checkpoint)."""
    total = 0
    for entry in os.scandir(info.path):
        stat = entry.stat()
        if stat.st_nlink == 1:
            total += stat.st_size
    return total


def timed_save(
    manager: CheckpointManager, model: nn.Module, optimizer: torch.optim.Optimizer | None, epoch: int
) -> tuple[float, CheckpointInfo]:
    start = time.perf_counter()
    info = manager.save(model, optimizer, epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
    return time.perf_counter() - start, info


def measure(args: argparse.Namespace, root: Path, with_optimizer: bool, detection: str) -> dict[str, float]:
    model, optimizer = build(args.mib)
    full = CheckpointManager(root / "full", max_checkpoints=2, save_rng=False)
    incremental = CheckpointManager(
        root / "incremental", max_checkpoints=2, save_rng=False, incremental=True, change_detection=detection
    )
    opt = optimizer if with_optimizer else None
    train_step(model, optimizer)
    timed_save(incremental, model, opt, 0)
    results: dict[str, list[float]] = {"full_s": [], "inc_s": [], "full_bytes": [], "inc_bytes": []}
    for round_index in range(args.rounds + 1):
        train_step(model, optimizer)
        epoch = round_index + 1
        sides = ("full", "inc") if round_index % 2 else ("inc", "full")
        for side in sides:
            manager = full if side == "full" else incremental
            elapsed, info = timed_save(manager, model, opt, epoch)
            if round_index:
                results[f"{side}_s"].append(elapsed)
                results[f"{side}_bytes"].append(written_bytes(info))
    check = incremental.load_latest()
    assert check is not None
    for key, value in model.state_dict().items():
        assert torch.equal(check["model"][key], value), key
    return {key: statistics.median(values) for key, values in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=whole_number(), default=320, help="approximate size of the model")
    parser.add_argument("--rounds", type=whole_number(3), default=5)
    parser.add_argument("--dir", type=existing_dir, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    print(machine())
    model, _ = build(args.mib)
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(
        f"model: {total * 4 / 2**20:.0f} MiB, {frozen / total:.1%} of the parameters frozen; "
        f"median of {args.rounds} rounds after a warm-up"
    )
    del model
    print(f"{'case':<26}{'full':>10}{'incremental':>13}{'bytes':>7}{'full':>9}{'incremental':>13}{'time':>7}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for with_optimizer in (False, True):
            for detection in ("checksum", "version"):
                label = ("model + Adam" if with_optimizer else "model") + f", {detection}"
                root = Path(tmp) / label.replace(" ", "_").replace(",", "").replace("+", "and")
                r = measure(args, root, with_optimizer, detection)
                print(
                    f"{label:<26}{r['full_bytes'] / 2**20:>6.1f} MiB{r['inc_bytes'] / 2**20:>9.1f} MiB"
                    f"{r['inc_bytes'] / r['full_bytes']:>7.3f}"
                    f"{r['full_s'] * 1000:>6.0f} ms{r['inc_s'] * 1000:>10.0f} ms"
                    f"{r['inc_s'] / r['full_s']:>7.3f}"
                )
    print(f"load average during the run: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
