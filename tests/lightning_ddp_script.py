"""A two-process DDP run on CPU (gloo) for tests/test_lightning.py; not a test module itself.

    python tests/lightning_ddp_script.py PHASE CHECKPOINT_DIR REPORT_DIR

PHASE ``train`` fits 3 epochs, then fits again to 5 epochs with ``ckpt_path="last"`` (a new
``Trainer`` in the same processes); ``bad-metric`` fits with a ``metric_for_best`` nobody logs;
``preempt`` sends SIGUSR1 to rank zero alone during step 5 with ``save_on_preemption=True``, then
resumes from ``"last"`` in a new ``Trainer``.
Each rank writes what it saw in each fit to ``REPORT_DIR/{fit}-rank{N}.json``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckpt_plugin import CheckpointManager
from ckpt_plugin.lightning import CheckpointCallback


class CountingManager(CheckpointManager):
    """Counts the saves this process performs."""

    saves = 0

    def save(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        CountingManager.saves += 1
        return super().save(*args, **kwargs)


class Regressor(pl.LightningModule):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.first_step: int | None = None
        self.backend: str | None = None

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs).squeeze(1), targets)

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        inputs, targets = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(inputs).squeeze(1), targets), sync_dist=True)

    def on_train_start(self) -> None:
        self.first_step = self.trainer.global_step
        self.backend = torch.distributed.get_backend()

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SignalRankZero(pl.Callback):
    """Rank zero alone receives SIGUSR1 as optimizer step ``step`` starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), signal.SIGUSR1)


def main(phase: str, checkpoint_dir: str, report_dir: str) -> None:
    if phase == "preempt":
        fit("preempt", checkpoint_dir, report_dir, metric="val_loss", max_epochs=3, preempt_at=5)
        fit("preempt-resume", checkpoint_dir, report_dir, metric="val_loss", max_epochs=3, ckpt_path="last")
        return
    if phase == "bad-metric":
        fit("bad-metric", checkpoint_dir, report_dir, metric="never_logged", max_epochs=3)
        return
    fit("train", checkpoint_dir, report_dir, metric="val_loss", max_epochs=3)
    fit("resume", checkpoint_dir, report_dir, metric="val_loss", max_epochs=5, ckpt_path="last")


def fit(
    name: str,
    checkpoint_dir: str,
    report_dir: str,
    metric: str,
    max_epochs: int,
    ckpt_path: str | None = None,
    preempt_at: int | None = None,
) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 4, generator=generator)
    targets = inputs.sum(1)
    data = TensorDataset(inputs, targets)
    CountingManager.saves = 0
    manager = CountingManager(checkpoint_dir, max_checkpoints=2, keep_best=True, metric_for_best=metric, mode="min")
    callback = CheckpointCallback(manager=manager, save_on_preemption=preempt_at is not None)
    extra = [SignalRankZero(preempt_at)] if preempt_at is not None else []
    trainer = pl.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=2,
        max_epochs=max_epochs,
        callbacks=[callback, *extra],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = Regressor()
    report = {"rank": None, "error": None}
    try:
        trainer.fit(
            model,
            DataLoader(data, batch_size=8),
            DataLoader(data, batch_size=8),
            ckpt_path=ckpt_path,
        )
    except SystemExit as exc:  # a preempted fit ends with Lightning's SIGTERMException
        report["error"] = f"{type(exc).__name__}"
    except Exception as exc:  # reported, then re-raised so the process fails
        report["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        report.update(
            rank=trainer.global_rank,
            saves=CountingManager.saves,
            broadcast_names=callback.checkpoint_names,
            listed_names=[info.name for info in manager.checkpoints()],
            first_step=model.first_step,
            backend=model.backend,
            global_step=trainer.global_step,
        )
        Path(report_dir, f"{name}-rank{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    try:
        main(*sys.argv[1:4])
    finally:
        # Lightning leaves the process group up; tearing it down here keeps gloo's threads from being
        # destroyed while still joinable at interpreter exit, which aborts the process.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
