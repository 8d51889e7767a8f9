"""dedupe: an async deduplicating backup engine for database snapshots.

The embedding API is re-exported here; see docs/API.md. Nothing in the library installs an
event loop policy: the caller's loop (asyncio or uvloop) is used as it is.

The names below are loaded on first use (PEP 562): `import dedupe` alone imports none of
the engine, so that the command's --help and --version, and a backup, which needs no
restore, verify or prune code, start without loading what they do not run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dedupe._lazy import lazy_exports

if TYPE_CHECKING:
    from dedupe._types import BackupStats, Generation, Progress, RestoreStats, SQLiteDatabase
    from dedupe.api import Repository
    from dedupe.engine.commands import Command
    from dedupe.engine.databases import postgres_basebackup, postgres_dump
    from dedupe.engine.forget import ForgetReport
    from dedupe.engine.prune import PruneReport
    from dedupe.engine.verify import DamagedObject, VerifyReport
    from dedupe.errors import DedupeError

__version__ = "0.1.0"

# Each exported name and the module that defines it.
_EXPORTS = {
    "BackupStats": "dedupe._types",
    "Command": "dedupe.engine.commands",
    "DamagedObject": "dedupe.engine.verify",
    "DedupeError": "dedupe.errors",
    "ForgetReport": "dedupe.engine.forget",
    "Generation": "dedupe._types",
    "Progress": "dedupe._types",
    "PruneReport": "dedupe.engine.prune",
    "Repository": "dedupe.api",
    "RestoreStats": "dedupe._types",
    "SQLiteDatabase": "dedupe._types",
    "VerifyReport": "dedupe.engine.verify",
    "postgres_basebackup": "dedupe.engine.databases",
    "postgres_dump": "dedupe.engine.databases",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, submodules=True)
