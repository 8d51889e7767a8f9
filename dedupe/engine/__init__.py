"""Pipelines over a RepositoryStore: backup (read, chunk, hash, dedupe, compress, seal,
pack, write) and restore (plan by pack, fetch in parallel, verify, write in order).
CPU stages run on an executor; stages are joined by bounded queues.

The names below are loaded on first use (PEP 562): importing one engine module (a backup's
dedupe.engine.backup) does not load the others (restore, verify)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dedupe._lazy import lazy_exports

if TYPE_CHECKING:
    from dedupe.engine.backup import (
        FILE_END,
        FileEnd,
        Ingested,
        Reuse,
        commit,
        ingest,
        run_backup,
    )
    from dedupe.engine.restore import restore_chunks, write_to_fileobj, write_to_path
    from dedupe.engine.sources import iter_source
    from dedupe.engine.verify import (
        DamagedObject,
        VerifyReport,
        load_quarantine,
        verify_repository,
    )

# Each exported name and the module that defines it.
_EXPORTS = {
    "FILE_END": "dedupe.engine.backup",
    "FileEnd": "dedupe.engine.backup",
    "Ingested": "dedupe.engine.backup",
    "Reuse": "dedupe.engine.backup",
    "commit": "dedupe.engine.backup",
    "ingest": "dedupe.engine.backup",
    "run_backup": "dedupe.engine.backup",
    "restore_chunks": "dedupe.engine.restore",
    "write_to_fileobj": "dedupe.engine.restore",
    "write_to_path": "dedupe.engine.restore",
    "iter_source": "dedupe.engine.sources",
    "DamagedObject": "dedupe.engine.verify",
    "VerifyReport": "dedupe.engine.verify",
    "load_quarantine": "dedupe.engine.verify",
    "verify_repository": "dedupe.engine.verify",
}

__all__ = [
    "FILE_END",
    "FileEnd",
    "Ingested",
    "Reuse",
    "commit",
    "ingest",
    "DamagedObject",
    "VerifyReport",
    "iter_source",
    "load_quarantine",
    "restore_chunks",
    "run_backup",
    "verify_repository",
    "write_to_fileobj",
    "write_to_path",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, submodules=True)
