"""Save and restore of a ~400 MiB model + Adam state on S3 (a moto server over HTTP on this machine).

    PYTHONPATH=. python benchmarks/remote.py [--rounds 3] [--dir PARENT]

Every figure is a ratio to the usual way of doing the same with torch, measured in the same run
(interleaved rounds, median after a warm-up round):

- ``CheckpointManager("s3://...").save`` / (``torch.save`` to a local file + s3fs ``put_file``)   target <= 1.0
- ``manager.restore`` (checksums verified) / (s3fs ``get_file`` + ``torch.load(weights_only=True)``
  + ``load_state_dict``)                                                                          target <= 0.8
- extra peak memory of a save, against the documented bound of an upload, ``UPLOAD_MEMORY_BYTES``
  (the parts, ``PART_BYTES * (UPLOAD_CONCURRENCY + 1)``, and the client's chunks of those in flight):
  the rise of the resident set's high-water mark, and the peak of the Python allocations made
  during the save (which also sees memory the allocator reuses, which the resident set does not)

The server is moto's S3 server in a separate process on this machine (its request handling competes
for the same cores as the client); both sides pay for it alike.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from _common import (
    MiB,
    build_state,
    existing_dir,
    interleaved_medians,
    machine,
    nbytes,
    peak_extra_rss,
    peak_python_bytes,
    print_table,
    scratch_dir,
    settle,
    start_server,
    state_tensors,
    whole_number,
)

from ckpt_plugin import CheckpointManager
from ckpt_plugin._storage import fsspec as remote


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=whole_number(), default=3)
    parser.add_argument(
        "--dir", type=existing_dir, default=None, help="parent of the scratch directory (default: the system temp dir)"
    )
    parser.add_argument("--hidden", type=whole_number(), default=2090)
    parser.add_argument("--layers", type=whole_number(), default=8)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    server, endpoint = start_server("bench")
    import s3fs

    fs = s3fs.S3FileSystem()
    model, optimizer = build_state(args.hidden, args.layers)
    tensors = state_tensors(model, optimizer)
    root = scratch_dir(args.dir)
    print(machine())
    print(f"state: {len(tensors)} tensors, {nbytes(tensors) / MiB:.1f} MiB; S3 server {endpoint} (moto, its own process)")

    manager = CheckpointManager("s3://bench/ours", max_checkpoints=2, keep_best=False, save_rng=False)
    local_file = root / "torch.pt"
    counter = iter(range(1_000_000))

    def torch_save_put() -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0}, local_file)
        fs.put_file(str(local_file), "bench/torch/state.pt")

    def ours_save() -> None:
        manager.save(model=model, optimizer=optimizer, epoch=next(counter), metrics={"loss": 0.5})

    def torch_get_load() -> None:
        fs.get_file("bench/torch/state.pt", str(local_file))
        loaded = torch.load(local_file, weights_only=True)
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])

    def ours_restore() -> None:
        manager.restore(model, optimizer, which="latest")

    try:
        saves = interleaved_medians({"torch": torch_save_put, "ours": ours_save}, args.rounds, before=settle)
        loads = interleaved_medians({"torch": torch_get_load, "ours": ours_restore}, args.rounds)
        settle()
        extra_ours = peak_extra_rss(ours_save)
        settle()
        traced_ours = peak_python_bytes(ours_save)
        settle()
        extra_torch = peak_extra_rss(torch_save_put)
    finally:
        server.terminate()
        server.wait(timeout=30)
    bound = remote.UPLOAD_MEMORY_BYTES
    print(
        f"\nmedians of {args.rounds} rounds: torch.save+put_file {saves['torch'] * 1e3:.0f} ms, manager.save "
        f"{saves['ours'] * 1e3:.0f} ms; get_file+torch.load+load_state_dict {loads['torch'] * 1e3:.0f} ms, "
        f"manager.restore {loads['ours'] * 1e3:.0f} ms"
    )
    print_table(
        "object storage (ratios, lower is better)",
        [
            ("save / (torch.save + s3fs put_file)", f"{saves['ours'] / saves['torch']:.2f}x", "<= 1.0"),
            ("restore (verified) / (s3fs get_file + torch.load + load_state_dict)", f"{loads['ours'] / loads['torch']:.2f}x", "<= 0.8"),
            ("extra peak RSS during save", f"{extra_ours / MiB:.1f} MiB", f"<= {bound / MiB:.0f} MiB (upload)"),
            ("  peak of the Python allocations of a save", f"{traced_ours / MiB:.1f} MiB", "reported"),
            ("extra peak RSS of torch.save + put_file", f"{extra_torch / MiB:.1f} MiB", "reported"),
        ],
    )


if __name__ == "__main__":
    main()
