"""The save strategies of a :class:`~ckpt_plugin.CheckpointManager`, all through its
:class:`~ckpt_plugin._store.CheckpointStore`: plain or incremental (the model sharded, unchanged
shards reused), written now or by the asynchronous saver in the background, or collective, where
every rank of a distributed job writes its own shards (:mod:`ckpt_plugin._distributed.collective`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _metadata as metadata
from ._options import SaveSettings
from ._snapshot import SaveArguments, current_dir, snapshot_of
from ._store import CheckpointStore
from ._io.async_save import AsyncSaver
from ._io.incremental import IncrementalWriter, Observation
from ._io.info import CheckpointInfo
from ._io.writer import Snapshot
from ._storage import trash

OnCommit = Callable[[CheckpointInfo], None]


class SaveStrategies:
    """Writes one save of a manager by the strategy its options and the objects call for.

    ``saver`` is the manager's asynchronous saver (None: every save is written before it returns).
    """

    def __init__(self, store: CheckpointStore, settings: SaveSettings, saver: AsyncSaver | None) -> None:
        self._store = store
        self._settings = settings
        self._saver = saver
        self._incremental = IncrementalWriter(settings.change_detection) if settings.incremental else None

    def save(
        self, model: Any, optimizer: Any, arguments: SaveArguments, on_commit: OnCommit | None, *, collective: bool
    ) -> CheckpointInfo:
        """Save ``model`` and ``optimizer`` with the other ``arguments`` of ``CheckpointManager.save``;
        collectively when the model is sharded across ranks."""
        if collective:
            return self.sharded(model, optimizer, arguments, on_commit)
        return self.here(model, optimizer, arguments, on_commit)

    def sharded(self, model: Any, optimizer: Any, arguments: SaveArguments, on_commit: OnCommit | None) -> CheckpointInfo:
        """The collective strategy: every rank writes its own shards, the coordinator commits."""
        from ._distributed.collective import save_sharded

        try:  # the save in flight commits first, and the checkpoints it dropped are gone
            if self._saver is not None:
                self._saver.wait()
        finally:
            trash.drain()
        return save_sharded(
            self._store, self._settings, model, optimizer, arguments, saver=self._saver, on_commit=on_commit
        )

    def here(self, model: Any, optimizer: Any, arguments: SaveArguments, on_commit: OnCommit | None) -> CheckpointInfo:
        """The plain and incremental strategies, written now or, with a saver, in the background."""
        seen: list[Observation | None] = [None]

        def take() -> Snapshot:
            snapshot, seen[0] = snapshot_of(self._settings, model, optimizer, arguments, observe=self._incremental is not None)
            return snapshot

        def write(snapshot: Snapshot) -> CheckpointInfo:
            info = self._store.commit(snapshot, incremental=self._incremental, seen=seen[0])
            self._store.committed(info)
            if on_commit is not None:
                on_commit(info)
            return info

        cwd = current_dir()
        if self._saver is None:
            snapshot = take()
            snapshot.pending_provenance = metadata.git_provenance_in_background(cwd)
            return write(snapshot)

        def write_later(snapshot: Snapshot) -> CheckpointInfo:
            snapshot.provenance.update(metadata.git_provenance(cwd))
            return write(snapshot)

        return self._store.pending(self._saver.save(take, write_later))
