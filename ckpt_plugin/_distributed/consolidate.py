"""Read a sharded checkpoint in one process, as full plain tensors: no process group needed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import os
from typing import Any

import torch

from ..errors import CorruptCheckpointError
from .._format.layout import SHARDING_FILE
from .._format.records import FileRecord
from .._storage import Backend, backend_of
from .dcp_storage import read_full, read_sharding
from .files import BackendShardFiles


def read_sharded_items(
    location: str | os.PathLike[str],
    records: Mapping[str, FileRecord],
    items: Iterable[str],
    *,
    verify: bool = True,
    map_location: Any = None,
    backend: Backend | None = None,
) -> dict[str, Any]:
    """The ``items`` of the sharded checkpoint at ``location`` (a directory, or a prefix on the
    object store ``backend`` reaches), consolidated into full tensors. Without ``backend``, a URL
    is reached with the store's standard environment (pass the caller's backend to use its
    ``storage_options``) and a path on the local file system.

    ``records`` are the file records of its ``metadata.json``. The optimizer's state comes back
    keyed by parameter index, as ``Optimizer.state_dict()`` gives it, so that it loads into a
    plain optimizer over the unsharded model.
    """
    if backend is None:
        backend = backend_of(location)
    files = BackendShardFiles(location, backend)
    record = records.get(SHARDING_FILE)
    where = backend.join(files.location, SHARDING_FILE)
    if verify and record is None:
        raise CorruptCheckpointError(f"{where} has no recorded checksum in metadata.json")
    sharding = read_sharding(files, record if verify else None, where=where)
    for name, recorded in sharding.files.items():
        if verify and records.get(name) != recorded:
            raise CorruptCheckpointError(
                f"{backend.join(files.location, name)} is recorded differently in metadata.json and {SHARDING_FILE}"
            )
    wanted = list(items)
    state = read_full(files, sharding, items=wanted, verify=verify, where=where)
    if "optimizer" in state:
        state["optimizer"] = plain_optimizer_state(state["optimizer"], where)
    if map_location is not None:
        device = torch.device(map_location)
        state = _to_device(state, device)
    return {item: state.get(item) for item in wanted}


def model_files(records: Iterable[str]) -> list[str]:
    """The files a consolidated model is read from: ``sharding.json`` and the ``model-r…`` shards."""
    return sorted(name for name in records if name == SHARDING_FILE or name.startswith("model-r"))


def plain_optimizer_state(state: Mapping[str, Any], where: str = "the checkpoint") -> dict[str, Any]:
    """Turn an optimizer state keyed by parameter name (as ``get_state_dict`` gives it) into the
    form ``Optimizer.load_state_dict`` takes: parameters numbered in the order of their groups."""
    try:
        groups = state.get("param_groups") or []
        numbers: dict[str, int] = {}
        plain_groups = []
        for group in groups:
            params = [numbers.setdefault(name, len(numbers)) for name in group["params"]]
            plain_groups.append({**group, "params": params})
        plain_state = {numbers[name]: value for name, value in (state.get("state") or {}).items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{where}: the optimizer state does not name its parameters consistently ({exc!r})") from None
    return {"state": plain_state, "param_groups": plain_groups}


def _to_device(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {key: _to_device(value, device) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_to_device(value, device) for value in tree]
    return tree
