"""What a save records: the arguments of :meth:`CheckpointManager.save` checked and turned into a
:class:`~ckpt_plugin._io.writer.Snapshot` (metrics as plain numbers, ``config`` as plain data, each
state dict taken once, the RNG states when asked)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._options import SaveSettings
from .errors import ConfigurationError, EncodingError
from ._io import incremental as incremental_saves
from ._io.rng import capture_rng_state
from ._io.writer import Snapshot, take_snapshot
from ._metadata import provenance


@dataclass(frozen=True)
class SaveArguments:
    """What one save records besides the model and optimizer, checked (see ``CheckpointManager.save``)."""

    epoch: int
    step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    config: Any = None
    scheduler: Any = None
    extra: Any = None
    files: Mapping[str, bytes] | None = None


def snapshot_of(
    settings: SaveSettings, model: Any, optimizer: Any, arguments: SaveArguments, *, observe: bool = False
) -> tuple[Snapshot, incremental_saves.Observation | None]:
    """The snapshot of one save, and (with ``observe``, for an incremental save) what the
    incremental writer needs to find the unchanged tensors."""
    states = {
        "model": state_of(model, "model"),
        "optimizer": state_of(optimizer, "optimizer"),
        "scheduler": state_of(arguments.scheduler, "scheduler"),
        "extra": arguments.extra,
        "rng": capture_rng_state() if settings.save_rng else None,
    }
    seen = incremental_saves.observe(model, states["model"], states["optimizer"]) if observe else None
    snapshot = take_snapshot(
        states,
        epoch=arguments.epoch,
        step=arguments.step,
        metrics=arguments.metrics,
        config=config_to_dict(arguments.config),
        metric_for_best=settings.metric_for_best,
        mode=settings.mode,
        provenance=provenance(git=False),  # asked of git while the files are written
        files=arguments.files,
    )
    return snapshot, seen


def current_dir() -> str | None:
    """The working directory (where git provenance is asked), or None when it was deleted."""
    try:
        return os.getcwd()
    except OSError:
        return None


def whole_number(value: Any, name: str) -> int:
    """``value`` (an int or a one-element tensor) as an int of at least 0, or :class:`ConfigurationError`."""
    import torch

    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name} must be a whole number of at least 0, not {value!r}")
    return int(value)


def state_of(obj: Any, label: str) -> Any:
    """The state dict of ``obj`` (a live object, or already a state dict); None stays None."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj
    state_dict = getattr(obj, "state_dict", None)
    if callable(state_dict):
        return state_dict()
    raise ConfigurationError(f"{label} must be an object with state_dict() or a state dict, not {type(obj).__name__}")


def normalize_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as plain numbers: one-element tensors and numpy scalars become floats (ints stay ints).

    Raises :class:`EncodingError` for a metric that is not a single number.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise EncodingError(f"metrics must be a dict of metric name to number, not {type(metrics).__name__}")
    normalized: dict[str, Any] = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise EncodingError(f"metric names must be strings, not {name!r}")
        normalized[name] = _scalar(name, value)
    return normalized


def _scalar(name: str, value: Any) -> Any:
    import torch

    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):  # subclasses such as np.float64 become plain numbers
        return float(value) if isinstance(value, float) else _ranked_int(name, int(value))
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise EncodingError(f"metric {name!r} is a tensor of shape {tuple(value.shape)}; log one number per metric")
        return float(value.detach().cpu().item())
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "size", 1) == 1:
        result = item()
        if isinstance(result, (bool, int, float)):
            return _scalar(name, result)
    raise EncodingError(f"metric {name!r} is {value!r}, not a number; log one number per metric")


def _ranked_int(name: str, value: int) -> int:
    """``value``, if a float can hold it (checkpoints are ranked by their metrics as floats)."""
    try:
        float(value)
    except OverflowError:
        raise ConfigurationError(
            f"metric {name!r} is a whole number of {value.bit_length()} bits, too large for a float to rank; "
            "log it as a float or on a smaller scale"
        ) from None
    return value


def config_to_dict(config: Any) -> Any:
    """Plain data for ``config``: objects with ``to_dict()``, dataclasses and namespaces are converted."""
    if config is None or isinstance(config, (Mapping, list, tuple, str, int, float, bool)):
        return config
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if hasattr(config, "__dict__"):
        return {key: value for key, value in vars(config).items() if not key.startswith("_")}
    return config

