"""``ArtifactRegistry``: promote checkpoints from raw to validated to production.

::

    checkpoints/epoch_120/     training output, pruned by retention
    validated/
      v1.0.0/                  the checkpoint's files, hard-linked (or copied) and verified, plus
        validation.json        the version, the source checkpoint and its checksum, every check's result
      history.jsonl            the audit log: one JSON object per validate, promote and rollback
      .history-intent.json     the event of the change under way, written before it takes effect
      .registry.lock           serializes writers across processes
    production/
      model.safetensors        the weights, plain safetensors
      model.json               version, source, metrics, checks, checksums, who promoted it and when

A validated version is immutable. ``production/`` is replaced as a whole directory with one
atomic rename, so a reader sees the old model or the new one, never a mix. It holds only what a
promotion writes: a promotion or rollback that finds anything else there (a file someone put beside
the model) refuses with :class:`~ckpt_plugin.errors.ForeignFileError` instead of replacing it.
Cleanup removes only hidden names of the exact forms the registry writes (staging, trash and
writability-probe directories of dead writers); opening a registry removes the probes dead writers left.

The history always matches what took effect, even after a kill at any instant: each change first
writes its event as an intent, then takes effect, then appends the event and drops the intent. An
intent left by a dead writer is an event if its change took effect (the version is validated, or
production is what it promoted) and is dropped otherwise: :meth:`ArtifactRegistry.history` reads
it so, and the next change records or drops it for good.

On an object store (``ArtifactRegistry("s3://bucket/run/checkpoints")``) the same layout holds, with
conditional writes in place of the lock and the rename; :mod:`ckpt_plugin.registry_objects`
describes it and how concurrent validations and promotions resolve.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import filelock
from packaging.version import InvalidVersion, Version

from . import signing
from .errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    ForeignFileError,
    PromotionError,
    SignatureError,
    StorageError,
)
from .format import codec, documents, shards
from .format.layout import MODEL_FILE, STATE_FILE
from .format.records import METADATA_FILE, FileRecord, checksum_bytes
from .io.files import (
    copy_file,
    read_bytes_file,
    read_json,
    stream_tensor_file,
    verify_file,
    write_bytes_file,
    write_tensor_file,
)
from .io.info import CheckpointInfo, parse_metadata
from .io.reader import Device, open_item_files, read_info
from .io.writer import SAFETENSORS_METADATA
from .manager import CheckpointManager
from .metadata import utc_timestamp
from .reading import read_checkpoint
from .registry_objects import ObjectStorePlaces
from .storage import LOCAL, Backend, LocalStore, append_line, conditional, is_url, publish_file

if TYPE_CHECKING:
    import torch

VALIDATION_FILE = "validation.json"
HISTORY_FILE = "history.jsonl"
INTENT_FILE = ".history-intent.json"
"""The event of the change being made, written before the change takes effect (see ``_intend``)."""
LOCK_FILE = ".registry.lock"
PRODUCTION_MODEL_FILE = "model.safetensors"
PRODUCTION_RECORD_FILE = "model.json"
VALIDATED_FORMAT = "ckpt_plugin.validated"
PRODUCTION_FORMAT = "ckpt_plugin.production"
PRODUCTION_FILES = frozenset({PRODUCTION_MODEL_FILE, PRODUCTION_RECORD_FILE})
"""Everything a local promotion writes into ``production/``."""
FORMAT_VERSION = 1
BUMPS = ("major", "minor", "patch")
_LOAD_ATTEMPTS = 20
_CLAIM_ATTEMPTS = 20
_SWITCH_ATTEMPTS = 20

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
    exception, or the returned value when it was not a plain bool. A check that raises
    :class:`ConfigurationError` says it was asked a wrong question (such as a metric the checkpoint
    never recorded), not that the model failed: that error is raised as it is.
    """
    results = []
    for name, check in checks:
        try:
            outcome = check(checkpoint)
            passed = bool(outcome)
            detail = None if isinstance(outcome, bool) else repr(outcome)[:200]
        except ConfigurationError:
            raise
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
        checkpoint_dir: the directory a :class:`CheckpointManager` saves into, or its object store
            URL (``s3://bucket/run/checkpoints``). On an object store, validating and promoting need
            conditional writes (S3, and ``memory://`` within one process); see
            :mod:`ckpt_plugin.registry_objects`.
        storage_options: the fsspec options of such a URL, as for :class:`CheckpointManager`.
        validated_dir: where validated versions go; default ``validated/`` beside ``checkpoint_dir``
            (a URL when ``checkpoint_dir`` is one).
        production_dir: what inference loads; default ``production/`` beside ``checkpoint_dir``.
            The places beside a local ``checkpoint_dir`` are its own only when it exists: when it
            does not exist as the registry is made (a mistyped name) and neither place is given,
            every method that would read or write them raises :class:`CheckpointNotFoundError`
            instead of serving the ``validated/`` and ``production/`` of another run. (Deleting the
            raw checkpoints later breaks nothing; a new registry over them then needs the places.)
        lock_timeout: seconds to wait for another process's promotion before giving up (local
            directories; an object store needs no lock).
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
            self._open_remote(str(checkpoint_dir), validated_dir, production_dir)
            return
        self.checkpoint_dir = Path(checkpoint_dir).expanduser()
        self._places_unproven = validated_dir is None and production_dir is None and not self.checkpoint_dir.is_dir()
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
        for store in (self._validated, self._production_parent):
            try:
                store.remove_dead_probes()
            except OSError:  # a reader that may not delete: the next writer removes them
                pass

    def _open_remote(self, url: str, validated_dir: Any, production_dir: Any) -> None:
        url = url.rstrip("/")
        parent, _, name = url.rpartition("/")
        if not name or parent.endswith(":/") or parent.endswith("://"):
            raise ConfigurationError(
                f"{url} has no parent prefix to hold validated/ and production/ beside it; save into a prefix "
                "such as s3://bucket/run/checkpoints, or pass validated_dir= and production_dir="
            )
        places = {}
        for label, given, default in (("validated_dir", validated_dir, "validated"), ("production_dir", production_dir, "production")):
            chosen = str(given).rstrip("/") if given is not None else f"{parent}/{default}"
            if not is_url(chosen) or chosen.split("://", 1)[0] != url.split("://", 1)[0]:
                raise ConfigurationError(f"{label} must be a URL on the same store as {url} when checkpoint_dir is one, not {given!r}")
            places[label] = chosen
        if len({url, places["validated_dir"], places["production_dir"]}) != 3:
            raise ConfigurationError(
                f"checkpoint_dir, validated_dir and production_dir must be three different places; got {url}, "
                f"{places['validated_dir']} and {places['production_dir']}"
            )
        self.checkpoint_dir: Path | str = url
        self.validated_dir: Path | str = places["validated_dir"]
        self.production_dir: Path | str = places["production_dir"]
        self._places = ObjectStorePlaces(self.validated_dir, self.production_dir, self.storage_options or None)

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
        the gate, which raises :class:`PromotionError` and writes nothing (a check that raises
        :class:`ConfigurationError`, a question it cannot ask of this checkpoint, has that raised). Returns the validation
        record: version, source checkpoint and its checksum, metrics, and each check's result.
        ``progress`` reports the bytes read, for progress bars. With ``signing_key`` (an elliptic-curve
        private key's PEM file) the version is signed before it becomes visible; see
        :mod:`ckpt_plugin.signing` and ``verify_with=`` of :meth:`promote` and :meth:`load_production`.
        """
        if self.remote:
            self._places.require_conditional_writes("validating a version")
        if (version is None) == (bump is None):
            raise ConfigurationError("pass exactly one of version= (such as '1.0.0') or bump= ('major', 'minor' or 'patch')")
        wanted = parse_version(version) if version is not None else None
        if bump is not None and bump not in BUMPS:
            raise ConfigurationError(f"bump must be one of {', '.join(BUMPS)}, not {bump!r}")
        named = _named_checks(checks)
        if wanted is not None:
            self._refuse_existing(wanted)

        source = self.resolve(epoch, metric, mode)
        backend = source.backend
        metadata_bytes = read_bytes_file(source.file(METADATA_FILE), backend=backend)
        info = parse_metadata(source.location, documents.load_json(metadata_bytes, source.file(METADATA_FILE)), backend)
        advance = progress(f"validating {info.name}", 2 * info.size) if progress is not None else None
        for filename, file in info.files.items():
            verify_file(info.file(filename), file, advance, backend=backend)
        results = run_checks(named, read_checkpoint(info, verify=False))
        failed = [result for result in results if not result["passed"]]
        if failed:
            reasons = "; ".join(f"{r['name']}" + (f" ({r['detail']})" if r["detail"] else "") for r in failed)
            raise PromotionError(
                f"{info.location} failed {len(failed)} of {len(results)} checks: {reasons}. Nothing was validated; "
                "fix the model or pick another checkpoint"
            )

        files = {**info.files, METADATA_FILE: FileRecord(len(metadata_bytes), checksum_bytes(metadata_bytes))}
        if self.remote:
            return self._validate_remote(info, metadata_bytes, files, results, wanted, bump, advance, signing_key)
        with self._locked():
            chosen = wanted if wanted is not None else next_version(self._parsed_versions(), bump)  # type: ignore[arg-type]
            self._refuse_existing(chosen)
            record = self._validation_record(chosen, info, files, results)
            name = _directory_name(chosen)
            staging = self._validated.staging_dir(name)
            event = None
            try:
                for filename, file in info.files.items():
                    copy_file(info.path / filename, staging / filename, file, advance)
                write_bytes_file(staging / METADATA_FILE, metadata_bytes)
                record = documents.seal(record)
                write_bytes_file(staging / VALIDATION_FILE, codec.dumps(record))
                if signing_key is not None:
                    signing.sign_directory(staging, signing_key)
                event = self._event("validate", chosen, source=record["source"], time=record["validated_at"])
                self._intend(event)
                self._validated.publish(staging, name)
            except BaseException:
                self._validated.discard(staging)
                self._settle_after_failure(event)
                raise
            self._record(event)
        return _decoded(record)

    def _validation_record(
        self, version: Version, info: CheckpointInfo, files: Mapping[str, FileRecord], results: list[dict[str, Any]]
    ) -> dict[str, Any]:
        return {
            "format": VALIDATED_FORMAT,
            "format_version": FORMAT_VERSION,
            "version": str(version),
            "source": self._source_entry(info, files[METADATA_FILE]),
            "metrics": codec.to_json(info.metrics, "metrics"),
            "metric_for_best": info.metric_for_best,
            "mode": info.mode,
            "checks": results,
            "files": {name: file.to_json() for name, file in files.items()},
            "validated_at": utc_timestamp(),
            "validated_by": _actor(),
        }

    def _validate_remote(
        self,
        info: CheckpointInfo,
        metadata_bytes: bytes,
        files: Mapping[str, FileRecord],
        results: list[dict[str, Any]],
        wanted: Version | None,
        bump: str | None,
        advance: Callable[[int], None] | None,
        signing_key: Any,
    ) -> dict[str, Any]:
        """Write the version under a fresh prefix, then claim its name; a lost claim tries the next
        version (``bump``) or refuses (an explicit version)."""
        backend = info.backend
        for _ in range(_CLAIM_ATTEMPTS):
            chosen = wanted if wanted is not None else next_version(self._parsed_versions(), bump)  # type: ignore[arg-type]
            self._refuse_existing(chosen)
            record = documents.seal(self._validation_record(chosen, info, files, results))
            name = _directory_name(chosen)
            prefix = self._places.begin_version(name)
            event = None
            try:
                for filename, file in info.files.items():
                    copy_file(info.file(filename), backend.join(prefix, filename), file, advance, backend=backend)
                write_bytes_file(backend.join(prefix, METADATA_FILE), metadata_bytes, backend=backend)
                validation = write_bytes_file(backend.join(prefix, VALIDATION_FILE), codec.dumps(record), backend=backend)
                if signing_key is not None:
                    signing.sign_prefix(backend, prefix, signing_key)
                event = self._event("validate", chosen, source=record["source"], time=record["validated_at"])
                self._places.intend(event)
                claimed = self._places.claim(chosen, name, prefix, validation)
            except BaseException:
                self._settle_after_failure(event)
                self._places.discard(prefix)
                raise
            if claimed:
                self._record(event)
                return _decoded(record)
            self._places.drop_intent(event)
            self._places.discard(prefix)
            if wanted is not None:
                self._refuse_existing(chosen)
            advance = None  # the bytes were counted once
        raise PromotionError(
            f"other processes claimed {_CLAIM_ATTEMPTS} versions in {self.validated_dir} while this one was being "
            "written; retry the validation"
        )

    def versions(self) -> list[str]:
        """Every validated version, lowest first, compared semantically (1.10.0 after 1.9.0)."""
        return [str(version) for version in self._parsed_versions()]

    def validation(self, version: str | Version) -> dict[str, Any]:
        """The validation record of ``version``: source checkpoint, checksum, metrics and checks."""
        return _decoded(self._located(parse_version(version))[1])

    def version_dir(self, version: str | Version) -> Path | str:
        """The directory of validated ``version`` (a URL on an object store; raises
        :class:`CheckpointNotFoundError` if there is no such version)."""
        place = self._located(parse_version(version))[0]
        return place if self.remote else Path(place)

    def checkpoint_info(self, version: str | Version) -> CheckpointInfo:
        """The validated ``version`` as a :class:`CheckpointInfo`, its metadata verified."""
        place, document = self._located(parse_version(version))
        record = _record(document, METADATA_FILE, self.backend.join(place, VALIDATION_FILE))
        return read_info(place, self.backend, record=record)

    def load(
        self, version: str | Version, *, map_location: Device = None, verify: bool = True, verify_with: Any = None
    ) -> dict[str, Any]:
        """Load validated ``version`` as a checkpoint dict (``model``, ``optimizer``, ``metrics``, ...)
        with its ``version`` added; every file is checked against its checksum unless ``verify`` is False.
        With ``verify_with`` (a public key's PEM file) the version's signature must verify first."""
        if verify_with is not None:
            signed = self._signed_version(parse_version(version), verify_with, documents_only=False)
            info = read_info(signed.directory, signed.copy, record=_record(signed.validation, METADATA_FILE, signed.where))
            checkpoint = read_checkpoint(info, map_location=map_location)
        else:
            info = self.checkpoint_info(version)
            checkpoint = read_checkpoint(info, map_location=map_location, verify=verify)
        checkpoint["version"] = str(parse_version(version))
        return checkpoint

    def verify_signature(self, version: str | Version, public_key: str | os.PathLike[str]) -> None:
        """Check that validated ``version`` is exactly what the owner of ``public_key`` signed
        (:class:`SignatureError` otherwise)."""
        place = self.version_dir(version)
        if self.remote:
            signing.verify_prefix(self.backend, str(place), public_key)
        else:
            signing.verify_directory(place, public_key)

    # ------------------------------------------------------------------ production

    def promote(
        self, version: str | Version, *, progress: ProgressFactory | None = None, verify_with: Any = None
    ) -> dict[str, Any]:
        """Make validated ``version`` what :meth:`load_production` returns, atomically.

        Promoting the version already in production changes nothing. Returns :meth:`production`.
        ``progress`` reports the bytes read, for progress bars. With ``verify_with`` (a public key's
        PEM file) a version whose signature does not verify is refused (:class:`SignatureError`).
        """
        parsed = parse_version(version)
        if self.remote:
            return self._promote_remote(parsed, progress, verify_with)
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
            document = self._switch(parsed, stack, progress, "promote", current["version"] if current else None)
        return _public(document)

    def rollback(self, *, progress: ProgressFactory | None = None) -> dict[str, Any]:
        """Put the previously promoted version back into production; returns :meth:`production`."""
        if self.remote:
            return self._rollback_remote(progress)
        with self._locked():
            current = self._production_document()
            if current is None:
                raise PromotionError(f"nothing is in production at {self.production_dir}; promote a version first")
            if not current["previous_versions"]:
                raise PromotionError(_first_promotion(current["version"], self.production_dir))
            *stack, target = current["previous_versions"]
            document = self._switch(parse_version(target), stack, progress, "rollback", current["version"])
        return _public(document)

    def _promote_remote(self, version: Version, progress: ProgressFactory | None, verify_with: Any) -> dict[str, Any]:
        """Upload the weights once, then switch the pointer on top of whatever production is by then."""
        self._places.require_conditional_writes("promoting a version")
        if verify_with is not None:
            self.verify_signature(version, verify_with)
        source: _ProductionSource | None = None
        uploaded: tuple[str, FileRecord] | None = None
        try:
            for _ in range(_SWITCH_ATTEMPTS):
                pointer = self._places.read_pointer()
                current = self._pointer_document(pointer)
                self._settle_intents(current)
                if current is not None and current["version"] == str(version):
                    return _public(current)
                if uploaded is None:
                    source = self._production_source(version)
                    uploaded = self._upload_production_weights(source, progress)
                assert source is not None
                stack = [*current["previous_versions"], current["version"]] if current is not None else []
                document = self._production_record(source, stack, *uploaded)
                event = self._event(
                    "promote", version, source=document["source"], previous=current["version"] if current else None,
                    time=document["promoted_at"],
                )
                self._places.intend(event)
                try:
                    self._places.switch(codec.dumps(document), pointer)
                except conditional.WriteConflict:
                    self._places.drop_intent(event)
                    continue
                except BaseException:
                    self._settle_after_failure(event)
                    raise
                weights, uploaded = uploaded[0], None  # pointed at now: never dropped below
                self._record(event)
                self._tidy(current, weights)
                return _public(document)
        finally:
            if uploaded is not None:
                self._places.drop_weights(uploaded[0])
        raise PromotionError(f"production in {self.production_dir} changed {_SWITCH_ATTEMPTS} times during this promotion; retry")

    def _rollback_remote(self, progress: ProgressFactory | None) -> dict[str, Any]:
        """Switch back to the previous version, refusing if production changes meanwhile."""
        self._places.require_conditional_writes("rolling back")
        pointer = self._places.read_pointer()
        current = self._pointer_document(pointer)
        self._settle_intents(current)
        if current is None:
            raise PromotionError(f"nothing is in production at {self.production_dir}; promote a version first")
        if not current["previous_versions"]:
            raise PromotionError(_first_promotion(current["version"], self.production_dir))
        *stack, target = current["previous_versions"]
        source = self._production_source(parse_version(target))
        weights, record = self._upload_production_weights(source, progress)
        document = self._production_record(source, stack, weights, record)
        event = self._event("rollback", target, source=document["source"], previous=current["version"], time=document["promoted_at"])
        self._places.intend(event)
        try:
            self._places.switch(codec.dumps(document), pointer)
        except conditional.WriteConflict:
            self._places.drop_intent(event)
            self._places.drop_weights(weights)
            raise PromotionError(
                f"production in {self.production_dir} changed while rolling back from {current['version']}; "
                "look at what is in production now (ckpt history) and roll back again if you still mean to"
            ) from None
        except BaseException:
            self._settle_after_failure(event)
            raise
        self._record(event)
        self._tidy(current, weights)
        return _public(document)

    def _upload_production_weights(self, source: _ProductionSource, progress: ProgressFactory | None) -> tuple[str, FileRecord]:
        """Give production a new weights object for ``source``: its name and record."""
        name = self._places.new_weights_name()
        try:
            record = _publish_model(source, self._places.weights_key(name), progress, self.backend)
        except BaseException:
            self._places.drop_weights(name)
            raise
        return name, record

    def _tidy(self, replaced: Mapping[str, Any] | None, weights: str) -> None:
        """After production switched to ``weights``: delete the weights it replaced, and what dead
        writers left. The switch has happened, so a failure here only warns."""
        if replaced is not None:
            self._places.drop_weights(replaced.get("weights", PRODUCTION_MODEL_FILE))
        try:
            self._places.recover(weights)
        except StorageError as exc:
            warnings.warn(f"could not clean up leftovers in {self.validated_dir} or {self.production_dir} ({exc}); "
                          "a later promotion removes them", UserWarning, stacklevel=3)

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
        if verify_with is not None:
            return self._load_signed_production(verify_with, map_location)
        for _ in range(_LOAD_ATTEMPTS):
            before = self._production_bytes()
            if before is None:
                return None
            document = self._production_document(before)
            record = _record(document, PRODUCTION_MODEL_FILE, self._production_file(PRODUCTION_RECORD_FILE))
            tensors = self._production_weights(document, record, verify, before)
            if tensors is not None:
                break
        else:
            raise PromotionError(f"{self.production_dir} changed {_LOAD_ATTEMPTS} times while loading; retry")
        public = _public(document)
        model = codec.decode(document["model"], _on_device(tensors, map_location), self._production_file(PRODUCTION_RECORD_FILE), "model")
        return _served(model, document["version"], document["source"]["epoch"], public["metrics"], public.get("config"), public)

    def _production_weights(
        self, document: Mapping[str, Any], record: FileRecord, verify: bool, before: bytes
    ) -> dict[str, torch.Tensor] | None:
        """The weights ``document`` names, read once into private memory and checked against
        ``record``; None when production changed meanwhile (``before`` is what it was)."""
        weights = self._production_file(document.get("weights", PRODUCTION_MODEL_FILE))
        try:
            # Read into private memory rather than mapping the file: the served weights must not
            # change when someone edits or truncates a file that shares their inode.
            tensors = stream_tensor_file(weights, record, lambda spec: None, verify=verify, backend=self.backend)
        except CorruptCheckpointError:
            if self._production_bytes() == before:
                raise
            return None
        return tensors if self._production_bytes() == before else None

    def _load_signed_production(self, public_key: Any, map_location: Device) -> dict[str, Any] | None:
        """:meth:`load_production` with every value from bytes a signature covers.

        ``model.json`` is not signed (a promotion needs no private key), so it only says which
        version is in production and where its weights are. Everything returned comes from that
        version's signed documents, read once: version, epoch, metrics, checks, source and config
        from ``validation.json`` and ``metadata.json``, the layout from ``state.json``, and the
        weights are checked against the signed checksum in the same pass that reads them. What only
        the promotion knows (``previous_versions``, ``promoted_at``, ``promoted_by``) is left out;
        :meth:`production` and :meth:`history` show it, unverified.
        """
        for _ in range(_LOAD_ATTEMPTS):
            before = self._production_bytes()
            if before is None:
                return None
            document = self._production_document(before)
            signed = self._signed_production(document, public_key)
            tensors = self._production_weights(document, signed.weights, True, before)
            if tensors is not None:
                break
        else:
            raise PromotionError(f"{self.production_dir} changed {_LOAD_ATTEMPTS} times while loading; retry")
        public = {**_decoded(signed.validation), "config": codec.from_json(signed.metadata.get("config"))}
        public["source"] = {**public["source"], "validated_path": signed.directory}
        model = codec.decode(signed.model_tree, _on_device(tensors, map_location), signed.where, "model")
        return _served(model, public["version"], public["source"]["epoch"], public["metrics"], public["config"], public)

    def history(self) -> list[dict[str, Any]]:
        """The audit log, oldest first: one dict per validate, promote and rollback, with ``time``,
        ``event``, ``version``, ``source`` (checkpoint path, epoch, checksum), ``user`` and ``host``."""
        if self.remote:
            events = self._places.history()
            pending = [event for event in self._places.intents() if event not in events]
        else:
            events = self._recorded_events()
            intent = self._pending_intent()
            pending = [] if intent is None or intent in events else [intent]
        production = _Unread
        for event in pending:
            if event["event"] != "validate" and production is _Unread:
                production = self._readable_production()
            if self._took_effect(event, production):
                events.append(event)
        return sorted(events, key=self._places.event_name) if self.remote and pending else events

    def _recorded_events(self) -> list[dict[str, Any]]:
        """The events of the local ``history.jsonl``, in the order they were appended."""
        self._check_places()
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

    def _check_places(self) -> None:
        """Refuse the default places beside a local checkpoint directory that has never existed
        while this registry was in use: they would be another run's (``ArtifactRegistry("chekpoints")``
        beside ``production/``). A registry made before the run's first save is fine once the run
        has saved, and one whose raw checkpoints were deleted later keeps its versions."""
        if not self.remote and self._places_unproven:
            self._places_unproven = not self.checkpoint_dir.is_dir()
        if not self.remote and self._places_unproven:
            raise CheckpointNotFoundError(
                f"{self.checkpoint_dir} does not exist, so the validated/ and production/ beside it are not its own; "
                "pass the directory a CheckpointManager saved into, or validated_dir= and production_dir= to use "
                "a registry without one"
            )

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._check_places()
        self._validated.ensure_writable()
        try:
            with self._lock:
                self._validated.recover()
                self._production_parent.recover(only=self.production_dir.name)
                self._settle_intents(self._readable_production())
                yield
        except filelock.Timeout:
            raise PromotionError(
                f"another process has held the registry lock {self._lock.lock_file} for more than "
                f"{self._lock.timeout} s; wait for its promotion to finish and retry"
            ) from None

    @property
    def backend(self) -> Backend:
        """What reaches the validated versions and production (the local file system, or the object store)."""
        return self._places.backend if self.remote else LOCAL

    def _production_file(self, filename: str) -> str:
        return self.backend.join(str(self.production_dir), filename)

    def _parsed_versions(self) -> list[Version]:
        if self.remote:
            names = self._places.version_names()
        else:
            self._check_places()
            names = [entry.name for entry in self._validated.entries() if (Path(entry.path) / VALIDATION_FILE).is_file()]
        found = []
        for name in names:
            try:
                version = parse_version(name[1:])
            except PromotionError:
                continue
            if name == _directory_name(version):
                found.append(version)
        return sorted(found)

    def _refuse_existing(self, version: Version) -> None:
        if self.remote:
            taken = self.backend.fingerprint(self._places.claim_key(_directory_name(version))) is not None
        else:
            self._check_places()
            taken = (self.validated_dir / _directory_name(version)).exists()
        if taken:
            raise PromotionError(
                f"version {version} is already validated in {self.validated_dir} and validated versions are "
                "immutable; choose a new version, or bump the highest one"
            )

    def _located(self, version: Version) -> tuple[str, dict[str, Any]]:
        """Where validated ``version`` lives and its verified ``validation.json``
        (:class:`CheckpointNotFoundError` when there is no such version)."""
        record: FileRecord | None = None
        if self.remote:
            found = self._places.version_location(_directory_name(version))
            place = None if found is None else found[0]
            record = None if found is None else found[1]
        else:
            self._check_places()
            local = self.validated_dir / _directory_name(version)
            place = str(local) if (local / VALIDATION_FILE).is_file() else None
        if place is None:
            existing = ", ".join(self.versions()) or "none"
            raise CheckpointNotFoundError(
                f"version {version} is not validated yet (validated versions: {existing}, in {self.validated_dir}); "
                f"validate a checkpoint as that version first: ckpt validate {self.checkpoint_dir} EPOCH --version {version} "
                "(or ArtifactRegistry.validate)"
            )
        path = self.backend.join(place, VALIDATION_FILE)
        document = read_json(path, record, backend=self.backend)
        documents.check_seal(document, path)
        if document["version"] != str(version):
            raise CorruptCheckpointError(f"{path} records version {document['version']}, not {version}; the record is damaged")
        return place, document

    @staticmethod
    def _source_entry(info: CheckpointInfo, metadata: FileRecord) -> dict[str, Any]:
        return {
            "path": info.location if is_url(info.location) else str(Path(info.location).resolve()),
            "name": info.name,
            "epoch": info.epoch,
            "step": info.step,
            "checksum": metadata.checksum,
            "saved_at": info.timestamp,
        }

    def _production_bytes(self) -> bytes | None:
        if self.remote:
            try:
                return read_bytes_file(self._places.pointer_key, backend=self.backend)
            except CorruptCheckpointError:  # how the read path reports a missing file
                if self.backend.fingerprint(self._places.pointer_key) is not None:
                    raise
                return None
        self._check_places()
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
        where = self._production_file(PRODUCTION_RECORD_FILE)
        try:
            document = documents.parse(data, PRODUCTION_RECORD_FILE, where)
            documents.check_seal(document, where)
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"{exc}; promote a version again to replace it") from None
        return document

    def _production_source(self, version: Version) -> _ProductionSource:
        """Everything a promotion of validated ``version`` takes from it, read and verified once."""
        directory, validation = self._located(version)
        backend = self.backend
        files = {name: FileRecord.from_json(record) for name, record in validation["files"].items()}
        where = backend.join(directory, VALIDATION_FILE)
        metadata = read_json(backend.join(directory, METADATA_FILE), _record(validation, METADATA_FILE, where), backend=backend)
        parse_metadata(directory, metadata, backend)
        state = read_json(backend.join(directory, STATE_FILE), _record(validation, STATE_FILE, where), backend=backend)
        if "model" not in state["items"]:
            raise CorruptCheckpointError(f"{backend.join(directory, STATE_FILE)} holds no model; validate a complete checkpoint")
        source = _ProductionSource(version, directory, validation, metadata.get("config"), files, state["items"]["model"].get("tree"))
        if state["items"]["model"].get("sharded"):
            from .distributed.consolidate import read_sharded_items

            source.consolidated = read_sharded_items(directory, files, ["model"], backend=backend)["model"]
            source.model_tree = {key: {codec.TENSOR: key} for key in source.consolidated}
        return source

    def _production_record(
        self, source: _ProductionSource, previous_versions: list[str], weights: str, record: FileRecord
    ) -> dict[str, Any]:
        """The sealed production record of ``source`` whose weights are the file ``weights``."""
        validation = source.validation
        directory = source.directory
        document = {
            "format": PRODUCTION_FORMAT,
            "format_version": FORMAT_VERSION,
            "version": str(source.version),
            "source": {**validation["source"], "validated_path": directory if self.remote else str(Path(directory).resolve())},
            "metrics": validation["metrics"],
            "metric_for_best": validation["metric_for_best"],
            "mode": validation["mode"],
            "checks": validation["checks"],
            "files": {PRODUCTION_MODEL_FILE: record.to_json()},
            "tied": _aliases(source.model_tree),
            "config": source.config,
            "validated_at": validation["validated_at"],
            "validated_by": validation["validated_by"],
            "promoted_at": utc_timestamp(),
            "promoted_by": _actor(),
            "previous_versions": previous_versions,
            "model": source.model_tree,
        }
        if weights != PRODUCTION_MODEL_FILE:
            document["weights"] = weights
        return documents.seal(document)

    def _switch(
        self, version: Version, previous_versions: list[str], progress: ProgressFactory | None, event: str, previous: str | None
    ) -> dict[str, Any]:
        """Replace ``production/`` with ``version`` in one atomic rename, and record the ``event``
        (promote or rollback from version ``previous``). The caller holds the lock."""
        source = self._production_source(version)
        place, parent = self._production_place()
        _refuse_foreign_production(place)
        parent.ensure_writable(place.name)  # the parent is not the registry's: only production's leftovers are removed there
        parent.recover(only=place.name)
        staging = parent.staging_dir(place.name)
        entry = None
        try:
            record = _publish_model(source, str(staging / PRODUCTION_MODEL_FILE), progress)
            document = self._production_record(source, previous_versions, PRODUCTION_MODEL_FILE, record)
            write_bytes_file(staging / PRODUCTION_RECORD_FILE, codec.dumps(document))
            entry = self._event(event, version, source=document["source"], previous=previous, time=document["promoted_at"])
            self._intend(entry)
            parent.publish(staging, place.name)
        except BaseException:
            parent.discard(staging)
            self._settle_after_failure(entry)
            raise
        self._record(entry)
        return document

    def _pointer_document(self, pointer: conditional.Versioned | None) -> dict[str, Any] | None:
        """The production record a conditional read returned; a damaged one is replaced with a warning."""
        if pointer is None:
            return None
        try:
            return self._production_document(pointer.data)
        except CorruptCheckpointError as exc:
            warnings.warn(f"replacing a damaged production model: {exc}", UserWarning, stacklevel=3)
            return None

    def verify_production_signature(self, public_key: str | os.PathLike[str]) -> None:
        """Check that production is a validated version signed with the private half of ``public_key``,
        its weights and layout unchanged (:class:`SignatureError` otherwise; nothing in production
        passes trivially)."""
        document = self._production_document()
        if document is not None:
            signed = self._signed_production(document, public_key)
            weights = self._production_file(document.get("weights", PRODUCTION_MODEL_FILE))
            verify_file(weights, signed.weights, backend=self.backend)

    def _signed_production(self, document: Mapping[str, Any], public_key: Any) -> _SignedVersion:
        """The signed version production's ``document`` names, read once and verified; its weights
        must be that version's signed weights, laid out as it signed them."""
        version = parse_version(document["version"])
        signed = self._signed_version(version, public_key)
        where = self._production_file(PRODUCTION_RECORD_FILE)
        recorded = signed.validation["files"].get(MODEL_FILE)
        if recorded is None or document["files"].get(PRODUCTION_MODEL_FILE) != recorded:
            raise SignatureError(
                f"{where} records weights that are not the signed weights of version {version} (a sharded model's "
                "joined file cannot be tied to its signature either); promote a signed version again"
            )
        if signed.model_tree != document["model"]:
            raise SignatureError(f"{where} lays the weights out unlike signed version {version}; promote it again")
        return signed

    def _signed_version(self, version: Version, public_key: Any, *, documents_only: bool = True) -> _SignedVersion:
        """Validated ``version`` read once into private memory, its signature checked over those
        bytes; with ``documents_only`` its tensor files are only hashed. The signed
        ``validation.json`` must name ``version``."""
        directory = str(self.version_dir(version))
        keep = (lambda name: name.endswith(".json")) if documents_only else None
        copy = signing.read_signed(self.backend, directory, public_key, keep=keep)
        where = copy.join(directory, VALIDATION_FILE)
        validation = read_json(where, backend=copy)
        documents.check_seal(validation, where)
        if validation.get("version") != str(version):
            raise SignatureError(
                f"{directory} holds the signed version {validation.get('version')}, not {version}; validate it again"
            )
        metadata = read_json(copy.join(directory, METADATA_FILE), _record(validation, METADATA_FILE, where), backend=copy)
        parse_metadata(directory, metadata, copy)
        state = read_json(copy.join(directory, STATE_FILE), _record(validation, STATE_FILE, where), backend=copy)
        model = state["items"].get("model", {})
        recorded = validation["files"].get(MODEL_FILE)
        weights = FileRecord.from_json(recorded) if recorded is not None else None
        return _SignedVersion(directory, copy, where, validation, metadata, model.get("tree"), weights)  # type: ignore[arg-type]

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

    @staticmethod
    def _event(event: str, version: Version | str, *, time: str, **fields: Any) -> dict[str, Any]:
        """A history event; ``time`` is the one the change records (``validated_at`` or
        ``promoted_at``), which orders the history and tells whether the change took effect."""
        return {"time": time, "event": event, "version": str(version), **fields, **_actor()}

    def _intend(self, entry: dict[str, Any]) -> None:
        """Write ``entry`` as the intent of the change about to take effect (the caller holds the lock,
        and any earlier intent was settled when it took it)."""
        if self.remote:
            self._places.intend(entry)
            return
        path = self.validated_dir / INTENT_FILE
        path.unlink(missing_ok=True)
        publish_file(path, lambda handle: handle.write(codec.dumps(entry)))

    def _record(self, entry: dict[str, Any]) -> None:
        """Append the event of a change that took effect, then drop its intent."""
        if self.remote:
            self._places.log(entry)
            self._places.drop_intent(entry)
            return
        append_line(self.validated_dir / HISTORY_FILE, codec.dumps(entry))
        (self.validated_dir / INTENT_FILE).unlink(missing_ok=True)

    def _pending_intent(self) -> dict[str, Any] | None:
        """The local intent a writer left, or None (also for one cut short, whose change never began)."""
        path = self.validated_dir / INTENT_FILE
        try:
            return documents.validate(documents.load_json(read_bytes_file(path), str(path)), documents.HistoryEventDoc, str(path))
        except CorruptCheckpointError:
            return None

    def _settle_after_failure(self, entry: dict[str, Any] | None) -> None:
        """After the change of intent ``entry`` failed: record its event if it took effect all the
        same (a failure after the change), else drop the intent."""
        if entry is None:
            return
        try:
            if self._took_effect(entry, self._readable_production()):
                self._record(entry)
            elif self.remote:
                self._places.drop_intent(entry)
            else:
                (self.validated_dir / INTENT_FILE).unlink(missing_ok=True)
        except Exception:  # noqa: BLE001 - the failure on its way out says more; the next change settles it
            pass

    def _settle_intents(self, production: Mapping[str, Any] | None) -> None:
        """Turn the intents of changes that took effect into events, and drop those of changes that
        did not (on an object store: once they are older than a live writer could be)."""
        if self.remote:
            for entry in self._places.intents():
                if self._took_effect(entry, production):
                    self._record(entry)
                elif self._places.is_stale(entry):
                    self._places.drop_intent(entry)
            return
        entry = self._pending_intent()
        if entry is not None and self._took_effect(entry, production) and entry not in self._recorded_events():
            append_line(self.validated_dir / HISTORY_FILE, codec.dumps(entry))
        (self.validated_dir / INTENT_FILE).unlink(missing_ok=True)

    def _took_effect(self, entry: Mapping[str, Any], production: Mapping[str, Any] | None) -> bool:
        """Whether the change of the intent ``entry`` took effect: its version is validated with its
        time, or production is the version it promoted at its time. A later change settles every
        earlier intent first, so production is the latest promotion's."""
        try:
            if entry["event"] == "validate":
                return self._located(parse_version(entry["version"]))[1]["validated_at"] == entry["time"]
        except (CheckpointNotFoundError, CorruptCheckpointError, PromotionError):
            return False
        return production is not None and (production["version"], production["promoted_at"]) == (entry["version"], entry["time"])

    def _readable_production(self) -> dict[str, Any] | None:
        """The production record, or None when there is none or it is damaged."""
        try:
            return self._production_document()
        except CorruptCheckpointError:
            return None


_Unread: Any = object()
"""Production not read yet."""


@dataclass
class _ProductionSource:
    """What a promotion takes from a validated version."""

    version: Version
    directory: str
    validation: dict[str, Any]
    config: Any
    files: dict[str, FileRecord]
    model_tree: Any
    consolidated: dict[str, torch.Tensor] | None = None
    """A sharded checkpoint's model joined into full tensors: production holds the full weights."""


@dataclass
class _SignedVersion:
    """A validated version's documents as its signature covers them (see ``_signed_version``)."""

    directory: str
    copy: Backend
    where: str
    validation: dict[str, Any]
    metadata: dict[str, Any]
    model_tree: Any
    weights: FileRecord


def _first_promotion(version: str, production_dir: Any) -> str:
    """Why a rollback from the first promoted version is refused, and what to do."""
    return (
        f"version {version} is the first one promoted to {production_dir}; there is nothing to roll back to: a rollback "
        "returns to the version promoted before the current one, so promote another version first"
    )


def _on_device(tensors: dict[str, torch.Tensor], map_location: Device) -> dict[str, torch.Tensor]:
    if map_location is None:
        return tensors
    import torch

    device = torch.device(map_location)
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def _served(model: Any, version: str, epoch: Any, metrics: Any, config: Any, metadata: dict[str, Any]) -> dict[str, Any]:
    """What :meth:`ArtifactRegistry.load_production` returns."""
    return {"model": model, "version": version, "epoch": epoch, "metrics": metrics, "config": config, "metadata": metadata}


def _publish_model(source: _ProductionSource, target: str, progress: ProgressFactory | None, backend: Backend = LOCAL) -> FileRecord:
    """Give ``target`` the production weights: the version's own model file, linked or copied
    (server-side on an object store), or, for a model stored as shards (an incremental or a sharded
    checkpoint), the shards joined into one."""
    if source.consolidated is not None:
        return write_tensor_file(target, source.consolidated, SAFETENSORS_METADATA, backend=backend)
    files, directory = source.files, source.directory
    sources = shards.item_files(files, MODEL_FILE)
    if sources == [MODEL_FILE]:
        advance = progress(f"promoting {source.version}", files[MODEL_FILE].size) if progress is not None else None
        copy_file(backend.join(directory, MODEL_FILE), target, files[MODEL_FILE], advance, backend=backend)
        return files[MODEL_FILE]
    if not sources:
        raise CorruptCheckpointError(f"{directory} holds no model weights; validate a complete checkpoint")
    tensors = open_item_files(directory, files, sources[0], backend=backend)
    return write_tensor_file(target, tensors, SAFETENSORS_METADATA, backend=backend)


def _record(document: Mapping[str, Any], filename: str, where: Path) -> FileRecord:
    """The record of ``filename`` in a validated document's ``files``; its absence is damage."""
    record = document["files"].get(filename)
    if record is None:
        raise CorruptCheckpointError(f"{where} records no checksum for {filename}; the record is damaged: validate the checkpoint again")
    return FileRecord.from_json(record)


def _refuse_foreign_production(place: Path) -> None:
    """Raise :class:`ForeignFileError` when the production directory holds anything a promotion did
    not write: replacing the directory would delete it."""
    try:
        foreign = sorted(name for name in os.listdir(place) if name not in PRODUCTION_FILES)
    except (FileNotFoundError, NotADirectoryError):
        return
    if foreign:
        raise ForeignFileError(
            f"{place} holds {', '.join(repr(name) for name in foreign)}, which ckpt_plugin did not write; a "
            "promotion replaces the whole directory and would delete it. Move it out of the production directory "
            "and promote again"
        )


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
