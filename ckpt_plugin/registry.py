"""``ArtifactRegistry``: promote checkpoints from raw to validated to production.

::

    checkpoints/epoch_120/     training output, pruned by retention
    validated/
      v1.0.0/                  the checkpoint's files, hard-linked (or copied) and verified, plus
        validation.json        the version, the source checkpoint and its checksum, every check's result
      history.jsonl            the audit log: one JSON object per validate, promote and rollback
      .registry.lock           serializes writers across processes
    production/
      model.safetensors        the weights, plain safetensors
      model.json               version, source, metrics, checks, checksums, who promoted it and when

A validated version is immutable. ``production/`` is replaced as a whole directory with one
atomic rename, so a reader sees the old model or the new one, never a mix.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import filelock
import torch
from packaging.version import InvalidVersion, Version

from . import codec, shards, signing
from .checkpoint import METADATA_FILE, MODEL_FILE, STATE_FILE, CheckpointInfo, parse_metadata
from .errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    PromotionError,
    SignatureError,
)
from .format import documents
from .io.files import (
    copy_file,
    read_bytes_file,
    read_json,
    stream_tensor_file,
    verify_file,
    write_bytes_file,
    write_tensor_file,
)
from .manager import CheckpointManager
from .metadata import utc_timestamp
from .reader import Device, open_item_files, read_checkpoint, read_info
from .storage import FileRecord, LocalStore, append_line, checksum_bytes, is_url
from .writer import SAFETENSORS_METADATA

VALIDATION_FILE = "validation.json"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".registry.lock"
PRODUCTION_MODEL_FILE = "model.safetensors"
PRODUCTION_RECORD_FILE = "model.json"
VALIDATED_FORMAT = "ckpt_plugin.validated"
PRODUCTION_FORMAT = "ckpt_plugin.production"
FORMAT_VERSION = 1
BUMPS = ("major", "minor", "patch")
_LOAD_ATTEMPTS = 20

Check = Callable[[dict[str, Any]], Any]
ProgressFactory = Callable[[str, int], Optional[Callable[[int], None]]]
"""Called with a label and a byte count before a long read; returns a callback taking each chunk's size, or None."""


MAX_VERSION_LENGTH = 64
_SEMVER = re.compile(r"v?(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})(?:-?(?:a|b|rc|alpha|beta|c|pre|preview)\.?(0|[1-9][0-9]{0,8})?)?", re.IGNORECASE)


def parse_version(version: str | Version) -> Version:
    """Parse a semantic version: ``MAJOR.MINOR.PATCH`` (each at most 9 digits) with an optional
    pre-release such as ``"1.1.0rc1"``; anything else raises :class:`PromotionError` before any file
    is touched."""
    text = str(version) if isinstance(version, Version) else version
    parsed = None
    if isinstance(text, str) and len(text) <= MAX_VERSION_LENGTH and _SEMVER.fullmatch(text.strip()):
        try:
            parsed = Version(text)
        except InvalidVersion:
            parsed = None
    if parsed is None or len(parsed.release) != 3 or parsed.epoch != 0 or parsed.local is not None or parsed.post is not None or parsed.dev is not None:
        shown = text if not isinstance(text, str) or len(text) <= MAX_VERSION_LENGTH else f"{text[:20]}... ({len(text)} characters)"
        raise PromotionError(
            f"{shown!r} is not a semantic version; use MAJOR.MINOR.PATCH such as '1.0.0' "
            "(pre-releases such as '1.1.0rc1' are allowed; at most 9 digits per number)"
        )
    return parsed


def next_version(existing: Sequence[Version], bump: str) -> Version:
    """The version after the highest of ``existing`` when bumping its ``major``, ``minor`` or ``patch``."""
    if bump not in BUMPS:
        raise ConfigurationError(f"bump must be one of {', '.join(BUMPS)}, not {bump!r}")
    major, minor, patch = max(existing).release if existing else (0, 0, 0)
    if bump == "major":
        return Version(f"{major + 1}.0.0")
    if bump == "minor":
        return Version(f"{major}.{minor + 1}.0")
    return Version(f"{major}.{minor}.{patch + 1}")


