"""Retention across two tiers: which copies to delete. Pure functions over plain data, no I/O.

- The durable tier is governed by the manager's policies (``max_checkpoints``, ``keep_best``,
  ``keep_top_k``), exactly as a single-tier manager's directory is.
- The local tier keeps the ``keep_local`` newest local copies and every copy whose upload is
  pending. A local copy beyond those goes once a durable copy of it exists.
- The only copy of a checkpoint is never deleted to save space: a local copy without a durable one
  goes only when the manager's policies retire that checkpoint itself (its durable copy was
  deleted by the durable tier's retention already).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol, TypeVar

from .. import _retention as retention


class Named(retention.RetentionEntry, Protocol):
    """What tier retention needs of a checkpoint: its name, epoch, step and metrics."""

    @property
    def name(self) -> str: ...


Entry = TypeVar("Entry", bound=Named)


def durable_to_delete(
    durable: Sequence[Entry], policies: Sequence[retention.RetentionPolicy], protect: Entry | None = None
) -> list[Entry]:
    """The durable copies the policies drop (``durable`` oldest first); ``protect`` (an upload just
    committed) is kept."""
    protected = None if protect is None else retention.order_key(protect.epoch, protect.step)
    return retention.to_delete(durable, policies, protected)  # type: ignore[return-value]


def local_to_delete(
    local: Sequence[Entry],
    *,
    pending: Collection[str],
    durable: Collection[str],
    keep_local: int,
    retired: Collection[str] = (),
) -> list[Entry]:
    """The local copies to delete. ``local`` is oldest first; ``pending`` names the copies awaiting
    upload, ``durable`` the checkpoints the durable tier holds, and ``retired`` those the manager's
    policies drop (see :func:`retired_names`)."""
    newest = {entry.name for entry in local[max(0, len(local) - keep_local) :]} if keep_local > 0 else set()
    return [
        entry
        for entry in local
        if entry.name not in newest and entry.name not in pending and (entry.name in durable or entry.name in retired)
    ]


def retired_names(everything: Sequence[Entry], policies: Sequence[retention.RetentionPolicy]) -> set[str]:
    """The names the policies drop among ``everything``: the checkpoints of both tiers, each once,
    oldest first."""
    return {entry.name for entry in retention.to_delete(everything, policies)}
