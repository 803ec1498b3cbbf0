"""A training job that a test preempts with SIGTERM; not a test module itself.

    python tests/preemption_script.py FRAMEWORK OUTPUT_DIR STEP

FRAMEWORK is ``lightning`` or ``hf``. The job trains with ``save_on_preemption=True``. At optimizer
step STEP it writes ``OUTPUT_DIR/at-step`` and waits (at most 60 s) for the test to write
``OUTPUT_DIR/signal-sent`` once it has sent the signal, so the signal always lands mid-training.
The job must then save, stop and exit with status 0.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import torch  # noqa: E402

torch.set_num_threads(1)


def wait_for_signal(output: Path) -> None:
    (output / "at-step").write_text("")
    deadline = time.monotonic() + 60
    while not (output / "signal-sent").exists():
        if time.monotonic() > deadline:
            raise SystemExit("no signal came within 60 s")
        time.sleep(0.02)


def lightning_job(output: Path, step: int) -> None:
    import lightning.pytorch as pl
    from test_lightning import StatefulData, fresh_model, make_trainer

    from ckpt_plugin.lightning import CheckpointCallback

    class Wait(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            if trainer.global_step == step:
                wait_for_signal(output)

    callback = CheckpointCallback(output / "ckpt", save_on_preemption=True)
    make_trainer(output, 3, [callback, Wait()]).fit(fresh_model(0), StatefulData())
    raise SystemExit("training was not stopped by the signal")


def hf_job(output: Path, step: int) -> None:
    from test_hf import make_trainer
    from transformers import TrainerCallback

    from ckpt_plugin.hf import CheckpointCallback

    class Wait(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step == step:
                wait_for_signal(output)

    trainer, callback = make_trainer(output, callback=CheckpointCallback(save_on_preemption=True))
    trainer.add_callback(Wait())
    trainer.train()
    if trainer.state.global_step == trainer.state.max_steps:
        raise SystemExit("training was not stopped by the signal")


if __name__ == "__main__":
    framework, output_dir, at = sys.argv[1:4]
    {"lightning": lightning_job, "hf": hf_job}[framework](Path(output_dir), int(at))
