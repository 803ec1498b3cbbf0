"""A two-process FSDP2 run on CPU (gloo) through Lightning's ModelParallelStrategy, for
tests/test_sharded_lightning.py; not a test module itself.

    python tests/lightning_sharded_script.py WORK_DIR

Fits 4 epochs straight in WORK_DIR/straight; fits 2 epochs in WORK_DIR/run, then, with a new
Trainer, to 4 epochs with ``ckpt_path="last"``. Rank 0 writes each fit's final full weights and
Adam state to WORK_DIR/{straight,resumed}.safetensors and a report to WORK_DIR/{fit}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import safetensors.torch
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckpt_plugin.lightning import CheckpointCallback
from rank_exit import end_without_finalizing


class Regressor(pl.LightningModule):
    def __init__(self, hidden: int = 9) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs).squeeze(1), targets)

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        inputs, targets = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(inputs).squeeze(1), targets), sync_dist=True)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)]


def fit(work: Path, name: str, directory: str, max_epochs: int, ckpt_path: str | None = None, base: str | None = None) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 4, generator=generator)
    data = TensorDataset(inputs, inputs.sum(1))
    place = f"{base}/{directory}" if base else work / directory
    callback = CheckpointCallback(place, max_checkpoints=2, metric_for_best="val_loss")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=max_epochs, callbacks=[callback], logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    model = Regressor()
    trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
    optimizer = trainer.optimizers[0]
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.global_rank == 0:
        flat = {f"model/{k}": v for k, v in model_state.items()}
        flat.update({f"optim/{n}/{k}": torch.as_tensor(v) for n, values in optim_state["state"].items() for k, v in values.items()})
        safetensors.torch.save_file({k: v.contiguous() for k, v in flat.items()}, str(work / f"{name}.safetensors"))
        report = {"global_step": trainer.global_step, "lr": optimizer.param_groups[0]["lr"],
                  "checkpoints": callback.checkpoint_names, "epoch": trainer.current_epoch}
        (work / f"{name}.json").write_text(json.dumps(report))


def main(work: str, base: str | None = None) -> None:
    """Train straight, then in two parts with a resume; checkpoints go under ``work`` or, when
    given, the object store URL ``base``."""
    fit(Path(work), "straight", "straight", 4, base=base)
    fit(Path(work), "first", "run", 2, base=base)
    fit(Path(work), "resumed", "run", 4, ckpt_path="last", base=base)


if __name__ == "__main__":
    main(*sys.argv[1:3])
    if torch.distributed.is_initialized():  # Lightning leaves the process group up
        torch.distributed.destroy_process_group()
    end_without_finalizing()  # see rank_exit: each rank ends right after a gather of FSDP2's
