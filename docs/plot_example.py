"""Make docs/run.png, the README's picture of a run: 12 saves, the last 3 kept plus the best.

    python docs/plot_example.py
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from ckpt_plugin import ArtifactRegistry, CheckpointManager
from ckpt_plugin.plot import plot_run, run_history

OUTPUT = Path(__file__).resolve().parent / "run.png"


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        os.chdir(root)
        manager = CheckpointManager("checkpoints", max_checkpoints=3, keep_best=True, metric_for_best="val_loss")
        model = torch.nn.Linear(4, 4)
        for epoch in range(12):  # the validation loss bottoms out at epoch 5, then the run overfits
            val_loss = 0.35 + 0.9 * math.exp(-epoch / 1.6) + 0.025 * max(0, epoch - 5) ** 1.3
            accuracy = 0.97 - 0.55 * math.exp(-epoch / 2.2) - 0.01 * max(0, epoch - 5)
            manager.save(model, epoch=epoch, step=250 * (epoch + 1), metrics={"val_loss": val_loss, "accuracy": accuracy})
        registry = ArtifactRegistry("checkpoints")
        registry.validate(epoch="best", version="1.0.0")
        registry.validate(epoch="latest", version="1.1.0")
        registry.promote("1.0.0")
        print(plot_run(run_history("checkpoints"), OUTPUT))


if __name__ == "__main__":
    main()
