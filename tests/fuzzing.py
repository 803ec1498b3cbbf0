"""A fuzzing harness over every reader of ckpt_plugin (used by the tests and ``benchmarks/fuzz.py``).

It starts from a real run: two checkpoints (model, Adam, ``ReduceLROnPlateau``, RNG states, an
``extra`` tree using every codec marker, and a shuffled data loader's position inside an epoch, as
the Hugging Face callback keeps it), a validated version, the production model, the audit log
and the listing cache. Each case copies that tree, applies one structured mutation to one file, and
re-records every checksum that covers the file (file records, ``metadata_checksum``, the self
checksums of the records), as an attacker who can write the directory would, so that the parsers
themselves are reached; or it puts a special file or link in the file's place (a link to
``/dev/zero`` or out of the run, a FIFO, a directory). Then every reader runs: listing, ``load_latest``, ``load`` with and without
verification, ``restore``, what ``ckpt show`` says of the data loader's position, that position
handed back to a loader, and the registry's versions, validation records, loads, production and
history, the save log and the history ``ckpt plot`` draws. The run also holds sharded checkpoints, saved by two FSDP2 ranks (spawned once, when the
run is built), read back consolidated in one process; a mutated shard file is re-recorded in
``sharding.json`` and that in ``metadata.json``, as an attacker would.

A case passes when every reader returns data or raises :class:`CheckpointError`, nothing outside
the case's directory changed, and every value that came back is plain data.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from torch import nn

from ckpt_plugin import ArtifactRegistry, CheckpointError, CheckpointManager
from ckpt_plugin import _data_state as data_state
from ckpt_plugin import _listing as listing
from ckpt_plugin import _savelog as savelog
from ckpt_plugin._checkpoint import METADATA_CHECKSUM_KEY, METADATA_FILE, SHARDING_FILE, metadata_checksum
from ckpt_plugin._distributed.layout import CHECKSUM_KEY as SHARDING_CHECKSUM_KEY
from ckpt_plugin._distributed.layout import _checksum as sharding_checksum
from ckpt_plugin._format import codec, documents
from ckpt_plugin.plot import run_history
from ckpt_plugin.summary import data_loader_state
from ckpt_plugin._storage import checksum_bytes

TARGETS = [
    "checkpoints/epoch_1/metadata.json",
    "checkpoints/epoch_1/state.json",
    "checkpoints/epoch_1/model.safetensors",
    "checkpoints/epoch_1/optimizer.safetensors",
    "checkpoints/epoch_1/state.safetensors",
    "checkpoints/.listing.json",
    "validated/v1.0.0/validation.json",
    "validated/v1.0.0/metadata.json",
    "validated/v1.0.0/state.json",
    "validated/v1.0.0/model.safetensors",
    "validated/history.jsonl",
    "production/model.json",
    "production/model.safetensors",
    "checkpoints/.saves.jsonl",
    "sharded/epoch_1/sharding.json",
    "sharded/epoch_1/metadata.json",
    "sharded/epoch_1/model-r1-of-2.safetensors",
]
KINDS = ["replace", "delete", "deep", "truncate", "flip", "overflow"]
OVERFLOW_TEXTS = [
    str(10**400), str(-(10**400)), "1e999", "-1e999", "1" + "0" * 5000, "[" * 3000 + "0" + "]" * 3000,
]
"""Numbers no float holds, as JSON text: what an ``overflow`` mutation puts in place of a number
(10**400 itself, so that checksums can be recomputed over it; the others spliced in as text)."""
SPECIAL_KINDS = ["link_to_dev_zero", "link_outside", "fifo", "directory"]
"""Special files and links put in place of the target: endless bytes, a copy of the target outside
the run (so only the link is wrong; reading it through the link is a failure), a FIFO that never
delivers a byte, a directory."""
KINDS += SPECIAL_KINDS
HOSTILE_STRINGS = [
    "../../outside/canary.bin", "../outside", "/etc/passwd", "..", ".", "a/b", "model.safetensors",
    "optimizer.safetensors", "state.json", "nan", "inf", "F32", "V2000000000", "object", "save", "load",
    "cuda:99999999999999", "cpu", "float16", "__builtins__", "os", "1" * 300 + ".0.0", "",
]
ALLOWED_LEAVES = (
    str, bytes, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, pathlib.PurePath,
    np.generic, np.ndarray,
)

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(HOSTILE_STRINGS),
)
_marker_keys = st.sampled_from(sorted(codec.MARKERS))
json_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=6), _marker_keys), children, max_size=3),
        st.builds(lambda key, value: {key: value}, _marker_keys, children),
        st.builds(lambda value: {codec.NUMPY: value[0], "value": value[1]}, st.tuples(children, children)),
    ),
    max_leaves=6,
)


@dataclass(frozen=True)
class Mutation:
    """One change to one file: which file, what kind, where (indexes wrap around) and with what."""

    target: str
    kind: str
    where: int
    value: Any
    depth: int
    byte: int
    within: str = ""
    """Aim a structured edit at the JSON paths (keys joined by ``/``) that start with this."""

    def describe(self) -> str:
        aim = f" within {self.within}" if self.within else ""
        return f"{self.kind} in {self.target}{aim} at {self.where} (value {self.value!r:.80}, depth {self.depth}, byte {self.byte})"


DATA_STATE_PATHS = {
    "checkpoints/epoch_1/state.json": f"items/extra/tree/{data_state.DATA_STATE_KEY}",
    "checkpoints/epoch_1/state.safetensors": f"extra/{data_state.DATA_STATE_KEY}",  # its tensors' header entries
}
"""Where the data loader's position lives in the files of a checkpoint, for aimed mutations."""
_fields = {
    "where": st.integers(min_value=0, max_value=10**6),
    "value": json_values,
    "depth": st.sampled_from([2, 50, 99, 101, 127, 129, 1000, 5000]),
    "byte": st.integers(min_value=1, max_value=255),
}
data_state_mutations = st.sampled_from(sorted(DATA_STATE_PATHS)).flatmap(
    lambda target: st.builds(Mutation, target=st.just(target), kind=st.sampled_from(KINDS), within=st.just(DATA_STATE_PATHS[target]), **_fields)
)
mutations = st.one_of(
    st.builds(Mutation, target=st.sampled_from(TARGETS), kind=st.sampled_from(KINDS), **_fields),
    data_state_mutations,
)


