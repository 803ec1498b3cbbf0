"""Which names a checkpoint's documents may use for files, which directory names are checkpoints,
and which object-store prefixes are transactions ckpt_plugin began. No I/O.

Every file a document names lives directly in the checkpoint's own directory, so a name is a
single plain path component: no directory separator, no leading dot (which also rules out ``.``
and ``..``), no control characters, and at most 255 bytes. Anything else in a document read from
disk is damage or an attack, and is refused before the name is joined to a path.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass

MAX_NAME_BYTES = 255
_PLAIN = re.compile(r"[^./\\\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]*")

FILE_NAME_PATTERN = _PLAIN.pattern
"""The regular expression every file name must match in full (also used by the document schemas)."""


def is_plain_file_name(name: object) -> bool:
    """Whether ``name`` is a string usable as one file directly inside a checkpoint directory."""
    if not isinstance(name, str) or _PLAIN.fullmatch(name) is None:
        return False
    try:
        return len(name.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES
    except UnicodeEncodeError:
        return False


_NUMBER = r"(0|[1-9][0-9]*)"
CHECKPOINT_NAME = re.compile(rf"epoch_{_NUMBER}(?:_step_{_NUMBER})?", re.ASCII)
"""The names ckpt_plugin gives checkpoints (``epoch_3``, ``epoch_3_step_120``), matched in full:
ASCII digits, no leading zeros, nothing before or after (not even a newline). Anything else in a
checkpoint directory is foreign, and foreign entries are never listed nor deleted."""


def parse_checkpoint_name(name: object) -> tuple[int, int | None] | None:
    """The epoch and step (None when absent) of the checkpoint name ``name``, or None when ``name``
    is not exactly one that ckpt_plugin generates (see :data:`CHECKPOINT_NAME`)."""
    match = CHECKPOINT_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        return None
    epoch, step = match.groups()
    return int(epoch), None if step is None else int(step)


def is_checkpoint_name(name: object) -> bool:
    """Whether ``name`` is exactly a checkpoint name ckpt_plugin generates."""
    return parse_checkpoint_name(name) is not None


def checkpoint_name(epoch: int, step: int | None) -> str:
    """The name of the checkpoint of ``epoch`` (and ``step``), as :data:`CHECKPOINT_NAME` matches it."""
    return f"epoch_{epoch}" if step is None else f"epoch_{epoch}_step_{step}"


TRANSACTION_SEPARATOR = "@"
_UTC_TIME = (
    r"[0-9]{4}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])"  # YYYYMMDD
    r"T(?:[01][0-9]|2[0-3])[0-5][0-9][0-5][0-9]\.[0-9]{9}Z"  # THHMMSS.nnnnnnnnnZ
)
TRANSACTION_ID_PATTERN = rf"{_UTC_TIME}-[0-9a-f]{{16}}"
"""A transaction id, to be matched in full (also used by the ``metadata.json`` schema)."""
TRANSACTION_NAME = re.compile(
    rf"(?P<name>[0-9A-Za-z][0-9A-Za-z_.+!-]{{0,199}}){TRANSACTION_SEPARATOR}(?P<transaction>{TRANSACTION_ID_PATTERN})",
    re.ASCII,
)
"""The prefix of one transaction on an object store, matched in full:
``<name>@<YYYYMMDD>T<HHMMSS>.<nanoseconds>Z-<16 lowercase hex>``, the UTC time its writer began,
fixed width, then 64 random bits, as in ``epoch_3@20260105T143000.123456789Z-9f86d081884c7d65``.
The name is what the prefix holds (a checkpoint name, ``v1.0.0`` in a registry, ``model`` for
production weights). Nothing else is a transaction: ``epoch_1@manual-backup``,
``alice@example.com``, an id with upper-case hex, another width or a trailing newline are
foreign, and foreign objects are never deleted."""

LEGACY_TRANSACTION_NAME = re.compile(
    rf"(?P<name>[0-9A-Za-z][0-9A-Za-z_.+!-]{{0,199}}){TRANSACTION_SEPARATOR}(?P<transaction>[0-9a-f]{{24}})", re.ASCII
)
"""The prefixes release 0.2 wrote (16 hex digits of nanoseconds, then 8 random ones). They are still
read; see :func:`parse_transaction_name`."""


@dataclass(frozen=True)
class TransactionName:
    """A transaction prefix, parsed: what it holds (``name``), its id, and whether 0.2 wrote it."""

    name: str
    transaction: str
    legacy: bool = False

    @property
    def started_ns(self) -> int:
        """When the writer began the transaction, in nanoseconds since the epoch."""
        if self.legacy:
            return int(self.transaction[:16], 16)
        seconds = calendar.timegm(time.strptime(self.transaction[:15], "%Y%m%dT%H%M%S"))
        return seconds * 1_000_000_000 + int(self.transaction[16:25])

    @property
    def order(self) -> tuple[int, str]:
        """Sorts transactions by start, then by id: the later of two commits of a name wins."""
        return self.started_ns, self.transaction


def parse_transaction_name(entry: object, *, legacy: bool = False) -> TransactionName | None:
    """``entry`` parsed as a transaction prefix (:data:`TRANSACTION_NAME`), or None when it is not
    exactly one. With ``legacy``, the 0.2 form (:data:`LEGACY_TRANSACTION_NAME`) is accepted too."""
    if not isinstance(entry, str):
        return None
    match = TRANSACTION_NAME.fullmatch(entry)
    if match is not None:
        try:
            time.strptime(match["transaction"][:15], "%Y%m%dT%H%M%S")  # a real day (no 20260230)
        except ValueError:
            return None
        return TransactionName(match["name"], match["transaction"])
    match = LEGACY_TRANSACTION_NAME.fullmatch(entry) if legacy else None
    return None if match is None else TransactionName(match["name"], match["transaction"], legacy=True)


def format_transaction_id(time_ns: int, random_hex: str) -> str:
    """The transaction id of a writer that began at ``time_ns`` (nanoseconds since the epoch) with
    16 lowercase hex digits of randomness, as :data:`TRANSACTION_NAME` matches it."""
    if re.fullmatch(r"[0-9a-f]{16}", random_hex, re.ASCII) is None:
        raise ValueError(f"a transaction id takes 16 lowercase hex digits of randomness, not {random_hex!r}")
    seconds, nanoseconds = divmod(time_ns, 1_000_000_000)
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(seconds))}.{nanoseconds:09d}Z-{random_hex}"


def transaction_name(name: str, transaction: str) -> str:
    """The prefix name of transaction ``transaction`` for ``name``."""
    return f"{name}{TRANSACTION_SEPARATOR}{transaction}"
