"""Incremental checkpoints: tensors that did not change since the previous checkpoint are not
written again.

With ``CheckpointManager(incremental=True)`` the model is stored as Hugging Face-style shards
(``model-00001-of-00003.safetensors`` ... plus ``model.safetensors.index.json``). A shard whose
tensors are all unchanged since the previous checkpoint written by the same manager is
hard-linked from that checkpoint instead of being written; the other tensors go into new shards.

Unchanged tensors are found in one of two ways (``change_detection``):

- ``"checksum"`` (the default): every model tensor is hashed (xxh3) at each save and compared with
  the digest recorded at the previous one. It cannot miss a change, and costs one read of the
  model's memory, which is a fraction of writing it.
- ``"version"``: a tensor whose storage, view and autograd version counter are what they were at
  the previous save is taken as unchanged without reading it; only the others are hashed. In-place
  operations on a parameter (optimizer steps, ``copy_`` under ``no_grad``, ``load_state_dict``) bump
  its version counter, but writes through ``param.data`` or a numpy view do not, and neither do
  fused optimizer kernels (``fused=True``): when the optimizer saved with the model is fused, every
  tensor is hashed as with ``"checksum"``. Use this only when nothing else modifies weights unseen.

Tensors are grouped so that shards stay reusable: frozen parameters (``requires_grad=False``) and
tensors found unchanged go into shards of their own, apart from the tensors that change. A shard
shared between checkpoints is one file with several names, so deleting any checkpoint, in any
order, never affects another one, and every checkpoint still records the size and checksum of
each of its files, shared or not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import xxhash

from .._format import codec, shards
from .._format.layout import MODEL_FILE, STATE_FILE
from .._format.records import FileRecord
from .._storage import Backend, Commit
from .files import read_header, read_json, tensor_bytes, write_bytes_file, write_tensor_file
from .info import CheckpointInfo
from .writer import MODEL_INDEX_FILE, SAFETENSORS_METADATA, BeforeCommit, Snapshot, write_snapshot

if TYPE_CHECKING:
    import torch

DETECTION_MODES = ("checksum", "version")
SHARD_BYTES = 2 * 1024**3
DIGESTS_KEY = "digests"

Fingerprint = tuple[Any, ...]


def fingerprint(tensor: torch.Tensor) -> Fingerprint:
    """What identifies a tensor's current contents without reading them: where its memory is, how it
    is viewed, and its autograd version counter (bumped by every tracked in-place write)."""
    return (*codec.tensor_identity(tensor), tensor._version)


def digest(tensor: torch.Tensor) -> str:
    """The xxh3 digest of a tensor's bytes."""
    return f"xxh3_64:{xxhash.xxh3_64(tensor_bytes(tensor)).hexdigest()}"


@dataclass(frozen=True)
class Observation:
    """What a save sees of the live model before its state is handed to the writer."""

    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)
    frozen: frozenset[str] = frozenset()


def uses_fused_kernels(optimizer_state: Any) -> bool:
    """Whether an optimizer state dict says its steps run fused kernels, which update parameters in
    place without bumping their version counters."""
    if not isinstance(optimizer_state, Mapping):
        return False
    groups = optimizer_state.get("param_groups")
    return isinstance(groups, list) and any(isinstance(g, Mapping) and g.get("fused") for g in groups)


def observe(model: Any, state: Any, optimizer_state: Any = None) -> Observation:
    """Fingerprint the tensors of a model state dict and note the frozen parameters of ``model``.

    No fingerprints are taken when ``optimizer_state`` shows fused kernels: their writes are invisible
    to version counters, so every tensor is hashed instead.
    """
    import torch

    fingerprints: dict[str, Fingerprint] = {}
    if isinstance(state, Mapping) and not uses_fused_kernels(optimizer_state):
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and isinstance(key, str):
                fingerprints.setdefault(key, fingerprint(value))
    frozen: frozenset[str] = frozenset()
    if isinstance(model, torch.nn.Module):
        frozen = frozenset(name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad)
    return Observation(fingerprints, frozen)


@dataclass(frozen=True)
class _Tensor:
    digest: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    fingerprint: Fingerprint | None


@dataclass(frozen=True)
class _Shard:
    filename: str
    names: tuple[str, ...]
    record: FileRecord
    identity: str | None


@dataclass
class _Base:
    location: str
    backend: Backend
    tensors: dict[str, _Tensor]
    shards: list[_Shard]


