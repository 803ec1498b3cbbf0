"""Ending a test rank of a distributed job once its work is done.

Torch keeps a process group, and its gloo threads, alive after ``destroy_process_group`` once
functional collectives have run on it (FSDP2's ``full_tensor`` and ``get_state_dict`` gathers,
DTensor redistribution). A worker of such a group may still hold the tensors of the rank's last
gather when the rank exits, and frees them later, which needs the GIL. CPython ends a thread that
asks for the GIL while the interpreter finalizes, in an unwind that aborts the process
("terminate called without an active exception"). Measured here: a rank ending right after
FSDP2's ``get_state_dict(full_state_dict=True)``, its gloo threads given the idle scheduling
class and the finalization slowed by one second, aborts in 2 of 4 runs.

So the test ranks end as a normal exit does, without the finalization.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def end_without_finalizing() -> None:
    """End this process now with status 0: wait for its non-daemon threads and run the exit hooks
    (``threading``'s, where the library finishes its saves in flight, and ``atexit``'s, where it
    releases its gloo groups and finishes its background deletions), then leave without
    finalizing the interpreter."""
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)
