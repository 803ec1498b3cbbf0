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
conditional writes in place of the lock and the rename; :mod:`ckpt_plugin.registry.objects`
describes it and how concurrent validations and promotions resolve.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from packaging.version import Version

from .. import signing
from ..errors import CheckpointNotFoundError, ConfigurationError, CorruptCheckpointError, PromotionError, SignatureError
from .._format import codec, documents
from .._format.layout import MODEL_FILE, STATE_FILE
from .._format.records import METADATA_FILE, FileRecord, checksum_bytes
from .._io.files import copy_file, read_bytes_file, read_json, verify_file, write_bytes_file
from .._io.info import CheckpointInfo, parse_metadata
from .._io.reader import Device, read_info
from ..manager import CheckpointManager
from .._reading import read_checkpoint
from .._storage import Backend, Location
from . import records
from .checks import Check, named_checks, run_checks
from .local import LocalPlaces
from .objects import ObjectStorePlaces
from .places import Places
from .production import ProductionOperations
from .records import VALIDATION_FILE, SignedVersion, decoded, file_record
from .verification import ProgressFactory, VerificationReport, verify_registry
from .versions import check_bump, directory_name, next_version, parse_version, versions_named

_CLAIM_ATTEMPTS = 20


class ArtifactRegistry(ProductionOperations):
    """The promotion pipeline over one checkpoint directory: raw -> validated -> production.

    Args:
        checkpoint_dir: the directory a :class:`CheckpointManager` saves into, or its object store
            URL (``s3://bucket/run/checkpoints``). On an object store, validating and promoting need
            conditional writes (S3, and ``memory://`` within one process); see
            :mod:`ckpt_plugin.registry.objects`.
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
        self._manager: CheckpointManager | None = None
        self.location = Location.of(checkpoint_dir, storage_options)
        self.storage_options = self.location.storage_options
        self.remote = self.location.remote  # a public attribute since 0.2; nothing here branches on it
        # Places are chosen once, by whether the location has a directory: every operation below runs
        # one algorithm over the Places protocol.
        directory = self.location.local_dir()
        self._places: Places = (
            LocalPlaces(directory, validated_dir, production_dir, lock_timeout=lock_timeout) if directory is not None
            else ObjectStorePlaces.beside(self.location, validated_dir, production_dir)
        )
        self.checkpoint_dir: Path | str = self._places.checkpoint_dir
        self.validated_dir: Path | str = self._places.validated_dir
        self.production_dir: Path | str = self._places.production_dir

    def __repr__(self) -> str:
        return f"ArtifactRegistry({str(self.checkpoint_dir)!r}, validated_dir={str(self.validated_dir)!r}, production_dir={str(self.production_dir)!r})"

    @property
    def backend(self) -> Backend:
        """What reaches the validated versions and production (the local file system, or the object store)."""
        return self._places.backend

    def _writing(self) -> Any:
        """The places' guard around a change (the lock of local directories)."""
        return self._places.writing(lambda: self._settle_intents(self._readable_production()))

    # ------------------------------------------------------------------ raw checkpoints

    @property
    def manager(self) -> CheckpointManager:
        """A read-only view of the raw checkpoints (it never saves, so it never prunes)."""
        if self._manager is None:
            self._places.require_checkpoints()
            self._manager = CheckpointManager(self.location, max_checkpoints=None, keep_best=False, metric_for_best=None)
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
        self._places.require_writes("validating a version")
        if (version is None) == (bump is None):
            raise ConfigurationError("pass exactly one of version= (such as '1.0.0') or bump= ('major', 'minor' or 'patch')")
        wanted = parse_version(version) if version is not None else None
        if bump is not None:
            check_bump(bump)
        named = named_checks(checks)
        if wanted is not None:
            self._refuse_existing(wanted)
        info, metadata_bytes, advance = self._verified_source(epoch, metric, mode, progress)
        results = run_checks(named, read_checkpoint(info, verify=False))
        failed = [result for result in results if not result["passed"]]
        if failed:
            reasons = "; ".join(f"{r['name']}" + (f" ({r['detail']})" if r["detail"] else "") for r in failed)
            raise PromotionError(
                f"{info.location} failed {len(failed)} of {len(results)} checks: {reasons}. Nothing was validated; "
                "fix the model or pick another checkpoint"
            )
        files = {**info.files, METADATA_FILE: FileRecord(len(metadata_bytes), checksum_bytes(metadata_bytes))}
        with self._writing():
            for _ in range(_CLAIM_ATTEMPTS):
                chosen = wanted if wanted is not None else next_version(self._parsed_versions(), bump)  # type: ignore[arg-type]
                self._refuse_existing(chosen)
                record = documents.seal(records.validation_record(chosen, info, files, results, self._places.absolute(info.location)))
                if self._write_version(chosen, record, info, metadata_bytes, advance, signing_key):
                    return decoded(record)
                if wanted is not None:
                    self._refuse_existing(chosen)
                advance = None  # the bytes were counted once
        raise PromotionError(
            f"other processes claimed {_CLAIM_ATTEMPTS} versions in {self.validated_dir} while this one was being "
            "written; retry the validation"
        )

    def _verified_source(
        self, epoch: int | str, metric: str | None, mode: str | None, progress: ProgressFactory | None
    ) -> tuple[CheckpointInfo, bytes, Callable[[int], None] | None]:
        """The raw checkpoint to validate, its metadata's bytes, and its files verified (half the
        progress; copying them is the other half)."""
        source = self.resolve(epoch, metric, mode)
        backend = source.backend
        metadata_bytes = read_bytes_file(source.file(METADATA_FILE), backend=backend)
        info = parse_metadata(source.location, documents.load_json(metadata_bytes, source.file(METADATA_FILE)), backend)
        advance = progress(f"validating {info.name}", 2 * info.size) if progress is not None else None
        for filename, file in info.files.items():
            verify_file(info.file(filename), file, advance, backend=backend)
        return info, metadata_bytes, advance

    def _write_version(
        self, version: Version, record: dict[str, Any], info: CheckpointInfo, metadata_bytes: bytes,
        advance: Callable[[int], None] | None, signing_key: Any,
    ) -> bool:
        """Write ``version`` where nobody sees it, then claim its name: False when another writer
        claimed it first (what was written is then removed)."""
        backend = info.backend
        name = directory_name(version)
        prefix = self._places.begin_version(name)
        entry = None
        try:
            for filename, file in info.files.items():
                copy_file(info.file(filename), backend.join(prefix, filename), file, advance, backend=backend)
            write_bytes_file(backend.join(prefix, METADATA_FILE), metadata_bytes, backend=backend)
            validation = write_bytes_file(backend.join(prefix, VALIDATION_FILE), codec.dumps(record), backend=backend)
            if signing_key is not None:
                signing.sign_prefix(backend, prefix, signing_key)
            entry = records.event("validate", version, source=record["source"], time=record["validated_at"])
            self._places.intend(entry)
            claimed = self._places.claim(version, name, prefix, validation)
        except BaseException:
            self._settle_after_failure(entry)
            self._places.discard(prefix)
            raise
        if claimed:
            self._record(entry)
        else:
            self._places.drop_intent(entry)
            self._places.discard(prefix)
        return claimed

    def versions(self) -> list[str]:
        """Every validated version, lowest first, compared semantically (1.10.0 after 1.9.0)."""
        return [str(version) for version in self._parsed_versions()]

    def validation(self, version: str | Version) -> dict[str, Any]:
        """The validation record of ``version``: source checkpoint, checksum, metrics and checks."""
        return decoded(self._located(parse_version(version))[1])

    def version_dir(self, version: str | Version) -> Path | str:
        """The directory of validated ``version`` (a URL on an object store; raises
        :class:`CheckpointNotFoundError` if there is no such version)."""
        return self._places.as_dir(self._located(parse_version(version))[0])

    def checkpoint_info(self, version: str | Version) -> CheckpointInfo:
        """The validated ``version`` as a :class:`CheckpointInfo`, its metadata verified."""
        place, document = self._located(parse_version(version))
        record = file_record(document, METADATA_FILE, self.backend.join(place, VALIDATION_FILE))
        return read_info(place, self.backend, record=record)

    def load(
        self, version: str | Version, *, map_location: Device = None, verify: bool = True, verify_with: Any = None
    ) -> dict[str, Any]:
        """Load validated ``version`` as a checkpoint dict (``model``, ``optimizer``, ``metrics``, ...)
        with its ``version`` added; every file is checked against its checksum unless ``verify`` is False.
        With ``verify_with`` (a public key's PEM file) the version's signature must verify first."""
        if verify_with is not None:
            signed = self._signed_version(parse_version(version), verify_with, documents_only=False)
            info = read_info(signed.directory, signed.copy, record=file_record(signed.validation, METADATA_FILE, signed.where))
            checkpoint = read_checkpoint(info, map_location=map_location)
        else:
            info = self.checkpoint_info(version)
            checkpoint = read_checkpoint(info, map_location=map_location, verify=verify)
        checkpoint["version"] = str(parse_version(version))
        return checkpoint

    def verify_signature(self, version: str | Version, public_key: str | os.PathLike[str]) -> None:
        """Check that validated ``version`` is exactly what the owner of ``public_key`` signed
        (:class:`SignatureError` otherwise)."""
        signing.verify_prefix(self.backend, self.version_dir(version), public_key)

    def verify(self, public_key: str | os.PathLike[str] | None = None, *, progress: ProgressFactory | None = None) -> VerificationReport:
        """Check every file's checksum: the raw checkpoints, the validated versions and production;
        with ``public_key``, their signatures too. Returns a :class:`VerificationReport` (one item per
        check) instead of raising; see :mod:`ckpt_plugin.registry.verification`."""
        return verify_registry(self, public_key, progress=progress)

    def _parsed_versions(self) -> list[Version]:
        return versions_named(self._places.version_names())

    def _refuse_existing(self, version: Version) -> None:
        if self._places.is_taken(directory_name(version)):
            raise PromotionError(
                f"version {version} is already validated in {self.validated_dir} and validated versions are "
                "immutable; choose a new version, or bump the highest one"
            )

    def _located(self, version: Version) -> tuple[str, dict[str, Any]]:
        """Where validated ``version`` lives and its verified ``validation.json``
        (:class:`CheckpointNotFoundError` when there is no such version)."""
        found = self._places.version_location(directory_name(version))
        if found is None:
            existing = ", ".join(self.versions()) or "none"
            raise CheckpointNotFoundError(
                f"version {version} is not validated yet (validated versions: {existing}, in {self.validated_dir}); "
                f"validate a checkpoint as that version first: ckpt validate {self.checkpoint_dir} EPOCH --version {version} "
                "(or ArtifactRegistry.validate)"
            )
        place, record = found
        path = self.backend.join(place, VALIDATION_FILE)
        document = read_json(path, record, backend=self.backend)
        documents.check_seal(document, path)
        if document["version"] != str(version):
            raise CorruptCheckpointError(f"{path} records version {document['version']}, not {version}; the record is damaged")
        return place, document

    def _signed_version(self, version: Version, public_key: Any, *, documents_only: bool = True) -> SignedVersion:
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
        metadata = read_json(copy.join(directory, METADATA_FILE), file_record(validation, METADATA_FILE, where), backend=copy)
        parse_metadata(directory, metadata, copy)
        state = read_json(copy.join(directory, STATE_FILE), file_record(validation, STATE_FILE, where), backend=copy)
        model = state["items"].get("model", {})
        recorded = validation["files"].get(MODEL_FILE)
        weights = FileRecord.from_json(recorded) if recorded is not None else None
        return SignedVersion(directory, copy, where, validation, metadata, model.get("tree"), weights)  # type: ignore[arg-type]


__all__ = ["ArtifactRegistry", "Check", "ProgressFactory", "next_version", "parse_version", "run_checks"]
