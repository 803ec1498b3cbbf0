"""Which names a checkpoint's documents may use for files, and which directory names are checkpoints. No I/O.

Every file a document names lives directly in the checkpoint's own directory, so a name is a
single plain path component: no directory separator, no leading dot (which also rules out ``.``
and ``..``), no control characters, and at most 255 bytes. Anything else in a document read from
disk is damage or an attack, and is refused before the name is joined to a path.
"""

from __future__ import annotations

import re

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
