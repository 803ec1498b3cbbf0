"""A TCP proxy that resets and stalls connections on purpose, to put a real network fault between
a client (s3fs, botocore) and a server (moto's S3 server).

Every chunk of bytes it forwards, in either direction, is first put to chance: with
``reset_probability`` both sockets are closed with a TCP reset (``SO_LINGER`` zero), with
``stall_probability`` the chunk waits ``stall_seconds`` first. The probabilities can be changed
while it runs (for example ``0`` to let a check through), and ``resets``/``stalls``/``connections``
count what it did.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from typing import Any

_CHUNK = 64 * 1024


class FaultyProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port`` with injected faults."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        reset_probability: float = 0.0,
        stall_probability: float = 0.0,
        stall_seconds: float = 0.5,
        seed: int | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self.reset_probability = reset_probability
        self.stall_probability = stall_probability
        self.stall_seconds = stall_seconds
        self.connections = self.resets = self.stalls = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name="faulty-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        """Connections the proxy still holds: both sockets of each count once."""
        with self._lock:
            return len(self._open) // 2

    def start(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting and reset every open connection."""
        self._closed.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            open_now = list(self._open)
        for each in open_now:
            _reset(each)

    def __enter__(self) -> "FaultyProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self.connections += 1
                self._open.update((client, server))
            ended: list[int] = []  # the directions that reached their end of stream
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink, ended), daemon=True).start()

    def _fate(self) -> str:
        with self._lock:
            draw = self._random.random()
            if draw < self.reset_probability:
                self.resets += 1
                return "reset"
            if draw < self.reset_probability + self.stall_probability:
                self.stalls += 1
                return "stall"
        return "pass"

    def _pump(self, source: socket.socket, sink: socket.socket, ended: list[int]) -> None:
        try:
            source.settimeout(None)
            while not self._closed.is_set():
                data = source.recv(_CHUNK)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    with self._lock:
                        ended.append(1)
                        if len(ended) < 2:
                            return  # the other direction still runs
                        self._open.difference_update((source, sink))
                    source.close()  # both directions ended: the connection is done
                    sink.close()
                    return
                fate = self._fate()
                if fate == "reset":
                    break
                if fate == "stall":
                    time.sleep(self.stall_seconds)
                sink.sendall(data)
            else:
                return
        except OSError:
            pass
        for each in (source, sink):
            _reset(each)
        with self._lock:
            self._open.difference_update((source, sink))


def _reset(connection: socket.socket) -> None:
    """Close ``connection`` with a TCP reset rather than an orderly FIN.

    The other pump of the connection may be blocked in ``recv`` on this very socket, and while it
    is, ``close`` only drops the descriptor: the socket stays open and the peer learns nothing (a
    client would then wait for an answer forever). Shutting the reading side first wakes that
    ``recv``, so the close takes effect at once, and with ``SO_LINGER`` zero it sends the reset.
    """
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        connection.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    try:
        connection.close()
    except OSError:
        pass
