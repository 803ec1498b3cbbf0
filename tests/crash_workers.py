"""What the children of :mod:`spawned_workers` run: saves that are killed, crash themselves, or hit limits.

Run as ``python crash_workers.py <function> <json list of arguments>``: it prints ``ready`` once
imported, then ``result <json>`` with what the function returned.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import warnings
from typing import Any

import torch

from ckpt_plugin import CheckpointManager

from core_helpers import full_state, save_full

INTERCEPTED = ("open", "write", "pwrite", "writev", "fsync", "fdatasync", "close", "mkdir", "rename",
               "replace", "unlink", "rmdir", "ftruncate", "link", "symlink")

LOSSES = {0: 0.1, 1: 0.5, 2: 0.4, 3: 0.3, 4: 0.2, 13: 0.05}


def large_state(version: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A 2 MiB model and optimizer whose every value is ``version``."""
    value = float(version)
    model = {"w": torch.full((512, 1024), value), "b": torch.full((7,), value, dtype=torch.float64)}
    optimizer = {"state": {0: {"m": torch.full((512, 1024), value), "step": torch.tensor(value)}},
                 "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}]}
    return model, optimizer


def save_forever(mode: str, directory: str) -> None:
    """Save in a loop, printing ``saved <version>`` after each save returns, until killed.

    ``append`` saves a new epoch each time; ``replace`` re-saves epoch 0.
    """
    warnings.simplefilter("ignore")
    manager = CheckpointManager(directory, max_checkpoints=3, keep_best=True, metric_for_best="loss", mode="min")
    if mode == "append":
        latest = manager.latest()
        version = 0 if latest is None else latest.epoch + 1
    else:
        checkpoint = manager.load_latest()
        version = 0 if checkpoint is None else checkpoint["extra"]["version"] + 1
    while True:
        model, optimizer = large_state(version)
        epoch = version if mode == "append" else 0
        manager.save(model=model, optimizer=optimizer, epoch=epoch,
                     metrics={"loss": 1.0 / (version + 1)}, extra={"version": version})
        os.write(1, f"saved {version}\n".encode())
        version += 1


def small_state(version: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A small model with a tied weight, and an optimizer, whose every value is ``version``."""
    value = float(version)
    model = {"w": torch.full((64, 64), value), "tied": torch.full((3,), value)}
    model["tied_again"] = model["tied"]
    optimizer = {"state": {0: {"m": torch.full((64, 64), value)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    return model, optimizer


def open_manager(directory: str) -> CheckpointManager:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CheckpointManager(directory, max_checkpoints=3, keep_best=True, metric_for_best="loss", mode="min",
                                 save_rng=False)


def save_version(manager: CheckpointManager, version: int, epoch: int) -> None:
    model, optimizer = small_state(version)
    manager.save(model=model, optimizer=optimizer, epoch=epoch, metrics={"loss": LOSSES.get(version, 0.2)},
                 extra={"version": version})


def save_and_crash(directory: str, version: int, epoch: int, crash_at: int | None, after: bool) -> int:
    """Save, SIGKILLing this process just before (or after) the ``crash_at``-th intercepted ``os`` call.

    Returns how many intercepted calls the save made, when it was not killed.
    """
    manager = open_manager(directory)
    calls = [0]
    real = {name: getattr(os, name) for name in INTERCEPTED if hasattr(os, name)}

    def wrap(function: Any) -> Any:
        def intercepted(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == crash_at and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            result = function(*args, **kwargs)
            if calls[0] == crash_at and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return intercepted

    for name, function in real.items():
        setattr(os, name, wrap(function))
    try:
        save_version(manager, version, epoch)
    finally:
        for name, function in real.items():
            setattr(os, name, function)
    return calls[0]


def save_under_file_size_limit(directory: str, limit: int) -> list[Any]:
    """Save with RLIMIT_FSIZE at ``limit`` bytes; return ``[error type, errno, message]`` or ``["no error"]``.

    The state is trained before the limit is set: torch probes its temporary directory (by writing
    a file) on the first optimizer step, and only the save is under test.
    """
    state = full_state()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_full(CheckpointManager(directory, max_checkpoints=2, keep_best=True), 3, state=state)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return [type(exc).__name__, getattr(exc, "errno", None), str(exc)]
    return ["no error"]


def registry_change_and_crash(root: str, action: str, crash_at: int | None) -> list[list[str]]:
    """Validate 1.0.2, promote 1.0.1, or roll back (after promoting 1.0.1), SIGKILLing this process
    just before the ``crash_at``-th intercepted ``os`` call of that change.

    Returns the intercepted calls (name and the last path components of their arguments) when not killed.
    """
    from ckpt_plugin import ArtifactRegistry

    warnings.simplefilter("ignore")
    registry = ArtifactRegistry(os.path.join(root, "checkpoints"))
    if action == "rollback":
        registry.promote("1.0.1")
    calls: list[list[str]] = []
    real = {name: getattr(os, name) for name in INTERCEPTED if hasattr(os, name)}

    def wrap(name: str, function: Any) -> Any:
        def intercepted(*args: Any, **kwargs: Any) -> Any:
            calls.append([name, *(os.path.basename(str(arg)) for arg in args if isinstance(arg, (str, os.PathLike)))])
            if len(calls) == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return intercepted

    for name, function in real.items():
        setattr(os, name, wrap(name, function))
    try:
        if action == "validate":
            registry.validate(2, "1.0.2")
        elif action == "promote":
            registry.promote("1.0.1")
        else:
            registry.rollback()
    finally:
        for name, function in real.items():
            setattr(os, name, function)
    return calls


def save_listing_and_crash(directory: str) -> None:
    """Write the listing cache of ``directory``, SIGKILLing this process just before the temporary
    file replaces the cache."""
    from pathlib import Path

    from ckpt_plugin import _listing as listing

    def killed(*args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    os.replace = killed  # type: ignore[assignment]
    listing.save(Path(directory), {})


if __name__ == "__main__":
    function = globals()[sys.argv[1]]
    print("ready", flush=True)
    print(f"result {json.dumps(function(*json.loads(sys.argv[2])))}", flush=True)
