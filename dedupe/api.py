"""The embedding API: what other backup tools call, and what the CLI is built on.

    import asyncio, dedupe

    async def main():
        repo = await dedupe.Repository.init("/backups/repo", passphrase="correct horse")
        async with repo:
            stats = await repo.backup("/var/lib/app/db.sqlite", name="app-db")
            await repo.restore(stats.id, "/tmp/db.sqlite")

    asyncio.run(main())

Everything is async and cancellable; progress arrives through a callback; statistics are
returned as objects; failures are `DedupeError` subclasses (dedupe.errors).

What a handle may do follows the role of the key it was opened with (docs/FORMAT.md 4.4):
`admin` everything, `reader` list/restore/verify, `writer` list/back up. Anything else
raises `RoleNotPermitted` before it changes or reads anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import cached_property, partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, TypeAlias

import dedupe
from dedupe._lazy import lazy_exports
from dedupe._types import (
    BackupStats,
    CopiedGeneration,
    CopyReport,
    Generation,
    PostgresBaseBackupTars,
    Progress,
    ProgressCallback,
    RestoreStats,
    SpaceStats,
    SQLiteDatabase,
    SubsetSpec,
)
from dedupe.backends import Backend, open_backend
from dedupe.chunking import ChunkerParams, describe, kept_spec, parse_spec
from dedupe.crypto import KdfParams, get_passphrase
from dedupe.crypto.aead import Buffer
from dedupe.engine.backup import run_backup
from dedupe.engine.commands import Command, write_to_command
from dedupe.engine.sources import Source as StreamSource
from dedupe.engine.sources import iter_source
from dedupe.errors import (
    AmbiguousGeneration,
    DedupeError,
    GenerationNotFound,
    IntegrityError,
    RepositoryLocked,
    RoleNotPermitted,
    SourceError,
    TargetError,
)
from dedupe.format.config import DEFAULT_COMPRESSION_LEVEL, DEFAULT_PACK_SIZE
from dedupe.store import RepositoryStore
from dedupe.store.cache import ObjectCache, default_cache_root
from dedupe.store.locks import LockInfo, RepositoryLock, list_locks, remove_locks
from dedupe.store.tables import spill_complete_table

# Beyond the backup of a stream or file (above), the engine is imported where it is used
# (restore, verify, forget, prune, repair, keys, listing, trees, databases), and so are
# replicas and objectives: start-up is a large share of a small backup, and a command
# loads the code of its own operation only.
#
# The annotations must still resolve at run time (typing.get_type_hints, as pydantic,
# typer or cattrs call it, evaluates them in this module's namespace, where a PEP 562
# __getattr__ is never asked). So they name
# - what this module imports at the top: the records of dedupe._types, which is light (the
#   database sources and SubsetSpec were moved there for this);
# - anything else by its module, `dedupe.engine.prune.PruneReport`: evaluating that asks
#   the packages' lazy __getattr__ (dedupe._lazy), which imports the module then, when
#   the hints are read, not when this module is. The reports and handles they name are
#   not moved: a dataclass costs ~0.5 ms to define, a dozen of them more than start-up
#   may grow by, for a backup that never returns one.
# Never a name imported only below (tests/test_type_hints.py checks): those are for the
# type checker and for this module's lazy exports (`from dedupe.api import KeyInfo`).
if TYPE_CHECKING:
    import dedupe.engine.forget
    import dedupe.engine.keys
    import dedupe.engine.prune
    import dedupe.engine.repair
    import dedupe.engine.verify
    import dedupe.objectives
    import dedupe.replication
    from dedupe.engine.databases import postgres_basebackup, postgres_dump
    from dedupe.engine.keys import KeyInfo, KeyStatus, RotateReport
    from dedupe.objectives import Policy, StatusReport

log = logging.getLogger("dedupe")

__all__ = [
    "BackupStats",
    "Command",
    "Policy",
    "PostgresBaseBackupTars",
    "SQLiteDatabase",
    "StatusReport",
    "postgres_basebackup",
    "postgres_dump",
    "Generation",
    "KeyInfo",
    "KeyManager",
    "KeyStatus",
    "Progress",
    "Repository",
    "RestoreStats",
    "RotateReport",
    "SubsetSpec",
]

# The public names of this module that live in modules it does not import at the top,
# each with its module: imported on first use (PEP 562).
_LAZY_EXPORTS = {
    "KeyInfo": "dedupe.engine.keys",
    "KeyStatus": "dedupe.engine.keys",
    "Policy": "dedupe.objectives",
    "RotateReport": "dedupe.engine.keys",
    "StatusReport": "dedupe.objectives",
    "postgres_basebackup": "dedupe.engine.databases",
    "postgres_dump": "dedupe.engine.databases",
}


__getattr__, _ = lazy_exports(__name__, _LAZY_EXPORTS)


Location = str | os.PathLike[str] | Backend
Source: TypeAlias = StreamSource | SQLiteDatabase | PostgresBaseBackupTars
Target = str | os.PathLike[str] | BinaryIO | Command
KINDS = ("full", "incremental", "differential")
# Which roles may do what (docs/FORMAT.md 4.4); listing generations and locks is open to all.
PERMITTED = {
    "back up": ("admin", "writer"),
    "restore": ("admin", "reader"),
    "read generations": ("admin", "reader"),
    "verify": ("admin", "reader"),
    "forget": ("admin",),
    "prune": ("admin",),
    "unlock": ("admin",),
    "repair the index": ("admin",),
}
_ROLE_HINT = {
    "writer": "a writer key backs up and lists, and opens no data: use a reader or admin key",
    "reader": "a reader key lists, restores and verifies: use an admin key",
}


def _backend(location: Location) -> Backend:
    return location if isinstance(location, Backend) else open_backend(os.fspath(location))


@contextlib.asynccontextmanager
async def _closed_on_failure(location: Location, backend: Backend) -> AsyncIterator[None]:
    """Release the connections of a backend made here (not one the caller passed in) when
    the repository cannot be created or opened."""
    try:
        yield
    except BaseException:
        if backend is not location:
            await backend.close()
        raise


def _cache_root(cache: bool | str | os.PathLike[str] | None, backend: Backend) -> Path | None:
    if cache is None:
        cache = backend.remote
    if cache is True:
        return default_cache_root()
    if cache is False:
        return None
    return Path(cache)


Passphrase = str | bytes | Callable[[], bytes] | None
# How long after the key maps were listed a listing of generations trusts that list.
KEYS_FRESH = 2.0


def _passphrase(passphrase: Passphrase, confirm: bool) -> bytes:
    if passphrase is None:
        return get_passphrase(confirm=confirm)
    if callable(passphrase):
        return passphrase()
    return passphrase.encode() if isinstance(passphrase, str) else passphrase


class Repository:
    """An open repository. Create with `await Repository.init(...)` or open with
    `await Repository.open(...)`; close with `await repo.close()` or `async with repo`.

    Worker threads: CPU stages run on a private pool of `workers` threads (default: one per
    core). The event loop is whatever the caller runs; nothing here installs uvloop.
    """

    def __init__(self, store: RepositoryStore, workers: int | None = None) -> None:
        self._store = store
        self._executor = ThreadPoolExecutor(
            max_workers=workers or os.cpu_count() or 2, thread_name_prefix="dedupe"
        )
        self.keys = KeyManager(self)

    @cached_property
    def replicas(self) -> dedupe.replication.Replicas:
        """The repositories this one keeps copies in (dedupe/replication.py)."""
        from dedupe.replication import Replicas

        return Replicas(self)

    @cached_property
    def objectives(self) -> dedupe.objectives.Objectives:
        """The recovery objectives and drills (dedupe/objectives.py)."""
        from dedupe.objectives import Objectives

        return Objectives(self)

    def _sync_replicas(self) -> bool:
        """Whether a backup goes to sync replicas too. The keyring is asked first, so that
        a repository without replicas never loads the replication code."""
        return bool(self._store.keyring.replicas) and bool(self.replicas.sync_replicas())

    def _require_key_admin(self, what: str) -> None:
        """RoleNotPermitted unless this handle's key is an admin's (the CLI asks before it
        prompts for a new key's passphrase)."""
        from dedupe.engine.keys import require_admin

        require_admin(self._store, what)

    def _require(self, what: str) -> None:
        role = self._store.role
        if role not in PERMITTED[what]:
            raise RoleNotPermitted(f"a {role} key may not {what}", hint=_ROLE_HINT.get(role))

    # --- lifecycle -----------------------------------------------------------------------------

    @classmethod
    async def init(
        cls,
        location: Location,
        passphrase: Passphrase = None,
        *,
        chunker: ChunkerParams | None = None,
        pack_size: int = DEFAULT_PACK_SIZE,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        kdf: KdfParams | None = None,
        workers: int | None = None,
        lock_wait: float = 0.0,
        cache: bool | str | os.PathLike[str] | None = None,
    ) -> Repository:
        """Create a repository at `location` and return it open. The passphrase comes from
        the argument, else DEDUPE_PASSWORD / _FILE / _COMMAND, else a terminal prompt.
        `lock_wait` and `cache` as for open()."""
        backend = _backend(location)
        root = _cache_root(cache, backend)
        async with _closed_on_failure(location, backend):
            store = await RepositoryStore.create(
                backend,
                lambda: _passphrase(passphrase, confirm=True),
                chunker=chunker,
                pack_size=pack_size,
                compression_level=compression_level,
                kdf=kdf,
                cache=None if root is None else partial(ObjectCache.of_holder, root),
            )
        store.lock_wait = lock_wait
        return cls(store, workers)

    @classmethod
    async def open(
        cls,
        location: Location,
        passphrase: Passphrase = None,
        *,
        workers: int | None = None,
        lock_wait: float = 0.0,
        cache: bool | str | os.PathLike[str] | None = None,
    ) -> Repository:
        """Open the repository at `location`. `lock_wait`: how many seconds a command waits
        for a conflicting lock (another process's prune, say) to go before it fails with
        RepositoryLocked (0: at once). `cache`: where to keep local copies of the
        repository's key maps, index objects and manifest headers, so that each command
        fetches only what changed (docs/FORMAT.md 3.1): a directory, True for the default
        ($DEDUPE_CACHE_DIR, else $XDG_CACHE_HOME/dedupe, else ~/.cache/dedupe), False for
        none; None (the default) caches object-store repositories only."""
        backend = _backend(location)
        root = _cache_root(cache, backend)
        async with _closed_on_failure(location, backend):
            store = await RepositoryStore.open(
                backend,
                lambda: _passphrase(passphrase, False),
                None if root is None else partial(ObjectCache.of_holder, root),
            )
        store.lock_wait = lock_wait
        return cls(store, workers)

    async def close(self) -> None:
        # Off the loop: a worker may be waiting for the loop to load a dictionary for it
        # (closing() also stops that wait).
        self._store.closing()
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
        await self._store.backend.close()

    async def __aenter__(self) -> Repository:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- facts ---------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._store.repository_id.hex()

    @property
    def location(self) -> str:
        return self._store.backend.location

    @property
    def chunker(self) -> ChunkerParams:
        return self._store.chunker_params

    @property
    def config(self) -> dict[str, object]:
        """The repository config record (docs/FORMAT.md section 5), without its signature."""
        return {k: v for k, v in self._store.config.items() if k != "signature"}

    @property
    def role(self) -> str:
        """The role of the key this handle was opened with: admin, reader or writer."""
        return self._store.role

    @property
    def key_id(self) -> str:
        return self._store.holder.key_id.hex()

    @property
    def problems(self) -> list[str]:
        """Problems met on the way that did not stop an operation (a damaged keyring copy,
        a refused key map, an object that is not authenticated), oldest first. They are
        also logged as warnings on the "dedupe" logger."""
        return list(self._store.problems)

    # --- backup --------------------------------------------------------------------------------

    async def backup(
        self,
        source: Source,
        *,
        name: str,
        kind: str = "incremental",
        progress: ProgressCallback | None = None,
        label: str | None = None,
        chunker: str | None = None,
        allow_empty: bool = False,
        exclude: Sequence[str] = (),
        strict: bool = False,
        tags: Sequence[str] = (),
        dry_run: bool = False,
    ) -> BackupStats:
        """Back up a path, a binary file object or an async iterable of bytes as a new
        generation of `name`. Returns once the manifest is stored (the commit point).
        Cancelling the task (Ctrl-C, SIGTERM in the CLI) leaves the repository valid and
        adds no generation; the packs it had stored are indexed, so the next backup of
        the source does not store them again.

        A source that gives no bytes (a stream or file of none, a directory with nothing
        in it) raises EmptySource and commits nothing, unless `allow_empty`: that is what
        a failed dump piped in, or an unmounted mount point, looks like, and an empty
        generation would become the newest of `name`.

        `kind`: "full" (no parent), "incremental" (parent: the latest generation of `name`,
        any kind) or "differential" (parent: the latest full of `name`). With no full of
        `name` yet, an incremental or differential is made as a full and `note` says so.
        A stream is always read whole; the manifest of an incremental or differential
        stores only its delta against the parent.

        `chunker`: "fastcdc", "auto" (a SQLite database is cut into blocks of its page
        size, a tar member by member with PostgreSQL relation files in 8 KiB pages,
        anything else by FastCDC), "tar", or "fixed:SIZE". Page-aligned blocks store a
        day of changes to a SQLite file ~3x smaller than FastCDC, but a first full ~6%
        larger and ~0.8x as fast (docs/CHUNKING.md). None (the default) keeps the strategy of
        the name's latest generation (auto for a new name): chunk boundaries that
        change store the data again, so a change is made only when asked for, and `note`
        then says what it cost.

        A directory tree: `exclude` leaves out entries matching its patterns ("*.log"
        by name at any depth, "var/tmp" by path from the root). An entry that cannot be
        read (permissions) is left out and listed in `unreadable` (a partial backup)
        unless `strict`, which fails the backup instead.

        `dry_run`: read, chunk and look up everything and report what would be read and
        what would be new (`bytes_new`, `chunks_new`); nothing is stored or committed."""
        if not name or "/" in name or "@" in name:
            raise ValueError("name must be non-empty and contain neither '/' nor '@'")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self._require("back up")
        spec = None if chunker is None else parse_spec(chunker, self._store.chunker_params)
        is_tree = isinstance(source, str | os.PathLike) and os.path.isdir(source)
        if exclude and not is_tree:
            raise ValueError("exclude patterns apply to directory trees only")
        for tag in tags:
            if not tag or "," in tag or not tag.isprintable():
                raise ValueError(f"tag {tag!r}: a tag is printable, non-empty, without ','")
        labels = {"host": socket.gethostname(), "tags": sorted(set(tags))}
        # Passed down to the stream and tree paths: the tree options (exclude, strict), the
        # header's labels (host, tags), and dry_run.
        options: dict[str, Any] = {
            "exclude": tuple(exclude),
            "strict": strict,
            "labels": labels,
            "dry_run": dry_run,
        }
        if isinstance(source, SQLiteDatabase):
            return await self._backup_sqlite(source, name, kind, progress, chunker, options)
        if isinstance(source, PostgresBaseBackupTars):
            return await self._backup_pg_tars(source, name, kind, progress, chunker, options)
        if self._sync_replicas() and not dry_run:
            return await self.replicas.backup(
                source, name, kind, progress, label, chunker, allow_empty, options
            )
        return await self._backup(source, name, kind, progress, label, spec, allow_empty, options)

    async def _backup_sqlite(
        self,
        db: SQLiteDatabase,
        name: str,
        kind: str,
        progress: ProgressCallback | None,
        chunker: str | None,
        options: dict[str, Any],
    ) -> BackupStats:
        """A snapshot of a live SQLite database (engine/databases.py), backed up as the
        file it is, then removed; the generation records the database, not the copy."""
        from dedupe.engine.databases import sqlite_snapshot

        try:
            st = os.stat(db.path)
        except OSError as e:
            raise SourceError(f"cannot read {db.path}: {e.strerror}") from None
        with tempfile.TemporaryDirectory(prefix="dedupe-sqlite-", dir=db.scratch) as tmp:
            copy = os.path.join(tmp, os.path.basename(db.path) or "database")
            info = await asyncio.to_thread(sqlite_snapshot, db.path, copy)
            info.update(mode=stat.S_IMODE(st.st_mode), mtime_ns=st.st_mtime_ns)
            label = f"sqlite:{os.path.abspath(db.path)}"
            options = {**options, "source_info": info}
            return await self._backup_copy(copy, name, kind, progress, label, chunker, options)

    async def _backup_pg_tars(
        self,
        source: PostgresBaseBackupTars,
        name: str,
        kind: str,
        progress: ProgressCallback | None,
        chunker: str | None,
        options: dict[str, Any],
    ) -> BackupStats:
        """A base backup of a cluster with tablespaces: pg_basebackup writes a tar per
        tablespace into a scratch directory, backed up as a tree (each tar cut member by
        member under auto), then removed."""
        from dedupe.engine.databases import write_basebackup_tars

        with tempfile.TemporaryDirectory(prefix="dedupe-pgbase-", dir=source.scratch) as tmp:
            into = os.path.join(tmp, "backup")
            wal = await write_basebackup_tars(source, into)
            options = {**options, "source_info": {**source.info, **wal, "label": "pgbase:"}}
            return await self._backup_copy(into, name, kind, progress, "pgbase:", chunker, options)

    async def _backup_copy(
        self,
        copy: str,
        name: str,
        kind: str,
        progress: ProgressCallback | None,
        label: str,
        chunker: str | None,
        options: dict[str, Any],
    ) -> BackupStats:
        """Back up `copy`, a scratch copy made of a database, as `label`: to the sync
        replicas and here, or here alone."""
        if self._sync_replicas() and not options.get("dry_run"):
            return await self.replicas.backup(
                copy, name, kind, progress, label, chunker, False, options
            )
        spec = None if chunker is None else parse_spec(chunker, self._store.chunker_params)
        return await self._backup(copy, name, kind, progress, label, spec, False, options)

    async def _backup(
        self,
        source: StreamSource,
        name: str,
        kind: str,
        progress: ProgressCallback | None,
        label: str | None,
        spec: dict[str, Any] | str | None,
        allow_empty: bool,
        options: dict[str, Any],
    ) -> BackupStats:
        # A shared lock: backups run side by side, a prune (exclusive) waits for them.
        async with RepositoryLock(
            self._store.backend, exclusive=False, operation="backup", wait=self._store.lock_wait
        ) as lock:
            try:
                gens = await self.generations(name)
                # The chunker is kept from this key's own generations, as the parent is taken
                # (_parent_for): another key's header does not choose how this one cuts.
                mine = [g for g in gens if self._store.written_by_me(g.id)]
                previous = mine[-1].chunker if mine else None
                chosen = (
                    spec if spec is not None else kept_spec(previous, self._store.chunker_params)
                )
                stats = await self._backup_source(
                    source, name, kind, gens, progress, label, lock, chosen, allow_empty, options
                )
                dry_run = bool(options.get("dry_run"))
                if spec is not None and previous is not None and stats.chunker != previous:
                    stats = _with_note(
                        stats,
                        f"the chunker of {name!r} changed from {describe(previous)} to "
                        f"{describe(stats.chunker)}: chunk boundaries moved, so this backup "
                        f"{'would store' if dry_run else 'stored'} {stats.chunks_new} of its "
                        f"{stats.chunks} chunks again; the next backups keep the new chunker and "
                        "deduplicate against it",
                    )
                return stats
            except DedupeError as e:
                await _blame_a_lost_lock(lock, e)
                raise

    async def _backup_source(
        self,
        source: StreamSource,
        name: str,
        kind: str,
        gens: list[Generation],
        progress: ProgressCallback | None,
        label: str | None,
        lock: RepositoryLock,
        spec: dict[str, Any] | str,
        allow_empty: bool,
        options: dict[str, Any],
    ) -> BackupStats:
        # A copy (copy, replicas) chains onto the copy of its original's parent only
        # ("parents" narrows the candidates), never onto an orphan copy.
        narrow = options.pop("parents", None)
        parent, note = self._parent_for(gens if narrow is None else narrow(gens), name, kind)
        # Pages are compressed with the dictionary this key's latest generation of the name
        # used (FORMAT.md 16), as a parent is chosen among its own generations.
        mine = [g for g in gens if self._store.written_by_me(g.id)]
        options = {**options, "dictionary": mine[-1].dictionary if mine else None}
        # Replication (dedupe/replication.py) waits at the commit: a sync replica for the
        # primary's id before it makes its header ("before_header"), the primary for every
        # sync replica's commit once its own id is known ("before_write"). The lock is
        # confirmed after each wait: it may have been lost meanwhile.
        before_header = options.pop("before_header", None)
        confirm = lock.confirm if before_header is None else _then(before_header, lock.confirm)
        before_write = options.get("before_write")
        if before_write is not None:

            async def then_confirm(gen_id: str, header: dict[str, Any]) -> None:
                await before_write(gen_id, header)
                await lock.confirm()

            options = {**options, "before_write": then_confirm}
        if isinstance(source, str | os.PathLike) and os.path.isdir(source):
            stats = await self._backup_tree(
                os.fspath(source),
                name,
                kind,
                parent,
                progress,
                confirm,
                spec,
                allow_empty,
                options,
            )
            return _with_note(stats, note)
        size_hint = None
        info: dict[str, Any] = {"type": "stream"}
        if isinstance(source, str | os.PathLike):
            label = label or os.fspath(source)
            try:
                st = os.stat(source)
            except OSError:
                pass
            else:
                size_hint = st.st_size
                if stat.S_ISREG(st.st_mode):  # what a restore to a path gives back
                    info.update(mode=stat.S_IMODE(st.st_mode), mtime_ns=st.st_mtime_ns)
        if isinstance(source, Command):  # what it is, as the generation records it
            label = label or source.describe()
            info.update(source.info)
            learned = source.learned  # filled once the command succeeded: before the header

            async def take_learned() -> None:
                info.update(learned)

            confirm = _then(confirm, take_learned)
        info["label"] = label or ""
        info.update(options.get("source_info") or {})
        # The parent's complete table, in a file: the delta reads it from there.
        spilled = None
        if parent is not None:
            try:
                spilled = await spill_complete_table(self._store, parent.id)
            except IntegrityError as e:
                note = _damaged_parent(parent, name, kind, e)
                parent = None
        try:
            blocks = options.get("blocks")
            stats = await run_backup(
                self._store,
                iter_source(source) if blocks is None else blocks,
                name=name,
                source_info=info,
                executor=self._executor,
                progress=progress,
                size_hint=size_hint,
                kind=kind if parent is not None else "full",
                parent=(parent.id, spilled) if parent is not None and spilled is not None else None,
                before_commit=confirm,
                chunker=spec,
                allow_empty=allow_empty,
                labels=options.get("labels"),
                dry_run=options.get("dry_run", False),
                before_write=options.get("before_write"),
                store_only=options.get("store_only", False),
                dictionary=options.get("dictionary"),
            )
        finally:
            if spilled is not None:
                spilled.close()
        return _with_note(stats, note)

    # --- directory trees (engine/tree.py) --------------------------------------------------

    async def _backup_tree(
        self,
        root: str,
        name: str,
        kind: str,
        parent: Generation | None,
        progress: ProgressCallback | None,
        before_commit: Callable[[], Awaitable[None]] | None = None,
        chunker: dict[str, Any] | str = "fastcdc",
        allow_empty: bool = False,
        options: dict[str, Any] | None = None,
    ) -> BackupStats:
        """Back up directory `root` as a tree generation (docs/FORMAT.md section 8.3). With
        a tree `parent`, an incremental or differential reads only new and changed files; a
        parent that is a stream generation makes this a full, and `note` says so."""
        from dedupe.engine.tree import backup_tree, load_tree

        base = None
        note = None
        if parent is not None:
            if parent.source.get("type") == "tree":
                try:
                    entries, _table = await load_tree(self._store, parent.id)
                    base = (parent.id, entries)
                except IntegrityError as e:
                    note = _damaged_parent(parent, name, kind, e)
            else:
                note = (
                    f"the parent {parent.id[:12]} of {name!r} is not a directory tree: "
                    f"this {kind} was made as a full"
                )
        stats = await backup_tree(
            self._store,
            root,
            name=name,
            kind=kind if base is not None else "full",
            parent=base,
            executor=self._executor,
            progress=progress,
            before_commit=before_commit,
            chunker=chunker,
            allow_empty=allow_empty,
            **{k: v for k, v in (options or {}).items() if k != "blocks"},
        )
        return _with_note(stats, note)

    async def _restore_tree(
        self,
        gen: Generation,
        target_dir: str,
        overwrite: bool,
        progress: ProgressCallback | None,
    ) -> RestoreStats:
        """Restore tree generation `gen` into directory `target_dir` (new or empty, else
        replaced with `overwrite`); the tree appears there only once fully verified."""
        from dedupe.engine.tree import load_tree, restore_tree

        await self._store.refresh_index()
        entries, _table = await load_tree(self._store, gen.id)
        return await restore_tree(
            self._store,
            gen.id,
            entries,
            target_dir,
            executor=self._executor,
            overwrite=overwrite,
            progress=progress,
        )

    def _parent_for(
        self, gens: list[Generation], name: str, kind: str
    ) -> tuple[Generation | None, str | None]:
        """The parent of an incremental (the latest generation of `name`) or differential
        (its latest full), among the generations this key's role wrote itself: an admin's
        or this writer's (FORMAT.md 4.5). A backup trusts its parent's chunk table and
        file entries without reading that data again, so it never chains onto another
        key's generation (a writer could otherwise date one in the future and have an
        admin's next incremental take its file contents)."""
        if kind == "full":
            return None, None
        if not gens:  # the first generation of the name: a full, and nothing to say
            return None, None
        store = self._store
        gens = [g for g in gens if store.written_by_me(g.id)]
        if kind == "differential":
            gens = [g for g in gens if g.kind == "full"]
        if not any(g.kind == "full" for g in gens):
            by = "by this key " if store.role == "writer" else ""
            return None, f"no full generation of {name!r} {by}yet: this {kind} was made as a full"
        parent = gens[-1]
        if not store.can_open_body(parent.id):  # a writer whose self-wraps were dropped
            return None, (
                f"this key cannot read generation {parent.id[:12]} of {name!r}: this {kind} "
                "was made as a full (it still stores only the chunks the repository lacks)"
            )
        return parent, None

    # --- generations ---------------------------------------------------------------------------

    async def generations(self, name: str | None = None) -> list[Generation]:
        """Every generation (of `name`, if given), oldest first. A manifest whose header is
        not authenticated, or is damaged, is left out and reported (`problems`), never
        listed: so it is never `NAME@latest`. Listing reads headers only: a manifest whose
        body alone is damaged is listed, fails to restore, and a backup that would chain
        onto it is made as a full instead (its note says so)."""
        store = self._store
        # Fresh from the open (or a call just before): a generation committed since is
        # still found, its key map loaded when its lookup misses.
        await store.refresh_keys(max_age=KEYS_FRESH)
        gens = []
        for gen_id, header in await store.generation_headers():
            if isinstance(header, GenerationNotFound):
                continue  # forgotten meanwhile
            if isinstance(header, DedupeError):
                store.report(f"{header.message}; it is not listed")
                continue
            authors = store.keymaps.authors(bytes.fromhex(gen_id))
            writer = next((a for a in authors if a is not None), None)
            gens.append(Generation.from_header(header, writer.hex() if writer else None))
        if name is not None:
            gens = [g for g in gens if g.name == name]
        return sorted(gens, key=lambda g: (g.created, g.id))

    async def resolve(self, spec: str | Generation) -> Generation:
        """A generation from an id, a unique id prefix, "NAME@latest", or "latest" (only
        while the repository holds one name: with several, "latest" would pick another
        source's data, so it raises AmbiguousGeneration listing the names)."""
        if isinstance(spec, Generation):
            return spec
        if spec == "latest" or spec.endswith("@latest"):
            name = None if spec == "latest" else spec[: -len("@latest")]
            gens = await self.generations(name)
            if not gens:
                where = f"named {name!r} " if name else ""
                raise GenerationNotFound(f"there is no generation {where}in this repository")
            names = sorted({g.name for g in gens})
            if len(names) > 1:
                raise AmbiguousGeneration(
                    f"'latest' is ambiguous: this repository holds {len(names)} names "
                    f"({', '.join(names)})",
                    hint=f"say which with NAME@latest, e.g. {names[0]}@latest",
                )
            return gens[-1]
        spec = spec.lower()
        if len(spec) < 4 or any(c not in "0123456789abcdef" for c in spec):
            raise GenerationNotFound(
                f"{spec!r} is not a generation id",
                hint="give an id or a unique prefix of at least 4 hex digits, 'latest' "
                "or 'NAME@latest'",
            )
        matches = [g for g in await self._store.generation_ids() if g.startswith(spec)]
        if not matches:
            raise GenerationNotFound(
                f"no generation id starts with {spec}", hint="list them with 'dedupe generations'"
            )
        if len(matches) > 1:
            raise AmbiguousGeneration(
                f"{len(matches)} generations start with {spec}", hint="give more digits"
            )
        return Generation.from_header(await self._store.read_manifest_header(matches[0]))

    # --- what is in it (engine/listing.py) ----------------------------------------------------

    async def stats(self, name: str | None = None) -> list[SpaceStats]:
        """Space per name (only `name`, if given), then the total (name None): logical
        bytes, unique bytes of the distinct chunks referenced, stored bytes; dedupe and
        compression ratios apart. Reads every generation's chunk table (no pack data)."""
        from dedupe.engine.listing import space_stats

        self._require("read generations")
        async with RepositoryLock(
            self._store.backend, exclusive=False, operation="stats", wait=self._store.lock_wait
        ):
            await self._store.refresh_index()
            return await space_stats(self._store, await self.generations(name))

    async def ls(
        self, generation: str | Generation, path: str | None = None
    ) -> list[dict[str, Any]]:
        """The entries of a tree generation at or below `path` (path, type, mode, size,
        mtime_ns, a symlink's target), or a stream generation as one entry (its label,
        size, chunks, digest)."""
        from dedupe.engine.listing import stream_listing, tree_listing
        from dedupe.engine.tree import load_tree

        self._require("read generations")
        gen = await self.resolve(generation)
        if gen.source.get("type") == "tree":
            entries, _table = await load_tree(self._store, gen.id)
            return tree_listing(entries, path)
        meta, _table = await self._store.generation_chunks(gen.id)
        return stream_listing(gen, meta)

    async def diff(self, old: str | Generation, new: str | Generation) -> dict[str, Any]:
        """What changed from `old` to `new`: for trees, the entries added, removed and
        changed (content or metadata); for streams, the byte ranges of `new` made of
        chunks `old` lacks, and how many bytes that is."""
        from dedupe.engine.listing import diff_streams, diff_trees
        from dedupe.engine.tree import load_tree

        self._require("read generations")
        a, b = await self.resolve(old), await self.resolve(new)
        kinds = {a.source.get("type"), b.source.get("type")}
        if kinds == {"tree"}:
            (old_entries, _), (new_entries, _) = [
                await load_tree(self._store, a.id),
                await load_tree(self._store, b.id),
            ]
            report: dict[str, Any] = {"type": "tree", **diff_trees(old_entries, new_entries)}
        elif "tree" in kinds:
            raise ValueError("one generation is a tree and the other a stream: nothing to compare")
        else:
            _, old_table = await self._store.generation_chunks(a.id)
            _, new_table = await self._store.generation_chunks(b.id)
            report = {"type": "stream", **diff_streams(old_table, new_table)}
        return {"old": a.id, "new": b.id, **report}

    # --- restore -------------------------------------------------------------------------------

    async def restore_stream(self, generation: str | Generation) -> AsyncIterator[bytes]:
        """The generation's bytes in order, verified chunk by chunk and as a whole; the
        iterator raises IntegrityError instead of yielding bad bytes."""
        self._require("restore")
        async with RepositoryLock(
            self._store.backend, exclusive=False, operation="restore", wait=self._store.lock_wait
        ):
            async for parts in await self._chunks(generation):
                yield b"".join(parts)

    async def restore(
        self,
        generation: str | Generation,
        target: Target,
        *,
        overwrite: bool = False,
        progress: ProgressCallback | None = None,
    ) -> RestoreStats:
        """Restore to a path (written to a temporary name, renamed once verified) or to a
        binary file object.

        A restore to a path that meets damaged or missing chunk copies, in a repository
        with replicas, reads the generation from a replica: with an admin key the lost
        chunks are stored here again and the restore runs again from here; with a reader
        key the replica's copy is restored. `note` then says so (dedupe/replication.py)."""
        self._require("restore")
        try:
            return await self._restore_with_lock(generation, target, overwrite, progress)
        except IntegrityError as e:
            if not self._store.keyring.replicas:
                raise
            if not isinstance(target, str | os.PathLike):  # what was written stays written
                raise IntegrityError(
                    e.message,
                    hint="this repository has replicas: restore to a path to read the "
                    "generation from one, or run 'dedupe replica repair' (admin) first",
                ) from e
            gen = await self.resolve(generation)
            stats = await self.replicas.restore_after_damage(gen, target, overwrite, progress, e)
            log.warning("%s", stats.note)
            return stats

    async def restore_into_postgres(
        self,
        generation: str | Generation,
        newdb: str,
        *,
        env: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> RestoreStats:
        """Create PostgreSQL database `newdb` and fill it from a logical generation (a
        `postgres_dump` source) with pg_restore; libpq's environment (or `env`) says
        where. If the restore fails, `newdb` is dropped again: no half-filled database
        is left behind. `newdb` must not exist."""
        from dedupe.engine.databases import is_postgres_dump, postgres_restore_into, run_command

        self._require("restore")
        gen = await self.resolve(generation)
        if not is_postgres_dump(gen.source):
            raise TargetError(
                f"generation {gen.id[:12]} is not a PostgreSQL dump made by dedupe "
                f"(its source: {gen.source.get('label')!r})",
                hint="restore it to a file, or into a command with --to-command",
            )
        create, fill, drop = postgres_restore_into(newdb, env)
        await run_command(create)
        try:
            stats = await self.restore(gen, fill, progress=progress)
        except BaseException:
            with contextlib.suppress(Exception):
                await run_command(drop)
            raise
        return dataclasses.replace(stats, note=f"database {newdb} created and filled")

    async def restore_into_datadir(
        self,
        generation: str | Generation,
        datadir: str | os.PathLike[str],
        *,
        tablespaces: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> RestoreStats:
        """Unpack a physical generation (a `postgres_basebackup` source) into `datadir`,
        which must not exist or be empty: a PostgreSQL data directory with the WAL it
        needs, ready to start (as the user that owns it). A cluster with tablespaces also
        gets each of them unpacked: into `tablespaces[oid]` (or `tablespaces[its location
        on the server]`) when given, else `<datadir>_tablespaces/<oid>`, each new or
        empty; the data directory's tablespace_map points PostgreSQL at them. A key of
        `tablespaces` that names none of the generation's tablespaces is a TargetError
        (a mistyped one would put the data where the operator does not look). Everything
        made is removed again if the restore fails."""
        from dedupe.engine.databases import BASEBACKUP_TARS, is_postgres_basebackup

        self._require("restore")
        gen = await self.resolve(generation)
        if not is_postgres_basebackup(gen.source):
            raise TargetError(
                f"generation {gen.id[:12]} is not a PostgreSQL base backup made by dedupe",
                hint="restore it to a file, or into a command with --to-command",
            )
        path = os.path.abspath(os.fspath(datadir))
        wanted = dict(tablespaces or {})
        known = dict(gen.source.get("tablespaces") or {})  # oid -> location on the server
        unknown = sorted(set(wanted) - set(known) - set(known.values()))
        if unknown:
            have = ", ".join(f"{oid} ({old})" for oid, old in sorted(known.items()))
            raise TargetError(
                f"generation {gen.id[:12]} has no tablespace {', '.join(unknown)}",
                hint=f"its tablespaces: {have}" if have else "it has no tablespaces",
            )
        places = {
            oid: os.path.abspath(wanted.get(oid) or wanted.get(old) or f"{path}_tablespaces/{oid}")
            for oid, old in known.items()
        }
        made: list[str] = []
        for where in [path, *places.values()]:
            if os.path.exists(where) and (not os.path.isdir(where) or os.listdir(where)):
                raise TargetError(f"{where} exists and is not an empty directory")
        try:
            for where in [path, *places.values()]:
                if not os.path.exists(where):
                    top = where  # the outermost directory makedirs will create
                    while not os.path.exists(os.path.dirname(top)):
                        top = os.path.dirname(top)
                    os.makedirs(where, mode=0o700)
                    made.append(top)
                os.chmod(where, 0o700)  # PostgreSQL starts only on private directories
        except OSError as e:
            _remove_made(made, [path, *places.values()])
            raise TargetError(f"cannot create {e.filename}: {e.strerror}") from None
        try:
            if gen.source.get("format") == BASEBACKUP_TARS:
                stats = await self._restore_pg_tars(gen, path, places, progress)
            else:
                untar = Command(("tar", "-x", "-f", "-", "-C", path))
                stats = await self.restore(gen, untar, progress=progress)
        except BaseException:
            _remove_made(made, [path, *places.values()])
            raise
        wal = f"{gen.source.get('wal_start')} .. {gen.source.get('wal_end')}"
        where = "".join(f"; tablespace {oid} in {place}" for oid, place in places.items())
        return dataclasses.replace(
            stats,
            note=f"data directory {path} unpacked (WAL {wal}){where}; start PostgreSQL on it",
        )

    async def _restore_pg_tars(
        self,
        gen: Generation,
        datadir: str,
        places: Mapping[str, str],
        progress: ProgressCallback | None,
    ) -> RestoreStats:
        """The tree of tars restored (and verified) beside `datadir`, then unpacked:
        base.tar into it, each tablespace's tar into its place."""
        from dedupe.engine.databases import run_command, tablespace_map

        scratch = tempfile.mkdtemp(prefix=".dedupe-pgbase-", dir=os.path.dirname(datadir))
        try:
            stats = await self.restore(gen, os.path.join(scratch, "tars"), progress=progress)
            tars = os.path.join(scratch, "tars")
            for tar, into in [("base", datadir), *places.items()]:
                await run_command(
                    Command(("tar", "-x", "-f", os.path.join(tars, f"{tar}.tar"), "-C", into))
                )
            with open(os.path.join(datadir, "tablespace_map"), "w") as f:
                f.write(tablespace_map(places))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return stats

    async def _restore_with_lock(
        self,
        generation: str | Generation,
        target: Target,
        overwrite: bool,
        progress: ProgressCallback | None,
    ) -> RestoreStats:
        from dedupe.engine.restore import write_to_fileobj, write_to_path

        started = time.monotonic()
        async with RepositoryLock(
            self._store.backend, exclusive=False, operation="restore", wait=self._store.lock_wait
        ):
            gen = await self.resolve(generation)
            if gen.source.get("type") == "tree":
                if not isinstance(target, str | os.PathLike):
                    raise TargetError(
                        f"generation {gen.id[:12]} is a directory tree: restore it to a directory"
                    )
                return await self._restore_tree(gen, os.fspath(target), overwrite, progress)
            # Closed here, however the writing ends: the pipeline's tasks and its table file
            # go now, not whenever the event loop finalises an abandoned generator.
            async with contextlib.aclosing(await self._chunks(gen)) as chunks:
                stream = chunks if progress is None else _report(chunks, progress, gen.size)
                if isinstance(target, str | os.PathLike):
                    path = os.fspath(target)
                    if os.path.isdir(path):  # into a directory, under its backed up name
                        path = os.path.join(path, _file_name(gen))
                    written = await write_to_path(
                        stream,
                        path,
                        overwrite,
                        mode=gen.source.get("mode"),
                        mtime_ns=gen.source.get("mtime_ns"),
                    )
                elif isinstance(target, Command):
                    written = await write_to_command(stream, target)
                else:
                    written = await write_to_fileobj(stream, target)
            return RestoreStats(gen.id, written, gen.chunks, time.monotonic() - started)

    # --- verify (engine/verify.py) -------------------------------------------------------------

    async def verify(
        self,
        read_data: bool = False,
        subset: SubsetSpec | None = None,
        progress: ProgressCallback | None = None,
        *,
        quarantine: bool = True,
        repair: bool = True,
    ) -> dedupe.engine.verify.VerifyReport:
        """Check the repository and return a report naming every damaged or missing object
        and the generations it breaks; damage is reported, not raised.

        Without `read_data` only the structure is checked (index objects, pack presence and
        lengths, manifests, every referenced chunk indexed); no pack data is read.
        `read_data` also reads every pack and opens every blob; `subset` reads only part of
        the packs: a fraction in (0, 1] (a random sample) or (n, t), the n-th of t fixed
        slices (run 1/t .. t/t to cover everything). When chunk copies are damaged or
        missing, one quarantine record is written (unless `quarantine=False`) so that the
        next full backup stores those chunks again.

        With replicas, an admin key (`repair`, the default) then stores the chunks each
        damaged generation lost again from a replica's copy; `repaired` lists them and a
        note says that `prune` now deletes the damaged copies (after which verify is
        clean). `ok` still says whether damage was found."""
        from dedupe.engine.verify import verify_repository

        self._require("verify")
        report = await verify_repository(
            self._store,
            self._executor,
            read_data=read_data,
            subset=subset,
            progress=progress,
            quarantine=quarantine,
        )
        if (
            report.ok
            or not repair
            or not quarantine
            or not self._store.keyring.replicas
            or self.role != "admin"
        ):
            return report
        broken = sorted({g for d in report.damaged for g in d.generations})
        healed, unhealed = await self.replicas.heal(broken)
        notes = list(report.notes)
        if healed:
            notes.append(
                f"{len(healed)} damaged generation(s) repaired from replicas: their lost chunks "
                "are stored again; 'dedupe prune' deletes the damaged copies, and verify is "
                "clean after it"
            )
        notes += [f"generation {g[:12]} not repaired: {why}" for g, why in unhealed.items()]
        return dataclasses.replace(
            report, notes=notes, repaired=[dataclasses.asdict(h) for h in healed]
        )

    # --- forget and prune (engine/forget.py, engine/prune.py) ----------------------------------

    async def forget(
        self,
        *,
        name: str | None = None,
        keep_last: int | None = None,
        keep_full: int | None = None,
        keep_within: timedelta | None = None,
        ids: tuple[str, ...] | list[str] = (),
        with_dependents: bool = False,
        dry_run: bool = False,
        keep_daily: int | None = None,
        keep_weekly: int | None = None,
        keep_monthly: int | None = None,
        keep_yearly: int | None = None,
    ) -> dedupe.engine.forget.ForgetReport:
        """Remove generations (their manifests only; `prune` then frees the data), following
        pgBackRest's rules per source name (all names, or `name`):

        - `keep_last=N`: keep the N newest generations and the chains they depend on;
        - `keep_full=N`: keep the N newest fulls and every generation depending on them;
        - `keep_within=timedelta`: keep those created within it, and their chains;
        - `keep_daily/weekly/monthly/yearly=N` (restic's): for the N latest days (ISO
          weeks, months, years; UTC) that have generations, keep the newest of each, and
          its chain;
        - `ids`: remove these generations (ids or unique prefixes).
        Whatever no keep rule keeps is removed. A generation a kept one depends on is never
        removed: naming it raises ValueError unless `with_dependents=True`, which removes its
        dependents too. No rule and no id: ValueError. Takes the exclusive lock
        (RepositoryLocked while a backup or prune runs); `dry_run` only reports."""
        from dedupe.engine.forget import ForgetPolicy, run_forget

        self._require("forget")
        policy = ForgetPolicy(
            name=name,
            keep_last=keep_last,
            keep_full=keep_full,
            keep_within=keep_within,
            ids=tuple(ids),
            with_dependents=with_dependents,
            keep_daily=keep_daily,
            keep_weekly=keep_weekly,
            keep_monthly=keep_monthly,
            keep_yearly=keep_yearly,
        )
        return await run_forget(self._store, policy, dry_run=dry_run)

    async def prune(
        self,
        *,
        repack_threshold: float = 0.5,
        dry_run: bool = False,
        progress: ProgressCallback | None = None,
        delete_unauthenticated: bool = False,
    ) -> dedupe.engine.prune.PruneReport:
        """Free the space no generation references: delete unused packs, rewrite packs whose
        unused fraction exceeds `repack_threshold` (1.0: never), and replace the index
        objects by one. Takes the exclusive lock; safe to kill at any moment (a re-run
        finishes the job). `dry_run` reports what would be freed and changes nothing.

        Prune refuses (IntegrityError, nothing deleted) while manifests or index objects
        no key map vouches for, or key maps of keys or epochs the keyring does not know,
        exist: planted objects, or a keyring older than the repository (restored from an
        old copy), on whose word real data would go. `delete_unauthenticated=True`, once
        `verify` showed them to be planted, deletes them."""
        from dedupe.engine.prune import run_prune

        self._require("prune")
        return await run_prune(
            self._store,
            executor=self._executor,
            repack_threshold=repack_threshold,
            dry_run=dry_run,
            progress=progress,
            delete_unauthenticated=delete_unauthenticated,
        )

    async def repair_index(
        self, *, progress: ProgressCallback | None = None
    ) -> dedupe.engine.repair.RepairReport:
        """Rebuild the index of every pack no usable index object lists, from the packs'
        own trailers, each pack checked whole as `verify --read-data` checks it; then
        delete the index objects that were damaged. For a repository whose index object
        was lost or damaged (restores then miss chunks and prune refuses). Takes the
        exclusive lock; safe to kill and run again (engine/repair.py)."""
        from dedupe.engine.repair import repair_index

        self._require("repair the index")
        return await repair_index(self._store, self._executor, progress)

    async def copy(
        self,
        target: Repository,
        generations: Sequence[str | Generation] = (),
        *,
        progress: ProgressCallback | None = None,
        scratch: str | os.PathLike[str] | None = None,
    ) -> CopyReport:
        """Copy generations (default: all) into `target`, another repository (any backend,
        its own keys), oldest first, storing only the chunks `target` lacks. Each is
        restored from here as a restore is, every chunk and the whole stream verified,
        and backed up into `target` with its chunker and keys: its name, kind, creation
        time, source, host and tags are kept, and `copied_from` names the original.
        A generation whose copy `target` holds already is skipped, so a copy that was
        interrupted finishes when run again. A directory generation passes through a
        restore into a temporary directory under `scratch` (default: the system's)."""
        self._require("restore")
        target._require("back up")
        if target.id == self.id:
            raise ValueError("source and target are the same repository")
        started = time.monotonic()
        wanted = (
            [await self.resolve(g) for g in generations]
            if generations
            else await self.generations()
        )
        wanted = sorted({g.id: g for g in wanted}.values(), key=lambda g: (g.created, g.id))
        copies = [g for g in await target.generations() if g.copied_from]
        copied: list[CopiedGeneration] = []
        already: list[str] = []
        for gen in wanted:
            origin = f"{self.id}/{gen.id}"
            if any(c.copy_of(gen, self.id) for c in copies):
                already.append(gen.id)
                continue
            stats = await self._copy_one(target, gen, origin, progress, scratch)
            copied.append(
                CopiedGeneration(
                    gen.id, stats.id, gen.name, stats.kind, stats.bytes_read, stats.bytes_new
                )
            )
        return CopyReport(
            copied=copied,
            already_there=already,
            bytes_read=sum(c.bytes_read for c in copied),
            bytes_new=sum(c.bytes_new for c in copied),
            seconds=round(time.monotonic() - started, 3),
        )

    async def _copy_one(
        self,
        target: Repository,
        gen: Generation,
        origin: str,
        progress: ProgressCallback | None,
        scratch: str | os.PathLike[str] | None,
    ) -> BackupStats:
        # The header fields that make the copy the same generation for its users: labels
        # are written over the ones the target's backup would record.
        labels = {
            "host": gen.host,
            "tags": list(gen.tags),
            "created": gen.created,
            "source": gen.source,
            "copied_from": origin,
        }
        parent = f"{self.id}/{gen.parent}" if gen.parent else None
        options: dict[str, Any] = {
            "exclude": (),
            "strict": True,
            "labels": labels,
            "parents": lambda gens: [g for g in gens if parent and g.copied_from == parent],
        }
        spec = kept_spec(gen.chunker, target._store.chunker_params)
        label = gen.source.get("label")
        if gen.source.get("type") != "tree":
            return await target._backup(
                self.restore_stream(gen), gen.name, gen.kind, progress, label, spec, True, options
            )
        with tempfile.TemporaryDirectory(prefix="dedupe-copy-", dir=scratch) as tmp:
            tree = os.path.join(tmp, "tree")
            await self.restore(gen, tree)
            return await target._backup(
                tree, gen.name, gen.kind, progress, label, spec, True, options
            )

    async def locks(self) -> list[LockInfo]:
        """Every lock in the repository (see `LockInfo.stale_reason`)."""

        return await list_locks(self._store.backend)

    async def unlock(self, *, all_locks: bool = False) -> list[LockInfo]:
        """Remove stale locks (with `all_locks`, every lock: only when no dedupe process
        uses the repository). Returns the removed locks."""
        self._require("unlock")
        return await remove_locks(self._store.backend, all_locks=all_locks)

    async def _chunks(self, generation: str | Generation) -> AsyncGenerator[list[Buffer], None]:
        from dedupe.engine.restore import restore_chunks

        gen = await self.resolve(generation)
        if gen.source.get("type") == "tree":
            raise TargetError(
                f"generation {gen.id[:12]} is a directory tree: restore it to a directory"
            )
        await self._store.refresh_index()
        # The complete table in a file, read piece by piece (restore_chunks closes it):
        # a restore's memory does not grow with the generation's size.
        table = await spill_complete_table(self._store, gen.id)
        return restore_chunks(self._store, gen.id, table, table.meta["digest"], self._executor)


class KeyManager:
    """`repo.keys`: the repository's key holders and key epochs (docs/FORMAT.md 4, 10).

    Changes (add, remove, rotate) need an admin key and take the exclusive lock, as prune
    does: they wait for no one and fail with RepositoryLocked while a backup runs. Every
    one of them can be killed at any point and run again. (dedupe.engine.keys is imported
    by each method: only key commands load it.)"""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo

    @property
    def _store(self) -> RepositoryStore:
        return self._repo._store

    async def list(self) -> list[dedupe.engine.keys.KeyInfo]:
        """Every key holder: id, name, role, created, whether it is this handle's key."""
        from dedupe.engine import keys as key_ops

        return await key_ops.list_keys(self._store)

    async def status(self) -> dedupe.engine.keys.KeyStatus:
        """Each epoch with the packs and generations whose keys are wrapped for it, and any
        unfinished rotation or re-encryption."""
        from dedupe.engine import keys as key_ops

        return await key_ops.key_status(self._store)

    async def add(
        self,
        passphrase: str | bytes,
        *,
        role: str,
        name: str,
        kdf: KdfParams | None = None,
    ) -> dedupe.engine.keys.KeyInfo:
        """A new key file opened by `passphrase`, with `role` (admin, reader, writer)."""
        from dedupe.engine import keys as key_ops

        key_ops.require_admin(self._store, "add keys")
        async with RepositoryLock(
            self._store.backend, exclusive=True, operation="key add", wait=self._store.lock_wait
        ):
            return await key_ops.add_key(
                self._store, _passphrase(passphrase, False), role=role, name=name, kdf=kdf
            )

    async def remove(self, key: str) -> dedupe.engine.keys.KeyInfo:
        """Remove a key holder (by id, unique id prefix or name). It keeps what it could
        open until `rotate()` runs; afterwards it opens nothing written."""
        from dedupe.engine import keys as key_ops

        key_ops.require_admin(self._store, "remove keys")
        async with RepositoryLock(
            self._store.backend, exclusive=True, operation="key remove", wait=self._store.lock_wait
        ) as lock:
            return await key_ops.remove_key(self._store, key, lock.confirm)

    async def passwd(
        self, new_passphrase: str | bytes, kdf: KdfParams | None = None
    ) -> dedupe.engine.keys.KeyInfo:
        """A new passphrase for this handle's key (its old key file goes once the new one
        opened)."""
        from dedupe.engine import keys as key_ops

        return await key_ops.change_passphrase(self._store, _passphrase(new_passphrase, False), kdf)

    async def rotate(
        self, *, reencrypt: bool = False, progress: ProgressCallback | None = None
    ) -> dedupe.engine.keys.RotateReport:
        """A new key epoch; every data key re-wrapped for it (no pack is rewritten); the
        old epochs retired. `reencrypt`: also rewrite every pack under fresh data keys
        (for a leaked data key), resumable. Finishes an interrupted rotation first."""
        from dedupe.engine import keys as key_ops

        key_ops.require_admin(self._store, "rotate keys")
        async with RepositoryLock(
            self._store.backend, exclusive=True, operation="key rotate", wait=self._store.lock_wait
        ) as lock:
            return await key_ops.rotate(
                self._store,
                reencrypt=reencrypt,
                executor=self._repo._executor,
                progress=progress,
                confirm=lock.confirm,
            )


def _then(
    first: Callable[[], Awaitable[None]], second: Callable[[], Awaitable[None]]
) -> Callable[[], Awaitable[None]]:
    async def both() -> None:
        await first()
        await second()

    return both


def _damaged_parent(parent: Generation, name: str, kind: str, error: IntegrityError) -> str:
    """The note of a backup whose parent's header is sound but whose body does not open
    (a torn or damaged manifest is listed by its header alone): it is made as a full
    rather than not at all."""
    return (
        f"the latest generation {parent.id[:12]} of {name!r} is damaged ({error.message}): "
        f"this {kind} was made as a full; 'dedupe verify' names the damage, 'dedupe forget "
        f"{parent.id[:12]}' removes it"
    )


async def _blame_a_lost_lock(lock: RepositoryLock, error: DedupeError) -> None:
    """When a backup fails, say so if its lock was taken from it meanwhile: that is the
    cause to report (a prune that judged it stale removes the temporary files of its puts
    too, which then fail as mere write errors)."""
    if isinstance(error, RepositoryLocked):
        return
    try:
        await lock.confirm()
    except RepositoryLocked as lost:
        raise lost from error
    except DedupeError:
        pass  # the store fails us anyway: the original error says most


def _remove_made(made: list[str], used: list[str]) -> None:
    """Undo a failed unpack: the directories it made go, the empty ones it was given are
    emptied again."""
    for where in made:
        shutil.rmtree(where, ignore_errors=True)
    for where in used:
        if not os.path.exists(where):
            continue
        with contextlib.suppress(OSError):
            for entry in os.scandir(where):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)


def _file_name(gen: Generation) -> str:
    """The name a stream generation restores under inside a directory: the last part of
    the path it was backed up from (a label such as "<stdin>" is no file name)."""
    label = str(gen.source.get("label") or "")
    name = os.path.basename(label.rstrip("/"))
    if not name or label.startswith("<") or name in (".", ".."):
        raise TargetError(
            f"generation {gen.id[:12]} was not backed up from a file, so it has no file name "
            "to restore under in a directory",
            hint="give the target's full path (DIR/NAME)",
        )
    return name


def _with_note(stats: BackupStats, note: str | None) -> BackupStats:
    """Add a note to the stats, keeping any the backup made itself."""
    if not note:
        return stats
    return dataclasses.replace(stats, note=f"{note}; {stats.note}" if stats.note else note)


async def _report(
    stream: AsyncIterator[list[Buffer]], progress: ProgressCallback, total: int
) -> AsyncIterator[list[Buffer]]:
    from dedupe.engine.restore import Window

    p = Progress("restore", "restoring", bytes_total=total)
    async for parts in stream:
        p.bytes_written += sum(len(x) for x in parts)
        p.chunks += parts.chunks if isinstance(parts, Window) else len(parts)
        progress(p)
        yield parts
    p.stage = "done"
    progress(p)
