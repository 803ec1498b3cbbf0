"""A two-process DDP Trainer run on CPU (gloo) for tests/test_hf.py; not a test module itself.

    python -m torch.distributed.run --nproc_per_node 2 tests/hf_ddp_script.py OUTPUT_DIR

Trains a tiny GPT-2 with ``save_on_preemption=True``; rank zero alone receives SIGUSR1 as step 5
starts. Each rank writes the step it stopped at and the checkpoints it sees to
``OUTPUT_DIR/rank{N}.json``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import torch  # noqa: E402

torch.set_num_threads(1)

from test_hf import make_trainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from rank_exit import end_without_finalizing  # noqa: E402

from ckpt_plugin.hf import CheckpointCallback  # noqa: E402


class SignalRankZero(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == 4 and args.process_index == 0:
            os.kill(os.getpid(), signal.SIGUSR1)


def main(output: Path) -> None:
    trainer, callback = make_trainer(output, callback=CheckpointCallback(save_on_preemption=True))
    trainer.add_callback(SignalRankZero())
    trainer.train()
    rank = trainer.args.process_index
    report = {
        "world_size": trainer.args.world_size,
        "global_step": trainer.state.global_step,
        "checkpoints": [info.name for info in callback.manager.checkpoints()],
    }
    (output / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # The Trainer leaves the default process group up, with gloo's threads, which abort the
    # interpreter's finalization when one of them still frees a tensor (see rank_exit).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    end_without_finalizing()
