"""The peers' training loops for ``overhead.py``: a Lightning fit and an HF Trainer run of the same
MLP and batch, each with a clock on its step hooks, saving with its own checkpointing (or not)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from _common import StepLog, Window
from torch import nn

WARM_STEPS = 2
"""Steps at the start of a run left out of its window (first allocations, the optimizer's state)."""


def mlp(layers: int, hidden: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(hidden, hidden) for _ in range(layers)))


class SameBatch(torch.utils.data.Dataset):
    """``length`` copies of one batch (already batched for Lightning, row by row for the Trainer)."""

    def __init__(self, batch: torch.Tensor, length: int, rows: bool = False) -> None:
        self.batch, self.length, self.rows = batch, length, rows

    def __len__(self) -> int:
        return self.length * (len(self.batch) if self.rows else 1)

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        return {"x": self.batch[index % len(self.batch)]} if self.rows else self.batch


def window_of(starts: list[float], steps: int) -> Window:
    """The ``steps`` step intervals after the warm-up, from the times at which steps began."""
    log = StepLog()
    for begin, end in zip(starts[WARM_STEPS : WARM_STEPS + steps], starts[WARM_STEPS + 1 : WARM_STEPS + steps + 1]):
        log.add(end - begin)
    if log.window().steps != steps:
        raise RuntimeError(f"the run took {len(starts)} steps, fewer than {WARM_STEPS + steps + 1}")
    return log.window()


def lightning_window(layers: int, hidden: int, batch: int, steps: int, every: int | None, root: Path) -> Window:
    """A Lightning fit of ``steps`` measured steps, with ``ModelCheckpoint(every_n_train_steps=every)``
    (or no checkpointing when ``every`` is None)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # no banner per fit

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(layers, hidden)

        def training_step(self, data, index):  # type: ignore[no-untyped-def]
            return self.net(data).square().mean()

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    starts: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_start(self, *args) -> None:  # type: ignore[no-untyped-def]
            starts.append(time.perf_counter())

    callbacks: list[pl.Callback] = [Clock()]
    if every is not None:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=1))
    trainer = pl.Trainer(
        default_root_dir=root,
        max_steps=WARM_STEPS + steps + 1,
        max_epochs=1,
        callbacks=callbacks,
        enable_checkpointing=every is not None,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    data = torch.utils.data.DataLoader(SameBatch(batch_rows(batch, hidden), WARM_STEPS + steps + 1), batch_size=None)
    trainer.fit(Module(), data)
    return window_of(starts, steps)


def batch_rows(batch: int, hidden: int) -> torch.Tensor:
    return torch.randn(batch, hidden, generator=torch.Generator().manual_seed(1))


def trainer_window(layers: int, hidden: int, batch: int, steps: int, every: int | None, root: Path) -> Window:
    """An HF Trainer run of ``steps`` measured steps saving with ``save_strategy="steps"`` every
    ``every`` steps (``"no"`` when ``every`` is None)."""
    import transformers
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    transformers.logging.set_verbosity_error()

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(layers, hidden)

        def forward(self, x, labels=None):  # type: ignore[no-untyped-def]
            return {"loss": self.net(x).square().mean()}

    starts: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            starts.append(time.perf_counter())

    arguments = TrainingArguments(
        output_dir=str(root),
        max_steps=WARM_STEPS + steps + 1,
        per_device_train_batch_size=batch,
        learning_rate=1e-3,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        save_strategy="no" if every is None else "steps",
        save_steps=every or 1,
        save_total_limit=2,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=Wrapper(),
        args=arguments,
        train_dataset=SameBatch(batch_rows(batch, hidden), WARM_STEPS + steps + 1, rows=True),
        callbacks=[Clock()],
    )
    trainer.remove_callback(PrinterCallback)  # no metrics printed per run
    trainer.train()
    return window_of(starts, steps)