# ---------------------------------------------------------------------- the starting run


def build_golden(root: Path) -> None:
    """A real run under ``root``: two checkpoints, one validated version, production, history."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    manager = CheckpointManager(root / "checkpoints", max_checkpoints=None)
    extra = {
        "tuple": (1, 2.5, "x"), "set": {1, 2}, "int_keys": {1: "a"}, "dtype": torch.float16,
        "device": torch.device("cpu"), "bytes": b"\x00\x01", "path": pathlib.Path("a/b"), "nan": math.nan,
        "numpy": np.float32(1.5), "array": np.arange(3), "nested": [{"a": [1, {"b": None}]}],
        data_state.DATA_STATE_KEY: loader_position(),
    }
    for epoch in range(2):
        model(torch.randn(2, 3)).sum().backward()
        optimizer.step()
        scheduler.step(1.0 - epoch / 10)
        manager.save(model, optimizer, epoch=epoch, metrics={"loss": 1.0 - epoch / 10, "acc": math.nan},
                     scheduler=scheduler, extra=extra, config={"width": 4, "layers": (1, 2)})
    registry = ArtifactRegistry(root / "checkpoints")
    registry.validate(1, "1.0.0")
    registry.promote("1.0.0")
    from sharded_workers import launch

    launch("fuzz_golden", 2, root)  # sharded/epoch_0, sharded/epoch_1
    for leftover in root.glob(".rendezvous-*"):
        leftover.unlink()
    (root / "outside").mkdir()
    (root / "outside" / "canary.bin").write_bytes(b"canary" * 10)
    shutil.copy(root / "checkpoints" / "epoch_0" / "model.safetensors", root / "outside" / "model.safetensors")


def loader_position() -> dict[str, Any]:
    """A shuffled ``StatefulDataLoader``'s position three batches into an epoch (its sampler's
    generator is a tensor in it), as the Hugging Face callback saves it; a plain counter without torchdata."""
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        return {"format": data_state.FORMAT_VERSION, "world_size": 1, "state": {"_num_yielded": 3}}
    loader = StatefulDataLoader(range(24), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    return data_state.capture(loader, world_size=1)


class TakesState:
    """A loader that takes back whatever position it is handed, to show what came back."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Any) -> None:
        self.state = state


