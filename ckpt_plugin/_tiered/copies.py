"""Where each checkpoint of a tiered run has copies, read without opening a manager (which would
resume the pending uploads): what ``ckpt list --local-dir`` shows. A rank's copy of a sharded
checkpoint (its own shards, see :mod:`.ranks`) counts as a local copy."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .._io.info import CheckpointInfo
from .._storage import Location
from .journal import PendingJournal
from .ranks import RankCopies
from .tiers import list_committed


@dataclass(frozen=True)
class TierCopies:
    """Every checkpoint of either tier, oldest first (the local copy where both tiers hold one),
    the tiers holding each (``"local"``, ``"durable"``), and the names whose upload is pending."""

    infos: list[CheckpointInfo]
    held: dict[str, tuple[str, ...]]
    pending: frozenset[str]


def tier_copies(durable: Location, local_dir: str | os.PathLike[str]) -> TierCopies:
    """The copies of the run whose durable tier is ``durable`` and whose local tier is ``local_dir``."""
    local = Location.of(local_dir)
    found: dict[str, CheckpointInfo] = {}
    held: dict[str, tuple[str, ...]] = {}
    for tier, place in (("durable", durable), ("local", local)):
        if place.is_missing_directory():
            continue
        for info in list_committed(place.commit_store()):
            found[info.name] = info
            held[info.name] = held.get(info.name, ()) + (tier,)
    if local.is_missing_directory():
        return TierCopies(sorted(found.values(), key=lambda info: info.sort_key), held, frozenset())
    ranks = RankCopies(local.path)
    for record in ranks.records():
        found.setdefault(record.name, ranks.info(record))
        if "local" not in held.get(record.name, ()):
            held[record.name] = held.get(record.name, ()) + ("local",)
    journals = (PendingJournal(local.path), ranks.journal)
    pending = frozenset(name for journal in journals for name, _ in journal.pending())
    return TierCopies(sorted(found.values(), key=lambda info: info.sort_key), held, pending)
