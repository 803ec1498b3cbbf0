"""ckpt_plugin: trustworthy, pickle-free checkpoints for PyTorch training.

``CheckpointManager`` saves safetensors weights plus JSON metadata with atomic commits, keeps the
last N and the best, and loads the latest, a given epoch or the best by any metric.
``ArtifactRegistry`` promotes checkpoints to immutable validated versions and to production. The
Lightning and Hugging Face callbacks live in ``ckpt_plugin.lightning`` and ``ckpt_plugin.hf``.
"""

__version__ = "0.2.0"

from .checkpoint import CheckpointInfo
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
)
from .manager import CheckpointManager
from .registry import ArtifactRegistry
from .rng import capture_rng_state, restore_rng_state

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
    "PromotionError",
    "SignatureError",
    "StorageError",
    "__version__",
    "capture_rng_state",
    "restore_rng_state",
]
