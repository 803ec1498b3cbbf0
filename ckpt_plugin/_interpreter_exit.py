"""Finishing background work when the interpreter exits.

When the main thread of a script ends, Python first calls the hooks registered with
``threading._register_atexit`` (newest first), then joins the non-daemon threads, and only then
runs the ``atexit`` hooks. ``concurrent.futures`` registers such a hook when it is imported: from
then on every thread pool refuses new work ("cannot schedule new futures after interpreter
shutdown"). Work that must finish at exit therefore has to run before that hook, and work that
still runs after it must not need a pool.

- :func:`before_pools_stop` registers a function to run when the main thread ends, while thread
  pools still accept work.
- :func:`submit` hands work to a pool, or runs it on the calling thread once pools refuse work;
  :func:`exiting` says whether that time has come.
- :func:`fail_exit_status` makes the process end with a non-zero status once every exit hook ran.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 - its exit hook must be registered before ours
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")

FAILED_EXIT_STATUS = 1
"""The exit status of a process whose work could not be finished at exit."""


def before_pools_stop(func: Callable[[], object]) -> None:
    """Run ``func`` when the main thread ends, before ``concurrent.futures`` stops its pools.

    Such hooks run newest first, and ``concurrent.futures`` registered its own when this module
    imported it, so ``func`` runs before it. Where the interpreter has no such hook (not CPython),
    ``func`` runs with the ``atexit`` hooks instead.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - other interpreters
        atexit.register(func)
        return
    register(func)


def submit(pool: Executor, func: Callable[..., T], *args: Any) -> Future[T]:
    """``pool.submit(func, *args)``, or, once the interpreter stops its pools, ``func`` run here.

    The returned future holds the result or the exception either way.
    """
    try:
        return pool.submit(func, *args)
    except RuntimeError:
        if not exiting():
            raise
    done: Future[T] = Future()
    try:
        done.set_result(func(*args))
    except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
        done.set_exception(exc)
    return done


def exiting() -> bool:
    """Whether the interpreter is exiting (the main thread has ended), so that pools may refuse work."""
    return bool(getattr(threading, "_SHUTTING_DOWN", False)) or sys.is_finalizing()


_failed = False


def fail_exit_status() -> None:
    """End the process with :data:`FAILED_EXIT_STATUS` once every ``atexit`` hook has run.

    For work that failed at exit after the script itself ended normally (whose status would be 0).
    """
    global _failed
    if not _failed:
        _failed = True
        atexit.register(_exit_failed)


def _exit_failed() -> None:
    """The newest ``atexit`` hook, so the first to run: run the others, then end with the failure status."""
    atexit.unregister(_exit_failed)
    run_others = getattr(atexit, "_run_exitfuncs", None)
    if run_others is not None:
        run_others()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(FAILED_EXIT_STATUS)
