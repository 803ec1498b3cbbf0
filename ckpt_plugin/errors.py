"""The one exception hierarchy of ckpt_plugin.

Every error the package raises on purpose derives from :class:`CheckpointError`, so a caller can
catch them all in one place. Each message says what was wrong, where, and what to do.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error raised by ckpt_plugin."""


class ConfigurationError(CheckpointError, ValueError):
    """An option given to a manager, callback or registry is invalid."""


class CheckpointNotFoundError(CheckpointError, LookupError):
    """The requested checkpoint, epoch or version does not exist."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is damaged: its size, checksum or structure is not what was recorded."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint was written in a format or by a version this release cannot read."""


class EncodingError(CheckpointError, TypeError):
    """A value cannot be stored without pickle; the message names its key path."""


class StorageError(CheckpointError, OSError):
    """The file system refused a write: an unwritable directory, a full disk, and the like."""


class ForeignFileError(CheckpointError):
    """The checkpoint directory holds something that ckpt_plugin did not write where it would write."""


class PromotionError(CheckpointError):
    """A validation gate failed, or a promotion, rollback or version request is invalid."""


class AsyncSaveError(CheckpointError):
    """A background save failed; the checkpoint it was writing was not committed."""


class DistributedCheckpointError(CheckpointError):
    """A collective save or restore failed on another rank; a failed save committed nothing.

    Every rank raises: the rank that failed its own error, the others this one, naming it.
    """


class SignatureError(CheckpointError):
    """A signature is missing or does not verify: the files are not what the key's owner signed."""


class UnsignedError(SignatureError):
    """A signature was required, but the checkpoint or version has none (no ``model.sig``)."""


class UploadError(CheckpointError):
    """A checkpoint committed in ``local_dir`` could not be copied to the durable tier after every
    retry. It stays in ``local_dir``, still pending, and its upload is tried again."""
