"""One rank of a DDP training run (gloo, CPU) whose every sample carries an id; the DDP exactly-once
tests start it. Not a test module.

    python tests/exactly_once_ddp_worker.py lightning OUTPUT_DIR MODE PROCESSES SAMPLER [STOP_STEP]
    python -m torch.distributed.run --nproc_per_node N tests/exactly_once_ddp_worker.py hf OUTPUT_DIR MODE N SAMPLER [STOP_STEP]

Lightning starts its other ranks itself (``strategy="ddp"``); the Trainer's ranks are started by
``torch.distributed.run``. The dataset is the shuffled map-style one of
:mod:`exactly_once_worker`. SAMPLER ``default`` leaves the distributed sampling to the framework
(Lightning wraps the sampler of ``StatefulDataLoader(shuffle=True)`` in its
``DistributedSamplerWrapper``; the Trainer shards accelerate's seeded sampler by batches);
``distributed`` gives Lightning's loader torch's ``DistributedSampler`` and ``resumable`` a
:class:`ckpt_plugin.ResumableDistributedSampler`. MODE ``full`` trains two epochs, ``preempt`` sends
every rank SIGTERM at optimizer step STOP_STEP (the callbacks save and stop), ``resume`` continues
from the latest checkpoint. Each rank writes the ids of its steps and its warnings to
``OUTPUT_DIR/MODE-rank{N}.json``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import exactly_once_worker as single  # noqa: E402
from rank_exit import end_without_finalizing  # noqa: E402

EPOCHS = 2
BATCH = single.BATCH


def hf_run(output: Path, mode: str, sampler: str, step: int | None) -> tuple[int, list[list[int]]]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ckpt_plugin.hf import CheckpointCallback

    maybe_signal = single.signal_at(step)

    class Signal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            maybe_signal(state.global_step)

    args = TrainingArguments(
        output_dir=str(output / "run"), per_device_train_batch_size=BATCH, save_strategy="no", logging_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, seed=3, num_train_epochs=EPOCHS, ddp_backend="gloo",
    )
    model = single.Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=single.Ids(),
                      callbacks=[Signal(), CheckpointCallback(save_on_preemption=True)])
    trainer.accelerator.dataloader_config.use_stateful_dataloader = True
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    return trainer.args.process_index, model.seen


def lightning_run(output: Path, mode: str, processes: int, sampler: str, step: int | None) -> tuple[int, list[list[int]]]:
    import lightning.pytorch as pl
    from torch.utils.data import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    from ckpt_plugin import ResumableDistributedSampler
    from ckpt_plugin.lightning import CheckpointCallback

    def loader() -> StatefulDataLoader:
        if sampler == "distributed":
            return StatefulDataLoader(single.Ids(), batch_size=BATCH, sampler=DistributedSampler(single.Ids(), seed=3))
        if sampler == "resumable":
            return StatefulDataLoader(single.Ids(), batch_size=BATCH, sampler=ResumableDistributedSampler(single.Ids(), seed=3))
        return StatefulDataLoader(single.Ids(), batch_size=BATCH, shuffle=True)

    root = output / "run"
    pl.seed_everything(3, verbose=False)
    module = single.lightning_module(loader, step)
    trainer = pl.Trainer(
        default_root_dir=root, max_epochs=EPOCHS, accelerator="cpu", devices=processes, logger=False,
        strategy="ddp" if processes > 1 else "auto",
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[CheckpointCallback(root / "checkpoints", metric_for_best=None, save_on_preemption=True)],
    )
    try:
        trainer.fit(module, ckpt_path="last" if mode == "resume" else None)
    except SystemExit:  # Lightning's SIGTERMException, after the preemption save
        pass
    return trainer.global_rank, module.model.seen


def main() -> None:
    framework, output, mode, processes, sampler = sys.argv[1:6]
    step = int(sys.argv[6]) if len(sys.argv) > 6 else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if framework == "hf":
            rank, seen = hf_run(Path(output), mode, sampler, step)
        else:
            rank, seen = lightning_run(Path(output), mode, int(processes), sampler, step)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    (Path(output) / f"{mode}-rank{rank}.json").write_text(json.dumps({"steps": seen, "warnings": messages}))


if __name__ == "__main__":
    try:
        main()
    finally:
        # The frameworks leave the process group up, with gloo's threads (see rank_exit).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    end_without_finalizing()
