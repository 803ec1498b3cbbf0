"""A training data loader's position, kept in a checkpoint as JSON and tensors, never pickled.

A stateful loader (torchdata's ``StatefulDataLoader``, accelerate's loaders built with
``use_stateful_dataloader``, or any object with ``state_dict()`` and ``load_state_dict()``, which
covers Hugging Face ``datasets`` iterable datasets) reports where it stands in the epoch: how many
samples it has yielded, its sampler's generator, its dataset's own position. That state is a tree
of dicts, lists, numbers, strings and tensors, which the manager's codec stores as JSON plus
tensors. This module captures it with the world size it was taken at and puts it back. A resume
at another world size continues the epoch when a :class:`~ckpt_plugin.ResumableDistributedSampler`
holds the position (it splits the rest of the epoch over the new ranks); any other position is
refused there instead of silently repeating or dropping samples.

Nothing here imports a training framework; the callbacks hand in the loader and the world size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import EncodingError, IncompatibleCheckpointError

DATA_STATE_KEY = "data_loader"
"""The key of the loader's state in a checkpoint's ``extra`` tree."""

FORMAT_VERSION = 1
_PLAIN_LEAVES = (type(None), bool, int, float, str)


def is_stateful(loader: Any) -> bool:
    """Whether ``loader`` can report and restore its position (``state_dict`` and ``load_state_dict``).

    accelerate's loaders always have both methods but hold a state only when built with
    ``use_stateful_dataloader``, which they record."""
    flag = getattr(loader, "use_stateful_dataloader", None)
    if isinstance(flag, bool):
        return flag
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def capture(loader: Any, *, world_size: int) -> dict[str, Any] | None:
    """The state to keep for ``loader`` (None when it is not stateful), tagged with ``world_size``.

    Raises :class:`~ckpt_plugin.EncodingError` naming the first value that is not plain data
    (dicts, lists, tuples, None, booleans, numbers, strings, tensors): such a state could only be
    pickled, which a checkpoint never is."""
    if not is_stateful(loader):
        return None
    state = loader.state_dict()
    check_plain(state, "state_dict()")
    return {
        "format": FORMAT_VERSION,
        "world_size": int(world_size),
        "any_world_size": resumes_at_any_world_size(loader),
        "state": state,
    }


def resumes_at_any_world_size(loader: Any) -> bool:
    """Whether ``loader`` draws its samples from a :class:`~ckpt_plugin.ResumableDistributedSampler`,
    whose position in an epoch continues at another world size."""
    from .sampler import ResumableDistributedSampler  # imports torch, which reading a summary must not

    return sampler_of(loader, ResumableDistributedSampler) is not None


def sampler_of(loader: Any, kind: type) -> Any:
    """The sampler of type ``kind`` that ``loader`` draws from, itself or through its batch sampler, or None."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        if isinstance(sampler, kind):
            return sampler
    return None


def check_plain(tree: Any, where: str) -> None:
    """Refuse a loader state holding anything but plain data and tensors (see :func:`capture`)."""
    stack = [(tree, where)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, Mapping):
            stack.extend((value, f"{at}[{key!r}]") for key, value in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((value, f"{at}[{index}]") for index, value in enumerate(node))
        elif not (isinstance(node, _PLAIN_LEAVES) or _is_tensor(node)):
            raise EncodingError(
                f"the data loader's {at} is a {type(node).__name__}, which a checkpoint cannot hold without pickle; "
                "return plain data (numbers, strings, lists, dicts) or tensors from the dataset's or sampler's state_dict()"
            )


def check_world_size(saved: Mapping[str, Any], world_size: int, path: Any) -> None:
    """Refuse to resume the loader state ``saved`` (from :func:`capture`) at another ``world_size``,
    unless a :class:`~ckpt_plugin.ResumableDistributedSampler` held it.

    Each rank's sampler state counts the samples of its own shard; at another world size the shards
    differ, so the rest of the epoch would repeat some samples and drop others. That sampler knows
    the whole epoch's order and splits what is left of it over the new ranks instead."""
    saved_size = saved.get("world_size")
    if saved_size == world_size or saved.get("any_world_size") is True:
        return
    raise IncompatibleCheckpointError(
        f"{path} was saved inside an epoch by {saved_size} process(es), and this run has {world_size}: the data "
        "loader's position counts the samples of each process's shard, so resuming it here would repeat some samples "
        f"and drop others. Either resume with {saved_size} process(es), or resume from a checkpoint taken at the end "
        "of an epoch (ckpt list shows each checkpoint's epoch and step), which any world size can continue. For a "
        "map-style dataset under Lightning or in a loop of your own, a loader whose sampler is "
        "ckpt_plugin.ResumableDistributedSampler continues mid-epoch at any world size (an iterable dataset's position "
        "cannot be split over another number of processes, and the Trainer's loaders shard a sampler of their own)"
    )


def restore(loader: Any, saved: Mapping[str, Any], *, world_size: int, path: Any) -> None:
    """Put the state ``saved`` (from :func:`capture`) back into ``loader`` after checking it."""
    found = saved.get("format") if isinstance(saved, Mapping) else type(saved).__name__
    if found != FORMAT_VERSION or "state" not in saved:
        raise IncompatibleCheckpointError(
            f"{path} holds a data loader state of format {found!r}, which this version of ckpt_plugin "
            f"does not read (it reads format {FORMAT_VERSION})"
        )
    check_world_size(saved, world_size, path)
    loader.load_state_dict(saved["state"])


def _is_tensor(value: Any) -> bool:
    import torch  # already imported by whoever built a loader

    return isinstance(value, torch.Tensor)


__all__ = [
    "DATA_STATE_KEY",
    "capture",
    "check_plain",
    "check_world_size",
    "is_stateful",
    "restore",
    "resumes_at_any_world_size",
    "sampler_of",
]
