"""Optional signatures: authenticity on top of checksums, with OpenSSF ``model-signing``.

Checksums prove that bytes are the ones recorded, but anyone who can write a directory can record
new checksums. A signature made with a private key proves who wrote the directory. This module signs
a whole checkpoint directory (every file in it, by SHA-256) into a ``model.sig`` file inside it,
in the Sigstore bundle format of `model-signing <https://github.com/sigstore/model-transparency>`_,
so that the ``model_signing`` command verifies it too::

    model_signing verify key epoch_3 --signature epoch_3/model.sig --public_key key.pub

Keys are elliptic-curve keys in PEM files (``openssl ecparam -name prime256v1 -genkey -noout -out
key.pem; openssl ec -in key.pem -pubout -out key.pub``). Signing with a key works offline. Keyless
signing through Sigstore (an OIDC identity, a certificate from Fulcio, an entry in the Rekor
transparency log) needs the network: sign a directory with ``model_signing sign sigstore DIR
--signature DIR/model.sig`` and verify it with ``model_signing verify sigstore``; this module
verifies only key signatures.

On an object store (``s3://...``) :func:`sign_prefix` and :func:`verify_prefix` do the same over a
checkpoint's prefix without downloading it: every object under the prefix is streamed through the
backend once (bounded memory, SHA-256), and model-signing's own manifest and signer turn those
digests into a ``model.sig`` object inside the prefix. The signature is byte for byte what
model-signing would produce for the prefix downloaded into a directory, so ``model_signing verify
key`` accepts such a copy. A checkpoint saved with ``signing_key`` is signed before its manifest
commits: the signature covers ``metadata.json`` (digested from the bytes about to be written) and is
written inside the prefix, so a signed checkpoint is never visible without its signature.

Needs the ``signing`` extra: ``pip install 'ckpt-plugin[signing]'``. Remote signing builds
model-signing's manifest from digests with the library's ``manifest`` module (not yet declared
stable) and one private name (``Digest``), and hands it to the public ``signing.Config`` and
``verifying.Config`` through a ``hashing.Config`` subclass; the extra pins the version range
(``model-signing>=1.1,<1.2``) that the tests cover.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Union

from .errors import CheckpointError, ConfigurationError, SignatureError, UnsignedError
from ._format.layout import SIGNATURE_FILE
from ._io.files import hash_file, write_bytes_file
from ._storage import Backend
from ._storage.copies import PrivateCopyBackend

MAX_SIGNATURE_BYTES = 64 * 1024 * 1024
"""A signature is a few kilobytes per thousand files; anything this large is not one."""
Key = Union[str, "os.PathLike[str]"]
Location = Union[str, "os.PathLike[str]"]
Signer = Callable[[Backend, str, Mapping[str, bytes]], str]
"""The ``before_commit`` hook of :func:`~ckpt_plugin._io.writer.write_snapshot`: given the backend, the
prefix that holds every file of a checkpoint, and the files its commit will write (name to bytes),
it writes the signature inside the prefix and returns its location."""


def _library() -> tuple[Any, Any, Any]:
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as exc:
        raise ConfigurationError(
            f"signing needs OpenSSF model-signing ({exc}); install it with pip install 'ckpt-plugin[signing]'"
        ) from None
    return hashing, signing, verifying


def _key_file(key: Key, what: str) -> Path:
    path = Path(key).expanduser()
    if not path.is_file():
        raise ConfigurationError(f"the {what} key {path} is not a file; pass the path of a PEM file")
    return path


def sign_directory(directory: str | os.PathLike[str], private_key: Key, *, password: str | None = None) -> Path:
    """Sign every file of ``directory`` with the elliptic-curve ``private_key`` (a PEM file); the
    signature goes to ``directory/model.sig`` (replacing an older one). Returns its path."""
    hashing, signing, _ = _library()
    root = Path(directory).resolve()
    signature = root / SIGNATURE_FILE
    key = _key_file(private_key, "private")
    signature.unlink(missing_ok=True)
    try:
        config = signing.Config().use_elliptic_key_signer(private_key=key, password=password)
        config.set_hashing_config(hashing.Config().set_ignored_paths(paths=[signature])).sign(root, signature)
    except (OSError, ValueError, TypeError) as exc:
        signature.unlink(missing_ok=True)
        raise ConfigurationError(f"could not sign {root} with {key}: {exc}") from exc
    return signature


def verify_directory(directory: str | os.PathLike[str], public_key: Key) -> None:
    """Check that ``directory`` holds exactly the files signed in its ``model.sig``, unchanged, and
    that the signature was made with the private half of ``public_key`` (a PEM file).

    Raises :class:`SignatureError` naming the directory otherwise: no signature, another key, a file
    changed, added or removed.
    """
    hashing, _, verifying = _library()
    root = Path(directory).resolve()
    signature = root / SIGNATURE_FILE
    key = _key_file(public_key, "public")
    if not signature.is_file():
        raise UnsignedError(f"{root} is not signed (no {SIGNATURE_FILE}); sign it, or load it without verify_with")
    try:
        config = verifying.Config().use_elliptic_key_verifier(public_key=key)
        config.set_hashing_config(hashing.Config().set_ignored_paths(paths=[signature])).verify(root, signature)
    except Exception as exc:  # noqa: BLE001 - the library raises ValueError and others for a bad signature
        raise SignatureError(
            f"the signature of {root} does not verify with {key}: {str(exc)[:300]}; do not use this checkpoint"
        ) from None


def sign_prefix(backend: Backend, prefix: Location, private_key: Key, *, password: str | None = None) -> str:
    """Sign every file under ``prefix`` (a local directory or an object store prefix, reached
    through ``backend``) with the elliptic-curve ``private_key`` (a PEM file), into
    ``prefix/model.sig`` (replacing an older one). Returns the signature's location.

    A local path goes to :func:`sign_directory`. On an object store every object under the prefix is
    streamed through ``backend`` and hashed (SHA-256, bounded memory); the signature is the one
    model-signing makes for the same files in a directory.
    """
    return _sign(backend, prefix, private_key, password, {})


def verify_prefix(backend: Backend, prefix: Location, public_key: Key) -> None:
    """Check that ``prefix`` (a local directory or an object store prefix, reached through
    ``backend``) holds exactly the files signed in its ``model.sig``, unchanged, signed with the
    private half of ``public_key`` (a PEM file).

    Raises :class:`SignatureError` naming the prefix otherwise: no signature, another key, a file
    changed, added or removed. A local path goes to :func:`verify_directory`; a failure of the store
    itself stays a :class:`~ckpt_plugin.errors.StorageError`.
    """
    directory = _directory(backend, prefix)
    if directory is not None:
        verify_directory(directory, public_key)
        return
    prefix = os.fspath(prefix).rstrip("/")
    key = _key_file(public_key, "public")
    _verify(prefix, _read_signature(backend, prefix), _prefix_hashing(backend, prefix, {}), key)


def read_signed(
    backend: Backend, location: Location, public_key: Key, *, keep: Callable[[str], bool] | None = None
) -> PrivateCopyBackend:
    """Read the signed checkpoint at ``location`` (a directory or an object store prefix) once, into
    private memory, and check its ``model.sig`` against exactly those bytes: the signature must be
    made with the private half of ``public_key`` and name every file, unchanged, and no other.

    Returns a read-only backend over the private copies, at the files' usual locations, through
    which the read path decodes the checkpoint: every value a load takes from it was verified, and
    no file can change between the check and the use. ``keep(name)`` (a path relative to
    ``location``) chooses the files to keep; the others are only hashed, streamed with bounded
    memory. Raises :class:`SignatureError` naming the location otherwise.
    """
    location = os.fspath(location)
    location = location.rstrip("/") or location
    key = _key_file(public_key, "public")
    signature = _read_signature(backend, location)
    buffers: dict[str, bytearray] = {}
    digests: dict[str, bytes] = {}
    for name in _signed_names(backend, location):
        path = backend.join(location, *name.split("/"))
        if keep is None or keep(name):
            buffers[path] = _private_copy(backend, path)
            digests[name] = hashlib.sha256(buffers[path]).digest()
        else:
            hasher = hashlib.sha256()
            hash_file(path, hasher, backend=backend)
            digests[name] = hasher.digest()
    _verify(location, signature, _hashing(lambda ignored: _manifest(location, digests, ignored)), key)
    return PrivateCopyBackend(backend, buffers)


def _directory(backend: Backend, location: Location) -> Path | None:
    """The local directory ``location`` names, when ``backend`` reaches the local file system:
    model-signing signs and verifies such a directory by its own walk, so a checkpoint directory
    and one signed by model-signing's own tools verify alike. None on an object store, whose files
    are hashed through the backend."""
    directory_of = getattr(backend, "directory_of", None)
    return None if directory_of is None else directory_of(os.fspath(location))


def _read_signature(backend: Backend, location: str) -> bytes:
    where = backend.join(location, SIGNATURE_FILE)
    try:
        if backend.size(where) > MAX_SIGNATURE_BYTES:
            raise SignatureError(f"{where} is larger than any signature; do not use this checkpoint")
        return backend.read_bytes(where)
    except FileNotFoundError:
        raise UnsignedError(
            f"{location} is not signed (no {SIGNATURE_FILE}); sign it, or load it without verify_with"
        ) from None


def _verify(location: str, signature: bytes, hashing_config: Any, key: Path) -> None:
    """Check ``signature`` (the bytes of a ``model.sig``) against the manifest ``hashing_config`` gives."""
    _, _, verifying = _library()
    with tempfile.TemporaryDirectory(prefix="ckpt-verify-") as scratch:
        local = Path(scratch) / SIGNATURE_FILE
        local.write_bytes(signature)
        try:
            config = verifying.Config().use_elliptic_key_verifier(public_key=key)
            config.set_hashing_config(hashing_config).verify(Path(scratch) / _model_name(location), local)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - the library raises ValueError and others for a bad signature
            raise SignatureError(
                f"the signature of {location} does not verify with {key}: {str(exc)[:300]}; do not use this checkpoint"
            ) from None


def _signed_names(backend: Backend, location: str) -> list[str]:
    """Every file under ``location`` by its path relative to it (``/``-separated). A link or a
    special file locally is refused: a signature covers plain files only."""
    if _directory(backend, location) is None:
        return sorted(name for name in backend.walk(location) if name)  # type: ignore[attr-defined]
    names: list[str] = []
    pending = [("", location)]
    while pending:
        relative, directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                name = f"{relative}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    pending.append((f"{name}/", entry.path))
                elif entry.is_file(follow_symlinks=False):
                    names.append(name)
                else:
                    raise SignatureError(
                        f"{entry.path} is a link or a special file, which no signature covers; do not use this checkpoint"
                    )
    return sorted(names)


def _private_copy(backend: Backend, location: str) -> bytearray:
    """The whole file at ``location``, read once into memory this process alone holds."""
    try:
        data = backend.read_all(location)
    except FileNotFoundError:
        raise SignatureError(f"{location} disappeared while its signature was being checked; retry") from None
    if isinstance(data, bytearray):
        return data
    try:
        return bytearray(data)
    finally:
        close = getattr(data, "close", None)
        if close is not None:
            close()


def signer(private_key: Key, *, password: str | None = None) -> Signer:
    """The hook that signs a checkpoint before it commits (``before_commit`` of
    :func:`~ckpt_plugin._io.writer.write_snapshot`), locally and on object stores alike."""
    _key_file(private_key, "private")  # a wrong path fails before any file is written
    return functools.partial(_sign_pending, private_key=private_key, password=password)


def _sign_pending(backend: Backend, prefix: str, pending: Mapping[str, bytes], *, private_key: Key, password: str | None) -> str:
    return _sign(backend, prefix, private_key, password, pending)


def _sign(backend: Backend, prefix: Location, private_key: Key, password: str | None, pending: Mapping[str, bytes]) -> str:
    directory = _directory(backend, prefix)
    if directory is not None:
        if pending:
            raise ConfigurationError(f"sign {prefix} once every file is in it; {', '.join(pending)} are still to be written")
        return os.fspath(sign_directory(directory, private_key, password=password))
    prefix = os.fspath(prefix).rstrip("/")
    return _sign_manifest(backend, prefix, _prefix_hashing(backend, prefix, pending), private_key, password)


def sign_digests(
    backend: Backend, prefix: str, digests: Mapping[str, bytes], private_key: Key, *, password: str | None = None
) -> str:
    """Sign the checkpoint directory or object-store ``prefix`` whose files have the SHA-256 ``digests`` (relative path to
    digest, every file the signature covers), as their writer computed them while writing them, so
    that nothing is read back; the signature goes to ``prefix/model.sig``. Returns its location."""
    prefix = prefix.rstrip("/")
    return _sign_manifest(backend, prefix, _hashing(lambda ignored: _manifest(prefix, digests, ignored)), private_key, password)


def _sign_manifest(backend: Backend, prefix: str, hashing_config: Any, private_key: Key, password: str | None) -> str:
    """Write ``prefix/model.sig``: the signature of the manifest ``hashing_config`` gives."""
    _, signing, _ = _library()
    key = _key_file(private_key, "private")
    target = backend.join(prefix, SIGNATURE_FILE)
    backend.delete(target)
    with tempfile.TemporaryDirectory(prefix="ckpt-sign-") as scratch:
        local = Path(scratch) / SIGNATURE_FILE
        try:
            config = signing.Config().use_elliptic_key_signer(private_key=key, password=password)
            config.set_hashing_config(hashing_config).sign(Path(scratch) / _model_name(prefix), local)
        except CheckpointError:
            raise
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigurationError(f"could not sign {prefix} with {key}: {exc}") from exc
        write_bytes_file(target, local.read_bytes(), backend=backend)
    return target


def _model_name(prefix: str) -> str:
    """What model-signing calls the model: the last component of its path (informative only)."""
    return prefix.rstrip("/").rsplit("/", 1)[-1] or "model"


@functools.lru_cache(maxsize=1)
def _file_serialization() -> tuple[tuple[str, Any], ...]:
    """The serialization that ``model_signing`` records when it signs a directory with ``model.sig``
    inside: by files, SHA-256, no symbolic links, ``model.sig`` and git's files ignored. Taken from
    the library itself (it hashes an empty directory), so both sign the same files the same way."""
    hashing, _, _ = _library()
    with tempfile.TemporaryDirectory(prefix="ckpt-sign-") as empty:
        parameters = hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE]).hash(empty).serialization_type
    if parameters.get("method") != "files" or parameters.get("hash_type") != "sha256":
        raise ConfigurationError(
            f"this model-signing release hashes by {parameters}, not by files with SHA-256; "
            "install a version in the range the signing extra names (pip install 'ckpt-plugin[signing]')"
        )
    return tuple(sorted((name, tuple(value) if isinstance(value, list) else value) for name, value in parameters.items()))


def _prefix_hashing(backend: Backend, prefix: str, pending: Mapping[str, bytes]) -> Any:
    """model-signing's hashing configuration over the objects under ``prefix``; ``pending`` files
    (name to bytes) count as if they were there already."""
    return _hashing(lambda ignored: prefix_manifest(backend, prefix, pending, ignored))


def _hashing(manifest_of: Callable[[set[PurePosixPath]], Any]) -> Any:
    """model-signing's hashing configuration whose manifest is ``manifest_of(ignored paths)``."""
    hashing, _, _ = _library()

    class ManifestHashing(hashing.Config):  # type: ignore[misc, name-defined]
        """Gives model-signing a manifest made here where the library would hash the files of a directory."""

        def __init__(self) -> None:
            super().__init__()
            self.ignored: set[PurePosixPath] = set()

        def add_ignored_paths(self, *, model_path: Any, paths: Iterable[Any]) -> None:
            super().add_ignored_paths(model_path=model_path, paths=paths)
            self.ignored.update(PurePosixPath(Path(path).as_posix()) for path in paths)

        def hash(self, model_path: Any, *, files_to_hash: Iterable[Any] | None = None) -> Any:
            if files_to_hash is not None:
                raise ConfigurationError("verifying only some files of a signed prefix is not supported")
            return manifest_of(self.ignored)

    return ManifestHashing()


