"""What a run holds, as plain data for people and scripts: the table of its checkpoints and the
details of one of them. ``ckpt list`` and ``ckpt show`` print these; nothing here imports torch
for a plain (not per-rank sharded) checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._data_summary import summarize
from ._format import codec
from ._format.layout import STATE_FILE
from ._format.records import METADATA_FILE
from ._io.files import read_json
from ._io.info import CheckpointInfo, parse_metadata
from ._metric_choice import choose
from ._retention import best_index
from .tensors import model_parameters, model_shapes

if TYPE_CHECKING:
    from .registry import ArtifactRegistry


@dataclass
class CheckpointTable:
    """The checkpoints of a run, oldest first, with the best and the latest marked.

    ``shown`` are the metrics to show, the ranking metric first; ``hidden`` the recorded ones left
    out (runtime and throughput counters, unless asked for). ``rows`` are the JSON rows: every
    metric, or only ``shown`` when metrics were asked for by name.
    """

    infos: list[CheckpointInfo]
    rows: list[dict[str, Any]]
    shown: list[str]
    hidden: list[str]
    ranking: str
    mode: str
    best: str | None
    versions: list[str]
    production: str | None

    def to_json(self) -> dict[str, Any]:
        """The table as ``ckpt list --json`` prints it."""
        return {"checkpoints": self.rows, "versions": self.versions, "production": self.production}


def checkpoint_table(
    registry: ArtifactRegistry, requested: list[str] | None = None, *, local_dir: str | os.PathLike[str] | None = None
) -> CheckpointTable:
    """The checkpoints of ``registry``'s run and its versions; ``requested`` metric names (in
    order) replace the default choice of metrics. With ``local_dir`` (the local tier of a tiered
    run, whose durable tier the registry reads) the checkpoints of both tiers are listed, and each
    row says which tiers hold a copy (``copies``) and whether its upload is pending."""
    copies = None
    if local_dir is None:
        infos = registry.manager.checkpoints()
    else:
        from ._tiered.copies import tier_copies

        copies = tier_copies(registry.location, local_dir)
        infos = copies.infos
    ranking, mode = registry.manager.ranking(infos)
    shown, hidden = choose((name for info in infos for name in info.metrics), ranking, requested)
    index = best_index(infos, ranking, mode) if infos and mode in ("min", "max") else None  # what ``best`` resolves to
    best = infos[index].name if index is not None else None
    latest = infos[-1].name if infos else None
    production = registry.production()
    rows = [
        {
            "name": info.name,
            "epoch": info.epoch,
            "step": info.step,
            "metrics": info.metrics if requested is None else {name: info.metrics[name] for name in shown if name in info.metrics},
            "size": info.size,
            "saved_at": info.timestamp,
            "best": info.name == best,
            "latest": info.name == latest,
            **({} if copies is None else {"copies": list(copies.held[info.name]), "pending": info.name in copies.pending}),
        }
        for info in infos
    ]
    return CheckpointTable(infos, rows, list(shown), list(hidden), ranking, mode, best, registry.versions(),
                           production["version"] if production else None)


def recorded_metadata(info: CheckpointInfo) -> dict[str, Any]:
    """The ``metadata.json`` of ``info``, checked against its format."""
    metadata = read_json(info.file(METADATA_FILE), backend=info.backend)
    parse_metadata(info.location, metadata, info.backend)
    return metadata


def data_loader_state(info: CheckpointInfo) -> dict[str, Any] | None:
    """What ``info`` records of the training data loaders' position (world size, format, each
    loader's position where known), read from its checked ``state.json``; None when it holds none."""
    if "extra" not in info.items or STATE_FILE not in info.files:
        return None
    state = read_json(info.file(STATE_FILE), info.files[STATE_FILE], backend=info.backend)
    return summarize(state["items"].get("extra", {}).get("tree"))


def checkpoint_details(info: CheckpointInfo) -> dict[str, Any]:
    """Everything recorded about one checkpoint: metrics, config, provenance, the model's size,
    the data loaders' position, and each file with its size and checksum."""
    metadata = recorded_metadata(info)
    model = model_shapes(info)
    return {
        "name": info.name,
        "path": str(info.path),
        "epoch": info.epoch,
        "step": info.step,
        "metrics": info.metrics,
        "metric_for_best": info.metric_for_best,
        "mode": info.mode,
        "saved_at": info.timestamp,
        "items": list(info.items),
        "model_tensors": len(model),
        "model_parameters": model_parameters(model),
        "data_loader": data_loader_state(info),
        "files": {name: record.to_json() for name, record in info.files.items()},
        "config": codec.from_json(metadata.get("config")),
        "provenance": codec.from_json(metadata.get("metadata") or {}),
    }


__all__ = ["CheckpointTable", "checkpoint_details", "checkpoint_table", "data_loader_state", "recorded_metadata"]
