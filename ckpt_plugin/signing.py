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

Needs the ``signing`` extra: ``pip install 'ckpt-plugin[signing]'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from .errors import ConfigurationError, SignatureError

SIGNATURE_FILE = "model.sig"
Key = Union[str, "os.PathLike[str]"]


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
        raise SignatureError(f"{root} is not signed (no {SIGNATURE_FILE}); sign it, or load it without verify_with")
    try:
        config = verifying.Config().use_elliptic_key_verifier(public_key=key)
        config.set_hashing_config(hashing.Config().set_ignored_paths(paths=[signature])).verify(root, signature)
    except Exception as exc:  # noqa: BLE001 - the library raises ValueError and others for a bad signature
        raise SignatureError(
            f"the signature of {root} does not verify with {key}: {str(exc)[:300]}; do not use this checkpoint"
        ) from None


__all__ = ["SIGNATURE_FILE", "sign_directory", "verify_directory"]
