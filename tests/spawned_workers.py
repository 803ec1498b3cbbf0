"""Run the functions of :mod:`crash_workers` in fresh interpreters, one child at a time.

Forking a process that has run torch work can deadlock the child: the OpenMP pool's locks are
copied in whatever state the pool's threads held them. So no test forks. Each child is a new
``python crash_workers.py <call> <json args>`` process; it prints ``ready`` once its imports are
done, may print lines of its own (``saved 3``), and prints ``result <json>`` last when its
function returns. Every wait on it has a timeout, so a stuck child fails the test instead of
hanging the run.
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
WORKER_SCRIPT = TESTS_DIR / "crash_workers.py"


class SpawnedWorkers:
    """Starts :mod:`crash_workers` functions in new interpreters and reads what they print."""

    def __init__(self, script: Path = WORKER_SCRIPT) -> None:
        self.script = script
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)])}
        self.process: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str] = queue.Queue()

    def _pump(self, process: subprocess.Popen[str]) -> None:
        result = "null"
        for line in process.stdout:
            line = line.rstrip("\n")
            if line.startswith("result "):
                result = line.split(" ", 1)[1]
            else:
                self.lines.put(line)
        returncode = process.wait()
        # Reported as a wait status, as os.waitpid gives it: the signal number, or the exit code << 8.
        status = -returncode if returncode < 0 else returncode << 8
        self.lines.put(f"exit {status} {result}")

    def next_line(self, timeout: float = 120.0) -> str:
        """The next line the child printed, or its ``exit`` line; fails after ``timeout`` seconds."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no answer from the child within {timeout} s: it hangs") from None

    def launch(self, call: str, *args: Any) -> int:
        """Start ``crash_workers.<call>(*args)`` in a new interpreter and return its pid at once."""
        self.process = subprocess.Popen([sys.executable, "-u", str(self.script), call, json.dumps(list(args))],
                                        stdout=subprocess.PIPE, text=True, env=self.env, start_new_session=True)
        threading.Thread(target=self._pump, args=(self.process,), daemon=True).start()
        return self.process.pid

    def start(self, call: str, *args: Any) -> int:
        """:meth:`launch`, then wait until the child's imports are done."""
        pid = self.launch(call, *args)
        line = self.next_line()
        assert line == "ready", f"the child printed before it started: {line}"
        return pid

    @staticmethod
    def parse_exit(line: str) -> tuple[int, Any] | None:
        """``(wait status, result)`` if ``line`` reports that the child ended, else ``None``."""
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
        """Kill a child still running (with its process group), and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
