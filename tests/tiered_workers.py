"""What the children of the tiered tests run (see :mod:`spawned_workers`): tiered saves whose uploads
are killed, and the resume of a later process.

Run as ``python tiered_workers.py <function> <json list of arguments>``: it prints ``ready`` once
imported, then ``result <json>`` with what the function returned.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ckpt_plugin import CheckpointManager
from ckpt_plugin.storage import faults


def state(version: int) -> dict[str, torch.Tensor]:
    """About 4 MiB whose every value is ``version``."""
    return {"w": torch.full((1024, 1024), float(version)), "b": torch.arange(7, dtype=torch.float64) + version}


def open_manager(local_dir: str, durable_url: str) -> CheckpointManager:
    return CheckpointManager(durable_url, local_dir=local_dir, keep_local=1, max_pending_uploads=10, save_rng=False)


def save_while_upload_stalls(local_dir: str, durable_url: str, count: int, stall_on: str) -> None:
    """Save ``count`` checkpoints, printing ``saved <epoch>`` as each save returns, while the upload of
    ``stall_on`` stalls in its first file (after printing ``uploading <name>``) until the process is
    killed."""
    manager = open_manager(local_dir, durable_url)

    def stall(operation: str, key: str) -> None:
        if operation == "write" and f"/{stall_on}@" in key:
            print(f"uploading {stall_on}", flush=True)
            time.sleep(600)

    manager.route_storage(lambda inner: faults.FaultyBackend(inner, hook=stall))
    for epoch in range(count):
        manager.save(state(epoch), epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
        print(f"saved {epoch}", flush=True)
    manager.wait()


def resume(local_dir: str, durable_url: str) -> dict[str, list[str]]:
    """Open a manager on the same tiers, let it finish the pending uploads, and say what each tier holds."""
    manager = open_manager(local_dir, durable_url)
    manager.wait()
    return {
        "durable": [info.name for info in CheckpointManager(durable_url).checkpoints()],
        "local": sorted(path.name for path in Path(local_dir).iterdir() if not path.name.startswith(".")),
        "pending": [info.name for info in manager.pending_uploads()],
    }


if __name__ == "__main__":
    function = globals()[sys.argv[1]]
    print("ready", flush=True)
    print(f"result {json.dumps(function(*json.loads(sys.argv[2])))}", flush=True)
