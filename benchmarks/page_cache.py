"""Why a save writes its tensor files with direct I/O: what page-cache writes cost on this host.

    python benchmarks/page_cache.py [--rounds 5] [--dir PARENT] [--mib 400]

A buffered write copies its bytes into newly allocated page-cache pages. In a virtual machine
whose host takes back the guest's free memory (virtio-balloon free page reporting, which reports
memory that has stayed free for about two seconds) allocating those pages makes the host fault
them in again, and the copy, not the disk, sets the time. This script frees ``--mib`` MiB of page
cache (deletes a file it wrote), waits 0, 0.5, 3 or 6 seconds, then writes and fsyncs the same
amount again, through the page cache and with ``O_DIRECT``, in interleaved rounds. On a host that
reclaims free memory the buffered write slows down several-fold once the wait passes ~2 s; the
direct write does not. Each line is the median (min-max) of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import time

from _common import MiB, existing_dir, machine, scratch_dir, spread, whole_number

PIECE = 8 * MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=whole_number(), default=5)
    parser.add_argument(
        "--dir", type=existing_dir, default=None, help="parent of the scratch directory (default: the system temp dir)"
    )
    parser.add_argument("--mib", type=whole_number(), default=400, help="MiB written per measurement")
    args = parser.parse_args()
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        parser.error("this system has no O_DIRECT")
    root = scratch_dir(args.dir)
    print(machine())
    source = mmap.mmap(-1, PIECE)  # page-aligned, as direct I/O needs
    source.write(os.urandom(PIECE))
    pieces = -(-args.mib * MiB // PIECE)
    path = root / "data.bin"

    def write(flags: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
        try:
            for _ in range(pieces):
                os.write(fd, source)
            os.fsync(fd)
        finally:
            os.close(fd)

    write(0)
    times: dict[tuple[str, float], list[float]] = {}
    for _ in range(args.rounds):
        for idle in (0.0, 3.0, 0.5, 6.0):
            for name, flags in (("page cache", 0), ("direct I/O", direct)):
                write(0)  # the memory about to be freed was in use just now
                os.unlink(path)  # frees its page cache
                os.sync()
                time.sleep(idle)
                start = time.perf_counter()
                write(flags)
                times.setdefault((name, idle), []).append(time.perf_counter() - start)
                os.unlink(path)
    print(f"\nwrite + fsync of {pieces * PIECE // MiB} MiB, {pieces * PIECE // MiB} MiB of page cache freed "
          f"just before (median (min-max) of {args.rounds} rounds):")
    for (name, idle), values in sorted(times.items(), key=lambda item: (item[0][0], item[0][1])):
        print(f"  {name:10s}  after {idle:3.1f} s idle  {spread(values):>22}")
    print(f"load average at the end: {', '.join(f'{value:.1f}' for value in os.getloadavg())}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
