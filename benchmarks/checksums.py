"""Why xxh3: the throughput of candidate checksums over 256 MiB, against a plain memory copy.

    PYTHONPATH=. python benchmarks/checksums.py [--mib 256] [--rounds 3]

Median of ``--rounds`` rounds after a warm-up. A checksum is computed over every byte a save
writes and a load reads, so it must run well above the speed of copying the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import zlib

import numpy as np
import xxhash

from _common import machine, median_time, whole_number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=whole_number(), default=256)
    parser.add_argument("--rounds", type=whole_number(), default=3)
    args = parser.parse_args()
    data = np.random.default_rng(0).integers(0, 256, size=args.mib * 2**20, dtype=np.uint8)
    view = memoryview(data)
    target = np.empty_like(data)
    candidates = {
        "memory copy (reference)": lambda: np.copyto(target, data),
        "xxh3_64 (used)": lambda: xxhash.xxh3_64(view).digest(),
        "xxh64": lambda: xxhash.xxh64(view).digest(),
        "zlib.crc32": lambda: zlib.crc32(view),
        "sha256": lambda: hashlib.sha256(view).digest(),
        "blake2b": lambda: hashlib.blake2b(view).digest(),
    }
    print(machine())
    print(f"{args.mib} MiB, median of {args.rounds} rounds after a warm-up")
    copy_seconds = None
    for name, run in candidates.items():
        seconds = median_time(run, args.rounds)
        copy_seconds = copy_seconds or seconds
        print(f"  {name:<26} {args.mib / 1024 / seconds:6.2f} GiB/s   time / memory copy {seconds / copy_seconds:5.2f}x")


if __name__ == "__main__":
    main()
