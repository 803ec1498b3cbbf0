"""Collective save and restore for :class:`~ckpt_plugin.CheckpointManager`.

When ``torch.distributed`` is initialized and the model holds DTensors (FSDP2 ``fully_shard``,
tensor parallel), every rank calls ``save`` and ``restore``:

1. Every rank takes its state with ``get_state_dict`` (its own shards, no gather); the
   coordinator (rank 0) also encodes the small replicated items (scheduler, ``extra``, its RNG
   states) and begins a transaction on the manager's store
   (:class:`~ckpt_plugin._store.CheckpointStore`): a staging directory on a local disk, a
   fresh, invisible ``<name>@<transaction>`` prefix on an object store. The ranks exchange their
   outcome and the transaction (plain strings): if any failed, every rank raises and nothing is
   written.
2. ``dcp.save`` with :class:`SafetensorsWriter`: each rank writes its own chunks under the
   transaction's prefix, through its own store's backend (streamed multipart uploads on
   an object store). Once every rank has reported its files, the coordinator writes
   ``sharding.json``, ``state.json`` and ``metadata.json`` and commits: the staging directory is
   renamed into place, or the manifest written last makes the prefix visible. A failure on any
   rank fails the save on every rank, and the transaction is aborted (its files removed; on an
   object store what cannot be removed stays invisible and ``recover`` removes it later).
3. The coordinator reports the commit to the store, which applies retention; the ranks exchange
   the outcome once more, so all return the same :class:`CheckpointInfo` or all raise.

Every exchange runs on a gloo group created with ``collective_timeout``, so a rank that never
arrives makes the others fail after that many seconds instead of waiting forever. With
``async_save``, step 1 also copies each rank's local shards into the manager's staging buffer, and
steps 2 and 3 run on its background thread.

This module never sees the manager: it is handed the store, the manager's
:class:`~ckpt_plugin._options.SaveSettings` and, for an asynchronous save, its saver.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import itertools
import os
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .. import _listing as listing
from .._options import SaveSettings
from .._snapshot import SaveArguments, snapshot_of
from .._store import CheckpointStore
from ..errors import CheckpointError, ConfigurationError, DistributedCheckpointError, IncompatibleCheckpointError
from .._format import codec
from .._format.layout import SHARDING_FILE
from .._format.names import checkpoint_name
from .._io.async_save import AsyncSaver
from .._io.info import CheckpointInfo, as_path
from .._io.reader import read_checkpoint
from .._io.rng import restore_rng_state
from .._io.writer import ShardedPart, Snapshot
from .._metadata import git_provenance_in_background
from .._storage import Transaction

def is_distributed() -> bool:
    """Whether this process is one rank of an initialized ``torch.distributed`` job."""
    return dist.is_available() and dist.is_initialized()


def holds_dtensors(*objects: Any) -> bool:
    """Whether any module or state dict among ``objects`` is sharded across ranks, in a distributed
    job: DTensors (FSDP2, tensor parallel), an FSDP1 module, or ShardedTensors (FSDP1 sharded state)."""
    if not is_distributed():
        return False
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            if any(isinstance(module, FullyShardedDataParallel) for module in obj.modules()):
                return True
            values: Any = itertools.chain(obj.parameters(), obj.buffers())
        elif isinstance(obj, Mapping):
            values = obj.values()
        else:
            continue
        if any(isinstance(value, (DTensor, ShardedTensor)) for value in values):
            return True
    return False


_GROUPS: dict[tuple[int, float, str], Any] = {}


def coordination_group(timeout: float, purpose: str = "saves") -> Any:
    """A gloo group over all ranks whose collectives give up after ``timeout`` seconds.

    Created on first use (a collective call: every rank must get here) and reused after that,
    until :func:`release_coordination_groups`. Each ``purpose`` gets a group of its own, so that
    work on one (the background uploads of a tiered manager) never interleaves with another's.
    """
    key = (id(dist.group.WORLD), float(timeout), purpose)
    group = _GROUPS.get(key)
    if group is None:
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        _GROUPS[key] = group
    return group


def release_coordination_groups() -> None:
    """Destroy the gloo groups that collective saves and restores use, on this rank, now.

    Each such group has worker threads of its own. Destroying the group joins them, and any
    tensor one of them still holds from a finished exchange is freed while the interpreter can
    still run code for it. An interpreter that shuts down with those threads alive may abort
    ("terminate called without an active exception"): CPython ends any thread that asks for the
    GIL once finalization has begun, and such a thread needs the GIL to free a tensor.

    Interpreter exit calls this (an ``atexit`` hook, which runs after the asynchronous saves in
    flight are finished and before finalization begins). The next collective save or restore
    creates the groups again.
    """
    groups = list(_GROUPS.values())
    _GROUPS.clear()
    for group in groups:
        try:
            dist.destroy_process_group(group)
        except (ValueError, RuntimeError):  # already gone with the default group it belonged to
            pass
    groups.clear()  # the last references: each group's threads are joined here


atexit.register(release_coordination_groups)  # atexit hooks run after the asynchronous saves are flushed


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _gather_bytes(group: Any, payload: bytes) -> list[bytes]:
    """Every rank's ``payload``, in rank order (two all-gathers: the sizes, then the padded bytes)."""
    world = dist.get_world_size(group)
    size = torch.tensor([len(payload)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(each.item()) for each in sizes)
    mine = torch.zeros(max(longest, 1), dtype=torch.uint8)
    mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else mine[:0]
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    return [bytes(data[: int(length.item())].numpy()) for data, length in zip(gathered, sizes)]


def agree(group: Any, action: str, error: BaseException | None, value: Any = None, *, exchange: bool = False) -> list[Any]:
    """Exchange every rank's outcome of a step (and, with ``exchange``, ``value``); return the
    values of all ranks. Every rank must pass the same ``exchange``.

    If any rank failed, every rank raises: the failed one its own error, the others a
    :class:`DistributedCheckpointError` naming the ranks that failed and why.
    """
    try:
        if not exchange:  # the common case costs one small all-reduce
            failed = torch.tensor([0 if error is None else 1], dtype=torch.int32)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
            if not failed.item():
                return []
        mine = (None if error is None else _describe(error), value)
        gathered = [codec.from_json(codec.loads(data)) for data in _gather_bytes(group, codec.dumps(codec.to_json(mine)))]
    except RuntimeError as exc:
        raise DistributedCheckpointError(
            f"{action}: the ranks could not exchange their outcome ({exc}); a rank may have died or stopped "
            "calling the collective save/restore"
        ) from (error or exc)
    failures = {rank: message for rank, (message, _) in enumerate(gathered) if message is not None}
    if failures:
        if error is not None:
            raise error
        raise DistributedCheckpointError(f"{action} failed on {_listed(failures)}")
    return [value for _, value in gathered]


def _listed(failures: Mapping[int, str]) -> str:
    return "; ".join(f"rank {rank}: {message}" for rank, message in sorted(failures.items()))


def _raise_dcp_failure(exc: BaseException, action: str, rank: int) -> None:
    failures: dict[int, Any] = getattr(exc, "failures", {}) or {}
    local = failures.get(rank)
    if local is not None and isinstance(local[0], CheckpointError):
        raise local[0] from None
    messages = {failed: _describe(pair[0]) for failed, pair in failures.items()}
    raise DistributedCheckpointError(f"{action} failed on {_listed(messages) or str(exc)}") from None


def _live_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The sharded state of ``model`` and ``optimizer``, or the sharded state dicts given instead
    (as ``get_state_dict`` returns them: the optimizer's keyed by parameter name)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if isinstance(model, Mapping):
        if optimizer is not None and not isinstance(optimizer, Mapping):
            raise ConfigurationError("with the model's state dict, pass the optimizer's sharded state dict too")
        return {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def _check_objects(model: Any, optimizer: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise ConfigurationError("a collective (sharded) save or restore needs the model itself, not its state dict")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigurationError("a collective (sharded) save or restore needs the optimizer itself, not its state dict")


@dataclasses.dataclass
class _Save:
    """One collective save between its two halves: prepared on the caller's thread, then written."""

    store: CheckpointStore
    group: Any
    rank: int
    name: str
    action: str
    state: Any
    snapshot: Snapshot | None
    txn: Transaction
    on_commit: Callable[[CheckpointInfo], None] | None

    @property
    def coordinator(self) -> bool:
        return self.rank == 0


def save_sharded(
    store: CheckpointStore,
    settings: SaveSettings,
    model: Any,
    optimizer: Any,
    arguments: SaveArguments,
    *,
    saver: AsyncSaver | None = None,
    on_commit: Callable[[CheckpointInfo], None] | None = None,
) -> CheckpointInfo:
    """The collective save described in the module notes; every rank calls it.

    ``on_commit`` runs on the coordinator after retention; if it raises, every rank raises. With a
    ``saver`` (an asynchronous manager's), the local shards are copied into its staging buffer and
    the write, commit and retention run on its background thread (the exchanges between ranks there use the
    coordination group, which nothing else uses meanwhile: the next save, load or restore waits).
    """
    request = _Request(store, settings, model, optimizer, arguments, on_commit)
    if saver is None or _holds_sharded_tensors(model):
        return _finish(_prepare(request))
    prepared: list[_Save] = []
    rebuild: list[Callable[[dict[str, torch.Tensor]], Any]] = []

    def take() -> Snapshot:
        save = _prepare(request)
        shards, rebuild_state = _local_tensors(save.state)
        snapshot = save.snapshot or Snapshot(
            epoch=arguments.epoch, step=arguments.step, metrics=arguments.metrics, config=None,
            metric_for_best=settings.metric_for_best, mode=settings.mode, provenance={},
        )
        snapshot.items[_SHARDS] = (None, shards)
        prepared.append(save)
        rebuild.append(rebuild_state)
        return snapshot

    def write(snapshot: Snapshot) -> CheckpointInfo:
        save = prepared[0]
        items = dict(snapshot.items)
        _, copies = items.pop(_SHARDS)
        save.state = rebuild[0](copies)
        if save.snapshot is not None:
            save.snapshot = dataclasses.replace(snapshot, items=items)
        return _finish(save)

    snapshot = saver.save(take, write)
    shown = dataclasses.replace(snapshot, items={k: v for k, v in snapshot.items.items() if k != _SHARDS})
    return store.pending(shown)


_SHARDS = "\x00shards"
"""The staging-buffer item that carries a rank's local shards through an asynchronous save."""


def _holds_sharded_tensors(model: Any) -> bool:
    """Whether the state is FSDP1's (ShardedTensors), which an asynchronous save does not stage:
    such a save runs synchronously."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, torch.nn.Module):
        return any(isinstance(module, FullyShardedDataParallel) for module in model.modules())
    return isinstance(model, Mapping) and any(isinstance(value, ShardedTensor) for value in model.values())


def _local_tensors(state: Any) -> tuple[dict[str, torch.Tensor], Callable[[dict[str, torch.Tensor]], Any]]:
    """Every tensor of ``state`` (a DTensor's local shard), by flattened key, and a function that
    rebuilds the same state around copies of those tensors."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
    from torch.distributed.tensor import DTensor

    flat, mapping = flatten_state_dict(state)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for key, value in flat.items():
        if isinstance(value, DTensor):
            tensors[key] = value.to_local()
            layout[key] = (value.device_mesh, value.placements, value.shape, value.stride())
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            values[key] = copy.deepcopy(value)

    def rebuild(copies: dict[str, torch.Tensor]) -> Any:
        rebuilt = dict(values)
        for key, tensor in copies.items():
            if key in layout:
                mesh, placements, shape, stride = layout[key]
                tensor = DTensor.from_local(tensor, mesh, placements, run_check=False, shape=shape, stride=stride)
            rebuilt[key] = tensor
        return unflatten_state_dict(rebuilt, mapping)

    return tensors, rebuild


@dataclasses.dataclass(frozen=True)
class _Request:
    """One collective save as the manager asked for it."""

    store: CheckpointStore
    settings: SaveSettings
    model: Any
    optimizer: Any
    arguments: SaveArguments
    on_commit: Callable[[CheckpointInfo], None] | None


def _prepare(request: _Request) -> _Save:
    """Step 1: every rank takes its state; the coordinator snapshots the small items and begins
    the transaction; the ranks agree on it, or all raise."""
    store, settings, arguments = request.store, request.settings, request.arguments
    group = coordination_group(settings.collective_timeout)
    rank = dist.get_rank(group)
    name = checkpoint_name(arguments.epoch, arguments.step)
    action = f"saving sharded checkpoint {name} in {store.location}"
    txn = snapshot = state = None
    error: BaseException | None = None
    try:
        if settings.incremental:
            raise ConfigurationError("incremental=True is not supported for sharded (FSDP / DTensor) checkpoints")
        state = _live_state(request.model, request.optimizer)
        if rank == 0:
            snapshot, _ = snapshot_of(settings, None, None, arguments)
            snapshot.pending_provenance = git_provenance_in_background(os.getcwd())  # folded in at commit
            txn = store.begin(name)
    except BaseException as exc:  # every rank must hear of it, whatever it is
        error = exc
    try:
        began = agree(group, action, error, (txn.name, txn.prefix) if txn is not None else None, exchange=True)[0]
    except BaseException:
        if txn is not None:
            store.abort(txn)
        raise
    return _Save(store, group, rank, name, action, state, snapshot, Transaction(*began), request.on_commit)


def _finish(save: _Save) -> CheckpointInfo:
    """Steps 2 and 3: every rank writes its shards, the coordinator commits once all reported and
    applies retention; the ranks agree on the outcome."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from .dcp_storage import SafetensorsWriter
    from .files import BackendShardFiles
    from .planners import JsonSavePlanner

    store = save.store
    committed: list[CheckpointInfo] = []

    def commit(sharding: Any, record: Any) -> None:
        assert save.snapshot is not None
        save.snapshot.sharded = ShardedPart(
            items=sharding.items(), files={**sharding.files, SHARDING_FILE: record}, world_size=sharding.world_size
        )
        committed.append(store.commit(save.snapshot, save.txn))

    own = store.rank_transaction(save.txn, save.rank)  # a tiered store: this rank's own local_dir
    writer = SafetensorsWriter(BackendShardFiles(own.prefix, store.backend), on_commit=commit if save.coordinator else None)
    try:
        dcp.save(save.state, storage_writer=writer, planner=JsonSavePlanner(), process_group=save.group)
    except CheckpointException as exc:
        if save.coordinator or own is not save.txn:  # every rank has finished writing by now: nothing adds to the prefix after this
            store.abort(own)
        _raise_dcp_failure(exc, save.action, save.rank)
    outcome = None
    error = None
    if save.coordinator:
        try:
            info = committed[0]
            store.committed(info)
            outcome = (info.location, listing.summary(info))
            if save.on_commit is not None:
                save.on_commit(info)
        except BaseException as exc:
            error = exc
    location, summary = agree(save.group, save.action, error, outcome, exchange=True)[0]
    info = committed[0] if save.coordinator else listing.info_from_summary(as_path(location), summary, store.backend)
    error = None
    try:  # a tiered store starts the upload here, and waits while too many are pending
        store.shared(info, save.rank, dist.get_world_size(save.group))
    except BaseException as exc:
        error = exc
    agree(save.group, save.action, error)
    return info


def restore_sharded(
    settings: SaveSettings,
    info: CheckpointInfo,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    *,
    strict: bool,
    restore_rng: bool,
    local_files: Mapping[str, str] | None = None,
) -> None:
    """Load ``info`` into the DTensor-holding ``model`` (and ``optimizer``) at this world size,
    whatever the world size that saved it; every rank calls it. A checkpoint saved by one process
    is read whole by every rank, which keeps its own shards of it. ``local_files`` (file name to a
    local path holding the same bytes, such as this rank's copy in a tiered ``local_dir``) are read
    from there instead."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.api import CheckpointException

    from .consolidate import read_sharded_items
    from .dcp_storage import SafetensorsReader
    from .files import BackendShardFiles, PreferLocalShardFiles
    from .planners import JsonLoadPlanner, check_compatible

    group = coordination_group(settings.collective_timeout)
    rank = dist.get_rank(group)
    action = f"restoring {info.path}"
    where = str(info.path)
    error: BaseException | None = None
    others: dict[str, Any] = {}
    state: dict[str, Any] = {}
    files = BackendShardFiles(info.location, info.backend)
    reader = SafetensorsReader(PreferLocalShardFiles(files, local_files) if local_files else files, record=info.files.get(SHARDING_FILE))
    full = not info.sharded
    try:
        _check_objects(model, optimizer)
        state = _live_state(model, optimizer)
        if not full:
            check_compatible(flatten_state_dict(state)[0], reader.read_metadata(), strict=strict, where=where)
        wanted = (
            ("model", full), ("optimizer", full and optimizer is not None), ("scheduler", scheduler is not None),
            ("rng", restore_rng),
        )
        small = tuple(item for item, wanted_item in wanted if wanted_item)
        others = read_checkpoint(info, items=small, sharded_reader=read_sharded_items) if small else {}
        if full:  # saved by one process: every rank holds the full state, set_state_dict keeps its shards
            state = {"model": others["model"]}
            if optimizer is not None:
                state["optimizer"] = _named_optimizer_state(model, optimizer, others.get("optimizer"), where)
        if scheduler is not None and others.get("scheduler") is None:
            raise ConfigurationError(f"{info.path} holds no scheduler state; pass scheduler=None to restore without it")
    except BaseException as exc:
        error = exc
    agree(group, action, error)
    if not full:
        try:
            dcp.load(state, storage_reader=reader, planner=JsonLoadPlanner(allow_partial_load=not strict, where=where), process_group=group)
        except CheckpointException as exc:
            _raise_dcp_failure(exc, action, rank)
    error = None
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

        options = StateDictOptions(strict=strict, full_state_dict=full)
        if optimizer is None:
            set_model_state_dict(model, state["model"], options=options)
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options)
        if scheduler is not None:
            scheduler.load_state_dict(others["scheduler"])
        if restore_rng and others.get("rng") is not None:
            restore_rng_state(others["rng"])
    except BaseException as exc:
        error = exc
    agree(group, action, error)


def _named_optimizer_state(model: Any, optimizer: Any, state: Any, where: str) -> dict[str, Any]:
    """A plain optimizer state (parameters numbered in the order of their groups) keyed by
    parameter name instead, as ``set_state_dict`` takes it."""
    if not isinstance(state, Mapping):
        raise ConfigurationError(f"{where} holds no optimizer state; pass optimizer=None to restore without it")
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    live = [names.get(id(parameter)) for group in optimizer.param_groups for parameter in group["params"]]
    saved = [number for group in state["param_groups"] for number in group["params"]]
    if len(saved) != len(live) or None in live:
        raise IncompatibleCheckpointError(
            f"{where} holds optimizer state for {len(saved)} parameters, but the optimizer has {len(live)}; "
            "build the optimizer over the same parameters"
        )
    by_number = dict(zip(saved, live))
    return {
        "state": {by_number[number]: value for number, value in state["state"].items()},
        "param_groups": [{**group, "params": [by_number[n] for n in group["params"]]} for group in state["param_groups"]],
    }
