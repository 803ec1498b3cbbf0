"""The names the documentation's code blocks use but do not define: a tiny model and its training objects.

``conftest.py`` at the repository root runs every fenced ``python`` block of README.md and of
``docs/`` as written. A block runs after the prelude named in an HTML comment just above it
(``<!-- prelude: lightning -->``), or after ``torch`` when there is none. Within one page, blocks
with the same prelude run in order, in one namespace and one fresh working directory, so a later
block sees what an earlier one saved.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def torch_prelude() -> dict[str, Any]:
    """``model``, ``optimizer``, ``scheduler``, ``config_dict``, ``epochs``, ``loss`` and ``train_one_epoch``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    inputs, targets = torch.randn(32, 8), torch.randn(32, 1)

    def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()

    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "config_dict": {"hidden": 16, "lr": 1e-3},
        "epochs": 3,
        "loss": 0.5,
        "train_one_epoch": train_one_epoch,
    }


def run_prelude() -> dict[str, Any]:
    """The ``torch`` prelude plus a run already saved: ``manager`` over ``checkpoints/`` holding
    epochs 50, 100 and 120 (with ``loss`` and ``accuracy``), and ``CheckpointManager``."""
    from ckpt_plugin import CheckpointManager

    names = torch_prelude()
    manager = CheckpointManager("checkpoints", max_checkpoints=5)
    for epoch, loss, accuracy in ((50, 0.6, 0.91), (100, 0.5, 0.95), (120, 0.55, 0.94)):
        manager.save(model=names["model"], optimizer=names["optimizer"], scheduler=names["scheduler"], epoch=epoch,
                     metrics={"loss": loss, "accuracy": accuracy}, config=names["config_dict"])
    return {**names, "manager": manager, "CheckpointManager": CheckpointManager}


def lightning_prelude() -> dict[str, Any]:
    """``model`` (a ``LightningModule`` that logs ``val_loss``), ``MyModel`` (its class) and ``datamodule``."""
    import lightning.pytorch as pl

    class MyModel(pl.LightningModule):
        def __init__(self, hidden: int = 16, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 1))

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs).squeeze(1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = nn.functional.mse_loss(self(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))

        test_step = validation_step

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    class MyData(pl.LightningDataModule):
        def __init__(self, batch_size: int = 32) -> None:
            super().__init__()
            self.save_hyperparameters()
            generator = torch.Generator().manual_seed(0)
            self.inputs = torch.randn(64, 8, generator=generator)
            self.targets = self.inputs.sum(1)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(self.inputs, self.targets), batch_size=self.hparams.batch_size)

        val_dataloader = test_dataloader = train_dataloader

    torch.manual_seed(0)
    return {"model": MyModel(), "MyModel": MyModel, "MyData": MyData, "datamodule": MyData()}


def hf_prelude() -> dict[str, Any]:
    """``model`` (a tiny GPT-2 built from its config, no download), ``train`` and ``val`` token datasets."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from test_hf import Tokens, tiny_gpt2

    return {"model": tiny_gpt2(0), "train": Tokens(32, 1), "val": Tokens(8, 2)}


PRELUDES = {"torch": torch_prelude, "run": run_prelude, "lightning": lightning_prelude, "hf": hf_prelude}
