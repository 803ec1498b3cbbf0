"""Tiered checkpoints: the time training is blocked per checkpoint, and the time to restore after a
restart, with a ~400 MiB model + Adam state and a moto S3 server on this machine.

    PYTHONPATH=. python benchmarks/tiered.py [--checkpoints 3] [--train-seconds 10] [--rate-mb 50] [--dir PARENT]

A training loop runs ``--train-seconds`` of real optimizer steps between checkpoints and saves
``--checkpoints`` times with each of (side by side, in turns):

- ``local``: ``CheckpointManager(local directory)``, the floor;
- ``tiered``: ``CheckpointManager("s3://...", local_dir=...)``: the save returns once committed
  locally and uploads in the background;
- ``s3 sync``: ``CheckpointManager("s3://...")``;
- ``lightning``: Lightning's ``TorchCheckpointIO.save_checkpoint`` to an ``s3://`` path, what
  ``ModelCheckpoint`` with an ``s3://`` dirpath calls (``torch.save`` through fsspec),

once straight to the server and once through a proxy that holds each direction to ``--rate-mb``
MB/s (the real-world case). Goals: tiered blocked time <= 1.1x local, and <= 0.1x a synchronous S3
save at 50 MB/s. Then a restart: a new manager restores the latest checkpoint from a warm
``local_dir`` and from an empty one (everything from S3); goal: warm <= 0.3x empty. The bytes the
tiered run sent through the proxy are reported beside the bytes it checkpointed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import MiB, build_state, existing_dir, machine, nbytes, print_table, scratch_dir, settle, start_server, state_tensors, whole_number

from ckpt_plugin import CheckpointManager


class ThrottlingProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``, each direction at most ``rate`` bytes per second
    (all connections together), and counts the bytes sent upstream."""

    def __init__(self, target: tuple[str, int], rate: float) -> None:
        self.target = target
        self.rate = rate
        self.sent_up = 0
        self._buckets = {"up": [0.0, time.monotonic()], "down": [0.0, time.monotonic()]}
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            upstream = socket.create_connection(self.target)
            for source, sink, direction in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(target=self._pump, args=(source, sink, direction), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        try:
            while data := source.recv(256 * 1024):
                self._wait_for(direction, len(data))
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _wait_for(self, direction: str, count: int) -> None:
        """Hold ``count`` bytes until the direction's budget allows them (a shared token bucket)."""
        with self._lock:
            bucket = self._buckets[direction]
            now = time.monotonic()
            bucket[1] = max(bucket[1], now)  # the time at which the direction is free again
            release = bucket[1]
            bucket[1] += count / self.rate
            if direction == "up":
                self.sent_up += count
        delay = release - now
        if delay > 0:
            time.sleep(delay)


def train_for(seconds: float, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> int:
    """Real optimizer steps for ``seconds``; returns how many ran."""
    steps, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        model(batch).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    return steps


def lightning_saver(url: str, endpoint: str) -> Callable[[Any, Any, int], None]:
    """What ``ModelCheckpoint`` with an ``s3://`` dirpath does per save: ``TorchCheckpointIO``
    (``torch.save`` into memory, then one fsspec write), reaching S3 at ``endpoint``."""
    import s3fs
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    io = TorchCheckpointIO()

    def save(model: Any, optimizer: Any, epoch: int) -> None:
        os.environ["AWS_ENDPOINT_URL"] = endpoint  # Lightning passes no storage options to fsspec
        s3fs.S3FileSystem.clear_instance_cache()
        checkpoint = {"epoch": epoch, "state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()]}
        io.save_checkpoint(checkpoint, f"{url}/epoch={epoch}.ckpt")

    return save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=whole_number(), default=3, help="checkpoints per run (default 3)")
    parser.add_argument("--train-seconds", type=whole_number(), default=10, help="training between checkpoints (default 10)")
    parser.add_argument("--rate-mb", type=whole_number(), default=50, help="the proxy's rate per direction, MB/s (default 50)")
    parser.add_argument("--dir", type=existing_dir, default=None, help="parent of the scratch directory (default: the system temp dir)")
    parser.add_argument("--hidden", type=whole_number(), default=2090)
    parser.add_argument("--layers", type=whole_number(), default=8)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    server, endpoint = start_server("bench")
    port = int(endpoint.rsplit(":", 1)[1])
    proxies = {name: ThrottlingProxy(("127.0.0.1", port), args.rate_mb * 1e6) for name in ("tiered", "others")}
    model, optimizer = build_state(args.hidden, args.layers)
    size = nbytes(state_tensors(model, optimizer))
    batch = torch.randn(16, args.hidden)
    root = scratch_dir(args.dir)
    print(machine())
    print(f"state: {size / MiB:.1f} MiB; S3 server {endpoint} (moto, its own process); proxy at {args.rate_mb} MB/s")
    try:
        blocked, sent = measure_blocking(args, root, model, optimizer, batch, endpoint, proxies)
        restores = measure_restores(root, model, optimizer, proxies["tiered"])
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    report(args, blocked, restores, sent, size)


def endpoint_of(proxy: ThrottlingProxy | None, direct: str) -> str:
    return direct if proxy is None else f"http://127.0.0.1:{proxy.port}"


def options_of(proxy: ThrottlingProxy | None) -> dict[str, Any] | None:
    return None if proxy is None else {"client_kwargs": {"endpoint_url": endpoint_of(proxy, "")}}


def measure_blocking(args: Any, root: Path, model: Any, optimizer: Any, batch: torch.Tensor, endpoint: str,
                     proxies: dict[str, ThrottlingProxy]) -> tuple[dict[str, list[float]], int]:
    """Seconds each save blocked training, by configuration; and the bytes the throttled tiered run sent."""
    local = CheckpointManager(root / "local-only", max_checkpoints=3, save_rng=False)
    savers: dict[str, Callable[[Any, Any, int], object]] = {"local only": _manager_saver(local)}
    managers = [local]
    for network in ("direct", "throttled"):
        tiered_proxy, other_proxy = (None, None) if network == "direct" else (proxies["tiered"], proxies["others"])
        tiered = CheckpointManager(f"s3://bench/tiered-{network}", local_dir=root / f"local-{network}", keep_local=2,
                                   max_checkpoints=3, save_rng=False, storage_options=options_of(tiered_proxy))
        synchronous = CheckpointManager(f"s3://bench/sync-{network}", max_checkpoints=3, save_rng=False,
                                        storage_options=options_of(other_proxy))
        managers += [tiered, synchronous]
        savers[f"tiered, {network}"] = _manager_saver(tiered)
        savers[f"s3 sync, {network}"] = _manager_saver(synchronous)
        savers[f"lightning s3, {network}"] = lightning_saver(f"s3://bench/lightning-{network}", endpoint_of(other_proxy, endpoint))
    blocked: dict[str, list[float]] = {name: [] for name in savers}
    for epoch in range(args.checkpoints):
        for name, save in savers.items():
            train_for(args.train_seconds, model, optimizer, batch)
            settle()
            start = time.perf_counter()
            save(model, optimizer, epoch)
            blocked[name].append(time.perf_counter() - start)
    for manager in managers:
        manager.close()  # waits for the uploads, and gives local_dir up for the restores
    return blocked, proxies["tiered"].sent_up


def _manager_saver(manager: CheckpointManager) -> Callable[[Any, Any, int], object]:
    return lambda model, optimizer, epoch: manager.save(model, optimizer, epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})


def measure_restores(root: Path, model: Any, optimizer: Any, proxy: ThrottlingProxy) -> dict[str, list[float]]:
    """Seconds a restarted process's manager takes to restore the latest checkpoint, three times each."""
    times: dict[str, list[float]] = {}
    for network, options in (("direct", None), ("throttled", options_of(proxy))):
        url = f"s3://bench/tiered-{network}"
        for label, local_dir in (("warm local_dir", root / f"local-{network}"), ("empty local_dir", None)):
            name = f"{label}, {network}"
            times[name] = []
            for attempt in range(3):
                where = local_dir if local_dir is not None else root / f"empty-{network}-{attempt}"
                settle()
                start = time.perf_counter()
                manager = CheckpointManager(url, local_dir=where, save_rng=False, storage_options=options)
                manager.restore(model, optimizer, which="latest")
                times[name].append(time.perf_counter() - start)
                manager.close()  # one live manager per local_dir
    return times


def report(args: Any, blocked: dict[str, list[float]], restores: dict[str, list[float]], sent: int, size: int) -> None:
    median = {name: statistics.median(values) for name, values in {**blocked, **restores}.items()}
    print(f"\nblocked per checkpoint (median of {args.checkpoints}, after {args.train_seconds} s of training each):")
    for name, values in blocked.items():
        print(f"  {name:28s} {median[name] * 1e3:9.0f} ms   ({', '.join(f'{v * 1e3:.0f}' for v in values)})")
    print("restore after a restart (median of 3):")
    for name, values in restores.items():
        print(f"  {name:28s} {median[name] * 1e3:9.0f} ms   ({', '.join(f'{v * 1e3:.0f}' for v in values)})")
    print_table(
        "tiered checkpoints (ratios, lower is better)",
        [
            ("tiered blocked / local-only blocked", f"{median['tiered, direct'] / median['local only']:.2f}x", "<= 1.1"),
            (f"tiered / s3 sync blocked at {args.rate_mb} MB/s", f"{median['tiered, throttled'] / median['s3 sync, throttled']:.3f}x", "<= 0.1"),
            (f"tiered / lightning s3 blocked at {args.rate_mb} MB/s",
             f"{median['tiered, throttled'] / median['lightning s3, throttled']:.3f}x", "reported"),
            ("restore, warm / empty local_dir (direct)", f"{median['warm local_dir, direct'] / median['empty local_dir, direct']:.2f}x", "<= 0.3"),
            (f"restore, warm / empty local_dir ({args.rate_mb} MB/s)",
             f"{median['warm local_dir, throttled'] / median['empty local_dir, throttled']:.2f}x", "<= 0.3"),
            ("bytes uploaded by the throttled tiered run / checkpointed", f"{sent / (size * args.checkpoints):.2f}x", "~1.0"),
        ],
    )


if __name__ == "__main__":
    main()