def run_checks(checks: Sequence[tuple[str, Check]], checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """Run every check on ``checkpoint``; a false result or an exception fails it.

    Returns one ``{"name", "passed", "detail"}`` record per check, in order. ``detail`` holds the
    exception, or the returned value when it was not a plain bool.
    """
    results = []
    for name, check in checks:
        try:
            outcome = check(checkpoint)
            passed = bool(outcome)
            detail = None if isinstance(outcome, bool) else repr(outcome)[:200]
        except Exception as exc:  # a check that raises fails the gate, whatever it raised
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        results.append({"name": name, "passed": passed, "detail": detail})
    return results


def _named_checks(checks: Sequence[Check] | Mapping[str, Check]) -> list[tuple[str, Check]]:
    if isinstance(checks, Mapping):
        pairs = [(str(name), check) for name, check in checks.items()]
    else:
        pairs = [(_check_name(check, index), check) for index, check in enumerate(checks, 1)]
    for name, check in pairs:
        if not callable(check):
            raise ConfigurationError(f"check {name!r} is {check!r}, not a callable taking the loaded checkpoint")
    return pairs


def _check_name(check: Any, index: int) -> str:
    name = getattr(check, "__name__", None) or getattr(getattr(check, "func", None), "__name__", None)
    if not name or name == "<lambda>":
        return f"check {index}" + (" (lambda)" if name else "")
    return str(name)


def _actor() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no USER variable, e.g. in some containers
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname()}


