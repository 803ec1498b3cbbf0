"""The registry's places in local directories: a file lock serializes writers, and a rename
publishes a version or a production model whole (see :mod:`ckpt_plugin.registry.core`)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import filelock
from packaging.version import Version

from ..errors import CheckpointError, CheckpointNotFoundError, ConfigurationError, CorruptCheckpointError, ForeignFileError, PromotionError
from .._format import codec, documents
from .._format.layout import looks_like_checkpoint
from .._format.records import METADATA_FILE, FileRecord
from .._io.files import read_bytes_file, write_bytes_file
from .._io.reader import read_info
from .._storage import LOCAL, Backend, LocalStore, append_line, conditional, publish_file
from .places import Settle, StagedWeights
from .records import HISTORY_FILE, INTENT_FILE, LOCK_FILE, PRODUCTION_FILES, PRODUCTION_MODEL_FILE, PRODUCTION_RECORD_FILE, VALIDATION_FILE


class LocalPlaces:
    """``validated/`` and ``production/`` as local directories beside (or apart from) the checkpoints.

    The places beside a checkpoint directory are its own only once it exists: until then (a
    mistyped name, and neither place given) every read or write raises
    :class:`CheckpointNotFoundError` instead of serving another run's ``validated/`` and ``production/``.
    """

    backend: Backend = LOCAL

    def __init__(self, checkpoint_dir: Path, validated_dir: Any, production_dir: Any, *, lock_timeout: float) -> None:
        self.checkpoint_dir = checkpoint_dir
        self._places_unproven = validated_dir is None and production_dir is None and not checkpoint_dir.is_dir()
        beside = checkpoint_dir.parent
        self.validated_dir = Path(validated_dir).expanduser() if validated_dir is not None else beside / "validated"
        self.production_dir = Path(production_dir).expanduser() if production_dir is not None else beside / "production"
        places = [p.resolve() for p in (self.checkpoint_dir, self.validated_dir, self.production_dir)]
        if len(set(places)) != 3:
            raise ConfigurationError(
                "checkpoint_dir, validated_dir and production_dir must be three different directories; "
                f"got {self.checkpoint_dir}, {self.validated_dir} and {self.production_dir}"
            )
        self._validated = LocalStore(self.validated_dir)
        self._production_parent = LocalStore(self.production_dir.parent)
        self._lock = filelock.FileLock(str(self.validated_dir / LOCK_FILE), timeout=lock_timeout)
        for store in (self._validated, self._production_parent):
            try:
                store.remove_dead_probes()
            except OSError:  # a reader that may not delete: the next writer removes them
                pass

    # ------------------------------------------------------------------ the place itself

    def check(self) -> None:
        """Refuse the default places beside a checkpoint directory that has never existed while
        this registry was in use: they would be another run's (``ArtifactRegistry("chekpoints")``
        beside ``production/``). A registry made before the run's first save is fine once the run
        has saved, and one whose raw checkpoints were deleted later keeps its versions."""
        if self._places_unproven:
            self._places_unproven = not self.checkpoint_dir.is_dir()
        if self._places_unproven:
            raise CheckpointNotFoundError(
                f"{self.checkpoint_dir} does not exist, so the validated/ and production/ beside it are not its own; "
                "pass the directory a CheckpointManager saved into, or validated_dir= and production_dir= to use "
                "a registry without one"
            )

    def require_checkpoints(self) -> None:
        if not self.checkpoint_dir.is_dir():
            raise CheckpointNotFoundError(
                f"checkpoint directory {self.checkpoint_dir} does not exist; pass the directory the "
                "CheckpointManager saved into"
            )

    def unreadable_checkpoints(self, listed: set[str]) -> list[tuple[str, str]]:
        """``(metadata path, error)`` for each entry of the checkpoint directory named like a
        checkpoint but not among ``listed`` because it cannot be read."""
        unreadable = []
        for entry in LocalStore(self.checkpoint_dir).entries():
            if looks_like_checkpoint(entry.name) and entry.name not in listed:
                path = Path(entry.path)
                try:
                    read_info(path)
                except (CheckpointError, KeyError, TypeError, ValueError) as exc:
                    unreadable.append((str(path / METADATA_FILE), str(exc)))
        return unreadable

    def require_writes(self, action: str) -> None:
        """Local directories can always be written (the lock is taken by :meth:`writing`)."""

    @contextmanager
    def writing(self, settle: Callable[[], None]) -> Iterator[None]:
        """Hold the registry lock, after removing what dead writers left and settling their intents."""
        self.check()
        self._validated.ensure_writable()
        try:
            with self._lock:
                self._validated.recover()
                self._production_parent.recover(only=self.production_dir.name)
                settle()
                yield
        except filelock.Timeout:
            raise PromotionError(
                f"another process has held the registry lock {self._lock.lock_file} for more than "
                f"{self._lock.timeout} s; wait for its promotion to finish and retry"
            ) from None

    def absolute(self, location: str) -> str:
        return str(Path(location).resolve())

    def as_dir(self, place: str) -> Path:
        return Path(place)

    # ------------------------------------------------------------------ validated versions

    def version_names(self) -> list[str]:
        self.check()
        return [entry.name for entry in self._validated.entries() if (Path(entry.path) / VALIDATION_FILE).is_file()]

    def is_taken(self, directory_name: str) -> bool:
        self.check()
        return (self.validated_dir / directory_name).exists()

    def version_location(self, directory_name: str) -> tuple[str, None] | None:
        self.check()
        local = self.validated_dir / directory_name
        return (str(local), None) if (local / VALIDATION_FILE).is_file() else None

    def begin_version(self, directory_name: str) -> str:
        return str(self._validated.staging_dir(directory_name))

    def claim(self, version: Version, directory_name: str, prefix: str, validation: FileRecord) -> bool:
        """Publish the staged version with one rename (the lock is held: nobody claims it first)."""
        self._validated.publish(Path(prefix), directory_name)
        return True

    def discard(self, prefix: str) -> None:
        self._validated.discard(Path(prefix))

    # ------------------------------------------------------------------ production

    def production_bytes(self) -> bytes | None:
        self.check()
        path = self.production_dir / PRODUCTION_RECORD_FILE
        try:
            return read_bytes_file(path)
        except CorruptCheckpointError:
            if path.exists():
                raise
            return None

    def read_production(self) -> conditional.Versioned | None:
        """The production record's bytes (the lock is held, so no tag is needed)."""
        data = self.production_bytes()
        return None if data is None else conditional.Versioned(data, "")

    def stage_weights(self, write: Callable[[str], FileRecord]) -> StagedWeights:
        """A staging directory beside production holding the weights ``write`` writes."""
        place, parent = self._production_place()
        _refuse_foreign_production(place)
        parent.ensure_writable(place.name)  # the parent is not the registry's: only production's leftovers are removed there
        parent.recover(only=place.name)
        staging = parent.staging_dir(place.name)
        try:
            record = write(str(staging / PRODUCTION_MODEL_FILE))
        except BaseException:
            parent.discard(staging)
            raise
        return StagedWeights(PRODUCTION_MODEL_FILE, record, (staging, parent, place))

    def switch(self, staged: StagedWeights, document: bytes, expected: conditional.Versioned | None) -> None:
        """Write the record beside the staged weights and replace ``production/`` with one rename."""
        staging, parent, place = staged.place
        write_bytes_file(staging / PRODUCTION_RECORD_FILE, document)
        parent.publish(staging, place.name)

    def drop_staged(self, staged: StagedWeights) -> None:
        staging, parent, _ = staged.place
        parent.discard(staging)

    def tidy(self, replaced: Mapping[str, Any] | None, staged: StagedWeights) -> None:
        """Nothing is left behind: the rename replaced the whole directory."""

    def _production_place(self) -> tuple[Path, LocalStore]:
        """Where a promotion writes: ``production_dir``, or, when that is a symbolic link, the
        directory it points to (the link is written through and stays as it is)."""
        if not self.production_dir.is_symlink():
            return self.production_dir, self._production_parent
        place = Path(os.path.realpath(self.production_dir))
        if place in (self.validated_dir.resolve(), self.checkpoint_dir.resolve()) or place == place.parent:
            raise PromotionError(
                f"production_dir {self.production_dir} is a link to {place}, which is not a place for the production "
                "model; point the link at a directory of its own"
            )
        return place, LocalStore(place.parent)

    # ------------------------------------------------------------------ history

    def history(self) -> list[dict[str, Any]]:
        """The events of ``history.jsonl``, in the order they were appended."""
        self.check()
        path = self.validated_dir / HISTORY_FILE
        if not path.is_file():
            return []
        events = []
        for number, line in enumerate(read_bytes_file(path).splitlines(), 1):
            where = f"line {number} of {path}"
            try:
                events.append(documents.validate(documents.load_json(line, where), documents.HistoryEventDoc, where))
            except CorruptCheckpointError:  # a line whose writer died mid-write; every other line stands
                warnings.warn(f"skipping line {number} of {path}: it is not a complete history record", UserWarning, stacklevel=4)
        return events

    def intents(self) -> list[dict[str, Any]]:
        """The intent a writer left (none for one cut short, whose change never began)."""
        path = self.validated_dir / INTENT_FILE
        try:
            return [documents.validate(documents.load_json(read_bytes_file(path), str(path)), documents.HistoryEventDoc, str(path))]
        except CorruptCheckpointError:
            return []

    def intend(self, entry: Mapping[str, Any]) -> None:
        """Write ``entry`` as the intent of the change about to take effect (the lock is held, and
        any earlier intent was settled when it was taken)."""
        path = self.validated_dir / INTENT_FILE
        path.unlink(missing_ok=True)
        publish_file(path, lambda handle: handle.write(codec.dumps(dict(entry))))

    def record(self, entry: Mapping[str, Any]) -> None:
        append_line(self.validated_dir / HISTORY_FILE, codec.dumps(dict(entry)))
        self.drop_intent(entry)

    def drop_intent(self, entry: Mapping[str, Any] | None = None) -> None:
        (self.validated_dir / INTENT_FILE).unlink(missing_ok=True)

    def settle_intents(self, took_effect: Settle) -> None:
        """Under the lock: record a dead writer's intent if its change took effect, and drop it."""
        for entry in self.intents():
            if took_effect(entry) and entry not in self.history():
                append_line(self.validated_dir / HISTORY_FILE, codec.dumps(entry))
        self.drop_intent()

    def in_order(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Events are appended in the order their changes took effect (the lock orders them)."""
        return events


def _refuse_foreign_production(place: Path) -> None:
    """Raise :class:`ForeignFileError` when the production directory holds anything a promotion did
    not write: replacing the directory would delete it."""
    try:
        foreign = sorted(name for name in os.listdir(place) if name not in PRODUCTION_FILES)
    except (FileNotFoundError, NotADirectoryError):
        return
    if foreign:
        raise ForeignFileError(
            f"{place} holds {', '.join(repr(name) for name in foreign)}, which ckpt_plugin did not write; a "
            "promotion replaces the whole directory and would delete it. Move it out of the production directory "
            "and promote again"
        )
