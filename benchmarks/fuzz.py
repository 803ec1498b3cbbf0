"""Fuzz every reader of ckpt_plugin with as many structured mutations of a real run as asked.

    PYTHONPATH=. python benchmarks/fuzz.py --cases 100000 [--seed 0]

Each case copies a real run (two checkpoints, a validated version, production, the audit log and
the listing cache), mutates one file (JSON values replaced by other types and codec markers, keys
deleted, deep nesting, numbers no float holds such as 10**400 and 1e999, safetensors header
fields, truncation, flipped bytes; or a link to /dev/zero or out of the run, a FIFO or a directory
in its place), records every checksum again so that the parsers are reached, and runs every reader
(see ``tests/fuzzing.py``).
A case passes when every reader returns plain data or raises ``CheckpointError`` and nothing
outside the run's directories changed. Failures are printed with the mutation that caused them;
the exit status is 1 if there was any.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fuzzing  # noqa: E402

from _common import machine, whole_number  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=whole_number(), default=1000)
    parser.add_argument("--seed", type=whole_number(0), default=0)
    parser.add_argument("--report-every", type=whole_number(), default=1000)
    args = parser.parse_args()
    print(machine())
    root = Path(tempfile.mkdtemp(prefix="ckpt-fuzz-"))
    fuzzing.build_golden(root / "golden")
    counts: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    started = time.perf_counter()

    @seed(args.seed)
    @settings(max_examples=args.cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(mutation=fuzzing.mutations)
    def case(mutation: fuzzing.Mutation) -> None:
        problems = fuzzing.run_case(root / "golden", root / "case", mutation)
        counts[f"{mutation.kind} {mutation.target}"] += 1
        counts["total"] += 1
        if problems:
            failures.append(f"{mutation.describe()}: {problems}")
            print("FAILED", failures[-1], flush=True)
        if counts["total"] % args.report_every == 0:
            print(f"{counts['total']} cases, {len(failures)} failures, {time.perf_counter() - started:.0f} s", flush=True)

    case()
    seconds = time.perf_counter() - started
    print(f"ran {counts['total']} cases in {seconds:.0f} s ({seconds / max(counts['total'], 1) * 1000:.0f} ms per case): "
          f"{len(failures)} failures")
    for key, count in sorted(counts.items()):
        if key != "total":
            print(f"  {count:6d}  {key}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
