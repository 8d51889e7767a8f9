"""Pipelines over a RepositoryStore: backup (read, chunk, hash, dedupe, compress, seal,
pack, write) and restore (plan by pack, fetch in parallel, verify, write in order).
CPU stages run on an executor; stages are joined by bounded queues."""

from dedupe.engine.backup import FILE_END, FileEnd, Ingested, Reuse, commit, ingest, run_backup
from dedupe.engine.restore import restore_chunks, write_to_fileobj, write_to_path
from dedupe.engine.sources import iter_source
from dedupe.engine.verify import DamagedObject, VerifyReport, load_quarantine, verify_repository

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