def new_objects() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)


def write_listing_cache(checkpoints: Path) -> None:
    """The listing cache of the copied tree (identities change with every copy)."""
    entries = {}
    for info in CheckpointManager(checkpoints, max_checkpoints=None).checkpoints():
        key = listing.identity(info.path / METADATA_FILE)
        if key is not None:
            entries[info.name] = (key, listing.summary(info))
    listing.save(checkpoints, entries)


# ---------------------------------------------------------------------- mutations


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, prefix + (index,))
    return found


_DEEP = "\x00deep\x00"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mutate_json(document: Any, mutation: Mutation) -> tuple[Any, str | None]:
    """Apply ``mutation`` to a parsed document; returns it, and a text to splice in for the
    placeholder (deep nesting, or a number no float holds)."""
    paths = _paths(document)
    if mutation.within:
        paths = [path for path in paths if "/".join(map(str, path)).startswith(mutation.within)] or paths
    if mutation.kind == "overflow":  # aim at the numbers of the document, where there are any
        paths = [path for path in paths if _is_number(_at(document, path))] or paths
    path = paths[mutation.where % len(paths)]
    splice = None
    if mutation.kind == "deep":
        replacement: Any = _DEEP
        splice = _deep(mutation.depth)
    elif mutation.kind == "overflow":
        text = OVERFLOW_TEXTS[mutation.byte % len(OVERFLOW_TEXTS)]
        replacement, splice = (int(text), None) if text.lstrip("-").isdigit() and len(text) < 4000 else (_DEEP, text)
    else:
        replacement = mutation.value
    if not path:
        return (replacement if mutation.kind != "delete" else {}), splice
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if mutation.kind == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif mutation.kind == "delete":
        parent.pop(path[-1])
    else:
        parent[path[-1]] = replacement
    return document, splice


def _at(document: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        document = document[key]
    return document


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _dumps(document: Any, deep: str | None) -> bytes:
    text = json.dumps(document, ensure_ascii=True)
    if deep is not None:
        text = text.replace(json.dumps(_DEEP), deep)
    return text.encode()


def plant_special(path: Path, kind: str, outside: Path) -> None:
    """Put the special file or link ``kind`` (one of :data:`SPECIAL_KINDS`) in place of ``path``,
    a link to ``outside`` for ``link_outside``."""
    path.unlink()
    if kind == "link_to_dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "link_outside":
        path.symlink_to(os.path.relpath(outside, path.parent))
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()


def mutate_file(path: Path, mutation: Mutation) -> None:
    """Apply ``mutation`` to the file ``path`` in place (byte edits, or structured JSON edits)."""
    data = path.read_bytes()
    if mutation.kind == "truncate":
        path.write_bytes(data[: mutation.where % (len(data) + 1)])
        return
    if mutation.kind == "flip":
        if data:
            at = mutation.where % len(data)
            path.write_bytes(data[:at] + bytes([data[at] ^ mutation.byte]) + data[at + 1 :])
        return
    if path.name.endswith(".safetensors"):
        (length,) = struct.unpack("<Q", data[:8])
        header, rest = json.loads(data[8 : 8 + length]), data[8 + length :]
        header, deep = _mutate_json(header, mutation)
        encoded = _dumps(header, deep)
        encoded += b" " * (-len(encoded) % 8)
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + rest)
        return
    if path.name.endswith(".jsonl"):
        lines = data.splitlines()
        line = mutation.where % len(lines)
        document, deep = _mutate_json(json.loads(lines[line]), mutation)
        lines[line] = _dumps(document, deep)
        path.write_bytes(b"\n".join(lines) + b"\n")
        return
    document, deep = _mutate_json(json.loads(data), mutation)
    if isinstance(document, dict):
        _reseal_self(path, document)
    path.write_bytes(_dumps(document, deep))


