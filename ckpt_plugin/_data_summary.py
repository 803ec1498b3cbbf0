"""What a checkpoint records of the training data loaders' position, read from its ``state.json``.

Both callbacks keep it in the ``extra`` item: the Hugging Face callback under ``data_loader``
(:mod:`ckpt_plugin._data_state`), Lightning in its fit loop's state (``combined_loader``, one state
per stateful loader) with the callback's own record beside it (whether the save was inside an
epoch, the world size, the samplers' generators at an epoch's end). This module reads that JSON
skeleton as data (tensors stay names in it, nothing is decoded or imported) and says what it holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._data_state import DATA_STATE_KEY

_TUPLE = "__tuple__"


def summarize(extra: Any) -> dict[str, Any] | None:
    """A summary of the loader state in the JSON skeleton of a checkpoint's ``extra`` item, or None."""
    if not isinstance(extra, Mapping):
        return None
    saved = extra.get(DATA_STATE_KEY)
    if isinstance(saved, Mapping):
        return {
            "saved_by": "hf",
            "format": saved.get("format"),
            "world_size": saved.get("world_size"),
            "loaders": [_position(saved.get("state"))],
        }
    return _lightning(extra.get("lightning"))


def _lightning(tree: Any) -> dict[str, Any] | None:
    loops = _get(tree, "loops", "fit_loop", "state_dict")
    loaders = _items(_get(loops, "combined_loader"))
    record = _callback_record(_get(tree, "callbacks"))
    if not loaders and not (record and record.get("sampler_generators")):
        return None
    summary: dict[str, Any] = {"saved_by": "lightning", "format": "lightning.combined_loader"}
    if record is not None:
        summary["world_size"] = record.get("world_size")
        summary["mid_epoch"] = record.get("mid_epoch")
        generators = _items(record.get("sampler_generators"))
        if generators:
            summary["sampler_generators"] = sum(len(_items(each)) for each in generators)
    summary["loaders"] = [_position(state) for state in loaders]
    return summary


def _callback_record(callbacks: Any) -> Mapping[str, Any] | None:
    """The :class:`~ckpt_plugin.lightning.CheckpointCallback`'s state among Lightning's callback states."""
    if not isinstance(callbacks, Mapping):
        return None
    for state in callbacks.values():
        if isinstance(state, Mapping) and "mid_epoch" in state and "world_size" in state:
            return state
    return None


def _position(state: Any) -> dict[str, Any]:
    """The position one loader state records, where its layout (torchdata's) is known."""
    if not isinstance(state, Mapping):
        return {"kind": type(state).__name__}
    snapshot = state.get("_snapshot")
    if isinstance(snapshot, Mapping):  # torchdata with worker processes
        main = snapshot.get("_main_snapshot")
        batches = _count(snapshot.get("_snapshot_step"), state.get("_steps_since_snapshot"))
        position = {"kind": "torchdata", "workers": _get(main, "_num_workers"), "batches": batches}
        datasets = _get(snapshot, "_worker_snapshots")
        if isinstance(datasets, Mapping):
            position["dataset_state"] = any(_get(worker, "dataset_state") is not None for worker in datasets.values())
    elif "_num_yielded" in state:  # torchdata in the training process
        position = {"kind": "torchdata", "workers": 0, "batches": state.get("_num_yielded")}
        position["dataset_state"] = state.get("dataset_state") is not None
    else:
        return {"kind": "own state_dict", "keys": sorted(str(key) for key in state)[:8]}
    finished = state.get("_iterator_finished")
    if isinstance(finished, bool):
        position["epoch_finished"] = finished
    return position


def _count(*parts: Any) -> int | None:
    if all(isinstance(part, int) and not isinstance(part, bool) for part in parts):
        return sum(parts)
    return None


def _get(tree: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, Mapping):
            return None
        tree = tree.get(key)
    return tree


def _items(value: Any) -> list[Any]:
    """A list or a tuple, as the codec writes them in JSON; anything else is no list."""
    if isinstance(value, Mapping) and isinstance(value.get(_TUPLE), list):
        value = value[_TUPLE]
    return list(value) if isinstance(value, list) else []


__all__ = ["summarize"]
