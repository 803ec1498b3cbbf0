"""The worker: a process forked from the pre-imported zygote that runs a scenario's operations over
one store and is killed, by the parent at a random instant or by itself at a crash point.

After each operation returns (after ``wait()`` for an asynchronous save) it appends an
acknowledgement to its log and fsyncs it: ``ack <index> <json>``. An operation that raises a
``CheckpointError`` is logged as ``fail <index> ...`` and ends the run (so at most one operation's
outcome is ever unknown); any other exception is logged as ``error <index> ...``. On S3 it also
logs the multipart uploads it starts and ends (``upload-start``, ``upload-open``, ``upload-end``),
so the checker can tell an upload abandoned by the kill from one the library lost track of.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import time
import traceback
import warnings
from typing import Any

from .crash_points import CrashPoints, patch_s3_requests, real_os, s3_method_name
from .scenarios import SCENARIOS, Scenario

REMOTE_PART_BYTES = 256 * 1024
"""The multipart part size on S3 in the certificate, so that a 1 MiB weight goes up in parts
(the S3 server is started with a matching minimum part size)."""


class Log:
    """An append-only log file written with the real ``os`` calls (never a crash point)."""

    def __init__(self, path: str) -> None:
        self._fd = real_os("open")(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def line(self, text: str, *, durable: bool = False) -> None:
        real_os("write")(self._fd, (text.replace("\n", " ") + "\n").encode())
        if durable:
            real_os("fsync")(self._fd)


def run(spec: dict[str, Any], conn: Any) -> None:
    """Run ``spec["ops"]`` (see :mod:`crash_certificate`) and report ``ready`` and ``done`` on ``conn``."""
    output = os.open(spec["output"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.chdir(spec["cwd"])  # not a git repository: provenance asks git and gets nothing, quickly
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for the stacks of a hung worker
    signal.signal(signal.SIGUSR2, _print_requests)
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    scenario = SCENARIOS[spec["scenario"]]
    log = Log(spec["log"])
    uploads = Log(spec["uploads"]) if scenario.remote else None
    if scenario.remote:
        import ckpt_plugin._storage.fsspec as remote

        remote.PART_BYTES = REMOTE_PART_BYTES
        _track_uploads(uploads)
    target = _open(scenario, spec)
    points = CrashPoints(spec["crash"], log.line)
    if scenario.remote:
        points.install_s3()
    else:
        points.install_local()
    conn.send(["ready"])
    started = time.perf_counter()
    for index, op in enumerate(spec["ops"]):
        try:
            result = _execute(scenario, target, op)
        except Exception as exc:  # noqa: BLE001 - logged for the parent, which judges it
            from ckpt_plugin.errors import CheckpointError

            kind = "fail" if isinstance(exc, CheckpointError) else "error"
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            if kind == "error":
                traceback.print_exc()
            log.line(f"{kind} {index} {detail}", durable=True)
            break
        log.line(f"ack {index} {json.dumps({**result, 'at': round(time.perf_counter() - started, 4)})}", durable=True)
        conn.send(["ack", index])
    _finish(target)
    elapsed = time.perf_counter() - started
    points.uninstall()
    conn.send(["done", dict(points.counts), elapsed, points.raised])


def _print_requests(*_: Any) -> None:
    """Print the stack of every task on fsspec's event loop (the requests under way)."""
    import asyncio
    import sys

    try:
        from fsspec.asyn import get_loop

        for task in asyncio.all_tasks(get_loop()):
            task.print_stack(file=sys.stderr)
    except Exception:  # noqa: BLE001 - a diagnosis only
        traceback.print_exc()
    sys.stderr.flush()


def _open(scenario: Scenario, spec: dict[str, Any]) -> dict[str, Any]:
    from ckpt_plugin import ArtifactRegistry, CheckpointManager

    options = {"storage_options": {"endpoint_url": spec["endpoint"]}} if scenario.remote else {}
    target: dict[str, Any] = {"manager": CheckpointManager(spec["location"], **scenario.manager_options, **options)}
    if scenario.kind == "registry":
        target["registry"] = ArtifactRegistry(spec["location"], **options)
    return target


def _execute(scenario: Scenario, target: dict[str, Any], op: list[Any]) -> dict[str, Any]:
    from .contents import model_state, optimizer_state

    kind = op[0]
    if kind == "save":
        _, epoch, version, loss = op
        manager = target["manager"]
        manager.save(model=model_state(scenario.shape, version), optimizer=optimizer_state(scenario.shape, version),
                     epoch=epoch, metrics={"loss": loss}, extra={"version": version})
        if manager.async_save:
            manager.wait()
        return {"epoch": epoch, "version": version}
    registry = target["registry"]
    if kind == "validate":
        record = registry.validate(op[1], op[2])
        return {"version": record["version"]}
    production = registry.promote(op[1]) if kind == "promote" else registry.rollback()
    return {"production": production["version"], "stack": production["previous_versions"]}


def _finish(target: dict[str, Any]) -> None:
    from ckpt_plugin._storage import trash

    try:
        target["manager"].close()
    except Exception:  # noqa: BLE001 - a failed save was logged already
        pass
    trash.drain()


def _track_uploads(log: Log) -> None:
    """Log every multipart upload this process starts, learns the id of, completes or aborts."""

    def wrap(real: Any) -> Any:
        async def call_s3(fs: Any, method: Any, *args: Any, **kwargs: Any) -> Any:
            name = s3_method_name(method)
            if name == "create_multipart_upload":
                log.line(f"upload-start {kwargs.get('Key')}")
                result = await real(fs, method, *args, **kwargs)
                log.line(f"upload-open {kwargs.get('Key')} {result['UploadId']}")
                return result
            result = await real(fs, method, *args, **kwargs)
            if name in ("complete_multipart_upload", "abort_multipart_upload"):
                log.line(f"upload-end {kwargs.get('Key')} {kwargs.get('UploadId')}")
            return result

        return call_s3

    patch_s3_requests(wrap)