def _reseal_self(path: Path, document: dict[str, Any]) -> None:
    """Record a document's own checksum again, where it keeps one and it can be computed."""
    key = METADATA_CHECKSUM_KEY if path.name == METADATA_FILE else documents.SEAL_KEY
    if path.name not in ("metadata.json", "validation.json", "model.json", ".listing.json", SHARDING_FILE):
        return
    try:
        if path.name == SHARDING_FILE:
            document[SHARDING_CHECKSUM_KEY] = sharding_checksum(document)
        else:
            document[key] = metadata_checksum(document) if key == METADATA_CHECKSUM_KEY else documents.checksum(documents.canonical(document))
    except (TypeError, ValueError, RecursionError):
        pass


def rerecord(root: Path, target: str) -> None:
    """Update every checksum that covers ``target`` after it changed, as an attacker would."""
    path = root / target
    directory = path.parent
    if target.startswith("sharded/epoch_") and path.name.endswith(".safetensors"):
        _record_in(directory / SHARDING_FILE, path.name, path.read_bytes(), SHARDING_CHECKSUM_KEY)
        _record_in(directory / METADATA_FILE, path.name, path.read_bytes(), METADATA_CHECKSUM_KEY)
        path = directory / SHARDING_FILE
    if target.startswith(("checkpoints/epoch_", "sharded/epoch_")) and path.name != METADATA_FILE:
        _record_in(directory / METADATA_FILE, path.name, path.read_bytes(), METADATA_CHECKSUM_KEY)
    elif target.startswith("validated/v1.0.0/") and path.name != "validation.json":
        _record_in(directory / "validation.json", path.name, path.read_bytes(), documents.SEAL_KEY)
    elif target == "production/model.safetensors":
        _record_in(directory / "model.json", path.name, path.read_bytes(), documents.SEAL_KEY)


def _record_in(record_path: Path, name: str, data: bytes, key: str) -> None:
    document = json.loads(record_path.read_bytes())
    document["files"][name] = {"size": len(data), "checksum": checksum_bytes(data)}
    if key == SHARDING_CHECKSUM_KEY:
        document[key] = sharding_checksum(document)
    else:
        document[key] = metadata_checksum(document) if key == METADATA_CHECKSUM_KEY else documents.checksum(documents.canonical(document))
    record_path.write_bytes(json.dumps(document).encode())


# ---------------------------------------------------------------------- running the readers


def readers(root: Path) -> list[tuple[str, Callable[[], Any]]]:
    """Every reader of the package over the run at ``root``, by name."""
    checkpoints = root / "checkpoints"

    def manager() -> CheckpointManager:
        return CheckpointManager(checkpoints, max_checkpoints=None)

    def restore() -> Any:
        model, optimizer, scheduler = new_objects()
        return manager().restore(model, optimizer, scheduler, which=1, restore_rng=False)

    def registry() -> ArtifactRegistry:
        return ArtifactRegistry(checkpoints)

    def shown_position() -> Any:
        return data_loader_state(manager().checkpoints()[-1])

    def resumed_position() -> Any:
        loader = TakesState()
        extra = manager().load(epoch=1)["extra"]
        saved = extra.get(data_state.DATA_STATE_KEY) if isinstance(extra, dict) else None  # as the callback reads it
        data_state.restore(loader, saved, world_size=1, path=checkpoints / "epoch_1")
        return loader.state

    def sharded() -> CheckpointManager:
        return CheckpointManager(root / "sharded", max_checkpoints=None)

    def restore_sharded() -> Any:
        from sharded_workers import build, objects

        model = build(1)
        optimizer, scheduler = objects(model)
        return sharded().restore(model, optimizer, scheduler, which=1, restore_rng=False)

    return [
        ("checkpoints", lambda: manager().checkpoints()),
        ("load_latest", lambda: manager().load_latest()),
        ("load(verify=False)", lambda: manager().load(epoch=1, verify=False)),
        ("load_best", lambda: manager().load_best(metric="loss")),
        ("restore", restore),
        ("data_loader_state", shown_position),
        ("data_state.restore", resumed_position),
        ("versions", lambda: registry().versions()),
        ("validation", lambda: registry().validation("1.0.0")),
        ("registry.load", lambda: registry().load("1.0.0")),
        ("registry.load(verify=False)", lambda: registry().load("1.0.0", verify=False)),
        ("production", lambda: registry().production()),
        ("load_production", lambda: registry().load_production()),
        ("load_production(verify=False)", lambda: registry().load_production(verify=False)),
        ("history", lambda: registry().history()),
        ("save_log", lambda: savelog.read(checkpoints)),
        ("run_history", lambda: run_history(checkpoints)),
        ("sharded.load_latest", lambda: sharded().load_latest()),
        ("sharded.load(verify=False)", lambda: sharded().load(epoch=1, verify=False)),
        ("sharded.restore", restore_sharded),
    ]