class ArtifactRegistry:
    """The promotion pipeline over one checkpoint directory: raw -> validated -> production.

    Args:
        checkpoint_dir: the directory a :class:`CheckpointManager` saves into. An object store URL
            (``s3://bucket/run/checkpoints``) gives a read-only registry in this release: its raw
            checkpoints can be listed, inspected and loaded, and it has no validated versions;
            :meth:`validate`, :meth:`promote` and :meth:`rollback` raise :class:`ConfigurationError`.
        storage_options: the fsspec options of such a URL, as for :class:`CheckpointManager`.
        validated_dir: where validated versions go; default ``validated/`` beside ``checkpoint_dir``.
        production_dir: what inference loads; default ``production/`` beside ``checkpoint_dir``.
        lock_timeout: seconds to wait for another process's promotion before giving up.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str] = "checkpoints",
        validated_dir: str | os.PathLike[str] | None = None,
        production_dir: str | os.PathLike[str] | None = None,
        *,
        lock_timeout: float = 60.0,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.storage_options = dict(storage_options or {})
        self._manager: CheckpointManager | None = None
        self.remote = is_url(str(checkpoint_dir))
        if self.remote:
            if validated_dir is not None or production_dir is not None:
                raise ConfigurationError("validated_dir and production_dir are not supported with an object store checkpoint_dir")
            self.checkpoint_dir: Path | str = str(checkpoint_dir).rstrip("/")
            self.validated_dir = self.production_dir = None  # type: ignore[assignment]
            return
        self.checkpoint_dir = Path(checkpoint_dir).expanduser()
        beside = self.checkpoint_dir.parent
        self.validated_dir = Path(validated_dir).expanduser() if validated_dir is not None else beside / "validated"
        self.production_dir = Path(production_dir).expanduser() if production_dir is not None else beside / "production"
        places = [p.resolve() for p in (self.checkpoint_dir, self.validated_dir, self.production_dir)]
        if len(set(places)) != 3:
            raise ConfigurationError(
                "checkpoint_dir, validated_dir and production_dir must be three different directories; "
                f"got {self.checkpoint_dir}, {self.validated_dir} and {self.production_dir}"
            )
        self._validated = LocalStore(self.validated_dir)
        self._production_parent = LocalStore(self.production_dir.parent)
        self._lock = filelock.FileLock(str(self.validated_dir / LOCK_FILE), timeout=lock_timeout)

    def __repr__(self) -> str:
        return f"ArtifactRegistry({str(self.checkpoint_dir)!r}, validated_dir={str(self.validated_dir)!r}, production_dir={str(self.production_dir)!r})"

    # ------------------------------------------------------------------ raw checkpoints

    @property
    def manager(self) -> CheckpointManager:
        """A read-only view of the raw checkpoints (it never saves, so it never prunes)."""
        if self._manager is None:
            if not self.remote and not self.checkpoint_dir.is_dir():
                raise CheckpointNotFoundError(
                    f"checkpoint directory {self.checkpoint_dir} does not exist; pass the directory the "
                    "CheckpointManager saved into"
                )
            self._manager = CheckpointManager(
                self.checkpoint_dir, max_checkpoints=None, keep_best=False, metric_for_best=None,
                storage_options=self.storage_options or None,
            )
        return self._manager

    def resolve(self, epoch: int | str = "best", metric: str | None = None, mode: str | None = None) -> CheckpointInfo:
        """The raw checkpoint that ``epoch`` (an int, ``"best"`` or ``"latest"``) refers to.

        ``"best"`` ranks by the ``metric_for_best`` and ``mode`` the checkpoints recorded (the latest
        that recorded one; ``"loss"``, ``"min"`` when none did), unless ``metric`` and ``mode`` are given.
        """
        manager = self.manager
        if epoch == "latest":
            info = manager.latest()
        elif epoch == "best":
            info = manager.best(metric, mode)
        elif isinstance(epoch, int) and not isinstance(epoch, bool):
            info = manager.find(epoch)
        else:
            raise ConfigurationError(f"epoch must be an epoch number, 'best' or 'latest', not {epoch!r}")
        if info is None:
            raise CheckpointNotFoundError(f"{self.checkpoint_dir} holds no checkpoint yet; save one before validating")
        return info

    # ------------------------------------------------------------------ validated versions

    def validate(
        self,
        epoch: int | str = "best",
        version: str | Version | None = None,
        *,
        bump: str | None = None,
        checks: Sequence[Check] | Mapping[str, Check] = (),
        metric: str | None = None,
        mode: str | None = None,
        progress: ProgressFactory | None = None,
        signing_key: str | os.PathLike[str] | None = None,
    ) -> dict[str, Any]:
        """Run ``checks`` on a raw checkpoint and, if all pass, store it as an immutable version.

        Give either ``version`` (``"1.0.0"``) or ``bump`` (``"major"``, ``"minor"``, ``"patch"``: the
        next version after the highest validated one). ``checks`` are callables on the loaded
        checkpoint dict (or a mapping of name to callable); a false result or an exception fails
        the gate, which raises :class:`PromotionError` and writes nothing. Returns the validation
        record: version, source checkpoint and its checksum, metrics, and each check's result.
        ``progress`` reports the bytes read, for progress bars. With ``signing_key`` (an elliptic-curve
        private key's PEM file) the version is signed before it becomes visible; see
        :mod:`ckpt_plugin.signing` and ``verify_with=`` of :meth:`promote` and :meth:`load_production`.
        """
        self._local_only("validate")
        if (version is None) == (bump is None):
            raise ConfigurationError("pass exactly one of version= (such as '1.0.0') or bump= ('major', 'minor' or 'patch')")
        wanted = parse_version(version) if version is not None else None
        if bump is not None and bump not in BUMPS:
            raise ConfigurationError(f"bump must be one of {', '.join(BUMPS)}, not {bump!r}")
        named = _named_checks(checks)
        if wanted is not None:
            self._refuse_existing(wanted)

        source = self.resolve(epoch, metric, mode)
        metadata_bytes = read_bytes_file(source.path / METADATA_FILE)
        info = parse_metadata(source.path, documents.load_json(metadata_bytes, str(source.path / METADATA_FILE)))
        advance = progress(f"validating {info.name}", 2 * info.size) if progress is not None else None
        for filename, file in info.files.items():
            verify_file(info.path / filename, file, advance)
        results = run_checks(named, read_checkpoint(info, verify=False))
        failed = [result for result in results if not result["passed"]]
        if failed:
            reasons = "; ".join(f"{r['name']}" + (f" ({r['detail']})" if r["detail"] else "") for r in failed)
            raise PromotionError(
                f"{info.path} failed {len(failed)} of {len(results)} checks: {reasons}. Nothing was validated; "
                "fix the model or pick another checkpoint"
            )

        files = {**info.files, METADATA_FILE: FileRecord(len(metadata_bytes), checksum_bytes(metadata_bytes))}
        with self._locked():
            chosen = wanted if wanted is not None else next_version(self._parsed_versions(), bump)  # type: ignore[arg-type]
            self._refuse_existing(chosen)
            record = {
                "format": VALIDATED_FORMAT,
                "format_version": FORMAT_VERSION,
                "version": str(chosen),
                "source": self._source_entry(info, files[METADATA_FILE]),
                "metrics": codec.to_json(info.metrics, "metrics"),
                "metric_for_best": info.metric_for_best,
                "mode": info.mode,
                "checks": results,
                "files": {name: file.to_json() for name, file in files.items()},
                "validated_at": utc_timestamp(),
                "validated_by": _actor(),
            }
            name = _directory_name(chosen)
            staging = self._validated.staging_dir(name)
            try:
                for filename, file in info.files.items():
                    copy_file(info.path / filename, staging / filename, file, advance)
                write_bytes_file(staging / METADATA_FILE, metadata_bytes)
                record = documents.seal(record)
                write_bytes_file(staging / VALIDATION_FILE, codec.dumps(record))
                if signing_key is not None:
                    signing.sign_directory(staging, signing_key)
                self._validated.publish(staging, name)
            except BaseException:
                self._validated.discard(staging)
                raise
            self._log("validate", chosen, source=record["source"])
        return _decoded(record)

    def versions(self) -> list[str]:
        """Every validated version, lowest first, compared semantically (1.10.0 after 1.9.0)."""
        return [str(version) for version in self._parsed_versions()]

    def validation(self, version: str | Version) -> dict[str, Any]:
        """The validation record of ``version``: source checkpoint, checksum, metrics and checks."""
        return _decoded(self._validation_document(parse_version(version)))

    def version_dir(self, version: str | Version) -> Path:
        """The directory of validated ``version`` (raises :class:`CheckpointNotFoundError` if none)."""
        parsed = parse_version(version)
        self._validation_document(parsed)
        return self.validated_dir / _directory_name(parsed)

    def checkpoint_info(self, version: str | Version) -> CheckpointInfo:
        """The validated ``version`` as a :class:`CheckpointInfo`, its metadata verified."""
        parsed = parse_version(version)
        document = self._validation_document(parsed)
        path = self.validated_dir / _directory_name(parsed)
        record = _record(document, METADATA_FILE, path / VALIDATION_FILE)
        return read_info(path, record=record)

    def load(
        self, version: str | Version, *, map_location: Device = None, verify: bool = True, verify_with: Any = None
    ) -> dict[str, Any]:
        """Load validated ``version`` as a checkpoint dict (``model``, ``optimizer``, ``metrics``, ...)
        with its ``version`` added; every file is checked against its checksum unless ``verify`` is False.
        With ``verify_with`` (a public key's PEM file) the version's signature must verify first."""
        if verify_with is not None:
            self.verify_signature(version, verify_with)
        info = self.checkpoint_info(version)
        checkpoint = read_checkpoint(info, map_location=map_location, verify=verify)
        checkpoint["version"] = str(parse_version(version))
        return checkpoint

    def verify_signature(self, version: str | Version, public_key: str | os.PathLike[str]) -> None:
        """Check that validated ``version`` is exactly what the owner of ``public_key`` signed
        (:class:`SignatureError` otherwise)."""
        signing.verify_directory(self.version_dir(version), public_key)

    # ------------------------------------------------------------------ production

    def promote(
        self, version: str | Version, *, progress: ProgressFactory | None = None, verify_with: Any = None
    ) -> dict[str, Any]:
        """Make validated ``version`` what :meth:`load_production` returns, atomically.

        Promoting the version already in production changes nothing. Returns :meth:`production`.
        ``progress`` reports the bytes read, for progress bars. With ``verify_with`` (a public key's
        PEM file) a version whose signature does not verify is refused (:class:`SignatureError`).
        """
        self._local_only("promote")
        parsed = parse_version(version)
        with self._locked():
            if verify_with is not None:
                self.verify_signature(parsed, verify_with)
            try:
                current = self._production_document()
            except CorruptCheckpointError as exc:
                warnings.warn(f"replacing a damaged production model: {exc}", UserWarning, stacklevel=2)
                current = None
            if current is not None and current["version"] == str(parsed):
                return _public(current)
            stack = [*current["previous_versions"], current["version"]] if current is not None else []
            document = self._switch(parsed, stack, progress)
            self._log("promote", parsed, source=document["source"], previous=current["version"] if current else None)
        return _public(document)

    def rollback(self, *, progress: ProgressFactory | None = None) -> dict[str, Any]:
        """Put the previously promoted version back into production; returns :meth:`production`."""
        self._local_only("rollback")
        with self._locked():
            current = self._production_document()
            if current is None:
                raise PromotionError(f"nothing is in production at {self.production_dir}; promote a version first")
            if not current["previous_versions"]:
                raise PromotionError(
                    f"version {current['version']} is the first one promoted to {self.production_dir}; "
                    "there is nothing to roll back to"
                )
            *stack, target = current["previous_versions"]
            document = self._switch(parse_version(target), stack, progress)
            self._log("rollback", target, source=document["source"], previous=current["version"])
        return _public(document)

    def production(self) -> dict[str, Any] | None:
        """What is in production: version, source, metrics, checks, checksums, who promoted it and
        when, and ``previous_versions`` (what :meth:`rollback` goes back to). None when empty."""
        document = self._production_document()
        return None if document is None else _public(document)

    def load_production(
        self, *, map_location: Device = None, verify: bool = True, verify_with: Any = None
    ) -> dict[str, Any] | None:
        """Load the production model for inference: ``model`` (the state dict, tied weights re-tied),
        ``version``, ``epoch``, ``metrics``, ``config`` and ``metadata`` (the production record).

        Returns None when nothing is in production. A promotion running meanwhile is never seen
        half-way: the weights are only returned if ``model.json`` did not change while they were opened.
        With ``verify_with`` (a public key's PEM file) the production model must be exactly the
        weights and layout of a validated version signed with its private half: the version's
        signature is verified, and the production weights are checked against its signed checksum.
        """
        for _ in range(_LOAD_ATTEMPTS):
            before = self._production_bytes()
            if before is None:
                return None
            document = self._production_document(before)
            if verify_with is not None:
                self._check_signed_production(document, verify_with)
                verify = True
            record = _record(document, PRODUCTION_MODEL_FILE, self.production_dir / PRODUCTION_RECORD_FILE)
            try:
                # Read into private memory rather than mapping the file: the served weights must not
                # change when someone edits or truncates a file that shares their inode.
                tensors = stream_tensor_file(
                    self.production_dir / PRODUCTION_MODEL_FILE, record, lambda spec: None, verify=verify
                )
            except CorruptCheckpointError:
                if self._production_bytes() == before:
                    raise
                continue
            if self._production_bytes() == before:
                break
        else:
            raise PromotionError(f"{self.production_dir} changed {_LOAD_ATTEMPTS} times while loading; retry")
        if map_location is not None:
            device = torch.device(map_location)
            tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
        public = _public(document)
        return {
            "model": codec.decode(document["model"], tensors, str(self.production_dir / PRODUCTION_RECORD_FILE), "model"),
            "version": document["version"],
            "epoch": document["source"]["epoch"],
            "metrics": public["metrics"],
            "config": public.get("config"),
            "metadata": public,
        }

    def history(self) -> list[dict[str, Any]]:
        """The audit log, oldest first: one dict per validate, promote and rollback, with ``time``,
        ``event``, ``version``, ``source`` (checkpoint path, epoch, checksum), ``user`` and ``host``."""
        if self.remote:
            return []
        path = self.validated_dir / HISTORY_FILE
        if not path.is_file():
            return []
        events = []
        for number, line in enumerate(read_bytes_file(path).splitlines(), 1):
            try:
                events.append(documents.validate(documents.load_json(line, f"line {number} of {path}"), documents.HistoryEventDoc, f"line {number} of {path}"))
            except CorruptCheckpointError:  # a line whose writer died mid-write; every other line stands
                warnings.warn(f"skipping line {number} of {path}: it is not a complete history record", UserWarning, stacklevel=2)
        return events

    # ------------------------------------------------------------------ internals

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._validated.ensure_writable()
        try:
            with self._lock:
                self._validated.recover()
                self._production_parent.recover(only=self.production_dir.name)
                yield
        except filelock.Timeout:
            raise PromotionError(
                f"another process has held the registry lock {self._lock.lock_file} for more than "
                f"{self._lock.timeout} s; wait for its promotion to finish and retry"
            ) from None

    def _local_only(self, action: str) -> None:
        if self.remote:
            raise ConfigurationError(
                f"cannot {action} in {self.checkpoint_dir}: validated versions and production live on a local "
                "file system in this release; copy the checkpoint to a local directory and use a registry there"
            )

    def _parsed_versions(self) -> list[Version]:
        if self.remote:
            return []
        found = []
        for entry in self._validated.entries():
            try:
                version = parse_version(entry.name[1:])
            except PromotionError:
                continue
            if entry.name == _directory_name(version) and (Path(entry.path) / VALIDATION_FILE).is_file():
                found.append(version)
        return sorted(found)

    def _refuse_existing(self, version: Version) -> None:
        if (self.validated_dir / _directory_name(version)).exists():
            raise PromotionError(
                f"version {version} is already validated in {self.validated_dir} and validated versions are "
                "immutable; choose a new version, or bump the highest one"
            )

    def _validation_document(self, version: Version) -> dict[str, Any]:
        if self.remote:
            raise CheckpointNotFoundError(f"version {version} is not validated: {self.checkpoint_dir} has no validated versions")
        path = self.validated_dir / _directory_name(version) / VALIDATION_FILE
        if not path.is_file():
            existing = ", ".join(self.versions()) or "none"
            raise CheckpointNotFoundError(f"version {version} is not validated in {self.validated_dir}; validated versions: {existing}")
        document = read_json(path)
        documents.check_seal(document, str(path))
        return document

    @staticmethod
    def _source_entry(info: CheckpointInfo, metadata: FileRecord) -> dict[str, Any]:
        return {
            "path": str(info.path.resolve()),
            "name": info.name,
            "epoch": info.epoch,
            "step": info.step,
            "checksum": metadata.checksum,
            "saved_at": info.timestamp,
        }

    def _production_bytes(self) -> bytes | None:
        if self.remote:
            return None
        path = self.production_dir / PRODUCTION_RECORD_FILE
        try:
            return read_bytes_file(path)
        except CorruptCheckpointError:
            if path.exists():
                raise
            return None

    def _production_document(self, data: bytes | None = None) -> dict[str, Any] | None:
        data = self._production_bytes() if data is None else data
        if data is None:
            return None
        where = str(self.production_dir / PRODUCTION_RECORD_FILE)
        try:
            document = documents.parse(data, PRODUCTION_RECORD_FILE, where)
            documents.check_seal(document, where)
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"{exc}; promote a version again to replace it") from None
        return document

    def _switch(self, version: Version, previous_versions: list[str], progress: ProgressFactory | None) -> dict[str, Any]:
        """Replace ``production/`` with ``version`` in one atomic rename. The caller holds the lock."""
        validation = self._validation_document(version)
        directory = self.validated_dir / _directory_name(version)
        files = {name: FileRecord.from_json(record) for name, record in validation["files"].items()}
        where = directory / VALIDATION_FILE
        metadata = read_json(directory / METADATA_FILE, _record(validation, METADATA_FILE, where))
        parse_metadata(directory, metadata)
        state = read_json(directory / STATE_FILE, _record(validation, STATE_FILE, where))
        if "model" not in state["items"]:
            raise CorruptCheckpointError(f"{directory / STATE_FILE} holds no model; validate a complete checkpoint")
        consolidated = None
        if state["items"]["model"].get("sharded"):
            from .distributed.consolidate import read_sharded_items

            consolidated = read_sharded_items(directory, files, ["model"])["model"]
            model_tree = {key: {codec.TENSOR: key} for key in consolidated}
        else:
            model_tree = state["items"]["model"].get("tree")
        document = {
            "format": PRODUCTION_FORMAT,
            "format_version": FORMAT_VERSION,
            "version": str(version),
            "source": {**validation["source"], "validated_path": str(directory.resolve())},
            "metrics": validation["metrics"],
            "metric_for_best": validation["metric_for_best"],
            "mode": validation["mode"],
            "checks": validation["checks"],
            "files": {},
            "tied": _aliases(model_tree),
            "config": metadata.get("config"),
            "validated_at": validation["validated_at"],
            "validated_by": validation["validated_by"],
            "promoted_at": utc_timestamp(),
            "promoted_by": _actor(),
            "previous_versions": previous_versions,
            "model": model_tree,
        }
        place, parent = self._production_place()
        parent.ensure_writable()
        parent.recover(only=place.name)
        staging = parent.staging_dir(place.name)
        try:
            if consolidated is not None:  # a sharded checkpoint: production holds the full weights
                record = write_tensor_file(staging / PRODUCTION_MODEL_FILE, consolidated, SAFETENSORS_METADATA)
            else:
                record = _publish_model(directory, files, staging, version, progress)
            document["files"][PRODUCTION_MODEL_FILE] = record.to_json()
            document = documents.seal(document)
            write_bytes_file(staging / PRODUCTION_RECORD_FILE, codec.dumps(document))
            parent.publish(staging, place.name)
        except BaseException:
            parent.discard(staging)
            raise
        return document

    def verify_production_signature(self, public_key: str | os.PathLike[str]) -> None:
        """Check that production is a validated version signed with the private half of ``public_key``,
        its weights and layout unchanged (:class:`SignatureError` otherwise; nothing in production
        passes trivially)."""
        document = self._production_document()
        if document is not None:
            self._check_signed_production(document, public_key)

    def _check_signed_production(self, document: Mapping[str, Any], public_key: Any) -> None:
        """Tie the production record to a signed validated version: the version's signature, its
        signed checksum of the weights, and its signed model layout."""
        version = parse_version(document["version"])
        self.verify_signature(version, public_key)
        directory = self.validated_dir / _directory_name(version)
        validation = self._validation_document(version)
        signed = validation["files"].get(MODEL_FILE)
        where = self.production_dir / PRODUCTION_RECORD_FILE
        if signed is None or document["files"].get(PRODUCTION_MODEL_FILE) != signed:
            raise SignatureError(
                f"{where} records weights that are not the signed weights of version {version} (a sharded model's "
                "joined file cannot be tied to its signature either); promote a signed version again"
            )
        state = read_json(directory / STATE_FILE, _record(validation, STATE_FILE, directory / VALIDATION_FILE))
        if state["items"].get("model", {}).get("tree") != document["model"]:
            raise SignatureError(f"{where} lays the weights out unlike signed version {version}; promote it again")

    def _production_place(self) -> tuple[Path, LocalStore]:
        """Where a promotion writes: ``production_dir``, or, when that is a symbolic link, the
        directory it points to (the link is written through and stays as it is)."""
        if not self.production_dir.is_symlink():
            return self.production_dir, self._production_parent
        place = Path(os.path.realpath(self.production_dir))
        if place in (self.validated_dir.resolve(), self.checkpoint_dir.resolve()) or place == place.parent:
            raise PromotionError(
                f"production_dir {self.production_dir} is a link to {place}, which is not a place for the production "
                "model; point the link at a directory of its own"
            )
        return place, LocalStore(place.parent)

    def _log(self, event: str, version: Version | str, **fields: Any) -> None:
        entry = {"time": utc_timestamp(), "event": event, "version": str(version), **fields, **_actor()}
        append_line(self.validated_dir / HISTORY_FILE, codec.dumps(entry))


def _publish_model(
    directory: Path, files: Mapping[str, FileRecord], staging: Path, version: Version, progress: ProgressFactory | None
) -> FileRecord:
    """Give ``staging`` the production ``model.safetensors``: the version's own file, linked or
    copied, or, for a model stored as shards (an incremental checkpoint), the shards joined into one."""
    sources = shards.item_files(files, MODEL_FILE)
    if sources == [MODEL_FILE]:
        advance = progress(f"promoting {version}", files[MODEL_FILE].size) if progress is not None else None
        copy_file(directory / MODEL_FILE, staging / PRODUCTION_MODEL_FILE, files[MODEL_FILE], advance)
        return files[MODEL_FILE]
    if not sources:
        raise CorruptCheckpointError(f"{directory} holds no model weights; validate a complete checkpoint")
    tensors = open_item_files(directory, files, sources[0])
    return write_tensor_file(staging / PRODUCTION_MODEL_FILE, tensors, SAFETENSORS_METADATA)


def _record(document: Mapping[str, Any], filename: str, where: Path) -> FileRecord:
    """The record of ``filename`` in a validated document's ``files``; its absence is damage."""
    record = document["files"].get(filename)
    if record is None:
        raise CorruptCheckpointError(f"{where} records no checksum for {filename}; the record is damaged: validate the checkpoint again")
    return FileRecord.from_json(record)


def _directory_name(version: Version) -> str:
    return f"v{version}"


def _aliases(model_tree: Any) -> dict[str, str]:
    """Keys of a flat state dict whose tensor is stored under another key (tied weights)."""
    if not isinstance(model_tree, dict):
        return {}
    return {
        key: node[codec.TENSOR]
        for key, node in model_tree.items()
        if isinstance(node, dict) and node.get(codec.TENSOR) not in (None, key)
    }


def _decoded(document: Mapping[str, Any]) -> dict[str, Any]:
    decoded = {key: value for key, value in document.items() if key != documents.SEAL_KEY}
    for key in ("metrics", "config"):
        if key in decoded:
            decoded[key] = codec.from_json(decoded[key])
    return decoded


def _public(document: Mapping[str, Any]) -> dict[str, Any]:
    return _decoded({key: value for key, value in document.items() if key not in ("model", documents.SEAL_KEY)})


__all__ = ["ArtifactRegistry", "ProgressFactory", "next_version", "parse_version", "run_checks"]
