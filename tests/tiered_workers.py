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

from ckpt_plugin._tiered import Tiers
from ckpt_plugin.io.writer import take_snapshot, write_snapshot
from ckpt_plugin.storage import LocalStore, open_store, with_backend
from ckpt_plugin.storage.faults import FaultyBackend


def state(version: int) -> dict[str, torch.Tensor]:
    """About 4 MiB whose every value is ``version``."""
    return {"w": torch.full((1024, 1024), float(version)), "b": torch.arange(7, dtype=torch.float64) + version}


def open_tiers(local_dir: str, durable_url: str, stall_on: str | None = None) -> Tiers:
    """The tiers of the test run; with ``stall_on``, the upload of that checkpoint stalls in its first
    file (after printing ``uploading <name>``) until the process is killed."""
    local = LocalStore(Path(local_dir))
    local.ensure_writable()
    durable = open_store(durable_url)

    def stall(operation: str, key: str) -> None:
        if operation == "write" and stall_on is not None and f"/{stall_on}@" in key:
            print(f"uploading {stall_on}", flush=True)
            time.sleep(600)

    durable = with_backend(durable, FaultyBackend(durable.backend, hook=stall))
    return Tiers(local, durable, keep_local=1, backoff=0.05)


def save_while_upload_stalls(local_dir: str, durable_url: str, count: int, stall_on: str) -> None:
    """Save ``count`` checkpoints, printing ``saved <epoch>`` as each save returns, while the upload of
    ``stall_on`` stalls; then wait (until killed)."""
    tiers = open_tiers(local_dir, durable_url, stall_on)
    for epoch in range(count):
        snapshot = take_snapshot({"model": state(epoch)}, epoch=epoch, step=None, metrics={"loss": 1.0 / (epoch + 1)},
                                 config=None, metric_for_best="loss", mode="min", provenance={})
        seq = tiers.before_commit(snapshot.name)
        info = write_snapshot(tiers.local, snapshot)
        tiers.after_commit(info, seq)
        print(f"saved {epoch}", flush=True)
    tiers.uploader.wait(timeout=600)


def resume(local_dir: str, durable_url: str) -> dict[str, list[str]]:
    """Open the tiers again, finish the pending uploads, and say what each tier holds."""
    tiers = open_tiers(local_dir, durable_url)
    tiers.resume()
    tiers.uploader.wait(timeout=120)
    return {
        "durable": [info.name for info in tiers.durable_listing()],
        "local": [info.name for info in tiers.local_listing()],
        "pending": [info.name for info in tiers.pending()],
    }


if __name__ == "__main__":
    function = globals()[sys.argv[1]]
    print("ready", flush=True)
    print(f"result {json.dumps(function(*json.loads(sys.argv[2])))}", flush=True)
