"""Quickstart: a plain PyTorch loop that checkpoints every epoch, is interrupted, and resumes.

    python examples/quickstart.py [--dir DIR] [--epochs 6] [--interrupt-after 2]

1. A child process trains and saves a checkpoint every epoch, then dies abruptly (``os._exit``)
   after epoch ``--interrupt-after``, the way a preempted job does.
2. This process builds a fresh model and optimizer, resumes from the latest checkpoint, and
   trains to ``--epochs``.
3. It checks that the resumed weights are bitwise identical to an uninterrupted run, loads the best
   checkpoint, and prints what is on disk.
4. It validates the best checkpoint behind two checks as the next minor version, promotes it to
   production, loads the production model into a fresh network and makes a prediction.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from ckpt_plugin import ArtifactRegistry, CheckpointManager


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(512, 16, generator=generator)
    targets = (inputs @ torch.randn(16, 1, generator=generator)).squeeze(1) + 0.1 * torch.randn(512, generator=generator)
    return inputs, targets


def make_training() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def train(checkpoint_dir: Path | None, epochs: int, interrupt_after: int | None = None) -> nn.Module:
    """Train to ``epochs``, resuming from ``checkpoint_dir`` when it holds a checkpoint."""
    inputs, targets = make_data()
    model, optimizer, scheduler = make_training()
    manager = CheckpointManager(checkpoint_dir, max_checkpoints=3, keep_best=True, metric_for_best="loss", mode="min") if checkpoint_dir else None
    start = 0
    if manager is not None:
        restored = manager.restore(model, optimizer, scheduler, which="latest")
        if restored is not None:
            start = restored.epoch + 1
            print(f"resumed from {restored.name} (loss {restored.metrics['loss']:.4f}); continuing at epoch {start}")
    for epoch in range(start, epochs):
        model.train()
        order = torch.randperm(len(inputs))
        total = 0.0
        for batch in order.split(64):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(inputs[batch]).squeeze(1), targets[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        scheduler.step()
        if manager is not None:
            info = manager.save(model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                                metrics={"loss": total / len(inputs)}, config={"lr": 3e-3, "epochs": epochs})
            print(f"epoch {epoch}: loss {total / len(inputs):.4f} -> saved {info.name}")
        if interrupt_after is not None and epoch == interrupt_after:
            print(f"simulating a crash after epoch {epoch}", flush=True)
            os._exit(1)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="checkpoint directory (default: a new temporary one)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--interrupt-after", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        train(args.dir, args.epochs, interrupt_after=args.interrupt_after)
        return

    directory = args.dir or Path(tempfile.mkdtemp(prefix="ckpt_quickstart_")) / "checkpoints"
    print(f"== 1. training in a child process that dies after epoch {args.interrupt_after}", flush=True)
    child = subprocess.run([sys.executable, __file__, "--child", "--dir", str(directory), "--epochs", str(args.epochs),
                            "--interrupt-after", str(args.interrupt_after)], check=False)
    print(f"child exited with status {child.returncode}")

    print("== 2. resuming in this process")
    resumed = train(directory, args.epochs)

    print("== 3. checking against an uninterrupted run")
    reference = train(None, args.epochs)
    identical = all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), reference.state_dict().values()))
    print(f"resumed weights bitwise identical to an uninterrupted run: {identical}")
    if not identical:
        sys.exit("resume was not exact")

    manager = CheckpointManager(directory, max_checkpoints=3, metric_for_best="loss", mode="min")
    best = manager.load_best()
    print(f"best checkpoint: epoch {best['epoch']} with loss {best['metrics']['loss']:.4f}")

    print(f"== on disk in {directory}")
    for info in manager.checkpoints():
        print(f"  {info.name:<10} loss={info.metrics['loss']:.4f}  {info.size / 1024:7.1f} KiB  "
              f"{', '.join(sorted(info.files))}")

    print("== 4. validating the best checkpoint and promoting it to production")
    promote_and_predict(directory)


def promote_and_predict(directory: Path) -> None:
    """Gate the best checkpoint, give it the next minor version, promote it, and serve a prediction."""
    inputs, targets = make_data()
    baseline = float(((targets - targets.mean()) ** 2).mean())   # the loss of always predicting the mean
    registry = ArtifactRegistry(checkpoint_dir=directory)   # validated/ and production/ sit beside it
    record = registry.validate(
        epoch="best",
        bump="minor",
        checks={
            f"loss beats predicting the mean ({baseline:.2f})": lambda checkpoint: checkpoint["metrics"]["loss"] < baseline,
            "weights are finite": lambda checkpoint: all(t.isfinite().all() for t in checkpoint["model"].values()),
        },
    )
    print(f"validated {record['source']['name']} as version {record['version']}: "
          + ", ".join(f"{check['name']} ({'passed' if check['passed'] else 'failed'})" for check in record["checks"]))
    production = registry.promote(record["version"])
    print(f"production is version {production['version']}, promoted by {production['promoted_by']['user']} "
          f"at {production['promoted_at']}")

    served = registry.load_production()
    model, _, _ = make_training()
    model.load_state_dict(served["model"])
    model.eval()
    with torch.no_grad():
        predictions = model(inputs[:3]).squeeze(1)
    for prediction, target in zip(predictions.tolist(), targets[:3].tolist()):
        print(f"  prediction {prediction:+.3f}  target {target:+.3f}")
    print(f"history: {', '.join(event['event'] + ' ' + event['version'] for event in registry.history())}")
    ckpt = Path(sys.executable).with_name("ckpt")
    command = str(ckpt) if ckpt.exists() else "ckpt"
    print(f"inspect it all with: {command} list {directory}; {command} versions {directory}; {command} history {directory}")


if __name__ == "__main__":
    main()
