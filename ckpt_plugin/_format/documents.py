"""The layout of every JSON document ckpt_plugin reads from disk, and its validation. No I/O.

A document comes from a file that anyone may have written, so it is parsed and checked before any
of its values is used: it must be JSON no larger than :data:`MAX_DOCUMENT_BYTES`, nested no deeper
than :data:`MAX_DEPTH`, and match its schema exactly: ``type(x) is int`` for counts and sizes (no
``true``, ``1.9`` or ``"12"``), ``0 <= n < 2**63``, file names that are one plain path component
(:mod:`.names`). The schemas are :mod:`msgspec` structs, which check a document in C at a fraction of
the cost of parsing it. Any failure raises :class:`~ckpt_plugin.errors.CorruptCheckpointError`
naming the file and the key path (``$.files[...].size``).

Documents ckpt_plugin writes after the checkpoint itself (the validation record, the production
record, the listing cache) carry a checksum of their own content, under :data:`SEAL_KEY`; see
:func:`seal` and :func:`check_seal`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Optional

import msgspec
import xxhash

from ..errors import CorruptCheckpointError
from .names import FILE_NAME_PATTERN, MAX_NAME_BYTES, TRANSACTION_ID_PATTERN, TransactionName, checkpoint_name

MAX_DOCUMENT_BYTES = 256 * 1024 * 1024
"""The largest JSON document read (a ``state.json`` of a very large optimizer stays far below)."""
MAX_DEPTH = 128
"""The deepest nesting of arrays and objects accepted in a document."""
SEAL_KEY = "document_checksum"
CHECKPOINT_FORMAT = "ckpt_plugin.checkpoint"
"""The ``format`` of every checkpoint's ``metadata.json``."""

Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
FileName = Annotated[str, msgspec.Meta(pattern=f"^{FILE_NAME_PATTERN}$", min_length=1, max_length=MAX_NAME_BYTES)]
Checksum = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
Mode = Literal["min", "max"]
TransactionId = Annotated[str, msgspec.Meta(pattern=rf"^{TRANSACTION_ID_PATTERN}\Z")]


class _Doc(msgspec.Struct, kw_only=True):
    """Unknown keys are allowed (a later release may add some); known ones must match exactly."""


class FileRecordDoc(_Doc, kw_only=True):
    size: Count
    checksum: Checksum


class MetadataDoc(_Doc, kw_only=True):
    """``metadata.json``: what a checkpoint holds and every file's size and checksum."""

    format: str
    format_version: int
    epoch: Count
    step: Optional[Count] = None
    metrics: dict[str, Any] = {}
    metric_for_best: Optional[str] = None
    mode: Mode = "min"
    config: Any = None
    metadata: dict[str, Any] = {}
    items: list[str] = []
    files: dict[FileName, FileRecordDoc] = {}
    transaction: Optional[TransactionId] = None
    """The transaction whose prefix holds the checkpoint on an object store (absent locally and in 0.2)."""
    metadata_checksum: Checksum


class ItemDoc(_Doc, kw_only=True):
    file: Optional[FileName] = None
    prefix: str = ""
    tree: Any = None


class StateDoc(_Doc, kw_only=True):
    """``state.json``: each item's skeleton and the file holding its tensors."""

    items: dict[str, ItemDoc]


class IndexDoc(_Doc, kw_only=True):
    """A Hugging Face shard index (``model.safetensors.index.json``)."""

    metadata: dict[str, Any] = {}
    weight_map: dict[str, FileName]


class SummaryDoc(_Doc, kw_only=True):
    epoch: Count
    step: Optional[Count]
    metrics: dict[str, Any]
    metric_for_best: Optional[str]
    mode: Mode
    timestamp: Optional[str]
    files: dict[FileName, tuple[Count, Checksum]]
    items: list[str]


class ListingEntryDoc(_Doc, kw_only=True):
    identity: tuple[int, int, int, int]
    summary: SummaryDoc


class ListingDoc(_Doc, kw_only=True):
    """``.listing.json``: the listing cache of a checkpoint directory."""

    version: int
    entries: dict[str, ListingEntryDoc]
    document_checksum: Checksum


class SourceDoc(_Doc, kw_only=True):
    path: str
    name: str
    epoch: Count
    step: Optional[Count] = None
    checksum: Checksum
    saved_at: Optional[str] = None


class CheckDoc(_Doc, kw_only=True):
    name: Text
    passed: bool
    detail: Optional[str] = None


class ActorDoc(_Doc, kw_only=True):
    user: Text
    host: Text


class _VersionRecordDoc(_Doc, kw_only=True):
    """What the validation record and the production record both say about a version."""

    version: Text
    source: SourceDoc
    metrics: dict[str, Any]
    metric_for_best: Optional[str]
    mode: Mode
    checks: list[CheckDoc]
    files: dict[FileName, FileRecordDoc]
    validated_at: Text
    validated_by: ActorDoc
    document_checksum: Checksum


class ValidationDoc(_VersionRecordDoc, kw_only=True):
    """``validation.json``: a validated version's record."""

    format: Literal["ckpt_plugin.validated"]
    format_version: Literal[1]


class ProductionDoc(_VersionRecordDoc, kw_only=True):
    """``production/model.json``: what is being served and where it came from."""

    format: Literal["ckpt_plugin.production"]
    format_version: Literal[1]
    tied: dict[str, str] = {}
    config: Any = None
    promoted_at: Text
    promoted_by: ActorDoc
    previous_versions: list[Text]
    model: Any
    weights: FileName = "model.safetensors"
    """The file beside ``model.json`` that holds the weights (unique per promotion on an object store)."""


