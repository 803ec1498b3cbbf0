"""A fork server for tests that need many short-lived child processes.

Forking a process that has run torch work deadlocks the child: the OpenMP pool's locks are copied
in whatever state the pool's threads held them. The pytest process has run torch, so it never
forks. Instead it starts this script as a fresh interpreter, which imports torch, ckpt_plugin and
:mod:`crash_workers` but runs no torch work itself. Children forked from it start in milliseconds
and build every tensor of their own.

Protocol, one JSON line per request on stdin::

    {"call": "<function of crash_workers>", "args": [...]}

The server answers ``pid <pid>`` once the child runs, then ``exit <status> <result>`` when it
ends, where ``<result>`` is the JSON the function returned (``null`` if it returned nothing or
died). Children may print lines of their own on stdout in between. :class:`ForkServer` is the
client; every wait on it has a timeout, so a stuck child fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


class ForkServer:
    """The client: starts the server in a fresh interpreter and runs worker functions in its children."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)])}
        self.process = subprocess.Popen([sys.executable, "-u", str(Path(__file__))], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float = 60.0) -> str:
        """The next line the server or a child printed; fails after ``timeout`` seconds."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no answer from the fork server within {timeout} s: a child hangs") from None
        if line is None:
            raise AssertionError(f"the fork server exited with {self.process.poll()}")
        return line

    def start(self, call: str, *args: Any) -> int:
        """Run ``crash_workers.<call>(*args)`` in a new child; return its pid once it runs."""
        self.process.stdin.write(json.dumps({"call": call, "args": list(args)}) + "\n")
        self.process.stdin.flush()
        line = self.next_line()
        assert line.startswith("pid "), f"the child printed before it started: {line}"
        return int(line.split()[1])

    @staticmethod
    def parse_exit(line: str) -> tuple[int, Any] | None:
        """``(status, result)`` if ``line`` reports that a child ended, else ``None``."""
        if not line.startswith("exit "):
            return None
        _, status, result = line.split(" ", 2)
        return int(status), json.loads(result)

    def wait(self, timeout: float = 120.0) -> tuple[int, Any]:
        """Wait for the running child to end, ignoring what it printed; ``(wait status, result)``."""
        while True:
            ended = self.parse_exit(self.next_line(timeout))
            if ended is not None:
                return ended

    def run(self, call: str, *args: Any, timeout: float = 120.0) -> tuple[int, Any]:
        """Start a child and wait for it."""
        self.start(call, *args)
        return self.wait(timeout)

    def close(self) -> None:
        """Stop the server; a server or child still running after a few seconds is killed, with its group."""
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - only when a child is stuck
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def _serve() -> None:  # pragma: no cover - runs in the server process
    import crash_workers  # imported once, before any fork; it imports torch but runs no torch work

    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            result = None
            try:
                result = getattr(crash_workers, request["call"])(*request["args"])
            finally:
                os.write(write_end, json.dumps(result).encode())
                os._exit(0)
        os.close(write_end)
        os.write(1, f"pid {pid}\n".encode())
        with os.fdopen(read_end, "rb") as reader:
            reported = reader.read()
        _, status = os.waitpid(pid, 0)
        os.write(1, f"exit {status} {reported.decode() or 'null'}\n".encode())


if __name__ == "__main__":
    _serve()
