"""A backend wrapper that injects failures into any other backend, for tests.

:class:`FaultyBackend` passes every call to the backend it wraps, but can

- fail a write once a budget of bytes has been written (``fail_after_bytes``, like a disk that
  fills up or a connection that drops mid-upload), with the exception of your choice;
- fail the N-th call of any operation (``fail_on={"create": 3, "reuse": 1}``);
- call a hook before every operation (``hook(operation, key)``), which may raise, or kill the
  process to test crash safety.

:func:`inject` routes a manager's storage through a faulty backend by
:meth:`CheckpointManager.route_storage <ckpt_plugin.CheckpointManager.route_storage>`, so its whole
save path, commit included, runs through it::

    disk = inject(manager, fail_after_bytes=4096)
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..errors import StorageError
from .._format.records import FileRecord
from .base import Backend

Hook = Callable[[str, str], None]


def disk_full(key: str) -> StorageError:
    """The error a full disk (or a dropped upload) gives: a :class:`StorageError` naming ``key``."""
    error = StorageError(errno.ENOSPC, f"could not write {key}: no space left on the device (injected); the disk is full")
    error.filename = key
    return error


class FaultyBackend:
    """Wraps ``inner``; see the module notes. ``calls`` counts every operation by name."""

    def __init__(
        self,
        inner: Backend,
        *,
        fail_after_bytes: int | None = None,
        error: Callable[[str], BaseException] | BaseException | None = None,
        fail_on: Mapping[str, int] | None = None,
        hook: Hook | None = None,
    ) -> None:
        self.inner = inner
        self.budget = fail_after_bytes
        self.error = error if error is not None else disk_full
        self.fail_on = dict(fail_on or {})
        self.hook = hook
        self.calls: Counter[str] = Counter()
        self.triggered = False

    def __getattr__(self, name: str) -> Any:  # root, read_concurrency, and a backend's own extras
        return getattr(self.inner, name)

    def fail(self, key: str) -> BaseException:
        self.triggered = True
        return self.error(key) if callable(self.error) and not isinstance(self.error, BaseException) else self.error

    def _enter(self, operation: str, key: str) -> None:
        self.calls[operation] += 1
        if self.hook is not None:
            self.hook(operation, key)
        if self.fail_on.get(operation) == self.calls[operation]:
            raise self.fail(key)

    def join(self, base: str, *names: str) -> str:
        return self.inner.join(base, *names)

    def create(self, key: str, size: int | None = None) -> FaultySink:
        self._enter("create", key)
        return FaultySink(self, self.inner.create(key, size), key)

    def read_range(self, key: str, offset: int, into: memoryview) -> None:
        self._enter("read_range", key)
        self.inner.read_range(key, offset, into)

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        self._enter("read_bytes", key)
        return self.inner.read_bytes(key, limit)

    def read_all(self, key: str, limit: int | None = None) -> Any:
        self._enter("read_all", key)
        return self.inner.read_all(key, limit)

    def size(self, key: str) -> int:
        self._enter("size", key)
        return self.inner.size(key)

    def list(self, prefix: str) -> Iterator[str]:
        self._enter("list", prefix)
        return self.inner.list(prefix)

    def fingerprint(self, key: str) -> str | None:
        self._enter("fingerprint", key)
        return self.inner.fingerprint(key)

    def reuse(self, src: str, dst: str) -> bool:
        self._enter("reuse", dst)
        return self.inner.reuse(src, dst)

    def delete(self, key: str) -> None:
        self._enter("delete", key)
        self.inner.delete(key)

    def delete_tree(self, prefix: str) -> None:
        self._enter("delete_tree", prefix)
        self.inner.delete_tree(prefix)


class FaultySink:
    """A sink that stops accepting bytes once its backend's budget is spent."""

    def __init__(self, backend: FaultyBackend, inner: Any, key: str) -> None:
        self._backend, self._inner, self._key = backend, inner, key

    def write(self, data: memoryview | bytes) -> None:
        backend = self._backend
        backend._enter("write", self._key)
        data = memoryview(data)
        if backend.budget is not None:
            allowed = min(len(data), backend.budget)
            backend.budget -= allowed
            if allowed < len(data):
                if allowed:
                    self._inner.write(data[:allowed])
                self._inner.abort()
                raise backend.fail(self._key)
        self._inner.write(data)

    def close(self) -> FileRecord:
        self._backend._enter("close", self._key)
        return self._inner.close()

    def abort(self) -> None:
        self._inner.abort()


def inject(manager: Any, **faults: Any) -> FaultyBackend:
    """Route a :class:`~ckpt_plugin.CheckpointManager`'s storage through a new :class:`FaultyBackend`
    configured with ``faults`` (by its public :meth:`~ckpt_plugin.CheckpointManager.route_storage`),
    and return it (to inspect ``calls`` or change the budget)."""
    backend: FaultyBackend = manager.route_storage(lambda inner: FaultyBackend(inner, **faults))
    return backend


__all__ = ["FaultyBackend", "FaultySink", "disk_full", "inject"]