def prefix_manifest(
    backend: Backend, prefix: str, pending: Mapping[str, bytes] | None = None, ignored: Iterable[PurePosixPath] = ()
) -> Any:
    """model-signing's manifest (``model_signing.manifest.Manifest``) of the objects under
    ``prefix``: each object's SHA-256, streamed through ``backend``, by its path relative to the
    prefix. Objects the signature ignores (``model.sig``, git's files, ``ignored``) are left out;
    ``pending`` files (name to bytes) count as if they were written already."""
    pending = pending or {}
    walk = getattr(backend, "walk", None)
    if walk is None:
        raise ConfigurationError(f"signing needs a store that can list a prefix whole; {backend!r} cannot")
    skipped = _skipped(ignored)
    names = {name for name in walk(prefix) if name and name not in pending}
    digests = {name: hashlib.sha256(data).digest() for name, data in pending.items()}
    for name in sorted(names):
        if skipped(name):
            continue
        hasher = hashlib.sha256()
        hash_file(backend.join(prefix, *name.split("/")), hasher, backend=backend)
        digests[name] = hasher.digest()
    return _manifest(prefix, digests, ignored)


def _skipped(ignored: Iterable[PurePosixPath]) -> Callable[[str], bool]:
    """Whether a file (by its relative path) is one the signature leaves out."""
    parameters = dict(_file_serialization())
    skip = {PurePosixPath(path) for path in parameters.get("ignore_paths", ())} | set(ignored)
    return lambda name: any(PurePosixPath(name).is_relative_to(path) for path in skip)


def _manifest(prefix: str, digests: Mapping[str, bytes], ignored: Iterable[PurePosixPath]) -> Any:
    """model-signing's manifest of the files ``digests`` names (relative path to SHA-256), less
    those the signature leaves out."""
    from model_signing import manifest
    from model_signing._hashing.hashing import Digest  # not public; the signing extra pins the range

    parameters = {name: list(value) if isinstance(value, tuple) else value for name, value in _file_serialization()}
    serialization = manifest.SerializationType.from_args(parameters)
    skipped = _skipped(ignored)
    items = [
        serialization.new_item(name, Digest(parameters["hash_type"], value))
        for name, value in digests.items()
        if not skipped(name)
    ]
    return manifest.Manifest(_model_name(prefix), items, serialization)


__all__ = ["SIGNATURE_FILE", "Signer", "prefix_manifest", "read_signed", "sign_digests", "sign_directory", "sign_prefix", "signer", "verify_directory", "verify_prefix"]
