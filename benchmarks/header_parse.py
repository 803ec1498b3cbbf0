"""What hostile but well-formed inputs cost to parse: safetensors headers and ``sharding.json``.

    PYTHONPATH=. python benchmarks/header_parse.py [--case NAME ...]

Each case is built on disk, then read in a fresh interpreter through the package's real read path
(:func:`ckpt_plugin._io.files.read_header` for a safetensors file, ``read_sharding`` for a sharding
document). The child reports the wall time of the read and its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), and its RSS before the read (the interpreter with
torch imported), so that the difference is what parsing cost. A read that is refused with a
``CheckpointError`` is reported as refused, with the time it took to refuse.

Cases:

- ``empty-1m``: a safetensors header of 1,000,000 empty tensors (about 59 MB);
- ``empty-cap``: a header of empty tensors filling the header cap the reader accepts;
- ``chunks-8000``: a ``sharding.json`` with one tensor of 8,000 one-element chunks (0.6 MB).
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch  # the baseline every user has
from ckpt_plugin.errors import CheckpointError
from ckpt_plugin._io.files import read_header
from ckpt_plugin._distributed import LocalShardFiles, read_sharding

kind, path = sys.argv[1], Path(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
outcome = "parsed"
try:
    if kind == "header":
        _, specs, _ = read_header(str(path), None)
        outcome = f"parsed {len(specs)} tensors"
    else:
        sharding = read_sharding(LocalShardFiles(path.parent))
        outcome = f"parsed {sum(len(e.chunks) for e in sharding.tensors.values())} chunks"
except CheckpointError as exc:
    outcome = f"refused ({type(exc).__name__}: {str(exc)[:120]})"
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "before_kib": before, "peak_kib": peak, "outcome": outcome}))
"""


def empty_tensor_header(path: Path, *, count: int | None = None, header_bytes: int | None = None) -> int:
    """Write a safetensors file whose header names ``count`` empty tensors, or as many as fit in
    ``header_bytes``; return how many it names."""
    entry = '"t{:09d}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    size = len(entry.format(0)) + 1
    if count is None:
        assert header_bytes is not None
        count = (header_bytes - 2) // size
    body = "{" + ",".join(entry.format(index) for index in range(count)) + "}"
    encoded = body.encode()
    encoded += b" " * (-(8 + len(encoded)) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded)
    return count


def many_chunks_sharding(directory: Path, chunks: int) -> None:
    """A sharding document with one tensor of ``chunks`` one-element chunks, checksummed."""
    from ckpt_plugin._distributed.layout import CHECKSUM_KEY, FORMAT_NAME, FORMAT_VERSION, _checksum

    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "world_size": 1,
        "tensors": {
            "model.w": {
                "dtype": "U8",
                "shape": [chunks],
                "chunks": [{"offsets": [i], "sizes": [1], "file": "model-r0-of-1.safetensors", "key": f"model.w@{i}"}
                           for i in range(chunks)],
            }
        },
        "objects": {},
        "paths": {"model.w": ["model", "w"]},
        "files": {"model-r0-of-1.safetensors": {"size": 1 << 30, "checksum": "xxh3_64:0"}},
    }
    document[CHECKSUM_KEY] = _checksum(document)
    (directory / "sharding.json").write_text(json.dumps(document))


def run_child(kind: str, path: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        return {"outcome": f"crashed: {result.stderr.strip().splitlines()[-1:]}", "seconds": float("nan"),
                "before_kib": 0, "peak_kib": 0}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=["empty-1m", "empty-cap", "chunks-8000"])
    args = parser.parse_args()
    cases = args.case or ["empty-1m", "empty-cap", "chunks-8000"]
    from ckpt_plugin._format import tensorformat

    print(machine())
    with tempfile.TemporaryDirectory(prefix="ckpt-header-") as scratch:
        root = Path(scratch)
        for case in cases:
            if case == "chunks-8000":
                many_chunks_sharding(root, 8000)
                kind, path, what = "sharding", root / "sharding.json", "8000 one-element chunks"
            else:
                path = root / f"{case}.safetensors"
                if case == "empty-1m":
                    count = empty_tensor_header(path, count=1_000_000)
                else:
                    count = empty_tensor_header(path, header_bytes=tensorformat.HEADER_LIMIT)
                kind, what = "header", f"{count} empty tensors"
            size = path.stat().st_size
            report = run_child(kind, path)
            print(
                f"{case:12s} {what:26s} {size / 1e6:7.1f} MB  {report['seconds']:6.2f} s  "
                f"peak RSS {report['peak_kib'] / 1024:7.0f} MiB (+{(report['peak_kib'] - report['before_kib']) / 1024:.0f} "
                f"over the interpreter)  {report['outcome']}",
                flush=True,
            )
            path.unlink()


if __name__ == "__main__":
    main()
