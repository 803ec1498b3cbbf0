"""The registry's audit log and the intents that keep it true after a kill at any instant.

Each change first writes its event as an intent, then takes effect, then records the event and
drops the intent. An intent left by a dead writer is an event if its change took effect (the
version is validated, or production is what it promoted) and is dropped otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, PromotionError
from .versions import parse_version

if TYPE_CHECKING:
    from packaging.version import Version

    from .places import Places

_Unread: Any = object()
"""Production not read yet."""


class HistoryOperations:
    """The history part of :class:`~ckpt_plugin.registry.ArtifactRegistry`."""

    _places: Places

    if TYPE_CHECKING:
        def _located(self, version: Version) -> tuple[str, dict[str, Any]]: ...
        def _production_document(self, data: bytes | None = None) -> dict[str, Any] | None: ...

    def history(self) -> list[dict[str, Any]]:
        """The audit log, oldest first: one dict per validate, promote and rollback, with ``time``,
        ``event``, ``version``, ``source`` (checkpoint path, epoch, checksum), ``user`` and ``host``."""
        events = self._places.history()
        pending = [event for event in self._places.intents() if event not in events]
        production = _Unread
        for event in pending:
            if event["event"] != "validate" and production is _Unread:
                production = self._readable_production()
            if self._took_effect(event, production):
                events.append(event)
        return self._places.in_order(events) if pending else events

    def _record(self, entry: Mapping[str, Any]) -> None:
        """Record the event of a change that took effect, then drop its intent."""
        self._places.record(entry)

    def _settle_after_failure(self, entry: Mapping[str, Any] | None) -> bool:
        """After the change of intent ``entry`` failed: record its event if it took effect all the
        same (a failure after the change), else drop the intent. Returns whether it took effect."""
        if entry is None:
            return False
        took_effect = False
        try:
            took_effect = self._took_effect(entry, self._readable_production())
            if took_effect:
                self._record(entry)
            else:
                self._places.drop_intent(entry)
        except Exception:  # noqa: BLE001 - the failure on its way out says more; the next change settles it
            pass
        return took_effect

    def _settle_intents(self, production: Mapping[str, Any] | None) -> None:
        """Turn the intents of changes that took effect into events, and drop those of changes that
        did not (on an object store: once they are older than a live writer could be)."""
        self._places.settle_intents(lambda entry: self._took_effect(entry, production))

    def _took_effect(self, entry: Mapping[str, Any], production: Mapping[str, Any] | None) -> bool:
        """Whether the change of the intent ``entry`` took effect: its version is validated with its
        time, or production is the version it promoted at its time. A later change settles every
        earlier intent first, so production is the latest promotion's."""
        try:
            if entry["event"] == "validate":
                return self._located(parse_version(entry["version"]))[1]["validated_at"] == entry["time"]
        except (CheckpointNotFoundError, CorruptCheckpointError, PromotionError):
            return False
        return production is not None and (production["version"], production["promoted_at"]) == (entry["version"], entry["time"])

    def _readable_production(self) -> dict[str, Any] | None:
        """The production record, or None when there is none or it is damaged."""
        try:
            return self._production_document()
        except CorruptCheckpointError:
            return None
