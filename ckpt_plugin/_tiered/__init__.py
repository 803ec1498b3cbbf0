"""Tiered checkpoints: commit to a fast local directory, drain to a durable store in the background,
read from the fastest copy that verifies. See :class:`.tiers.Tiers`."""

from .journal import PendingJournal
from .tiers import Tiers, list_committed
from .uploader import Uploader

__all__ = ["PendingJournal", "Tiers", "Uploader", "list_committed"]
