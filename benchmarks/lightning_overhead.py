"""Wall time of a 5-epoch Lightning fit: ckpt_plugin's CheckpointCallback against ModelCheckpoint.

    python benchmarks/lightning_overhead.py [--rounds 5] [--epochs 5] [--dir DIR] [--async-save]

The model holds about 100 MiB of state (fp32 weights plus AdamW's two moments). Both fits run in
this process on the same data, saving after every epoch's validation: once with
``CheckpointCallback(max_checkpoints=3, keep_best=True)`` (safetensors + JSON, fsynced atomic
commits) and once with ``ModelCheckpoint(save_top_k=3, save_last=True)`` (``torch.save``, Lightning's
default). A fit without any checkpointing is timed as well, to show each one's overhead. After one
warm-up round the three fits are interleaved for ``--rounds`` rounds; the medians and the ratio
CheckpointCallback / ModelCheckpoint are printed (lower is better; the target is <= 1.0).
``--async-save`` runs CheckpointCallback with ``async_save=True`` (the fit still ends only once the
last save has committed).

It then measures what an epoch that does not save costs: a tiny model is fitted for many epochs
with ``every_n_epochs`` too large to ever save, and every hook Lightning calls on the callback is
timed; the median over epochs of the summed hook time is printed (target < 1 ms), next to the same
figure for ``ModelCheckpoint(every_n_epochs=...)``. Last, the same per optimizer step for a step
schedule that never falls due (``every_n_train_steps``), with ``save_on_preemption=True`` on top:
the check every step pays.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from _common import machine, whole_number
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckpt_plugin.lightning import CheckpointCallback

warnings.filterwarnings("ignore")
WIDTH = 2048  # two 2048x2048 layers: 8.4 M parameters, ~32 MiB of weights, ~96 MiB with AdamW state
HOOK_WARMUP_EPOCHS = 5
"""The first epochs of a hook measurement, left out of its median (as is the last epoch, which ends the fit)."""


class Wide(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return nn.functional.mse_loss(self.net(batch[0]), batch[0])

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[0]))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def state_mib(model: nn.Module) -> float:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 3 * weights / 2**20  # weights + exp_avg + exp_avg_sq


def timed_fit(kind: str, root: Path, epochs: int, data: TensorDataset, async_save: bool = False) -> float:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if kind == "ckpt_plugin":
        callbacks = [
            CheckpointCallback(
                root / "checkpoints", max_checkpoints=3, keep_best=True, metric_for_best="val_loss", async_save=async_save
            )
        ]
    elif kind == "ModelCheckpoint":
        callbacks = [ModelCheckpoint(root / "checkpoints", monitor="val_loss", save_top_k=3, save_last=True)]
    else:
        callbacks = []
    torch.manual_seed(0)
    model = Wide()
    trainer = pl.Trainer(
        default_root_dir=root,
        max_epochs=epochs,
        callbacks=callbacks,
        enable_checkpointing=bool(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(data, batch_size=32), DataLoader(data, batch_size=64))
    return time.perf_counter() - start


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self.net(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.log("val_loss", self.net(batch[0]).pow(2).mean())

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def time_hooks(callback: pl.Callback, per_epoch: dict[int, float]) -> None:
    """Wrap every ``on_*`` hook of ``callback`` so its time is added to ``per_epoch[trainer.current_epoch]``."""
    for name in dir(pl.Callback):
        if not name.startswith("on_"):
            continue
        hook = getattr(callback, name)

        @functools.wraps(hook)
        def timed(trainer, *args, _hook=hook, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return _hook(trainer, *args, **kwargs)
            finally:
                epoch = trainer.current_epoch
                per_epoch[epoch] = per_epoch.get(epoch, 0.0) + time.perf_counter() - start

        setattr(callback, name, timed)


def non_saving_epoch_cost(kind: str, root: Path, epochs: int, steps_per_epoch: int = 1) -> float:
    """Median over ``epochs`` non-saving epochs of the time spent in the checkpoint callback's hooks (seconds).

    ``kind`` is ``ModelCheckpoint`` or ``ckpt_plugin`` (epoch schedules), ``ModelCheckpoint-steps``,
    ``ckpt_plugin-steps`` or ``ckpt_plugin-steps-preemption`` (step schedules).
    """
    never = epochs * steps_per_epoch * 1000
    schedule = {"every_n_train_steps": never} if "steps" in kind else {"every_n_epochs": never}
    if kind.startswith("ckpt_plugin"):
        callback: pl.Callback = CheckpointCallback(
            root / kind, metric_for_best="val_loss", save_on_preemption=kind.endswith("preemption"), **schedule
        )
    else:
        callback = ModelCheckpoint(root / kind, monitor="val_loss", save_top_k=3, **schedule)
    per_epoch: dict[int, float] = {}
    time_hooks(callback, per_epoch)
    data = TensorDataset(torch.randn(8 * steps_per_epoch, 4, generator=torch.Generator().manual_seed(0)))
    trainer = pl.Trainer(
        default_root_dir=root,
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Tiny(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    if (root / kind).exists() and any((root / kind).iterdir()):
        raise RuntimeError(f"{kind} saved a checkpoint in a run that should never save")
    warm = [per_epoch[epoch] for epoch in sorted(per_epoch) if HOOK_WARMUP_EPOCHS <= epoch < epochs - 1]
    return statistics.median(warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=whole_number(), default=5)
    parser.add_argument("--epochs", type=whole_number(), default=5)
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--async-save", action="store_true", help="run CheckpointCallback with async_save=True")
    parser.add_argument(
        "--hook-epochs",
        type=whole_number(HOOK_WARMUP_EPOCHS + 2),
        default=300,
        help=f"epochs of the non-saving epoch measurement (the first {HOOK_WARMUP_EPOCHS} and the last are not counted)",
    )
    args = parser.parse_args()
    print(machine())
    scratch = args.dir or Path(tempfile.mkdtemp(prefix="ckpt_lightning_bench_"))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = TensorDataset(torch.randn(64, WIDTH, generator=torch.Generator().manual_seed(0)))
    kinds = ("none", "ModelCheckpoint", "ckpt_plugin")
    print(
        f"model state: {state_mib(Wide()):.1f} MiB; {args.epochs} epochs, one save per epoch; "
        f"CheckpointCallback async_save={args.async_save}; scratch: {scratch}"
    )

    for kind in kinds:  # warm-up: imports, allocator, page cache
        timed_fit(kind, scratch / kind, args.epochs, data, args.async_save)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for round_index in range(args.rounds):
        for kind in kinds:
            times[kind].append(timed_fit(kind, scratch / kind, args.epochs, data, args.async_save))
        print(f"round {round_index + 1}: " + ", ".join(f"{kind} {times[kind][-1]:.2f}s" for kind in kinds), flush=True)

    median = {kind: statistics.median(values) for kind, values in times.items()}
    for kind in kinds:
        overhead = median[kind] - median["none"]
        print(f"{kind:>16}: median {median[kind]:.2f}s  (checkpointing overhead {overhead:+.2f}s)")
    mode = "async_save=True" if args.async_save else "sync"
    print(
        f"ratio CheckpointCallback ({mode}) / ModelCheckpoint (median wall time of the fit): "
        f"{median['ckpt_plugin'] / median['ModelCheckpoint']:.3f}"
    )

    costs = {kind: non_saving_epoch_cost(kind, scratch / "hooks", args.hook_epochs) for kind in ("ModelCheckpoint", "ckpt_plugin")}
    print(
        f"non-saving epoch, hooks of the checkpoint callback (median of {args.hook_epochs - HOOK_WARMUP_EPOCHS - 1} epochs): "
        f"CheckpointCallback {costs['ckpt_plugin'] * 1e6:.1f} us, ModelCheckpoint {costs['ModelCheckpoint'] * 1e6:.1f} us "
        f"(ratio {costs['ckpt_plugin'] / costs['ModelCheckpoint']:.2f}; target < 1 ms)"
    )
    steps = 20
    step_kinds = ("ModelCheckpoint-steps", "ckpt_plugin-steps", "ckpt_plugin-steps-preemption")
    epochs = max(10, args.hook_epochs // 10)
    per_step = {kind: non_saving_epoch_cost(kind, scratch / "hooks", epochs, steps) / steps for kind in step_kinds}
    print(
        f"non-saving step under every_n_train_steps, hooks per step (median of {epochs - HOOK_WARMUP_EPOCHS - 1} epochs of {steps} steps): "
        + ", ".join(f"{kind} {cost * 1e6:.1f} us" for kind, cost in per_step.items())
        + f" (ratios to ModelCheckpoint: {per_step['ckpt_plugin-steps'] / per_step['ModelCheckpoint-steps']:.2f}, "
        f"{per_step['ckpt_plugin-steps-preemption'] / per_step['ModelCheckpoint-steps']:.2f})"
    )
    shutil.rmtree(scratch, ignore_errors=True) if args.dir is None else None


if __name__ == "__main__":
    main()
