"""What signing, and the save log, add to a save on S3 (a moto server over HTTP on this machine).

    PYTHONPATH=. python benchmarks/remote_signing.py [--rounds 5] [--hidden 1045] [--layers 8]

The state is ``--layers`` ``nn.Linear(hidden, hidden)`` layers and Adam after one step (about
100 MiB with the defaults). Figures are ratios measured in the same run, in interleaved rounds
(median after a warm-up round):

- a save with ``signing_key`` / the same save without: signing streams every object of the new
  prefix back through the backend (SHA-256), signs, and uploads ``model.sig`` before the commit;
- ``verify_prefix`` (what ``load*(verify_with=...)`` adds) / an unsigned ``load_latest``;
- one save-log object (``.saves/...json``, written after every remote save) / an unsigned save;
- the extra peak memory of a signed save and of an unsigned one (resident-set high-water mark).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

from _common import (
    MiB,
    build_state,
    interleaved_medians,
    machine,
    nbytes,
    peak_extra_rss,
    print_table,
    settle,
    start_server,
    state_tensors,
    whole_number,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ckpt_plugin import CheckpointManager
from ckpt_plugin import _savelog as savelog
from ckpt_plugin.signing import verify_prefix


def key_pair(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / "key.pem", directory / "key.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=whole_number(), default=5)
    parser.add_argument("--hidden", type=whole_number(), default=1045)
    parser.add_argument("--layers", type=whole_number(), default=8)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    server, endpoint = start_server("bench")
    model, optimizer = build_state(args.hidden, args.layers)
    tensors = state_tensors(model, optimizer)
    print(machine())
    print(f"state: {len(tensors)} tensors, {nbytes(tensors) / MiB:.1f} MiB; S3 server {endpoint} (moto, its own process)")
    counter = iter(range(1_000_000))
    with tempfile.TemporaryDirectory() as scratch:
        private, public = key_pair(Path(scratch))
        plain = CheckpointManager("s3://bench/plain", max_checkpoints=2, save_rng=False)
        signed = CheckpointManager("s3://bench/signed", max_checkpoints=2, save_rng=False, signing_key=private)

        def save(manager: CheckpointManager) -> None:
            manager.save(model=model, optimizer=optimizer, epoch=next(counter), metrics={"loss": 0.5})

        def log_entry() -> None:
            savelog.append(plain.checkpoint_dir, info, backend=info.backend)

        try:
            saves = interleaved_medians(
                {"unsigned": lambda: save(plain), "signed": lambda: save(signed)}, args.rounds, before=settle
            )
            info = signed.latest()
            assert info is not None
            loads = interleaved_medians(
                {"load": lambda: plain.load_latest(), "verify": lambda: verify_prefix(info.backend, info.location, public)},
                args.rounds,
            )
            start = time.perf_counter()
            for _ in range(args.rounds):
                log_entry()
            log_seconds = (time.perf_counter() - start) / args.rounds
            settle()
            extra_signed = peak_extra_rss(lambda: save(signed))
            settle()
            extra_plain = peak_extra_rss(lambda: save(plain))
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(
        f"\nmedians of {args.rounds} rounds: unsigned save {saves['unsigned'] * 1e3:.0f} ms, signed save "
        f"{saves['signed'] * 1e3:.0f} ms; unsigned load_latest {loads['load'] * 1e3:.0f} ms, verify_prefix "
        f"{loads['verify'] * 1e3:.0f} ms; one save-log object {log_seconds * 1e3:.1f} ms (mean)"
    )
    print_table(
        "signing and the save log on object storage (ratios, lower is better)",
        [
            ("signed save / unsigned save", f"{saves['signed'] / saves['unsigned']:.2f}x", "reported"),
            ("verify_prefix / unsigned load_latest", f"{loads['verify'] / loads['load']:.2f}x", "reported"),
            ("one save-log object / unsigned save", f"{log_seconds / saves['unsigned']:.3f}x", "reported"),
            ("extra peak RSS, signed save", f"{extra_signed / MiB:.1f} MiB", "reported"),
            ("extra peak RSS, unsigned save", f"{extra_plain / MiB:.1f} MiB", "reported"),
        ],
    )


if __name__ == "__main__":
    main()
