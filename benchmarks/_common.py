"""Shared pieces of the benchmarks: argument types, the ~400 MiB state, timing, and peak-memory probes."""

from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from _args import existing_dir, whole_number  # noqa: F401 - the benchmarks import them from here

MiB = 1024 * 1024


def build_state(hidden: int = 2090, layers: int = 8, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A stack of linear layers and an Adam optimizer that has taken one step.

    With the defaults the model holds ~133 MiB of fp32 weights, and Adam's two moments bring the
    state to ~400 MiB. The largest tensor is one weight matrix (~16.7 MiB).
    """
    torch.manual_seed(seed)
    model = nn.Sequential(*(nn.Linear(hidden, hidden) for _ in range(layers)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, hidden)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of the model and optimizer state, each once."""
    found: dict[int, torch.Tensor] = {}
    for tensor in model.state_dict().values():
        found.setdefault(id(tensor), tensor)
    for per_param in optimizer.state_dict()["state"].values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                found.setdefault(id(value), value)
    return list(found.values())


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def median_time(fn: Callable[[], object], rounds: int, before: Callable[[], object] | None = None) -> float:
    """The median wall time of ``fn`` over ``rounds`` runs after one untimed warm-up run."""
    times = []
    for index in range(rounds + 1):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if index:
            times.append(elapsed)
    return statistics.median(times)


def interleaved_times(
    fns: dict[str, Callable[[], object]], rounds: int, before: Callable[[], object] | None = None
) -> dict[str, list[float]]:
    """Wall times of each of ``fns``, run in turn within every round so that drifting load on a
    shared machine hits them alike; the first round is an untimed warm-up."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for index in range(rounds + 1):
        for name, fn in fns.items():
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if index:
                times[name].append(elapsed)
    return times


def interleaved_medians(
    fns: dict[str, Callable[[], object]], rounds: int, before: Callable[[], object] | None = None
) -> dict[str, float]:
    """The median of each of :func:`interleaved_times`."""
    return {name: statistics.median(values) for name, values in interleaved_times(fns, rounds, before).items()}


def spread(values: list[float]) -> str:
    """``median (min-max)`` of a list of seconds, in milliseconds."""
    return f"{statistics.median(values) * 1e3:.0f} ms ({min(values) * 1e3:.0f}-{max(values) * 1e3:.0f})"


def settle() -> None:
    """Let background deletions finish and flush dirty pages, so that no measurement pays for
    another's leftovers (saves in training are further apart than either)."""
    from ckpt_plugin._storage import trash

    trash.drain()
    os.sync()


def load_average() -> str:
    return ", ".join(f"{value:.1f}" for value in os.getloadavg())


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        match = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def peak_extra_rss(fn: Callable[[], object]) -> int:
    """Bytes by which the resident set's high-water mark rose above its level before ``fn``.

    Resets the kernel's peak counter (``/proc/self/clear_refs``), so it sees every allocation,
    torch's included, without sampling.
    """
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def peak_python_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of Python allocations (bytes, bytearrays, buffers) made while ``fn`` runs and live at once.

    From :mod:`tracemalloc`, so unlike the resident-set probe it also sees memory the allocator
    reuses; it does not see torch's allocations (see :func:`peak_torch_bytes`).
    """
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def peak_torch_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of torch CPU allocations live at once while ``fn`` runs, from the profiler.

    Unlike the resident-set probe, this also sees allocations that reuse memory the allocator
    already held. Frees of memory allocated before ``fn`` are not counted against its allocations.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = sorted(
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in prof.events()
        if event.self_cpu_memory_usage
    )
    live = peak = 0
    for _, change in changes:
        live = max(0, live + change)
        peak = max(peak, live)
    return peak


def evict(*directories: Path) -> None:
    """Drop the files under ``directories`` (or those files) from the page cache: a read then comes from the disk.

    Saves may write with direct I/O (no page cache) or through it; evicting both sides' files
    makes the restores compare alike, as after a job restart."""
    settle()
    for directory in directories:
        for path in directory.rglob("*") if directory.is_dir() else [directory]:
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def machine() -> str:
    """One line naming the machine: CPU model, cores, RAM, torch threads, and Python/torch versions."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError):
        ram = float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = load_average()
    return (
        f"{model}, nproc={os.cpu_count()}, RAM {ram:.1f} GiB, {gpu}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}; load average {load}"
    )


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    """Print ``(name, value, target)`` rows as a fixed-width table."""
    width = max(len(row[0]) for row in rows)
    print(f"\n{title}")
    print(f"  {'measure'.ljust(width)}  {'value':>12}  target")
    for name, value, target in rows:
        print(f"  {name.ljust(width)}  {value:>12}  {target}")


def scratch_dir(parent: str | None) -> Path:
    """A fresh directory for the benchmark's files, on the disk the checkpoints would use."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=parent))


def start_server(bucket: str) -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server in its own process, so that the objects it holds in memory are not counted
    in this process's peak memory, holding an empty ``bucket``; the standard ``AWS_*`` environment
    points at it (child processes inherit it). Returns the server process and its endpoint."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("the moto server did not start") from None
            time.sleep(0.2)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint
    )
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return server, endpoint


class Window:
    """The steps of one measured stretch of training: each step's compute time, the time it was
    blocked in a save after it, and whether a background write overlapped it."""

    def __init__(self, computes: list[float], blocked: list[float], overlapped: list[bool]) -> None:
        self.computes, self.blocked, self.overlapped = computes, blocked, overlapped

    @property
    def steps(self) -> int:
        return len(self.computes)

    @property
    def mean_step(self) -> float:
        """Seconds per step, saves included."""
        return (sum(self.computes) + sum(self.blocked)) / self.steps

    @property
    def blocked_per_step(self) -> float:
        return sum(self.blocked) / self.steps

    @property
    def quiet_step(self) -> float:
        """The median compute time of the steps that no background write overlapped (nan if none)."""
        quiet = [compute for compute, busy in zip(self.computes, self.overlapped) if not busy]
        return statistics.median(quiet) if quiet else float("nan")

    @property
    def overlapped_share(self) -> float:
        return sum(self.overlapped) / self.steps

    def interference_per_step(self, baseline_quiet: float) -> float:
        """Extra seconds per step of the steps a background write overlapped, against this window's
        median quiet step (or ``baseline_quiet`` where every step overlapped a write)."""
        quiet = self.quiet_step if any(not busy for busy in self.overlapped) else baseline_quiet
        extra = sum(compute - quiet for compute, busy in zip(self.computes, self.overlapped) if busy)
        return extra / self.steps


class StepLog:
    """Collects a :class:`Window` step by step."""

    def __init__(self) -> None:
        self.computes: list[float] = []
        self.blocked: list[float] = []
        self.overlapped: list[bool] = []

    def add(self, compute: float, blocked: float = 0.0, overlapped: bool = False) -> None:
        self.computes.append(compute)
        self.blocked.append(blocked)
        self.overlapped.append(overlapped)

    def window(self) -> Window:
        return Window(self.computes, self.blocked, self.overlapped)
