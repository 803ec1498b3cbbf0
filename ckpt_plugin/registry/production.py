"""Promotion, rollback and serving of the production model (see :mod:`ckpt_plugin.registry.core`)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from ..errors import CorruptCheckpointError, PromotionError, SignatureError
from .._format import codec, documents, shards
from .._format.layout import MODEL_FILE, STATE_FILE
from .._format.records import METADATA_FILE, FileRecord
from .._io.files import copy_file, read_json, stream_tensor_file, verify_file, write_tensor_file
from .._io.info import parse_metadata
from .._io.reader import Device, open_item_files
from .._io.writer import SAFETENSORS_METADATA
from .._storage import Backend, conditional
from . import records
from .history import HistoryOperations
from .places import StagedWeights
from .records import PRODUCTION_MODEL_FILE, PRODUCTION_RECORD_FILE, VALIDATION_FILE, ProductionSource, SignedVersion, public
from .versions import parse_version

if TYPE_CHECKING:
    import torch

    from .verification import ProgressFactory

_LOAD_ATTEMPTS = 20
_SWITCH_ATTEMPTS = 20


class ProductionOperations(HistoryOperations):
    """The production part of :class:`~ckpt_plugin.registry.ArtifactRegistry`."""

    production_dir: Any

    if TYPE_CHECKING:
        backend: Backend

        def _writing(self) -> Any: ...
        def _located(self, version: Version) -> tuple[str, dict[str, Any]]: ...
        def _signed_version(self, version: Version, public_key: Any, *, documents_only: bool = True) -> SignedVersion: ...
        def verify_signature(self, version: str | Version, public_key: str | os.PathLike[str]) -> None: ...

    def promote(
        self, version: str | Version, *, progress: ProgressFactory | None = None, verify_with: Any = None
    ) -> dict[str, Any]:
        """Make validated ``version`` what :meth:`load_production` returns, atomically.

        Promoting the version already in production changes nothing. Returns :meth:`production`.
        ``progress`` reports the bytes read, for progress bars. With ``verify_with`` (a public key's
        PEM file) a version whose signature does not verify is refused (:class:`SignatureError`).
        A promotion that meets a rival's switches again on top of it.
        """
        parsed = parse_version(version)
        self._places.require_writes("promoting a version")
        with self._writing():
            if verify_with is not None:
                self.verify_signature(parsed, verify_with)
            staged: StagedWeights | None = None
            try:
                for _ in range(_SWITCH_ATTEMPTS):
                    pointer = self._places.read_production()
                    current = self._replaced_production(pointer)
                    if current is not None and current["version"] == str(parsed):
                        return public(current)
                    if staged is None:
                        source = self._production_source(parsed)
                        staged = self._stage(source, progress)
                    stack = [*current["previous_versions"], current["version"]] if current is not None else []
                    document = self._production_record(source, stack, staged)
                    if self._switch(staged, document, "promote", current, pointer):
                        return public(document)
            finally:
                if staged is not None and not staged.switched:
                    self._places.drop_staged(staged)
        raise PromotionError(f"production in {self.production_dir} changed {_SWITCH_ATTEMPTS} times during this promotion; retry")

    def rollback(self, *, progress: ProgressFactory | None = None) -> dict[str, Any]:
        """Put the previously promoted version back into production; returns :meth:`production`.
        A rollback that meets a rival's promotion is refused: what it would roll back has changed."""
        self._places.require_writes("rolling back")
        with self._writing():
            pointer = self._places.read_production()
            current = self._production_document(pointer.data) if pointer is not None else None
            self._settle_intents(current)
            if current is None:
                raise PromotionError(f"nothing is in production at {self.production_dir}; promote a version first")
            if not current["previous_versions"]:
                raise PromotionError(records.first_promotion(current["version"], self.production_dir))
            *stack, target = current["previous_versions"]
            source = self._production_source(parse_version(target))
            staged = self._stage(source, progress)
            try:
                document = self._production_record(source, stack, staged)
                if not self._switch(staged, document, "rollback", current, pointer):
                    raise PromotionError(
                        f"production in {self.production_dir} changed while rolling back from {current['version']}; "
                        "look at what is in production now (ckpt history) and roll back again if you still mean to"
                    )
            finally:
                if not staged.switched:
                    self._places.drop_staged(staged)
        return public(document)

    def _replaced_production(self, pointer: conditional.Versioned | None) -> dict[str, Any] | None:
        """The production record a switch would replace, after settling the intents it meets; a
        damaged one is replaced with a warning."""
        current = None
        if pointer is not None:
            try:
                current = self._production_document(pointer.data)
            except CorruptCheckpointError as exc:
                warnings.warn(f"replacing a damaged production model: {exc}", UserWarning, stacklevel=4)
        self._settle_intents(current)
        return current

    def _stage(self, source: ProductionSource, progress: ProgressFactory | None) -> StagedWeights:
        return self._places.stage_weights(lambda target: _publish_model(source, target, progress, self.backend))

    def _production_record(self, source: ProductionSource, stack: list[str], staged: StagedWeights) -> dict[str, Any]:
        return records.production_record(source, self._places.absolute(source.directory), stack, staged.name, staged.record)

    def _switch(
        self, staged: StagedWeights, document: dict[str, Any], name: str, current: Mapping[str, Any] | None,
        pointer: conditional.Versioned | None,
    ) -> bool:
        """Make ``document`` production if it is still ``pointer``, recording the event ``name``
        (promote or rollback from ``current``); False when a rival switched first."""
        entry = records.event(
            name, document["version"], source=document["source"], previous=current["version"] if current else None,
            time=document["promoted_at"],
        )
        self._places.intend(entry)
        try:
            self._places.switch(staged, codec.dumps(document), pointer)
        except conditional.WriteConflict:
            self._places.drop_intent(entry)
            return False
        except BaseException:
            staged.switched = self._settle_after_failure(entry)
            raise
        staged.switched = True
        self._record(entry)
        self._places.tidy(current, staged)
        return True

    def production(self) -> dict[str, Any] | None:
        """What is in production: version, source, metrics, checks, checksums, who promoted it and
        when, and ``previous_versions`` (what :meth:`rollback` goes back to). None when empty."""
        document = self._production_document()
        return None if document is None else public(document)

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
            before = self._places.production_bytes()
            if before is None:
                return None
            document = self._production_document(before)
            record = records.file_record(document, PRODUCTION_MODEL_FILE, self._production_file(PRODUCTION_RECORD_FILE))
            tensors = self._production_weights(document, record, verify, before)
            if tensors is not None:
                break
        else:
            raise PromotionError(f"{self.production_dir} changed {_LOAD_ATTEMPTS} times while loading; retry")
        shown = public(document)
        model = codec.decode(document["model"], _on_device(tensors, map_location), self._production_file(PRODUCTION_RECORD_FILE), "model")
        return _served(model, document["version"], document["source"]["epoch"], shown["metrics"], shown.get("config"), shown)

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
            if self._places.production_bytes() == before:
                raise
            return None
        return tensors if self._places.production_bytes() == before else None

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
            before = self._places.production_bytes()
            if before is None:
                return None
            document = self._production_document(before)
            signed = self._signed_production(document, public_key)
            tensors = self._production_weights(document, signed.weights, True, before)
            if tensors is not None:
                break
        else:
            raise PromotionError(f"{self.production_dir} changed {_LOAD_ATTEMPTS} times while loading; retry")
        shown = {**records.decoded(signed.validation), "config": codec.from_json(signed.metadata.get("config"))}
        shown["source"] = {**shown["source"], "validated_path": signed.directory}
        model = codec.decode(signed.model_tree, _on_device(tensors, map_location), signed.where, "model")
        return _served(model, shown["version"], shown["source"]["epoch"], shown["metrics"], shown["config"], shown)

    def verify_production_signature(self, public_key: str | os.PathLike[str]) -> None:
        """Check that production is a validated version signed with the private half of ``public_key``,
        its weights and layout unchanged (:class:`SignatureError` otherwise; nothing in production
        passes trivially)."""
        document = self._production_document()
        if document is not None:
            signed = self._signed_production(document, public_key)
            weights = self._production_file(document.get("weights", PRODUCTION_MODEL_FILE))
            verify_file(weights, signed.weights, backend=self.backend)

    def _signed_production(self, document: Mapping[str, Any], public_key: Any) -> SignedVersion:
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

    def _production_file(self, filename: str) -> str:
        return self.backend.join(str(self.production_dir), filename)

    def _production_document(self, data: bytes | None = None) -> dict[str, Any] | None:
        data = self._places.production_bytes() if data is None else data
        if data is None:
            return None
        where = self._production_file(PRODUCTION_RECORD_FILE)
        try:
            document = documents.parse(data, PRODUCTION_RECORD_FILE, where)
            documents.check_seal(document, where)
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"{exc}; promote a version again to replace it") from None
        return document

    def _production_source(self, version: Version) -> ProductionSource:
        """Everything a promotion of validated ``version`` takes from it, read and verified once."""
        directory, validation = self._located(version)
        backend = self.backend
        files = {name: FileRecord.from_json(record) for name, record in validation["files"].items()}
        where = backend.join(directory, VALIDATION_FILE)
        metadata = read_json(backend.join(directory, METADATA_FILE), records.file_record(validation, METADATA_FILE, where), backend=backend)
        parse_metadata(directory, metadata, backend)
        state = read_json(backend.join(directory, STATE_FILE), records.file_record(validation, STATE_FILE, where), backend=backend)
        if "model" not in state["items"]:
            raise CorruptCheckpointError(f"{backend.join(directory, STATE_FILE)} holds no model; validate a complete checkpoint")
        source = ProductionSource(version, directory, validation, metadata.get("config"), files, state["items"]["model"].get("tree"))
        if state["items"]["model"].get("sharded"):
            from .._distributed.consolidate import read_sharded_items

            source.consolidated = read_sharded_items(directory, files, ["model"], backend=backend)["model"]
            source.model_tree = {key: {codec.TENSOR: key} for key in source.consolidated}
        return source


def _on_device(tensors: dict[str, torch.Tensor], map_location: Device) -> dict[str, torch.Tensor]:
    if map_location is None:
        return tensors
    import torch

    device = torch.device(map_location)
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def _served(model: Any, version: str, epoch: Any, metrics: Any, config: Any, metadata: dict[str, Any]) -> dict[str, Any]:
    """What :meth:`ArtifactRegistry.load_production` returns."""
    return {"model": model, "version": version, "epoch": epoch, "metrics": metrics, "config": config, "metadata": metadata}


def _publish_model(source: ProductionSource, target: str, progress: ProgressFactory | None, backend: Backend) -> FileRecord:
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
