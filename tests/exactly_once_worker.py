"""A training run whose every sample carries an id; the exactly-once tests start it. Not a test module.

    python tests/exactly_once_worker.py FRAMEWORK DATA WORKERS OUTPUT_DIR MODE [STOP_STEP]

FRAMEWORK is ``hf`` or ``lightning``; DATA is ``map`` (a shuffled map-style dataset), ``iterable``
(an iterable dataset with ``state_dict``), ``sized_iterable`` (the same with a length) or ``hf_iterable`` (a Hugging Face ``datasets``
``IterableDataset``); WORKERS is the loader's ``num_workers``. MODE ``full`` trains two epochs,
``preempt`` sends the process SIGTERM at optimizer step STOP_STEP (the callbacks save and stop:
``save_on_preemption``), and ``resume`` continues from the latest checkpoint. The ids each step
trained on are written to ``OUTPUT_DIR/MODE.json``, with the warnings the run raised.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

SAMPLES = 48
BATCH = 4
EPOCHS = 2


def features(index: int) -> torch.Tensor:
    return torch.tensor([index % 7, index % 5, index % 3, 1.0]) / 7


class Ids(torch.utils.data.Dataset):
    """A map-style dataset of ``SAMPLES`` samples, each with its id."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": features(index), "sample_id": torch.tensor(index), "labels": torch.tensor(float(index % 2))}


class IterIds(torch.utils.data.IterableDataset):
    """The same samples in order, split among the loader's workers, with its position as state."""

    def __init__(self) -> None:
        self.position = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        info = torch.utils.data.get_worker_info()
        mine = list(range(SAMPLES)) if info is None else list(range(info.id, SAMPLES, info.num_workers))
        while self.position < len(mine):
            index = mine[self.position]
            self.position += 1
            yield Ids()[index]
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


class SizedIterIds(IterIds):
    """:class:`IterIds` with a length, so that Lightning reads no batch ahead."""

    def __len__(self) -> int:
        return SAMPLES


def hf_iterable():  # type: ignore[no-untyped-def]
    import datasets

    table = {"x": [features(i).tolist() for i in range(SAMPLES)], "sample_id": list(range(SAMPLES)),
             "labels": [float(i % 2) for i in range(SAMPLES)]}
    return datasets.Dataset.from_dict(table).to_iterable_dataset(num_shards=2).with_format("torch")


def dataset(kind: str):  # type: ignore[no-untyped-def]
    return {"map": Ids, "iterable": IterIds, "sized_iterable": SizedIterIds, "hf_iterable": hf_iterable}[kind]()


class Recorder(torch.nn.Module):
    """A linear model that records the ids of every batch it trains on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 1)
        self.seen: list[list[int]] = []

    def forward(self, x, sample_id, labels=None):  # type: ignore[no-untyped-def]
        if self.training:
            self.seen.append(sample_id.tolist())
        loss = torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), labels.float())
        return {"loss": loss}


def signal_at(step: int | None):  # type: ignore[no-untyped-def]
    def maybe_signal(global_step: int) -> None:
        if step is not None and global_step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return maybe_signal


def hf_run(kind: str, workers: int, output: Path, mode: str, step: int | None) -> list[list[int]]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ckpt_plugin.hf import CheckpointCallback

    maybe_signal = signal_at(step)

    class Signal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            maybe_signal(state.global_step)

    epochs = {"num_train_epochs": EPOCHS} if kind == "map" else {"max_steps": SAMPLES // BATCH}
    args = TrainingArguments(
        output_dir=str(output / mode.replace("preempt", "resume")), per_device_train_batch_size=BATCH, save_strategy="no", logging_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, seed=3, dataloader_num_workers=workers,
        **epochs,
    )
    model = Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=dataset(kind),
                      callbacks=[Signal(), CheckpointCallback(save_on_preemption=True)])
    trainer.accelerator.dataloader_config.use_stateful_dataloader = True
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    return model.seen


def lightning_module(loader, step: int | None):  # type: ignore[no-untyped-def]
    """A LightningModule training a :class:`Recorder` on ``loader()``, signalled at optimizer step ``step``."""
    import lightning.pytorch as pl

    maybe_signal = signal_at(step)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = Recorder()

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return self.model(**batch)["loss"]

        def on_train_batch_end(self, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            maybe_signal(self.trainer.global_step)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):  # type: ignore[no-untyped-def]
            return loader()

    return Module()


def lightning_run(kind: str, workers: int, output: Path, mode: str, step: int | None) -> list[list[int]]:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from torchdata.stateful_dataloader import StatefulDataLoader

    from ckpt_plugin.lightning import CheckpointCallback

    def loader() -> StatefulDataLoader:
        return StatefulDataLoader(dataset(kind), batch_size=BATCH, shuffle=kind == "map", num_workers=workers)

    root = output / mode.replace("preempt", "resume")
    pl.seed_everything(3, verbose=False)
    module = lightning_module(loader, step)
    trainer = pl.Trainer(
        default_root_dir=root, max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[CheckpointCallback(root / "checkpoints", metric_for_best=None, save_on_preemption=True)],
    )
    try:
        trainer.fit(module, ckpt_path="last" if mode == "resume" else None)
    except SIGTERMException:
        pass
    return module.model.seen


def main() -> None:
    framework, kind, workers, output, mode = sys.argv[1:6]
    step = int(sys.argv[6]) if len(sys.argv) > 6 else None
    run = {"hf": hf_run, "lightning": lightning_run}[framework]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = run(kind, int(workers), Path(output), mode, step)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    (Path(output) / f"{mode}.json").write_text(json.dumps({"steps": seen, "warnings": messages}))


if __name__ == "__main__":
    main()
