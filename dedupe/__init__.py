"""dedupe: an async deduplicating backup engine for database snapshots.

The embedding API is re-exported here; see docs/API.md. Nothing in the library installs an
event loop policy: the caller's loop (asyncio or uvloop) is used as it is.
"""

from dedupe.api import (
    BackupStats,
    Command,
    Generation,
    Progress,
    Repository,
    RestoreStats,
    SQLiteDatabase,
    postgres_basebackup,
    postgres_dump,
)
from dedupe.engine.forget import ForgetReport
from dedupe.engine.prune import PruneReport
from dedupe.engine.verify import DamagedObject, VerifyReport
from dedupe.errors import DedupeError

__version__ = "0.1.0"

__all__ = [
    "BackupStats",
    "Command",
    "DamagedObject",
    "DedupeError",
    "ForgetReport",
    "Generation",
    "Progress",
    "PruneReport",
    "Repository",
    "RestoreStats",
    "SQLiteDatabase",
    "VerifyReport",
    "__version__",
    "postgres_basebackup",
    "postgres_dump",
]
