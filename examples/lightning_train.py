"""PyTorch Lightning with ckpt_plugin: train, get interrupted, resume from "last", test on "best".

    python examples/lightning_train.py [--dir DIR] [--epochs 8] [--interrupt-after 3] [--async-save]

1. A child process trains a small regressor on synthetic data with ``CheckpointCallback`` and dies
   abruptly (``os._exit``) once epoch ``--interrupt-after`` is saved, the way a preempted job does.
2. This process builds a fresh model and ``Trainer`` and continues with ``ckpt_path="last"``.
3. It compares the result with an uninterrupted run (bitwise), tests the best checkpoint with
   ``ckpt_path="best"``, and prints what is on disk: no pickle, no ``.ckpt`` files.
4. It validates the best checkpoint, promotes it to production, and predicts with the production model.

With ``--async-save`` checkpoints are written in the background. The crash may then catch the
last save before it commits; that checkpoint is simply absent, and the run resumes from the one
before it, still ending bitwise identical.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckpt_plugin import ArtifactRegistry
from ckpt_plugin.lightning import CheckpointCallback, load_from_checkpoint

warnings.filterwarnings("ignore", module="lightning")


class Regressor(pl.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 3e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs).squeeze(1)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        inputs, targets = batch
        loss = nn.functional.mse_loss(self(inputs), targets)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        inputs, targets = batch
        self.log("val_loss", nn.functional.mse_loss(self(inputs), targets))

    def test_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        inputs, targets = batch
        self.log("test_loss", nn.functional.mse_loss(self(inputs), targets))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)}


class SyntheticData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(1024, 16, generator=generator)
        targets = inputs @ torch.randn(16, generator=generator) + 0.1 * torch.randn(1024, generator=generator)
        self.train_set = TensorDataset(inputs[:768], targets[:768])
        self.val_set = TensorDataset(inputs[768:], targets[768:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    test_dataloader = val_dataloader


class DieAfterEpoch(pl.Callback):
    """Kills the process at the start of the epoch after ``epoch``, once that one is saved."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch + 1:
            print(f"simulating a crash after epoch {self.epoch}", flush=True)
            os._exit(1)


def fit(
    directory: Path, epochs: int, *, ckpt_path: str | None = None, die_after: int | None = None, async_save: bool = False
) -> tuple[pl.Trainer, Regressor]:
    torch.manual_seed(0)
    model = Regressor()
    callbacks: list[pl.Callback] = [
        CheckpointCallback(
            directory, max_checkpoints=3, keep_best=True, metric_for_best="val_loss", mode="min", async_save=async_save
        )
    ]
    if die_after is not None:
        callbacks.append(DieAfterEpoch(die_after))
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        default_root_dir=directory.parent,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, SyntheticData(), ckpt_path=ckpt_path)
    return trainer, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="checkpoint directory (default: a new temporary one)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--interrupt-after", type=int, default=3)
    parser.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fit(args.dir, args.epochs, die_after=args.interrupt_after, async_save=args.async_save)
        return

    workdir = Path(tempfile.mkdtemp(prefix="ckpt_lightning_"))
    directory = args.dir or workdir / "checkpoints"
    print(f"== 1. training in a child process that dies after epoch {args.interrupt_after}")
    child = subprocess.run([sys.executable, __file__, "--child", "--dir", str(directory), "--epochs", str(args.epochs),
                            "--interrupt-after", str(args.interrupt_after)] + (["--async-save"] if args.async_save else []),
                           check=False)
    print(f"child exited with status {child.returncode}; on disk: {sorted(p.name for p in directory.iterdir())}")

    print('== 2. resuming in this process with ckpt_path="last"')
    trainer, resumed = fit(directory, args.epochs, ckpt_path="last", async_save=args.async_save)

    print("== 3. checking against an uninterrupted run")
    _, reference = fit(workdir / "uninterrupted", args.epochs)
    identical = all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), reference.state_dict().values()))
    print(f"resumed weights bitwise identical to an uninterrupted run: {identical}")
    if not identical:
        sys.exit("resume was not exact")

    print('== 4. testing with ckpt_path="best"')
    callback = trainer.checkpoint_callback
    assert isinstance(callback, CheckpointCallback)
    best = callback.manager.best()
    print(f"best checkpoint: {best.name} with val_loss {best.metrics['val_loss']:.4f}")
    results = trainer.test(resumed, SyntheticData(), ckpt_path="best", verbose=False)
    print(f"test_loss of the best weights: {results[0]['test_loss']:.4f}")
    rebuilt = load_from_checkpoint(Regressor, directory, which="best")  # hparams to the constructor, then the weights
    same = all(torch.equal(rebuilt.state_dict()[name], tensor) for name, tensor in callback.manager.load_best()["model"].items())
    print(f"load_from_checkpoint(Regressor, {directory.name!r}) rebuilds the best model: {same}")
    if not same:
        sys.exit("load_from_checkpoint did not rebuild the best model")

    print(f"== on disk in {directory}")
    for info in callback.manager.checkpoints():
        print(f"  {info.name:<16} val_loss={info.metrics['val_loss']:.4f}  {info.size / 1024:7.1f} KiB  "
              f"{', '.join(sorted(info.files))}")
    leftovers = sorted(str(path) for path in directory.parent.rglob("*.ckpt"))
    print(f"  .ckpt files anywhere under {directory.parent}: {leftovers or 'none'}")

    print("== 5. validating the best checkpoint, promoting it, and predicting with the production model")
    promote_and_predict(directory)


def promote_and_predict(directory: Path) -> None:
    """Gate the best checkpoint, give it the next minor version, promote it, and serve a prediction."""
    inputs, targets = SyntheticData().val_set.tensors
    baseline = float(((targets - targets.mean()) ** 2).mean())  # the loss of always predicting the mean
    registry = ArtifactRegistry(checkpoint_dir=directory)
    record = registry.validate(
        epoch="best",
        bump="minor",
        checks={
            f"val_loss beats predicting the mean ({baseline:.2f})": lambda ckpt: ckpt["metrics"]["val_loss"] < baseline,
            "weights are finite": lambda ckpt: all(t.isfinite().all() for t in ckpt["model"].values()),
        },
    )
    print(f"validated {record['source']['name']} as version {record['version']}: "
          + ", ".join(f"{check['name']} ({'passed' if check['passed'] else 'failed'})" for check in record["checks"]))
    registry.promote(record["version"])
    served = registry.load_production()
    model = Regressor()
    model.load_state_dict(served["model"])
    model.eval()
    with torch.no_grad():
        predictions = model(inputs[:3])
    print(f"production is version {served['version']}")
    for prediction, target in zip(predictions.tolist(), targets[:3].tolist()):
        print(f"  prediction {prediction:+.3f}  target {target:+.3f}")


if __name__ == "__main__":
    main()