class IncrementalWriter:
    """Writes checkpoints whose model shards are shared with the previous checkpoint when unchanged."""

    def __init__(self, change_detection: str = "checksum", shard_bytes: int = SHARD_BYTES) -> None:
        if change_detection not in DETECTION_MODES:
            raise ValueError(f"change_detection must be 'checksum' or 'version', not {change_detection!r}")
        self.change_detection = change_detection
        self.shard_bytes = shard_bytes
        self._base: _Base | None = None

    @property
    def has_base(self) -> bool:
        """Whether the next save has a previous checkpoint to share unchanged shards with."""
        return self._base is not None

    def adopt(self, info: CheckpointInfo | None) -> None:
        """Use ``info`` (a sharded checkpoint with recorded digests) as the base of the next save, if
        no save of this writer is known yet. Anything unexpected simply means no base."""
        if self._base is not None or info is None:
            return
        try:
            backend = info.backend
            state = read_json(info.file(STATE_FILE), info.files.get(STATE_FILE), backend=backend)
            entry = state["items"]["model"]
            index = read_json(info.file(entry["file"]), info.files[entry["file"]], backend=backend)
            digests = entry[DIGESTS_KEY]
            by_shard: dict[str, list[str]] = {}
            for name, shard in index["weight_map"].items():
                by_shard.setdefault(shard, []).append(name)
            specs = {}
            shard_list = []
            for shard, names in sorted(by_shard.items()):
                header = read_header(info.file(shard), info.files[shard], backend=backend)[1]
                specs.update(header)
                shard_list.append(_Shard(shard, tuple(names), info.files[shard], backend.fingerprint(info.file(shard))))
            tensors = {
                name: _Tensor(digests[name], spec.dtype, spec.shape, None)
                for name, spec in specs.items()
                if name in digests
            }
        except Exception:  # noqa: BLE001 - any doubt about the old checkpoint only costs a full write
            return
        self._base = _Base(info.location, info.backend, tensors, shard_list)

    def write(
        self, store: Commit, snapshot: Snapshot, seen: Observation, before_commit: BeforeCommit | None = None
    ) -> CheckpointInfo:
        """Write ``snapshot`` with its model sharded, reusing the shards that did not change (a hard
        link locally, a server-side copy on an object store)."""
        new_shards: list[_Shard] = []
        digests: dict[str, _Tensor] = {}

        def write_model(
            backend: Backend,
            prefix: str,
            model: dict[str, torch.Tensor],
            files: dict[str, FileRecord],
            document: dict[str, Any],
        ) -> None:
            tensors_now, shard_plan = self._plan(model, seen)
            digests.update(tensors_now)
            weight_map: dict[str, str] = {}
            for number, (names, reused) in enumerate(shard_plan, start=1):
                filename = shards.shard_name(MODEL_FILE, number, len(shard_plan))
                record = None
                target = backend.join(prefix, filename)
                if reused is not None and self._reuse(reused, backend, target):
                    record = reused.record
                if record is None:
                    record = write_tensor_file(target, {n: model[n] for n in names}, SAFETENSORS_METADATA, backend=backend)
                files[filename] = record
                new_shards.append(_Shard(filename, names, record, None))
                weight_map.update(dict.fromkeys(names, filename))
            total = sum(t.numel() * t.element_size() for t in model.values())
            files[MODEL_INDEX_FILE] = write_bytes_file(
                backend.join(prefix, MODEL_INDEX_FILE), codec.dumps(shards.build_index(weight_map, total)), backend=backend
            )
            entry = document["items"].get("model")
            if entry is not None:
                entry["file"] = MODEL_INDEX_FILE
                entry[DIGESTS_KEY] = {name: record.digest for name, record in tensors_now.items()}

        info = write_snapshot(store, snapshot, write_model, before_commit)
        self._base = _Base(
            info.location,
            info.backend,
            digests,
            [_Shard(s.filename, s.names, s.record, info.backend.fingerprint(info.file(s.filename))) for s in new_shards],
        )
        return info

    def _plan(
        self, model: Mapping[str, torch.Tensor], seen: Observation
    ) -> tuple[dict[str, _Tensor], list[tuple[tuple[str, ...], _Shard | None]]]:
        """Each tensor's record now, and the shards to produce: (names, base shard to link or None)."""
        base = self._base
        previous = base.tensors if base is not None else {}
        now: dict[str, _Tensor] = {}
        unchanged: set[str] = set()
        for name, tensor in model.items():
            old = previous.get(name)
            current = seen.fingerprints.get(name)
            same_layout = old is not None and old.dtype == tensor.dtype and old.shape == tuple(tensor.shape)
            if (
                self.change_detection == "version"
                and same_layout
                and current is not None
                and old is not None
                and old.fingerprint == current
            ):
                value = old.digest
            else:
                value = digest(tensor)
            now[name] = _Tensor(value, tensor.dtype, tuple(tensor.shape), current)
            if same_layout and old is not None and old.digest == value:
                unchanged.add(name)
        plan: list[tuple[tuple[str, ...], _Shard | None]] = []
        covered: set[str] = set()
        for shard in base.shards if base is not None else ():
            if shard.names and all(name in unchanged for name in shard.names):
                plan.append((shard.names, shard))
                covered.update(shard.names)
        rest = [name for name in model if name not in covered]
        stable = [name for name in rest if name in unchanged or name in seen.frozen]
        moving = [name for name in rest if not (name in unchanged or name in seen.frozen)]
        for group in (stable, moving):
            plan.extend((names, None) for names in self._pack(group, model))
        if not plan:
            plan.append(((), None))
        return now, plan

    def _pack(self, names: list[str], model: Mapping[str, torch.Tensor]) -> list[tuple[str, ...]]:
        groups: list[tuple[str, ...]] = []
        current: list[str] = []
        size = 0
        for name in names:
            nbytes = model[name].numel() * model[name].element_size()
            if current and size + nbytes > self.shard_bytes:
                groups.append(tuple(current))
                current, size = [], 0
            current.append(name)
            size += nbytes
        if current:
            groups.append(tuple(current))
        return groups

    def _reuse(self, shard: _Shard, backend: Backend, target: str) -> bool:
        """Share a base shard with the new checkpoint if it is still the very file that was written."""
        base = self._base
        if base is None or shard.identity is None:
            return False
        source = backend.join(base.location, shard.filename)
        if not backend.reuse(source, target):
            return False
        if backend.fingerprint(source) != shard.identity:  # replaced by a re-save meanwhile
            backend.delete(target)
            return False
        return True
