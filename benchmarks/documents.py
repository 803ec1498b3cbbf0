"""What validating every document costs: import time of the schema library, and parse speed.

    PYTHONPATH=. python benchmarks/documents.py [--rounds 7]

Import time is measured in fresh interpreters (``python -X importtime``, the cumulative time of the
top-level module, median of the rounds) for msgspec (used) and ``pydantic.main`` (pydantic's ``BaseModel``, the alternative), alone
and in an interpreter that has already imported torch, as every user of ckpt_plugin has. Parse
speed compares, in interleaved rounds, plain ``json.loads`` (no checks at all, what 0.1 did) with
:func:`ckpt_plugin._format.documents.parse` (``json.loads``, the depth walk and the msgspec schema)
on a ``metadata.json`` of 2,000 files and a ``state.json`` of a 2,000-parameter Adam state.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch
from _common import interleaved_medians, machine, whole_number

from ckpt_plugin._checkpoint import build_metadata
from ckpt_plugin._format import codec, documents
from ckpt_plugin._storage import FileRecord


def import_ms(module: str, rounds: int, prelude: str = "") -> float:
    times = []
    for _ in range(rounds):
        result = subprocess.run([sys.executable, "-X", "importtime", "-c", f"{prelude}import {module}"],
                                capture_output=True, text=True, check=True)
        line = [row for row in result.stderr.splitlines() if row.rstrip().endswith(f"| {module}")][-1]
        times.append(int(line.split("|")[1]) / 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=whole_number(), default=7)
    args = parser.parse_args()
    print(machine())
    for module in ("msgspec", "pydantic.main"):
        try:
            alone = import_ms(module, args.rounds)
            after_torch = import_ms(module, args.rounds, "import torch, json; ")
            print(f"import {module}: {alone:.1f} ms alone, {after_torch:.1f} ms once torch is imported "
                  f"(median of {args.rounds} fresh interpreters)")
        except (subprocess.CalledProcessError, IndexError):
            print(f"import {module}: not installed")
    files = {f"model-{i:05d}-of-02000.safetensors": FileRecord(123456789, f"xxh3_64:{i:016x}") for i in range(2000)}
    metadata = codec.dumps(build_metadata(epoch=3, step=None, metrics={"loss": 0.5}, metric_for_best="loss", mode="min",
                                          config={"width": 4}, provenance={"timestamp": "now"}, items=["model"], files=files))
    model = torch.nn.ModuleList(torch.nn.Linear(2, 2, bias=False) for _ in range(2000))
    optimizer = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    skeleton, _ = codec.encode(optimizer.state_dict(), "optimizer")
    state = codec.dumps({"items": {"optimizer": {"file": "optimizer.safetensors", "prefix": "", "tree": skeleton}}})
    for name, data in (("metadata.json", metadata), ("state.json", state)):
        medians = interleaved_medians(
            {"plain": lambda: json.loads(data), "checked": lambda: documents.parse(data, name, name)}, rounds=args.rounds * 3
        )
        plain, checked = medians["plain"], medians["checked"]
        print(f"{name} ({len(data) / 1024:.0f} KiB): json.loads {plain * 1e3:.2f} ms, validated parse "
              f"{checked * 1e3:.2f} ms, ratio {checked / plain:.2f}")


if __name__ == "__main__":
    main()
