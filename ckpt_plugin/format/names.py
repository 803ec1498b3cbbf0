"""Which names a checkpoint's documents may use for files. No I/O.

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
