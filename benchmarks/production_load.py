"""What serving from private memory costs: ``load_production`` (reads the weights into memory it
owns, verifying them in the same pass) against mapping the file as 0.1 did.

    PYTHONPATH=. python benchmarks/production_load.py [--rounds 5]

Both load the ~133 MiB model of ``_common.build_state`` with verification, in interleaved rounds
from a warm page cache. The mapped load returns as soon as the file is hashed and its pages are
mapped; its tensors share pages with a file that may be edited or truncated later. "then touch"
adds reading every weight once, which a server does on its first request.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import MiB, build_state, interleaved_medians, machine, whole_number
from ckpt_plugin import ArtifactRegistry, CheckpointManager
from ckpt_plugin.registry import PRODUCTION_MODEL_FILE
from ckpt_plugin._io.files import open_tensor_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=whole_number(), default=5)
    args = parser.parse_args()
    print(machine())
    model, optimizer = build_state()
    root = Path(tempfile.mkdtemp(prefix="ckpt-prod-"))
    CheckpointManager(root / "checkpoints").save(model, epoch=0, metrics={"loss": 1.0})
    registry = ArtifactRegistry(root / "checkpoints")
    registry.validate(0, "1.0.0")
    registry.promote("1.0.0")
    record = registry.production()["files"][PRODUCTION_MODEL_FILE]
    from ckpt_plugin._storage import FileRecord

    path, file = registry.production_dir / PRODUCTION_MODEL_FILE, FileRecord(record["size"], record["checksum"])

    def touch(tensors: dict) -> float:
        return sum(float(t.sum()) for t in tensors.values())

    medians = interleaved_medians(
        {
            "private (load_production)": lambda: registry.load_production(),
            "mapped (0.1)": lambda: open_tensor_file(path, file),
            "private, then touch": lambda: touch(registry.load_production()["model"]),
            "mapped, then touch": lambda: touch(open_tensor_file(path, file)),
        },
        rounds=args.rounds,
    )
    print(f"model {file.size / MiB:.0f} MiB, median of {args.rounds} interleaved rounds")
    base = medians["mapped (0.1)"]
    for name, seconds in medians.items():
        print(f"  {name:28s} {seconds * 1e3:8.1f} ms  ({seconds / base:.2f}x mapped)")


if __name__ == "__main__":
    main()
