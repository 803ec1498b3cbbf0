"""Where the registry keeps validated versions, production and history on an object store.

An object store has neither a directory rename nor a lock, so the local registry's two tools (a
file lock around every change, a rename to publish) are replaced by conditional writes
(:mod:`ckpt_plugin._storage.conditional`)::

    s3://bucket/run/checkpoints/...                  the raw checkpoints (a manager's manifest store)
    s3://bucket/run/validated/
      v1.0.0@<transaction>/                          the version's files, written first (invisible);
                                                     <transaction> as for checkpoints: UTC time + random hex
        model.safetensors, state.json, metadata.json, validation.json[, model.sig]
      v1.0.0.json                                    the claim: created only if absent, it makes the
                                                     version visible and names its prefix
      history/<time><hash>.json                      one object per validate, promote and rollback
      history-pending/<time><hash>.json              the event of a change under way, written before
                                                     it takes effect and removed once it is recorded
    s3://bucket/run/production/
      model.json                                     the production pointer: replaced only if unchanged
      model@<transaction>.safetensors                the weights it names (one object per promotion)

How races resolve:

- **Two validations of one version.** Both write their files under their own prefix; only one
  creation of ``v1.0.0.json`` succeeds (``If-None-Match: *``). The other removes its prefix, and
  raises :class:`~ckpt_plugin.errors.PromotionError` when the version was asked for by name, or
  takes the next version when it was asked for by ``bump``. A validated version never changes.
- **Two promotions.** Each reads ``model.json`` with its ETag, uploads its weights under a new
  name, and replaces ``model.json`` only if the ETag is unchanged (``If-Match``). The loser reads
  the new production and tries again on top of it, so ``previous_versions`` always records the
  promotions in the order they took effect, and no promotion is lost. A rollback that loses the
  race is refused instead, because what it would roll back has changed under it.
- **Readers** read ``model.json``, then the weights it names, and check every byte against the
  checksum it records; a reader that raced a promotion reads again.
- **History** objects are never rewritten, so concurrent writers cannot lose each other's events.
  Each change first writes its event under ``history-pending/``; once the change took effect the
  event is copied to ``history/`` under the same name (so recording it twice is harmless) and the
  pending one removed. A writer killed in between leaves a pending event: it counts when its change
  took effect (the claim names its version, or production is what it promoted; every promotion
  records the pending event of the production it replaces before replacing it) and is removed once
  older than the grace period otherwise.

Leftovers of a writer that died (a version prefix nobody claimed, weights nobody points at) are
removed by the next promotion or rollback once older than a grace period, as for checkpoints, and
so are the multipart uploads it left open. Only names this module writes are ever removed: a
version prefix ``v<version>@<transaction>`` and weights ``model@<transaction>.safetensors``, with a
transaction id of the strict form (:data:`~ckpt_plugin._format.names.TRANSACTION_NAME`). Anything
else under ``validated/`` or ``production/`` (``archive@2024/``, ``notes@team.txt``,
``model@backup.safetensors``) is foreign and left alone; so are the prefixes of release 0.2, except
that weights a production pointer named are removed once it is replaced.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from packaging.version import InvalidVersion, Version

from ..errors import ConfigurationError, CorruptCheckpointError, StorageError
from .._format import codec, documents
from .._format.names import TransactionName, parse_transaction_name, transaction_name
from .._format.records import FileRecord
from .._io.files import read_bytes_file, read_json
from .._storage import STALE_SECONDS, Location, conditional, new_transaction_id, remove_leftovers
from .places import Settle, StagedWeights
from .records import PRODUCTION_MODEL_FILE

CLAIM_FORMAT = "ckpt_plugin.version"
HISTORY_PREFIX = "history"
PENDING_PREFIX = "history-pending"
POINTER_FILE = "model.json"
WEIGHTS_STEM = "model"
WEIGHTS_SUFFIX = ".safetensors"


class ObjectStorePlaces:
    """The validated and production places of one registry on an object store (see the module notes)."""

    def __init__(self, validated_url: str, production_url: str, storage_options: Mapping[str, Any] | None = None,
                 *, grace_seconds: float = STALE_SECONDS, checkpoint_url: str | None = None, backend: Any = None) -> None:
        # an FsspecBackend: the places are URLs; the checkpoints' own when they share the store
        self.backend: Any = backend if backend is not None else Location(validated_url, storage_options).backend()
        self.validated = validated_url.rstrip("/")
        self.production = production_url.rstrip("/")
        self.grace_seconds = grace_seconds
        self.checkpoint_dir: str = checkpoint_url if checkpoint_url is not None else self.validated
        self.validated_dir: str = self.validated
        self.production_dir: str = self.production

    @classmethod
    def beside(cls, checkpoints: Location, validated_dir: Any, production_dir: Any) -> ObjectStorePlaces:
        """The places of the registry over ``checkpoints``: the ones given (URLs on the same store),
        else ``validated/`` and ``production/`` beside it."""
        url = str(checkpoints).rstrip("/")
        parent, _, name = url.rpartition("/")
        if not name or parent.endswith(":/") or parent.endswith("://"):
            raise ConfigurationError(
                f"{url} has no parent prefix to hold validated/ and production/ beside it; save into a prefix "
                "such as s3://bucket/run/checkpoints, or pass validated_dir= and production_dir="
            )
        places = {}
        for label, given, default in (("validated_dir", validated_dir, "validated"), ("production_dir", production_dir, "production")):
            chosen = str(given).rstrip("/") if given is not None else f"{parent}/{default}"
            if not checkpoints.same_store(Location(chosen)):
                raise ConfigurationError(f"{label} must be a URL on the same store as {url} when checkpoint_dir is one, not {given!r}")
            places[label] = chosen
        if len({url, places["validated_dir"], places["production_dir"]}) != 3:
            raise ConfigurationError(
                f"checkpoint_dir, validated_dir and production_dir must be three different places; got {url}, "
                f"{places['validated_dir']} and {places['production_dir']}"
            )
        return cls(places["validated_dir"], places["production_dir"], checkpoints.storage_options or None, checkpoint_url=url,
                   backend=checkpoints.backend())

    def require_conditional_writes(self, action: str) -> None:
        conditional.require(self.backend, action)

    require_writes = require_conditional_writes

    def check(self) -> None:
        """The places on a store are always the ones named: nothing to prove."""

    def require_checkpoints(self) -> None:
        """A prefix exists once something is under it: the manager's listing says what is there."""

    def writing(self, settle: Callable[[], None]) -> contextlib.AbstractContextManager[None]:
        """No lock: every change is a conditional write, and each settles the intents it meets itself."""
        return contextlib.nullcontext()

    def absolute(self, location: str) -> str:
        return location

    def as_dir(self, place: str) -> str:
        return place

    def unreadable_checkpoints(self, listed: set[str]) -> list[tuple[str, str]]:
        """None: only committed manifests are visible on a store, and unreadable ones are warned about."""
        return []

    def is_taken(self, directory_name: str) -> bool:
        return self.backend.fingerprint(self.claim_key(directory_name)) is not None

    # ------------------------------------------------------------------ validated versions

    def claim_key(self, directory_name: str) -> str:
        return self.backend.join(self.validated, f"{directory_name}.json")

    def version_names(self) -> list[str]:
        """The directory names (``v1.0.0``) of every claimed version, in no order."""
        return [name[: -len(".json")] for name in self.backend.list(self.validated) if name.endswith(".json")]

    def version_location(self, directory_name: str) -> tuple[str, FileRecord] | None:
        """The prefix holding claimed version ``directory_name`` and the record of its ``validation.json``."""
        key = self.claim_key(directory_name)
        try:
            data = self.backend.read_bytes(key)
        except FileNotFoundError:
            return None
        claim = documents.validate(documents.load_json(data, key), documents.VersionClaimDoc, key)
        wanted = directory_name[1:]
        prefix = parse_transaction_name(claim["location"], legacy=True)
        if claim["version"] != wanted or prefix is None or prefix.name != directory_name:
            raise CorruptCheckpointError(f"{key} claims {claim['version']} at {claim['location']}, not version {wanted}; "
                                         "the claim was altered: restore it or validate the version again under a new number")
        return self.backend.join(self.validated, claim["location"]), FileRecord.from_json(claim["validation"])

    def begin_version(self, directory_name: str) -> str:
        """A fresh, invisible prefix for the files of a new version."""
        return self.backend.join(self.validated, transaction_name(directory_name, new_transaction_id()))

    def claim(self, version: Version, directory_name: str, prefix: str, validation: FileRecord) -> bool:
        """Make the version written under ``prefix`` visible, unless someone claimed it first (False)."""
        document = {
            "format": CLAIM_FORMAT,
            "format_version": 1,
            "version": str(version),
            "location": prefix.rstrip("/").rsplit("/", 1)[-1],
            "validation": validation.to_json(),
        }
        try:
            conditional.write(self.backend, self.claim_key(directory_name), codec.dumps(document), None)
        except conditional.WriteConflict:
            return False
        return True

    def discard(self, prefix: str) -> None:
        """Remove what a validation that did not claim its version wrote, multipart uploads included
        (recovered later if this fails)."""
        try:
            self.backend.delete_tree(prefix)
        except StorageError:
            pass

    # ------------------------------------------------------------------ production

    @property
    def pointer_key(self) -> str:
        return self.backend.join(self.production, POINTER_FILE)

    def read_pointer(self) -> conditional.Versioned | None:
        return conditional.read(self.backend, self.pointer_key)

    read_production = read_pointer

    def production_bytes(self) -> bytes | None:
        """The production pointer's bytes, or None when nothing is in production."""
        try:
            return read_bytes_file(self.pointer_key, backend=self.backend)
        except CorruptCheckpointError:  # how the read path reports a missing file
            if self.backend.fingerprint(self.pointer_key) is not None:
                raise
            return None

    def stage_weights(self, write: Callable[[str], FileRecord]) -> StagedWeights:
        """Weights under a new name that no pointer names yet, written by ``write``."""
        name = self.new_weights_name()
        try:
            record = write(self.weights_key(name))
        except BaseException:
            self.drop_weights(name)
            raise
        return StagedWeights(name, record)

    def switch(self, staged: StagedWeights, document: bytes, expected: conditional.Versioned | None) -> None:
        """Replace the production pointer with ``document`` if it is still ``expected``
        (:class:`~ckpt_plugin._storage.conditional.WriteConflict` otherwise)."""
        conditional.write(self.backend, self.pointer_key, document, expected)

    def drop_staged(self, staged: StagedWeights) -> None:
        self.drop_weights(staged.name)

    def tidy(self, replaced: Mapping[str, Any] | None, staged: StagedWeights) -> None:
        """After production switched to ``staged``: delete the weights it replaced, and what dead
        writers left. The switch has happened, so a failure here only warns."""
        if replaced is not None:
            self.drop_weights(replaced.get("weights", PRODUCTION_MODEL_FILE))
        try:
            self.recover(staged.name)
        except StorageError as exc:
            warnings.warn(f"could not clean up leftovers in {self.validated} or {self.production} ({exc}); "
                          "a later promotion removes them", UserWarning, stacklevel=4)

    def new_weights_name(self) -> str:
        return f"{transaction_name(WEIGHTS_STEM, new_transaction_id())}{WEIGHTS_SUFFIX}"

    def weights_key(self, name: str) -> str:
        return self.backend.join(self.production, name)

    def drop_weights(self, name: str) -> None:
        """Remove weights no pointer names any more (a reader still on them reads the pointer again),
        if their name is one this module gives weights (0.2's included), and any upload left open on it."""
        if _weights_prefix(name, legacy=True) is not None:
            try:
                self.backend.delete_tree(self.weights_key(name))
            except StorageError as exc:
                warnings.warn(f"could not remove the replaced production weights {name} ({exc}); "
                              "they are removed by a later promotion", UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ history

    @staticmethod
    def event_name(entry: Mapping[str, Any]) -> str:
        """The object name of an event, the same for the same event, sorting by the event's ``time``:
        the time its record was made, which for two racing changes is before the winner's write and
        after the loser's re-read, so the history lists changes in the order they took effect."""
        at = datetime.datetime.fromisoformat(entry["time"])
        digest = hashlib.sha256(codec.dumps(dict(entry))).hexdigest()[:8]
        return f"{int(at.timestamp() * 1_000_000):016x}{digest}.json"

    def log(self, entry: Mapping[str, Any]) -> None:
        """Store one event as an object of its own (already stored: nothing changes)."""
        self._create(HISTORY_PREFIX, entry)

    def record(self, entry: Mapping[str, Any]) -> None:
        """Record the event of a change that took effect, then drop its intent."""
        self.log(entry)
        self.drop_intent(entry)

    def settle_intents(self, took_effect: Settle) -> None:
        """Record the pending events whose change took effect; drop those older than a live writer's."""
        for entry in self.intents():
            if took_effect(entry):
                self.record(entry)
            elif self.is_stale(entry):
                self.drop_intent(entry)

    def in_order(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Events in the order their changes took effect (see :meth:`event_name`)."""
        return sorted(events, key=self.event_name)

    def intend(self, entry: Mapping[str, Any]) -> None:
        """Store the event of a change about to take effect as pending."""
        self._create(PENDING_PREFIX, entry)

    def drop_intent(self, entry: Mapping[str, Any]) -> None:
        """Remove a pending event (recorded, or its change will never take effect)."""
        try:
            self.backend.delete(self.backend.join(self.validated, PENDING_PREFIX, self.event_name(entry)))
        except (FileNotFoundError, StorageError):
            pass  # left for the next promotion to settle

    def intents(self) -> list[dict[str, Any]]:
        """The pending events, whole ones only (a writer may be writing one this moment)."""
        return self._events(PENDING_PREFIX, quiet=True)

    def is_stale(self, entry: Mapping[str, Any]) -> bool:
        """Whether a pending event is older than any live writer's could be."""
        return time.time() - datetime.datetime.fromisoformat(entry["time"]).timestamp() > self.grace_seconds

    def _create(self, folder: str, entry: Mapping[str, Any]) -> None:
        key = self.backend.join(self.validated, folder, self.event_name(entry))
        try:
            conditional.write(self.backend, key, codec.dumps(dict(entry)), None)
        except conditional.WriteConflict:
            pass  # the same event, stored already

    def history(self) -> list[dict[str, Any]]:
        """The recorded events, oldest first."""
        return self._events(HISTORY_PREFIX)

    def _events(self, folder: str, *, quiet: bool = False) -> list[dict[str, Any]]:
        prefix = self.backend.join(self.validated, folder)
        events = []
        for name in sorted(self.backend.list(prefix)):
            key = self.backend.join(prefix, name)
            try:
                events.append(documents.validate(read_json(key, backend=self.backend), documents.HistoryEventDoc, key))
            except (CorruptCheckpointError, FileNotFoundError):
                if not quiet:
                    warnings.warn(f"skipping {key}: it is not a complete history record", UserWarning, stacklevel=4)
        return events

    # ------------------------------------------------------------------ recovery

    def recover(self, pointed_weights: str | None) -> None:
        """Remove version prefixes nobody claimed and weights nobody points at, once they are older
        than the grace period (a live writer may still be about to claim or point at them), and the
        multipart uploads a dead writer left under them. Only names of the strict form are touched."""
        now = time.time()
        claimed = set()
        for directory_name in self.version_names():
            try:
                found = self.version_location(directory_name)
            except CorruptCheckpointError:
                continue
            if found is not None:
                claimed.add(found[0].rsplit("/", 1)[-1])
        for place, owned, keep in (
            (self.validated, _version_prefix, claimed),
            (self.production, _weights_prefix, {pointed_weights}),
        ):
            remove_leftovers(self.backend, place, owned, keep, self.grace_seconds, now)


def _version_prefix(name: str) -> TransactionName | None:
    """``name`` as the prefix of a validated version this module wrote (``v1.0.0@<transaction>``), or None."""
    parsed = parse_transaction_name(name)
    if parsed is None or not parsed.name.startswith("v"):
        return None
    try:
        canonical = str(Version(parsed.name[1:])) == parsed.name[1:]
    except InvalidVersion:
        return None
    return parsed if canonical else None


def _weights_prefix(name: str, *, legacy: bool = False) -> TransactionName | None:
    """``name`` as production weights this module wrote (``model@<transaction>.safetensors``), or None."""
    if not name.endswith(WEIGHTS_SUFFIX):
        return None
    parsed = parse_transaction_name(name[: -len(WEIGHTS_SUFFIX)], legacy=legacy)
    return parsed if parsed is not None and parsed.name == WEIGHTS_STEM else None


__all__ = ["ObjectStorePlaces"]
