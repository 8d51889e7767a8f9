"""Pipelines over a RepositoryStore: backup (read, chunk, hash, dedupe, compress, seal,
pack, write) and restore (plan by pack, fetch in parallel, verify, write in order).
CPU stages run on an executor; stages are joined by bounded queues."""

from dedupe.engine.backup import run_backup
from dedupe.engine.restore import restore_chunks, write_to_fileobj, write_to_path
from dedupe.engine.sources import iter_source

__all__ = ["iter_source", "restore_chunks", "run_backup", "write_to_fileobj", "write_to_path"]
