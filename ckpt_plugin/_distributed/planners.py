"""DCP's default planners with every non-tensor value stored as JSON, never as pickle.

Stock DCP turns each non-tensor value of a state dict (a BYTE_IO item: a learning rate, ``betas``,
the parameter names of a group) into ``torch.save`` bytes and reads it back with a full unpickler.
These subclasses keep DCP's planning (who writes which chunk, how chunks map onto the shards of
the restoring ranks) and swap only that encoding for the package's codec, which decodes to plain
data types and runs no code.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, WriteItem, WriteItemType

from ..errors import CorruptCheckpointError, IncompatibleCheckpointError
from .._format import codec


def _is_tensor(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, ShardedTensor))


class JsonSavePlanner(DefaultSavePlanner):
    """:class:`DefaultSavePlanner` that stores non-tensor values as codec JSON.

    Every value is encoded while planning, so a value JSON cannot hold raises
    :class:`~ckpt_plugin.errors.EncodingError` (naming its key) before any rank writes a byte.
    """

    def set_up_planner(self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, storage_meta, is_coordinator)
        self._encoded = {
            key: codec.dumps(codec.to_json(value, key)) for key, value in self.state_dict.items() if not _is_tensor(value)
        }

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:  # noqa: A002 - DCP's name
        if write_item.type == WriteItemType.BYTE_IO:
            key = write_item.index.fqn
            data = self._encoded.get(key)
            return io.BytesIO(data if data is not None else codec.dumps(codec.to_json(object, key)))
        return object


class JsonLoadPlanner(DefaultLoadPlanner):
    """:class:`DefaultLoadPlanner` that reads non-tensor values as codec JSON and checks, before
    planning any read, that every live tensor can take the stored one.

    ``where`` names the checkpoint in error messages.
    """

    def __init__(self, *args: Any, where: str = "the checkpoint", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.where = where

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        check_compatible(self.state_dict, self.metadata, strict=not self.allow_partial_load, where=self.where)
        return super().create_local_plan()

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        key = read_item.dest_index.fqn
        try:
            decoded = codec.from_json(codec.loads(value.getvalue()))
        except (ValueError, TypeError, KeyError) as exc:
            raise CorruptCheckpointError(f"{self.where}: the stored value of {key!r} cannot be decoded ({exc})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[key], decoded)
        else:
            self.state_dict[key] = decoded


def check_compatible(state_dict: dict[str, Any], metadata: Metadata, *, strict: bool, where: str) -> None:
    """Raise :class:`IncompatibleCheckpointError` naming the first key of the flattened live
    ``state_dict`` that the checkpoint described by ``metadata`` cannot fill at this world size."""
    stored = metadata.state_dict_metadata
    for key, live in state_dict.items():
        entry = stored.get(key)
        if entry is None:
            if strict:
                raise IncompatibleCheckpointError(
                    f"{where} holds nothing for {key!r}, which the state being restored has; restore with "
                    "strict=False to keep its current value, or restore a checkpoint of the same model"
                )
            continue
        if not _is_tensor(live):
            continue
        if isinstance(entry, BytesStorageMetadata):
            raise IncompatibleCheckpointError(
                f"{where} holds a plain value for {key!r}, but the state being restored has a tensor there; "
                "the model or optimizer differs from the one that was saved"
            )
        if tuple(entry.size) != tuple(live.size()):
            raise IncompatibleCheckpointError(
                f"{where} holds {key!r} with global shape {list(entry.size)}, which cannot be resharded into "
                f"the live tensor of global shape {list(live.size())}; build the model with the configuration "
                "it was saved with"
            )
