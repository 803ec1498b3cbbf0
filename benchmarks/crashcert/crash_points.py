"""Crash points: every call that changes what a store holds, numbered, with a kill before or after one.

Locally these are the ``os`` calls that change the file system or make it durable (``mkdir``,
``open`` with ``O_CREAT``, ``rename``, ``replace``, ``renameat2`` through ctypes, ``link``,
``symlink``, ``unlink``, ``rmdir``, ``fsync``, ``fdatasync``, ``ftruncate``); on S3 every request
that writes (``put_object``, ``copy_object``, ``delete_object(s)`` and the multipart calls).

Calls are numbered per group: ``trash`` for the background thread that deletes hidden
directories, ``main`` for everything else (the caller's thread and the asynchronous save's thread,
which the caller waits for), ``s3`` for requests. Within a group the numbering of one plan is the
same from run to run, so a dry run counts the calls and trial ``k`` kills at call ``k``. The
call that was hit is written to the log before the kill, so a violation names it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

LOCAL_CALLS = ("mkdir", "rename", "replace", "link", "symlink", "unlink", "rmdir", "fsync", "fdatasync", "ftruncate")
S3_CALLS = frozenset({
    "put_object", "copy_object", "delete_object", "delete_objects", "create_multipart_upload", "upload_part",
    "upload_part_copy", "complete_multipart_upload", "abort_multipart_upload",
})
WHEN = ("before", "after")
_FD_CALLS = ("fsync", "fdatasync", "ftruncate")

_REAL_OS = {name: getattr(os, name) for name in (*LOCAL_CALLS, "open", "write", "kill", "getpid") if hasattr(os, name)}


def real_os(name: str) -> Callable[..., Any]:
    """The ``os`` function ``name`` as it was before any interception (for the worker's own log)."""
    return _REAL_OS[name]


def _describe(name: str, args: tuple[Any, ...]) -> str:
    """``rename(.tmp.<...>.epoch_5, epoch_5)``: the call with the last component of each path (a file
    descriptor is shown as the path it was opened at)."""
    shown = []
    for index, arg in enumerate(args):
        if index == 0 and name in _FD_CALLS and isinstance(arg, int):
            try:
                arg = os.readlink(f"/proc/self/fd/{arg}")
            except OSError:
                continue
        if isinstance(arg, (str, os.PathLike)):
            shown.append(os.path.basename(os.fspath(arg)))
    return f"{name}({', '.join(shown)})"


class CrashPoints:
    """Counts the crash-point calls of a worker, and SIGKILLs it at ``target``.

    ``target`` is ``[group, number, when]`` or None (a dry run, which only counts). ``log`` takes one
    line, the description of the call, just before the kill.
    """

    def __init__(self, target: list[Any] | None, log: Callable[[str], None]) -> None:
        self.target = tuple(target) if target is not None else None
        self.counts: Counter[str] = Counter()
        self.raised: dict[str, list[int]] = {}
        """The numbers of the calls that raised, per group: they have no state after them to crash in."""
        self._log = log
        self._lock = threading.Lock()
        self._undo: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ installing

    def install_local(self) -> None:
        import ckpt_plugin._storage.local as local

        for name in LOCAL_CALLS:
            if hasattr(os, name):
                self._patch(os, name, self._wrap(name, getattr(os, name)))
        real_open = os.open

        def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> Any:
            if flags & os.O_CREAT:
                return self._call("open", (path,), real_open, (path, flags, *args), kwargs)
            return real_open(path, flags, *args, **kwargs)

        self._patch(os, "open", open_)
        self._patch(local, "_exchange", self._wrap("renameat2", local._exchange))

    def install_s3(self) -> None:
        points = self

        def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
            async def call_s3(fs: Any, method: Any, *args: Any, **kwargs: Any) -> Any:
                name = s3_method_name(method)
                if name not in S3_CALLS:
                    return await real(fs, method, *args, **kwargs)
                description = f"{name}({'/'.join(str(kwargs.get('Key') or '').split('/')[-2:])})"
                number = points._enter("s3", description)
                try:
                    result = await real(fs, method, *args, **kwargs)
                except BaseException:
                    points.raised.setdefault("s3", []).append(number)
                    raise
                points._leave("s3", number, description)
                return result

            return call_s3

        self._undo.append(patch_s3_requests(wrap))

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, replacement)
        self._undo.append(lambda: setattr(owner, name, original))

    # ------------------------------------------------------------------ counting and killing

    def _wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def intercepted(*args: Any, **kwargs: Any) -> Any:
            return self._call(name, args, function, args, kwargs)

        return intercepted

    def _call(self, name: str, shown: tuple[Any, ...], function: Callable[..., Any], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
        group = "trash" if threading.current_thread().name.startswith("ckpt-trash") else "main"
        description = _describe(name, shown)
        number = self._enter(group, description)
        try:
            result = function(*args, **kwargs)
        except BaseException:
            self.raised.setdefault(group, []).append(number)
            raise
        self._leave(group, number, description)
        return result

    def _enter(self, group: str, description: str) -> int:
        with self._lock:
            self.counts[group] += 1
            number = self.counts[group]
        if self.target == (group, number, "before"):
            self._kill(f"{group} {number} before {description}")
        return number

    def _leave(self, group: str, number: int, description: str) -> None:
        if self.target == (group, number, "after"):
            self._kill(f"{group} {number} after {description}")

    def _kill(self, where: str) -> None:
        self._log(f"crash {where}")
        _REAL_OS["kill"](_REAL_OS["getpid"](), signal.SIGKILL)
        time.sleep(60)  # the signal is on its way


def s3_method_name(method: Any) -> str:
    return method if isinstance(method, str) else getattr(method, "__name__", str(method))


def patch_s3_requests(wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[[], None]:
    """Replace s3fs's request method (``S3FileSystem._call_s3``) with ``wrap(original)``, in its
    blocking form (``call_s3``, which holds the original itself) too; returns the undo."""
    import s3fs
    from fsspec.asyn import sync_wrapper

    cls = s3fs.S3FileSystem
    originals = cls.__dict__["_call_s3"], cls.__dict__["call_s3"]
    cls._call_s3 = wrap(originals[0])
    cls.call_s3 = sync_wrapper(cls._call_s3)

    def undo() -> None:
        cls._call_s3, cls.call_s3 = originals

    return undo


def points_of(counts: dict[str, int], raised: dict[str, list[int]]) -> list[list[Any]]:
    """Every crash point of a dry run that made ``counts`` calls per group, of which ``raised`` raised
    (a call that raised has no crash point after it: nothing changed)."""
    return [
        [group, number, when]
        for group in sorted(counts)
        for number in range(1, counts[group] + 1)
        for when in WHEN
        if when == "before" or number not in raised.get(group, ())
    ]
