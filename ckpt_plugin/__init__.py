"""ckpt_plugin: trustworthy, pickle-free checkpoints for PyTorch training.

``CheckpointManager`` saves safetensors weights plus JSON metadata with atomic commits, keeps the
last N and the best, and loads the latest, a given epoch or the best by any metric.
``ArtifactRegistry`` promotes checkpoints to immutable validated versions and to production. The
Lightning and Hugging Face callbacks live in ``ckpt_plugin.lightning`` and ``ckpt_plugin.hf``.
"""

from ._version import __version__

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AsyncSaveError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    DistributedCheckpointError,
    EncodingError,
    ForeignFileError,
    IncompatibleCheckpointError,
    PromotionError,
    SignatureError,
    StorageError,
    UnsignedError,
    UploadError,
)

if TYPE_CHECKING:
    from ._io.info import CheckpointInfo
    from ._io.rng import capture_rng_state, portable_rng_state, restore_rng_state
    from .manager import CheckpointManager
    from .registry import ArtifactRegistry
    from ._storage import Location
    from .sampler import ResumableDistributedSampler

_LAZY = {
    "CheckpointInfo": "._io.info",
    "CheckpointManager": ".manager",
    "ArtifactRegistry": ".registry",
    "Location": "._storage",
    "ResumableDistributedSampler": ".sampler",
    "capture_rng_state": "._io.rng",
    "portable_rng_state": "._io.rng",
    "restore_rng_state": "._io.rng",
}
"""Public names imported on first use, so that ``import ckpt_plugin.cli`` (and ``ckpt --help``)
does not load the storage and checkpoint machinery it does not need."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ArtifactRegistry",
    "AsyncSaveError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ConfigurationError",
    "CorruptCheckpointError",
    "DistributedCheckpointError",
    "EncodingError",
    "ForeignFileError",
    "IncompatibleCheckpointError",
    "Location",
    "PromotionError",
    "ResumableDistributedSampler",
    "SignatureError",
    "StorageError",
    "UnsignedError",
    "UploadError",
    "__version__",
    "capture_rng_state",
    "portable_rng_state",
    "restore_rng_state",
]
