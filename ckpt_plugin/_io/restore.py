"""Restore a checkpoint straight into a live model, optimizer and scheduler.

The model's parameters and buffers, and the optimizer's existing state tensors, receive the file
bytes directly: each byte of a tensor file is read once, into the tensor that keeps it, and hashed
in the same pass (see :func:`ckpt_plugin._io.files.stream_tensor_file`). Optimizer state that does not
exist yet (a freshly built optimizer) is read into new tensors, which the optimizer then adopts
without another copy.

What happens when damage is found
---------------------------------
Everything that can be checked without reading tensor data is checked before a single live value
changes: ``state.json`` (checksum), every file's presence and recorded size, every safetensors
header, missing or unexpected keys (with ``strict``), shapes, and the optimizer's parameter groups.
A checksum mismatch in tensor data can only be known once its file has been read. By then its
bytes are in the live tensors, so :class:`CorruptCheckpointError` is raised naming the file and
saying which objects were overwritten (also in its ``partially_restored`` attribute). The
optimizer, scheduler and RNG states are only replaced after every file has passed, so a damaged
model file leaves them untouched. Restore another checkpoint before using the overwritten
objects. ``atomic=True`` checks every file before touching anything, at the price of reading the
checkpoint twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, IncompatibleCheckpointError
from .._format import codec
from .._format.layout import STATE_FILE
from .._format.records import FileRecord
from .._format.tensorformat import TensorSpec
from .files import Header, can_receive, read_header, read_json, stream_tensor_file, verify_file
from .info import CheckpointInfo
from .reader import ShardedReader, item_shards, read_checkpoint
from .rng import restore_rng_state


class _Slot:
    """Stands for a stored tensor in a decoded tree until its bytes have been read."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _SlotMap(dict):  # type: ignore[type-arg]
    def __missing__(self, name: str) -> _Slot:
        return _Slot(name)


