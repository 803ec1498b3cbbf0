"""``ArtifactRegistry``: promote checkpoints from raw to validated to production.

:mod:`~ckpt_plugin.registry.core` holds the registry and describes the layout;
:mod:`~ckpt_plugin.registry.places` the protocol of the places it keeps versions, production and
history in, with :mod:`~ckpt_plugin.registry.local` (directories, a lock and renames) and
:mod:`~ckpt_plugin.registry.objects` (an object store and conditional writes);
:mod:`~ckpt_plugin.registry.verification` the report of :meth:`ArtifactRegistry.verify`.
"""

from .checks import Check as Check
from .checks import run_checks
from .core import ArtifactRegistry
from .records import HISTORY_FILE as HISTORY_FILE
from .records import INTENT_FILE as INTENT_FILE
from .records import LOCK_FILE as LOCK_FILE
from .records import PRODUCTION_MODEL_FILE as PRODUCTION_MODEL_FILE
from .records import PRODUCTION_RECORD_FILE as PRODUCTION_RECORD_FILE
from .records import VALIDATION_FILE as VALIDATION_FILE
from .verification import ProgressFactory, VerificationItem, VerificationReport
from .versions import BUMPS as BUMPS
from .versions import MAX_VERSION_LENGTH as MAX_VERSION_LENGTH
from .versions import next_version, parse_version

__all__ = [
    "ArtifactRegistry",
    "ProgressFactory",
    "VerificationItem",
    "VerificationReport",
    "next_version",
    "parse_version",
    "run_checks",
]