class VersionClaimDoc(_Doc, kw_only=True):
    """``validated/v<version>.json`` on an object store: the claim that makes a version visible,
    naming the prefix that holds it and the checksum of its ``validation.json``."""

    format: Literal["ckpt_plugin.version"]
    format_version: Literal[1]
    version: Text
    location: FileName
    validation: FileRecordDoc


class HistoryEventDoc(_Doc, kw_only=True):
    """One line of ``validated/history.jsonl``."""

    time: Text
    event: Text
    version: Text
    user: Text
    host: Text
    source: Optional[SourceDoc] = None
    previous: Optional[Text] = None



SCHEMAS: dict[str, type[_Doc]] = {
    "state.json": StateDoc,
    "validation.json": ValidationDoc,
    "model.json": ProductionDoc,
    ".listing.json": ListingDoc,
}
"""The schema of each document, by file name (shard indexes are recognized by their suffix).
``metadata.json`` is checked by :func:`ckpt_plugin._checkpoint.parse_metadata` against
:class:`MetadataDoc` once its format version is known to be one this release reads."""
INDEX_SUFFIX = ".safetensors.index.json"


def schema_for(filename: str) -> type[_Doc] | None:
    """The schema of the document stored as ``filename``, or None for a file of no known kind."""
    if filename.endswith(INDEX_SUFFIX):
        return IndexDoc
    return SCHEMAS.get(filename)


def _corrupt(where: str, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{where} {why}; the file is damaged or was not written by ckpt_plugin: restore it or delete it")


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def load_json(data: bytes | str, where: str) -> Any:
    """Parse ``data`` as strict JSON nested at most :data:`MAX_DEPTH` deep; ``where`` names the file."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise _corrupt(where, f"has {len(data)} bytes, more than the {MAX_DOCUMENT_BYTES} a document may have")
    try:
        document = json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise _corrupt(where, f"is nested more than {MAX_DEPTH} levels deep") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _corrupt(where, f"is not valid JSON ({exc})") from None
    if not within_depth(document, MAX_DEPTH):
        raise _corrupt(where, f"is nested more than {MAX_DEPTH} levels deep")
    return document


def within_depth(value: Any, limit: int) -> bool:
    """Whether the lists and dicts of ``value`` nest at most ``limit`` levels deep (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        kind = type(node)
        if kind is dict:
            children = node.values()
        elif kind is list or kind is tuple:
            children = node
        else:
            continue
        if depth > limit:
            return False
        for child in children:
            child_kind = type(child)
            if child_kind is dict or child_kind is list or child_kind is tuple:
                stack.append((child, depth + 1))
    return True


def validate(document: Any, schema: type[_Doc], where: str) -> Any:
    """Check ``document`` against ``schema``; return it unchanged, or raise naming the key path."""
    try:
        msgspec.convert(document, schema, strict=True)
    except msgspec.ValidationError as exc:
        detail = re.sub(r"`str` matching regex '.*' - at", "a plain file name (one path component) - at", str(exc))
        raise _corrupt(where, f"does not match its format: {detail}") from None
    return document


def names_transaction(document: Any, prefix: TransactionName) -> bool:
    """Whether ``document``, the parsed ``metadata.json`` found under the object-store prefix
    ``prefix``, is the manifest ckpt_plugin committed there, and not a copy or a stranger's file.

    The manifest of a checkpoint names its own transaction. One that release 0.2 wrote names none:
    it must then be a checkpoint manifest of the very name of its prefix (its epoch and step).
    """
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        return False
    if not prefix.legacy:
        return document.get("transaction") == prefix.transaction
    epoch, step = document.get("epoch"), document.get("step")
    if "transaction" in document or type(epoch) is not int or not (step is None or type(step) is int):
        return False
    return checkpoint_name(epoch, step) == prefix.name


def parse(data: bytes | str, filename: str, where: str) -> Any:
    """Parse and validate the document ``filename`` (schema chosen by its name); see the module notes."""
    document = load_json(data, where)
    schema = schema_for(filename)
    if schema is not None:
        validate(document, schema, where)
    return document


def checksum(data: bytes) -> str:
    """The checksum string recorded for ``data`` (the same algorithm as every file record)."""
    return f"xxh3_64:{xxhash.xxh3_64(data).hexdigest()}"


def canonical(document: Mapping[str, Any], key: str = SEAL_KEY) -> bytes:
    """The compact JSON of every key of ``document`` but ``key``, as its seal covers it."""
    body = {name: value for name, value in document.items() if name != key}
    return json.dumps(body, allow_nan=False, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def seal(document: Mapping[str, Any], key: str = SEAL_KEY) -> dict[str, Any]:
    """``document`` with ``key`` set (last) to the checksum of all its other keys."""
    sealed = {name: value for name, value in document.items() if name != key}
    sealed[key] = checksum(canonical(sealed, key))
    return sealed


def check_seal(document: Any, where: str, key: str = SEAL_KEY) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``document`` matches the checksum it records."""
    if not isinstance(document, dict):
        raise _corrupt(where, "does not hold a JSON object")
    recorded = document.get(key)
    if not isinstance(recorded, str):
        raise _corrupt(where, f"records no {key}")
    try:
        actual = checksum(canonical(document, key))
    except (ValueError, TypeError, RecursionError):
        actual = None
    if recorded != actual:
        raise _corrupt(where, "does not match its recorded checksum (it was edited or damaged)")
