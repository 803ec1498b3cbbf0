"""Copy a save's tensors into one reused host buffer, so training can go on while they are written.

:class:`StagingBuffer` owns a single flat byte buffer, the size of the state being saved. Each
save copies every tensor into a view of it; the next save reuses the same memory (it grows only
when the state grows), so an asynchronous save costs one copy of the state in host memory and no
allocation after the first.

CPU tensors are copied one of two ways: by two threads, the caller and a helper, each moving half
of every large tensor with a plain ``memcpy`` (numpy's ``copyto`` releases the GIL), or by
``Tensor.copy_``, which spreads each copy over torch's own intra-op threads. Which is faster depends
on the CPU: on an Intel Xeon host the two ``memcpy`` threads took 0.6x the time of ``copy_``, on an
AMD EPYC host 1.1x-1.3x (see ``benchmarks/async_save.py``). So by default the buffer times both
on its first saves (after the one that allocates it) and keeps the faster.
CUDA tensors are copied into pinned memory on a side stream: the copy waits for the work already
queued on the current stream, and work queued afterwards waits for the copy, so a training step
issued right after the save cannot change what is being copied. :meth:`Staged.wait` blocks until
the copies have landed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import _interpreter_exit as interpreter_exit

if TYPE_CHECKING:
    import torch

ALIGNMENT = 64
SPLIT_BYTES = 1024 * 1024
COPY_METHODS = ("memcpy", "copy_")
TRIALS = 2
"""Timed stages of each copy method before the faster one is kept."""


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


@dataclass
class Staged:
    """The staged copies of a save's tensors, grouped as they were given."""

    groups: list[dict[str, torch.Tensor]]
    events: list[Any] = field(default_factory=list)

    def wait(self) -> None:
        """Block until every device-to-host copy has finished (a no-op for CPU-only state)."""
        for event in self.events:
            event.synchronize()
        self.events.clear()