class _Files:
    """The tensor files of one item (one file, or the shards an index names), with their headers."""

    def __init__(self, info: CheckpointInfo, filename: str | None) -> None:
        self.info = info
        if filename:
            self._record(filename)
        names = item_shards(info.location, info.files, filename, backend=info.backend) if filename else []
        self.headers: dict[str, Header] = {}
        self.specs: dict[str, TensorSpec] = {}
        for name in names:
            header = read_header(info.file(name), self._record(name), backend=info.backend)
            self.headers[name] = header
            self.specs.update(header[1])

    def _record(self, filename: str) -> FileRecord:
        record = self.info.files.get(filename)
        if record is None:
            raise CorruptCheckpointError(
                f"{self.info.file(filename)} has no recorded checksum in metadata.json; the checkpoint is damaged"
            )
        return record

    def check(self) -> None:
        for name in self.headers:
            verify_file(self.info.file(name), self._record(name), backend=self.info.backend)

    def stream(self, destinations: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, header in self.headers.items():
            tensors.update(
                stream_tensor_file(
                    self.info.file(name),
                    self._record(name),
                    lambda spec: destinations.get(spec.name),
                    header=header,
                    backend=self.info.backend,
                )
            )
        return tensors


def _plain_loaders() -> frozenset[Any]:
    """``_load_from_state_dict`` overrides in torch that only fill in or reject keys of checkpoints
    from old torch releases; with the module's exact keys present they copy like the default."""
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.instancenorm import _InstanceNorm

    return frozenset(
        {torch.nn.Module._load_from_state_dict, _NormBase._load_from_state_dict, _InstanceNorm._load_from_state_dict}
    )


def _fast_module(model: torch.nn.Module) -> bool:
    """Whether loading ``model`` is plain copying: no hooks or overrides that transform the state."""
    base = torch.nn.Module
    if type(model).load_state_dict is not base.load_state_dict or type(model).state_dict is not base.state_dict:
        return False
    plain = _plain_loaders()
    for module in model.modules():
        kind = type(module)
        if (
            kind._load_from_state_dict not in plain
            or kind._save_to_state_dict is not base._save_to_state_dict
            or kind.set_extra_state is not base.set_extra_state
            or kind.get_extra_state is not base.get_extra_state
            or module._load_state_dict_pre_hooks
            or module._load_state_dict_post_hooks
            or module._state_dict_hooks
            or module._state_dict_pre_hooks
        ):
            return False
    return True


def _flat_refs(tree: Any) -> dict[str, str] | None:
    """``{key: stored tensor name}`` when ``tree`` is a flat dict of tensors, else None."""
    if not isinstance(tree, dict):
        return None
    refs: dict[str, str] = {}
    for key, value in tree.items():
        if not (isinstance(value, dict) and len(value) == 1 and isinstance(value.get(codec.TENSOR), str)):
            return None
        refs[key] = value[codec.TENSOR]
    return refs


class _ModelPlan:
    def __init__(self, model: torch.nn.Module, skeleton: Any, files: _Files, strict: bool) -> None:
        self.model, self.skeleton, self.files, self.strict = model, skeleton, files, strict
        refs = _flat_refs(skeleton)
        self.fast = refs is not None and _fast_module(model)
        self.destinations: dict[str, torch.Tensor] = {}
        self.copies: list[tuple[torch.Tensor, str]] = []
        if not self.fast:
            return
        assert refs is not None
        live = model.state_dict()
        missing = [key for key in live if key not in refs]
        unexpected = [key for key in refs if key not in live]
        if strict and (missing or unexpected):
            raise IncompatibleCheckpointError(
                f"{files.info.path} does not fit the model: missing keys {missing[:10]}, unexpected keys "
                f"{unexpected[:10]}; pass strict=False to restore the keys both have"
            )
        taken: set[tuple[Any, ...]] = set()
        for key, name in refs.items():
            target = live.get(key)
            if target is None:
                continue
            spec = files.specs.get(name)
            if spec is None:
                raise CorruptCheckpointError(
                    f"{files.info.path}: tensor {name!r} of the model is in no file; the checkpoint is damaged"
                )
            if tuple(target.shape) != spec.shape:
                raise IncompatibleCheckpointError(
                    f"{files.info.path}: {key} has shape {list(spec.shape)} in the checkpoint but "
                    f"{list(target.shape)} in the model; build the model with the configuration it was saved with"
                )
            holder = self.destinations.get(name)
            if holder is None and can_receive(target, spec) and codec.tensor_identity(target) not in taken:
                self.destinations[name] = target
                taken.add(codec.tensor_identity(target))
            elif holder is None or not _same_memory(holder, target):
                self.copies.append((target, name))

    def finish(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not self.fast:
            state = codec.decode(self.skeleton, tensors, self.files.info.file(STATE_FILE), "model")
            apply_state("model", self.files.info.path, self.model.load_state_dict, state, strict=self.strict)
            return
        for target, name in self.copies:
            target.copy_(tensors[name])


def _same_memory(first: torch.Tensor, second: torch.Tensor) -> bool:
    return codec.tensor_identity(first) == codec.tensor_identity(second)


class _OptimizerPlan:
    def __init__(self, optimizer: torch.optim.Optimizer, skeleton: Any, files: _Files | None) -> None:
        self.optimizer = optimizer
        self.where = files.info.path if files is not None else "the checkpoint"
        self.destinations: dict[str, torch.Tensor] = {}
        self.tree = codec.decode(skeleton, _SlotMap(), str(self.where), "optimizer")
        try:
            self._plan(optimizer, files)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise IncompatibleCheckpointError(
                f"the optimizer state in {self.where} is not an optimizer state dict this optimizer can load "
                f"({type(exc).__name__}: {exc}); build the optimizer the run was saved with"
            ) from exc

    def _plan(self, optimizer: torch.optim.Optimizer, files: _Files | None) -> None:
        standard = (
            type(optimizer).load_state_dict is torch.optim.Optimizer.load_state_dict
            and not optimizer._optimizer_load_state_dict_pre_hooks
        )
        if not standard or not isinstance(self.tree, dict):
            return
        saved_groups = self.tree.get("param_groups")
        if not isinstance(saved_groups, list) or [len(g.get("params", ())) for g in saved_groups] != [
            len(g["params"]) for g in optimizer.param_groups
        ]:
            raise IncompatibleCheckpointError(
                f"the optimizer state in {files.info.path if files else 'the checkpoint'} has parameter "
                f"groups of sizes "
                f"{[len(g.get('params', ())) for g in saved_groups or []]}, but the optimizer has "
                f"{[len(g['params']) for g in optimizer.param_groups]}; build the optimizer over the same parameters"
            )
        if files is None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        saved_ids = [i for group in saved_groups for i in group["params"]]
        settings = {i: group for group in saved_groups for i in group["params"]}
        id_map = dict(zip(saved_ids, params, strict=True))
        for saved_id, values in (self.tree.get("state") or {}).items():
            param = id_map.get(saved_id)
            live = optimizer.state.get(param) if param is not None else None
            if not live or not isinstance(values, dict):
                continue
            group = settings[saved_id]
            for key, value in values.items():
                target = live.get(key)
                if not isinstance(value, _Slot) or not isinstance(target, torch.Tensor):
                    continue
                spec = files.specs.get(value.name)
                if spec is None or not can_receive(target, spec) or value.name in self.destinations:
                    continue
                if _kept_as_is(param, key, group, target):
                    self.destinations[value.name] = target

    def finish(self, tensors: Mapping[str, torch.Tensor]) -> None:
        try:
            state = _fill(self.tree, tensors)
        except KeyError as exc:
            raise CorruptCheckpointError(
                f"{self.where}: the optimizer state refers to tensor {exc}, which is in none of its files; the "
                "checkpoint is damaged: restore it or delete it"
            ) from None
        apply_state("optimizer", self.where, self.optimizer.load_state_dict, state)


def _kept_as_is(param: torch.Tensor, key: Any, group: Mapping[str, Any], target: torch.Tensor) -> bool:
    """Whether ``Optimizer.load_state_dict`` would keep ``target`` (a CPU tensor) as it is rather than
    cast or move it, so that filling it in place gives what loading would have produced."""
    if key == "step":
        if not (group.get("fused") or group.get("capturable")):
            return True
        return target.dtype == torch.float32 and param.device == target.device
    if param.is_floating_point() and target.dtype != param.dtype:
        return False
    return param.device == target.device


def _fill(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(tree, _Slot):
        return tensors[tree.name]
    if isinstance(tree, dict):
        return {key: _fill(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_fill(value, tensors) for value in tree]
    if isinstance(tree, tuple):
        return tuple(_fill(value, tensors) for value in tree)
    if isinstance(tree, set):
        return {_fill(value, tensors) for value in tree}
    return tree


def restore_checkpoint(
    info: CheckpointInfo,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    strict: bool = True,
    restore_rng: bool = True,
    atomic: bool = False,
    sharded_reader: ShardedReader,
) -> None:
    """Load ``info`` into ``model`` (and ``optimizer``, ``scheduler``, the RNGs); see the module notes
    for what happens when damage is found. ``sharded_reader`` reads any small item stored as shards."""
    state = read_json(info.file(STATE_FILE), _record(info, STATE_FILE), backend=info.backend)
    entries = state.get("items", {}) if isinstance(state, dict) else {}
    model_entry = _entry(entries, "model", info)
    optimizer_entry = _entry(entries, "optimizer", info) if optimizer is not None else None
    small = tuple(item for item, wanted in (("scheduler", scheduler is not None), ("rng", restore_rng)) if wanted)
    others = read_checkpoint(info, items=small, sharded_reader=sharded_reader) if small else {}
    if scheduler is not None and others.get("scheduler") is None:
        raise CheckpointNotFoundError(
            f"{info.path} holds no scheduler state; pass scheduler=None to restore without it"
        )

    model_files = _Files(info, model_entry.get("file"))
    model_plan = _ModelPlan(model, model_entry.get("tree"), model_files, strict)
    optimizer_files = optimizer_plan = None
    if optimizer is not None and optimizer_entry is not None:
        optimizer_files = _Files(info, optimizer_entry.get("file"))
        optimizer_plan = _OptimizerPlan(optimizer, optimizer_entry.get("tree"), optimizer_files)
    if atomic:
        model_files.check()
        if optimizer_files is not None:
            optimizer_files.check()

    passes = [("model", model_files, model_plan.destinations)]
    if optimizer_files is not None and optimizer_plan is not None:
        passes.append(("optimizer", optimizer_files, optimizer_plan.destinations))
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for item, files, destinations in passes:
            try:
                loaded[item] = files.stream(destinations)
            except CorruptCheckpointError as exc:
                raise _damaged(exc, item, bool(destinations), list(loaded)) from exc
            finally:
                if destinations:
                    torch.autograd.graph.increment_version(list(destinations.values()))
        model_plan.finish(loaded["model"])
    if optimizer_plan is not None:
        optimizer_plan.finish(loaded.get("optimizer", {}))
    if scheduler is not None:
        apply_state("scheduler", info.path, scheduler.load_state_dict, others["scheduler"])
    if restore_rng and others.get("rng") is not None:
        apply_state("RNG", info.path, restore_rng_state, others["rng"])


def apply_state(what: str, where: Any, load: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``load`` (a ``load_state_dict``) with state read from the checkpoint at ``where``.

    Whatever it raises on that content becomes :class:`IncompatibleCheckpointError`, with the
    original exception as its cause; errors of ckpt_plugin itself pass through unchanged.
    """
    try:
        return load(*args, **kwargs)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch and user code raise anything on bad state
        raise IncompatibleCheckpointError(
            f"the {what} state in {where} cannot be loaded into this {what}: {type(exc).__name__}: {exc}; "
            f"build the {what} with the configuration the checkpoint was saved with, or load another checkpoint"
        ) from exc


def _damaged(exc: CorruptCheckpointError, item: str, overwritten: bool, done: list[str]) -> CorruptCheckpointError:
    """The error for damage found while ``item`` was streamed, saying what the live objects hold."""
    if overwritten:
        state = (
            f" The live {item} state was partially overwritten before the damage could be found"
            + (f" (the {' and '.join(done)} state was fully restored)" if done else "")
            + "; restore another checkpoint (for example an earlier epoch) before using it."
        )
    else:
        state = (
            f" No live {item} tensor was changed"
            + (f", but the {' and '.join(done)} state was restored" if done else "")
            + "."
        )
    error = CorruptCheckpointError(f"{exc}.{state}" if not str(exc).endswith(".") else f"{exc}{state}")
    error.partially_restored = (item,) if overwritten else ()  # type: ignore[attr-defined]
    error.filename = getattr(exc, "filename", None)  # type: ignore[attr-defined]
    return error


def _record(info: CheckpointInfo, filename: str) -> FileRecord:
    record = info.files.get(filename)
    if record is None:
        raise CorruptCheckpointError(
            f"{info.file(filename)} has no recorded checksum in metadata.json; the checkpoint is damaged"
        )
    return record


def _entry(entries: Mapping[str, Any], item: str, info: CheckpointInfo) -> Mapping[str, Any]:
    entry = entries.get(item)
    if not isinstance(entry, Mapping):
        raise CheckpointNotFoundError(f"{info.path} holds no {item} state; pass {item}=None to restore without it")
    return entry


__all__ = ["apply_state", "restore_checkpoint"]
