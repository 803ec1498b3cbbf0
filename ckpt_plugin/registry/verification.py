"""A registry's verification report: every file's checksum and, with a public key, every signature.

:meth:`ArtifactRegistry.verify <ckpt_plugin.registry.ArtifactRegistry.verify>` walks the raw
checkpoints, the validated versions and production, and returns a :class:`VerificationReport`
instead of printing or raising: one :class:`VerificationItem` per thing checked, with what is
wrong with it. ``ckpt verify`` prints it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from .. import signing
from ..errors import CorruptCheckpointError, SignatureError, UnsignedError
from .._format.layout import SIGNATURE_FILE
from .._format.records import FileRecord
from .._io.files import verify_file
from .._io.reader import foreign_files
from .records import PRODUCTION_MODEL_FILE

if TYPE_CHECKING:
    from .._io.info import CheckpointInfo
    from .core import ArtifactRegistry

ProgressFactory = Callable[[str, int], Optional[Callable[[int], None]]]
"""Called with a label and a byte count before a long read; returns a callback taking each chunk's size, or None."""

CHECKPOINT, VERSION, PRODUCTION, FILE, SIGNATURE = "checkpoint", "version", "production", "file", "signature"


@dataclass(frozen=True)
class VerificationItem:
    """One thing :meth:`ArtifactRegistry.verify` checked: ``name`` is its path or URL, ``kind`` one
    of ``"checkpoint"``, ``"version"``, ``"production"``, ``"file"`` or ``"signature"``, and
    ``problem`` what is wrong with it (None when ``ok``)."""

    name: str
    kind: str
    ok: bool
    problem: str | None = None


@dataclass
class VerificationReport:
    """What :meth:`ArtifactRegistry.verify` found: every item checked, in the order checked."""

    items: list[VerificationItem] = field(default_factory=list)
    files: int = 0
    """How many files' checksums were checked."""
    bytes: int = 0
    """Their size in all."""

    @property
    def ok(self) -> bool:
        """Whether nothing is wrong."""
        return all(item.ok for item in self.items)

    @property
    def problems(self) -> list[VerificationItem]:
        """The items that are not ok, in the order they were found."""
        return [item for item in self.items if not item.ok]

    def _fail(self, name: Any, kind: str, problem: str) -> None:
        self.items.append(VerificationItem(str(name), kind, False, problem))


def verify_registry(
    registry: ArtifactRegistry, public_key: str | os.PathLike[str] | None = None, *, progress: ProgressFactory | None = None
) -> VerificationReport:
    """The :class:`VerificationReport` of ``registry`` (see :meth:`ArtifactRegistry.verify`)."""
    report = VerificationReport()
    infos = _raw_checkpoints(registry, report)
    for info in infos:
        for name in foreign_files(info):
            report._fail(info.file(name), FILE, _foreign(info, name))
    files = [(info.file(name), record) for info in infos for name, record in info.files.items()]
    files += _versions_and_production(registry, public_key, report)
    if public_key is not None:
        for info in infos:
            if info.backend.fingerprint(info.file(SIGNATURE_FILE)) is not None:
                try:
                    signing.verify_prefix(info.backend, info.location, public_key)
                except SignatureError as exc:
                    report._fail(info.path, SIGNATURE, str(exc))
    _check_files(files, registry, report, progress)
    return report


def _raw_checkpoints(registry: ArtifactRegistry, report: VerificationReport) -> list[CheckpointInfo]:
    """The checkpoints of the directory; a problem for each one named like a checkpoint that cannot be read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # each unreadable one is reported as a problem below
        infos = registry.manager.checkpoints()
    for path, error in registry._places.unreadable_checkpoints({info.name for info in infos}):
        report._fail(path, CHECKPOINT, error)
    return infos


def _versions_and_production(
    registry: ArtifactRegistry, public_key: Any, report: VerificationReport
) -> list[tuple[str, FileRecord]]:
    """Check every validated version's record and production's (and, with ``public_key``, their
    signatures); return the files whose checksums are still to be checked."""
    backend = registry.backend
    files: list[tuple[str, FileRecord]] = []
    unsigned: dict[str, str] = {}  # version -> where it is
    for version in registry.versions():
        folder = str(registry.version_dir(version))
        try:
            records = registry.validation(version)["files"]
            if public_key is not None:
                registry.verify_signature(version, public_key)
        except UnsignedError:
            unsigned[version] = folder
        except (CorruptCheckpointError, SignatureError) as exc:
            report._fail(folder, VERSION, str(exc))
            continue
        files += [(backend.join(folder, name), FileRecord.from_json(record)) for name, record in records.items()]
    try:
        production = registry.production()
        if public_key is not None and (production is None or production["version"] not in unsigned):
            registry.verify_production_signature(public_key)
    except (CorruptCheckpointError, SignatureError) as exc:
        production = None
        report._fail(registry.production_dir, PRODUCTION, str(exc))
    serving = production["version"] if production is not None else None
    for version, folder in unsigned.items():
        report._fail(folder, SIGNATURE, _unsigned(version, version == serving, registry.checkpoint_dir))
    if production is not None:
        record = FileRecord.from_json(production["files"][PRODUCTION_MODEL_FILE])
        files.append((backend.join(str(registry.production_dir), production.get("weights", PRODUCTION_MODEL_FILE)), record))
    return files


def _check_files(
    files: list[tuple[str, FileRecord]], registry: ArtifactRegistry, report: VerificationReport, progress: ProgressFactory | None
) -> None:
    """Check every file against its record; one item per file."""
    report.files, report.bytes = len(files), sum(record.size for _, record in files)
    advance = progress("verifying", report.bytes) if progress is not None else None
    for path, record in files:
        try:
            verify_file(path, record, advance, backend=registry.backend)
        except CorruptCheckpointError as exc:
            report._fail(path, FILE, str(exc))
        else:
            report.items.append(VerificationItem(str(path), FILE, True))


def _unsigned(version: str, in_production: bool, directory: Any) -> str:
    """What to do about a validated version that a check with a public key finds without a signature."""
    served = " (the one in production)" if in_production else ""
    return (
        f"validated version v{version}{served} is not signed, so --key cannot vouch for it. A version never changes, "
        f"so sign a new one: ckpt validate {directory} EPOCH --version NEW --signing-key PRIVATE_KEY.pem"
        + (", then ckpt promote it" if in_production else "")
        + "; or run ckpt verify without --key to check the checksums only"
    )


def _foreign(info: CheckpointInfo, name: str) -> str:
    return (
        f"{info.file(name)} is not part of checkpoint {info.name}: its metadata.json "
        "does not name it, so ckpt_plugin did not write it (tools that read whatever a checkpoint directory holds, "
        "such as the Hugging Face Trainer's resume, would load it); remove it"
    )


__all__ = ["VerificationItem", "VerificationReport", "verify_registry"]
