"""The on-disk format as pure data: the checkpoint layout (:mod:`.layout`), file records and checksums
(:mod:`.records`), document layouts and their validation, and file-name rules. No I/O.

Everything read from disk passes through here before it is used, so a checkpoint that came from
anyone can at worst be refused with a :class:`~ckpt_plugin.errors.CorruptCheckpointError`.
"""

from .documents import (
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    SEAL_KEY,
    check_seal,
    load_json,
    parse,
    schema_for,
    seal,
    validate,
    within_depth,
)
from .names import is_plain_file_name

__all__ = [
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "SEAL_KEY",
    "check_seal",
    "is_plain_file_name",
    "load_json",
    "parse",
    "schema_for",
    "seal",
    "validate",
    "within_depth",
]