class StagingBuffer:
    """One pre-allocated host buffer that holds a copy of the state between saves.

    Args:
        threads: how many threads copy CPU tensors with ``memcpy`` (1 or 2; default 2 where the
            machine has more than one core).
        method: ``"memcpy"`` or ``"copy_"`` (``Tensor.copy_``). By default, where the machine has
            more than one core and ``threads`` is not given, both are timed on the first saves
            and the faster is kept; see ``benchmarks/async_save.py``.
    """

    def __init__(self, threads: int | None = None, method: str | None = None) -> None:
        if method not in (None, *COPY_METHODS):
            raise ValueError(f"method must be one of {COPY_METHODS} or None, not {method!r}")
        adaptive = method is None and threads is None and (os.cpu_count() or 1) > 1
        if threads is None:
            threads = 2 if (os.cpu_count() or 1) > 1 else 1
        if threads not in (1, 2):
            raise ValueError(f"threads must be 1 or 2, not {threads!r}")
        self.threads = threads
        self._fixed = method or "memcpy"
        self._trials: dict[str, list[float]] | None = {name: [] for name in COPY_METHODS} if adaptive else None
        self._buffer: torch.Tensor | None = None
        self._helper: ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, Any] = {}

    @property
    def nbytes(self) -> int:
        """The size of the buffer in bytes (0 before the first save)."""
        return 0 if self._buffer is None else self._buffer.numel()

    @property
    def pinned(self) -> bool:
        return self._buffer is not None and self._buffer.is_pinned()

    def release(self) -> None:
        """Free the buffer and stop the helper thread; the next :meth:`stage` starts them again."""
        self._buffer = None
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None

    def stage(self, groups: list[Mapping[str, torch.Tensor]]) -> Staged:
        """Copy every tensor of ``groups`` into the buffer and return the copies, grouped alike.

        The copies stay valid until the next call: the caller must not stage again while the
        previous copies are still being read.
        """
        import torch

        tensors = [tensor for group in groups for tensor in group.values()]
        offsets, total = [], 0
        for tensor in tensors:
            offsets.append(total)
            total = _aligned(total + tensor.numel() * tensor.element_size())
        needs_pinned = any(tensor.device.type == "cuda" for tensor in tensors) and torch.cuda.is_available()
        allocated = self._reserve(total, needs_pinned)
        assert self._buffer is not None
        copies = [self._view(tensor, offset) for tensor, offset in zip(tensors, offsets)]
        method = self.method
        start = time.perf_counter()
        events = self._copy_all(copies, tensors, method)
        if self._trials is not None and not allocated and total:
            self._trials[method].append((time.perf_counter() - start) / total)
        staged = Staged(groups=[], events=events)
        position = 0
        for group in groups:
            names = list(group)
            staged.groups.append(dict(zip(names, copies[position : position + len(names)])))
            position += len(names)
        return staged

    @property
    def method(self) -> str:
        """How CPU tensors are copied: ``"memcpy"`` (on ``threads`` threads) or ``"copy_"``.

        While the default buffer is still timing the two, each stage uses the one tried less.
        """
        if self._trials is None:
            return self._fixed
        untried = min(self._trials, key=lambda name: len(self._trials[name]))  # type: ignore[index]
        if len(self._trials[untried]) < TRIALS:
            return untried
        return min(self._trials, key=lambda name: min(self._trials[name]))  # type: ignore[index]

    def _reserve(self, total: int, pinned: bool) -> bool:
        """Make the buffer hold ``total`` bytes; True when it had to be allocated."""
        if self._buffer is not None and self._buffer.numel() >= total and (not pinned or self.pinned):
            return False
        import torch

        self._buffer = None  # free the old buffer before allocating its replacement
        self._buffer = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pinned)
        return True

    def _view(self, tensor: torch.Tensor, offset: int) -> torch.Tensor:
        assert self._buffer is not None
        count = tensor.numel() * tensor.element_size()
        if count == 0:
            import torch

            return torch.empty(tensor.shape, dtype=tensor.dtype)
        return self._buffer[offset : offset + count].view(tensor.dtype).view(tensor.shape)

    def _copy_all(self, copies: list[torch.Tensor], tensors: list[torch.Tensor], method: str) -> list[Any]:
        import torch

        try:
            import numpy as _np  # ships with every supported torch
        except ImportError:  # pragma: no cover
            _np = None
        halves: tuple[list[tuple[Any, Any]], list[tuple[Any, Any]]] = ([], [])
        loads = [0, 0]
        on_cuda: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for copy, tensor in zip(copies, tensors):
            tensor = tensor.detach()
            if tensor.numel() == 0:
                continue
            if tensor.device.type == "cuda" and copy.is_pinned():
                on_cuda.setdefault(tensor.device, []).append((copy, tensor))
            elif method == "memcpy" and _np is not None and tensor.device.type == "cpu" and _plain(tensor):
                source = tensor.reshape(-1).view(torch.uint8).numpy()
                target = copy.reshape(-1).view(torch.uint8).numpy()
                if self.threads == 2 and source.nbytes >= 2 * SPLIT_BYTES:
                    middle = source.nbytes // 2
                    halves[0].append((target[:middle], source[:middle]))
                    halves[1].append((target[middle:], source[middle:]))
                    loads[0] += middle
                    loads[1] += source.nbytes - middle
                else:
                    lighter = 0 if loads[0] <= loads[1] or self.threads == 1 else 1
                    halves[lighter].append((target, source))
                    loads[lighter] += source.nbytes
            else:
                copy.copy_(tensor)
        events = [self._copy_from_cuda(device, pairs) for device, pairs in on_cuda.items()]
        helped = None
        if halves[1]:
            if self._helper is None:
                self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-stage")
            helped = interpreter_exit.submit(self._helper, _copy_pairs, halves[1])
        try:
            _copy_pairs(halves[0])
        finally:
            if helped is not None:
                helped.result()
        return events

    def _copy_from_cuda(self, device: torch.device, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        import torch

        current = torch.cuda.current_stream(device)
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for copy, tensor in pairs:
                copy.copy_(tensor, non_blocking=True)
                tensor.record_stream(stream)
            done = torch.cuda.Event()
            done.record(stream)
        current.wait_event(done)
        return done


def _plain(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s bytes can be copied as they lie in memory."""
    return tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()


def _copy_pairs(pairs: list[tuple[Any, Any]]) -> None:
    import numpy as _np

    for target, source in pairs:
        _np.copyto(target, source)