def non_data(value: Any, path: str = "<result>") -> str | None:
    """The key path of the first value in ``value`` that is not plain data, or None."""
    stack = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            stack += [(key, f"{where}<key>") for key in node]
            stack += [(child, f"{where}[{key!r}]") for key, child in node.items()]
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack += [(child, f"{where}[{index}]") for index, child in enumerate(node)]
        elif not isinstance(node, ALLOWED_LEAVES) and not hasattr(node, "__dataclass_fields__"):
            return f"{where}: {type(node).__module__}.{type(node).__qualname__}"
        elif hasattr(node, "__dataclass_fields__"):  # CheckpointInfo records
            # ``backend`` is the manager's own storage object (where the files are), not data read from them
            stack += [(getattr(node, name), f"{where}.{name}") for name in node.__dataclass_fields__ if name != "backend"]
    return None


def snapshot(directory: Path) -> dict[str, bytes]:
    files = {}
    for base, _, names in os.walk(directory):
        for name in names:
            path = Path(base, name)
            files[str(path.relative_to(directory))] = path.read_bytes()
    return files


def run_case(golden: Path, work: Path, mutation: Mutation) -> list[str]:
    """Run one case in a fresh copy of ``golden`` at ``work``; return what went wrong (empty: passed)."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(golden, work, symlinks=True)
    write_listing_cache(work / "checkpoints")
    twin = work / "outside" / mutation.target.replace("/", "__")
    if mutation.kind == "link_outside":  # the target's own bytes, outside the run: only the link is wrong
        shutil.copyfile(work / mutation.target, twin)
    outside = snapshot(work / "outside")
    unread: int | None = None
    if mutation.kind in SPECIAL_KINDS:
        plant_special(work / mutation.target, mutation.kind, twin)
        unread = _mark_unread(twin) if twin.exists() else None
    else:
        mutate_file(work / mutation.target, mutation)
        rerecord(work, mutation.target)
    failures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, read in readers(work):
            try:
                result = read()
            except CheckpointError:
                continue
            except Exception as exc:  # noqa: BLE001 - exactly what the harness looks for
                failures.append(f"{name} raised {type(exc).__name__}: {exc}"[:500])
                continue
            bad = non_data(result)
            if bad is not None:
                failures.append(f"{name} returned a non-data object at {bad}")
    if unread is not None and os.stat(twin).st_atime_ns != unread:
        failures.append(f"{twin} outside the run was read through the link at {mutation.target}")
    if snapshot(work / "outside") != outside:
        failures.append("a file outside the checkpoint directories changed")
    return failures


def _mark_unread(path: Path) -> int:
    """Set ``path``'s access time before its modification time, so that the next read of it moves
    the access time (also under ``relatime``); return the access time set."""
    status = os.stat(path)
    unread = status.st_mtime_ns - 3600 * 10**9
    os.utime(path, ns=(unread, status.st_mtime_ns))
    return unread
