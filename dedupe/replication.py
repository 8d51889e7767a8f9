"""Replicas: other repositories a repository keeps copies of its generations in
(docs/FORMAT.md 4.3.1), on other disks, hosts or object stores.

The list lives in the keyring, so only an admin names where the data may go, and a list
rolled back with an old keyring copy is refused with it. Each entry pins the replica's
own repository id: a different repository put at the same location is refused, never
written to. A replica has its own keys and chunker (it is any dedupe repository), so
what it holds are copies made as `Repository.copy` makes them: the same generation (name,
kind, creation time, source, labels) with `copied_from` naming the original.

- **sync**: `Repository.backup` reads the source once and feeds every sync replica the
  same bytes as it stores them (`Tee`); each replica commits its copy first, and the
  primary commits only once every sync replica has: a generation is in the primary only
  if it is in every sync replica. A replica that fails makes the backup fail with
  ReplicaError, nothing committed in the primary (a replica that had committed keeps its
  copy; `status` counts such copies as `orphans`).
- **async**: `sync()` copies what a replica lacks (resumable: copies there are skipped);
  `status()` says how far behind each replica is.
- **repair**: a restore to a path, or `repair()`, that meets damaged or missing chunk
  copies reads the generation from a replica and stores the lost chunks in the primary
  again; the restore then runs again from the primary, checked as every restore is (so
  a replica's copy that is not byte for byte the generation repairs nothing). A reader
  key may not write: its restore is served from the replica's copy and the primary is
  left for an admin's `repair()`.

Forget and prune are not replicated: each replica keeps its own retention.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import os
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import dedupe
from dedupe._types import BackupStats, CopyReport, Generation, ProgressCallback, RestoreStats
from dedupe.backends import open_backend
from dedupe.backends.deadline import Deadline
from dedupe.chunking import Block, kept_spec, parse_spec
from dedupe.crypto import get_passphrase
from dedupe.engine import keys as key_ops
from dedupe.engine.backup import ingest
from dedupe.engine.forget import parse_created
from dedupe.engine.prune import PruneReport
from dedupe.engine.sources import Source, iter_source
from dedupe.engine.verify import VerifyReport, verify_repository
from dedupe.errors import (
    DedupeError,
    IntegrityError,
    ReplicaError,
    RoleNotPermitted,
)
from dedupe.format.keyring import REPLICA_MODES, ReplicaRecord, replica_name_problem
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.store import RepositoryStore
from dedupe.store.locks import RepositoryLock
from dedupe.store.repository import utc_now

# The handle's types are named by module (`dedupe.api.Repository`), as dedupe.api names
# its own lazily loaded ones: the annotations must resolve at run time (typing.
# get_type_hints), and dedupe.api, which imports this module lazily, is loaded by then.

# Blocks each branch of a Tee may hold before the reader waits for the slowest branch.
TEE_DEPTH = 4
# Seconds a call on a replica in a directory may take before the replica counts as gone
# (dedupe.backends.deadline): NFS mounted "hard" blocks for as long as its server is away.
# Generous, as listing a large replica over a network can take a while.
DEFAULT_REPLICA_IO_TIMEOUT = 300.0


@dataclass(frozen=True)
class ReplicaInfo:
    """One replica as the keyring lists it."""

    name: str
    location: str
    mode: str
    repository: str  # the replica's repository id (hex), pinned when it was added
    added: str

    @classmethod
    def of(cls, rec: ReplicaRecord) -> ReplicaInfo:
        return cls(rec.name, rec.location, rec.mode, rec.repository_id.hex(), rec.added)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReplicaStatus:
    """How far a replica is behind. `lag_seconds`: the age of the oldest generation of the
    primary the replica has no copy of (0 when it has them all); `behind` lists those
    generations, oldest first. `orphans`: copies there of generations the primary does not
    hold (forgotten here since, or never committed: a sync backup that failed after the
    replica committed). `error` is set, and the counts are None, when it could not be
    opened."""

    replica: ReplicaInfo
    reachable: bool
    error: str | None
    generations: int  # in the primary
    copies: int | None  # of them, copied to the replica
    behind: list[str] | None
    lag_seconds: float | None
    newest_copied: str | None  # creation time of the newest generation copied
    orphans: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReplicaSyncReport:
    replica: str
    copy: CopyReport | None
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HealedGeneration:
    """A generation whose lost chunks were read from a replica and stored again."""

    generation: str
    name: str
    replica: str
    replica_generation: str
    chunks_lost: int
    chunks_stored: int
    bytes_stored: int


@dataclass(frozen=True)
class ReplicaRepairReport:
    """What `repair()` did: the verify that found the damage, the generations it healed
    from replicas and those it could not (with why), the prune that dropped the damaged
    copies, and the verify after it (None when no prune ran)."""

    verify: VerifyReport
    healed: list[HealedGeneration]
    unhealed: dict[str, str]  # generation id -> why
    prune: PruneReport | None
    after: VerifyReport | None
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.unhealed and (self.after.ok if self.after else self.verify.ok)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def replica_passphrase(name: str) -> bytes:
    """A replica's passphrase: DEDUPE_REPLICA_<NAME>_PASSWORD (_FILE, _COMMAND; NAME in
    capitals, other characters as '_') when set, else DEDUPE_REPLICA_PASSWORD (_FILE,
    _COMMAND), else a prompt on a terminal."""
    specific = "DEDUPE_REPLICA_" + re.sub("[^A-Z0-9]", "_", name.upper()) + "_PASSWORD"
    if any(v in os.environ for v in (specific, f"{specific}_FILE", f"{specific}_COMMAND")):
        return get_passphrase(variable=specific, prompt=f"Passphrase of replica {name}")
    return get_passphrase(
        variable="DEDUPE_REPLICA_PASSWORD", prompt=f"Passphrase of replica {name}"
    )


class Tee:
    """One source read once, given to several readers: every branch yields the same
    blocks (read-only; a Block is rewritten only once nothing refers to it), in order.
    The reading runs ahead of the slowest branch by at most TEE_DEPTH blocks. A branch
    whose reader is gone is `detach`ed and no longer waited for. An error reading the
    source is raised in every branch."""

    _END = object()

    def __init__(self, source: AsyncIterator[bytes | Block], branches: int) -> None:
        self._source = source
        self._queues: list[asyncio.Queue[Any]] = [asyncio.Queue(TEE_DEPTH) for _ in range(branches)]
        self._attached = [True] * branches
        self._reader: asyncio.Task[None] | None = None

    def branch(self, i: int) -> AsyncIterator[bytes | Block]:
        return self._branch(i)

    async def _branch(self, i: int) -> AsyncIterator[bytes | Block]:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        queue = self._queues[i]
        try:
            while True:
                item = await queue.get()
                if item is Tee._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.detach(i)

    def detach(self, i: int) -> None:
        """Stop feeding branch i (its reader failed or finished): the others go on."""
        self._attached[i] = False
        queue = self._queues[i]
        while not queue.empty():  # frees the slot a put to it may be waiting for
            queue.get_nowait()

    async def _read(self) -> None:
        try:
            async for block in self._source:
                for i, queue in enumerate(self._queues):
                    if self._attached[i]:
                        await queue.put(block)
                        if not self._attached[i]:  # detached while the put waited
                            self.detach(i)
            end: Any = Tee._END
        except Exception as e:  # noqa: BLE001 - every branch raises it
            end = e
        finally:
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        for i, queue in enumerate(self._queues):
            if self._attached[i]:
                await queue.put(end)

    async def close(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def replica_io_timeout() -> float | None:
    """Seconds a call on a replica in a directory may take: DEDUPE_REPLICA_IO_TIMEOUT, else
    DEFAULT_REPLICA_IO_TIMEOUT; "0" waits for ever (None)."""
    raw = os.environ.get("DEDUPE_REPLICA_IO_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_REPLICA_IO_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ReplicaError(
            f"DEDUPE_REPLICA_IO_TIMEOUT={raw!r} is not a number of seconds",
            hint="give seconds (e.g. 300), or 0 to wait for ever",
        )
    return seconds or None


class Replicas:
    """`repo.replicas`: the replicas of a repository (see the module docstring).

    `passphrase(name)` gives a replica's passphrase; the default reads
    DEDUPE_REPLICA_<NAME>_PASSWORD or DEDUPE_REPLICA_PASSWORD (and their _FILE and
    _COMMAND forms). Set it to give them another way. `io_timeout`: the seconds each
    call on a replica in a directory may take before the replica fails with
    BackendTimeout (None: no limit); read from DEDUPE_REPLICA_IO_TIMEOUT when the
    replicas are first used."""

    def __init__(self, repo: dedupe.api.Repository) -> None:
        self._repo = repo
        self.passphrase: Callable[[str], bytes] = replica_passphrase
        self._io_timeout: float | None = None
        self._io_timeout_set = False  # until set, or read from the environment

    @property
    def io_timeout(self) -> float | None:
        if not self._io_timeout_set:
            self.io_timeout = replica_io_timeout()
        return self._io_timeout

    @io_timeout.setter
    def io_timeout(self, seconds: float | None) -> None:
        # 0 is "no limit", as in DEDUPE_REPLICA_IO_TIMEOUT.
        self._io_timeout = seconds if seconds is not None and seconds > 0 else None
        self._io_timeout_set = True

    @property
    def _store(self) -> RepositoryStore:
        return self._repo._store

    def _records(self, names: Sequence[str] = ()) -> builtins.list[ReplicaRecord]:
        records = list(self._store.keyring.replicas)
        unknown = set(names) - {r.name for r in records}
        if unknown:
            raise ValueError(f"no replica named {', '.join(sorted(unknown))}")
        return [r for r in records if not names or r.name in names]

    # --- the list ------------------------------------------------------------------------------

    async def list(self) -> builtins.list[ReplicaInfo]:
        """The replicas the keyring names (read afresh), in the order they were added."""
        await self._store.refresh_keys()
        return [ReplicaInfo.of(r) for r in self._store.keyring.replicas]

    async def add(
        self,
        location: str | os.PathLike[str],
        *,
        name: str | None = None,
        mode: str = "async",
        passphrase: dedupe.api.Passphrase = None,
    ) -> ReplicaInfo:
        """Name the repository at `location` (it exists: `init` it first, with its own
        passphrase) as a replica. It is opened here, and its repository id pinned; its key
        must be allowed to back up. Admin key; takes the exclusive lock."""
        from dedupe.api import _passphrase

        key_ops.require_admin(self._store, "change the replicas")
        if mode not in REPLICA_MODES:
            raise ValueError(f"mode must be one of {', '.join(REPLICA_MODES)}, not {mode!r}")
        location = os.fspath(location)
        if "://" not in location:  # every later command resolves it the same way
            location = os.path.abspath(location)
        if await self._same_as_this(location):
            raise ValueError(f"{location} is this repository, not a replica of it")
        if name is None:
            name = _default_name(location, {r.name for r in self._store.keyring.replicas})
        problem = replica_name_problem(name)
        if problem:
            raise ValueError(problem)
        chosen = name

        def secret() -> bytes:
            if passphrase is None:
                return self.passphrase(chosen)
            return _passphrase(passphrase, False)

        try:
            replica = await self._open_at(os.fspath(location), secret)
        except DedupeError as e:
            raise ReplicaError(f"cannot open {location} as a replica: {e.message}", e.hint) from e
        async with replica:
            if replica.id == self._repo.id:
                raise ValueError(f"{location} is this repository, not a replica of it")
            replica._require("back up")
            record = ReplicaRecord(name, location, mode, bytes.fromhex(replica.id), utc_now())

        def with_it(current: tuple[ReplicaRecord, ...]) -> tuple[ReplicaRecord, ...]:
            return (*current, record)

        async with RepositoryLock(
            self._store.backend, exclusive=True, operation="replica add", wait=self._store.lock_wait
        ) as lock:
            await key_ops.set_replicas(self._store, with_it, lock.confirm)
        return ReplicaInfo.of(record)

    async def remove(self, name: str) -> ReplicaInfo:
        """Stop replicating to `name` (its copies stay where they are). Admin key."""
        key_ops.require_admin(self._store, "change the replicas")
        async with RepositoryLock(
            self._store.backend,
            exclusive=True,
            operation="replica remove",
            wait=self._store.lock_wait,
        ) as lock:
            await self._store.refresh_keys()
            (record,) = self._records([name])
            await key_ops.set_replicas(
                self._store,
                lambda current: tuple(r for r in current if r.name != name),
                lock.confirm,
            )
        return ReplicaInfo.of(record)

    async def open(self, name: str) -> dedupe.api.Repository:
        """The replica `name`, open; ReplicaError when it cannot be opened or is not the
        repository that was added."""
        (record,) = self._records([name])
        return await self._open(record)

    async def _same_as_this(self, location: str) -> bool:
        """Whether `location` is this repository's, resolved off the event loop and under
        the deadline (resolving a path on a stalled mount blocks too)."""
        here = self._repo.location
        if self.io_timeout is None:
            return await asyncio.to_thread(_same_place, location, here)
        deadline = Deadline(self.io_timeout, location)
        return await deadline.run("resolving its path", _same_place, location, here)

    async def _open_at(
        self, location: str, passphrase: Callable[[], bytes]
    ) -> dedupe.api.Repository:
        """The repository at `location` open, its calls under the replicas' deadline."""
        from dedupe.api import Repository

        backend = open_backend(location, io_timeout=self.io_timeout)
        try:
            return await Repository.open(backend, passphrase, lock_wait=self._store.lock_wait)
        except BaseException:
            await backend.close()  # Repository.open leaves a backend it was given open
            raise

    async def _open(self, record: ReplicaRecord) -> dedupe.api.Repository:

        try:
            replica = await self._open_at(record.location, lambda: self.passphrase(record.name))
        except DedupeError as e:
            raise ReplicaError(
                f"replica {record.name} ({record.location}) cannot be opened: {e.message}",
                e.hint,
            ) from e
        if replica.id != record.repository_id.hex():
            await replica.close()
            raise ReplicaError(
                f"replica {record.name}: {record.location} holds repository {replica.id[:16]}, "
                f"not {record.repository_id.hex()[:16]}, the one added; nothing is copied to it",
                hint="if the replica was recreated on purpose, remove it and add it again",
            )
        return replica

    # --- async: catch up, and how far behind -----------------------------------------------

    async def status(self, names: Sequence[str] = ()) -> builtins.list[ReplicaStatus]:
        """How far each replica (all, or `names`) is behind this repository."""
        mine = await self._repo.generations()
        result = []
        for record in self._records(names):
            info = ReplicaInfo.of(record)
            try:
                async with await self._open(record) as replica:
                    theirs = await replica.generations()
            except DedupeError as e:
                result.append(
                    ReplicaStatus(info, False, e.message, len(mine), None, None, None, None, None)
                )
                continue
            copies = self._copies(theirs, mine)
            behind = [g for g in mine if g.id not in copies]
            done = [g for g in mine if g.id in copies]
            ids = {g.id for g in mine}
            prefix = f"{self._repo.id}/"
            orphans = [
                g
                for g in theirs
                if g.copied_from
                and g.copied_from.startswith(prefix)
                and g.copied_from[len(prefix) :] not in ids
            ]
            result.append(
                ReplicaStatus(
                    info,
                    True,
                    None,
                    len(mine),
                    len(done),
                    [g.id for g in behind],
                    round(max(0.0, time.time() - parse_created(behind[0].created).timestamp()), 3)
                    if behind
                    else 0.0,
                    done[-1].created if done else None,
                    len(orphans),
                )
            )
        return result

    def _copies(
        self, theirs: Sequence[Generation], mine: Sequence[Generation]
    ) -> dict[str, builtins.list[Generation]]:
        """Each of `mine` (this repository's generations) -> the generations among `theirs`
        (a replica's) that say they are its copy and whose headers agree, newest first.
        Only the replica's keys vouch for the claim: a holder of one that may back up
        there can plant a copy; whoever reads one for the original checks its bytes."""
        by_id = {g.id: g for g in mine}
        prefix = f"{self._repo.id}/"
        found: dict[str, builtins.list[Generation]] = {}
        for g in sorted(theirs, key=lambda g: (g.created, g.id), reverse=True):
            if not g.copied_from or not g.copied_from.startswith(prefix):
                continue
            origin = by_id.get(g.copied_from[len(prefix) :])
            if origin is not None and g.copy_of(origin, self._repo.id):
                found.setdefault(origin.id, []).append(g)
        return found

    async def sync(
        self,
        names: Sequence[str] = (),
        *,
        progress: ProgressCallback | None = None,
        scratch: str | os.PathLike[str] | None = None,
    ) -> builtins.list[ReplicaSyncReport]:
        """Copy every generation a replica (all, or `names`) lacks into it, oldest first
        (Repository.copy). A replica that fails is reported and the others still run; the
        CLI exits non-zero then."""
        reports = []
        for record in self._records(names):
            try:
                async with await self._open(record) as replica:
                    report = await self._repo.copy(replica, progress=progress, scratch=scratch)
            except DedupeError as e:
                reports.append(ReplicaSyncReport(record.name, None, e.message))
                continue
            reports.append(ReplicaSyncReport(record.name, report, None))
        return reports

    # --- sync: a backup commits only once every sync replica has ---------------------------

    def sync_replicas(self) -> builtins.list[ReplicaRecord]:
        return [r for r in self._store.keyring.replicas if r.mode == "sync"]

    async def backup(
        self,
        source: Source,
        name: str,
        kind: str,
        progress: ProgressCallback | None,
        label: str | None,
        chunker: str | None,
        allow_empty: bool,
        options: dict[str, Any],
    ) -> BackupStats:
        """Repository.backup with sync replicas (see the module docstring)."""
        records = self.sync_replicas()
        targets: builtins.list[dedupe.api.Repository] = []
        try:
            for record in records:
                targets.append(await self._open(record))
                try:
                    targets[-1]._require("back up")
                except RoleNotPermitted as e:
                    raise ReplicaError(f"replica {record.name}: {e.message}", e.hint) from e
            return await self._backup_to_all(
                targets, records, source, name, kind, progress, label, chunker, allow_empty, options
            )
        finally:
            for t in targets:
                await t.close()

    async def _backup_to_all(
        self,
        targets: builtins.list[dedupe.api.Repository],
        records: builtins.list[ReplicaRecord],
        source: Source,
        name: str,
        kind: str,
        progress: ProgressCallback | None,
        label: str | None,
        chunker: str | None,
        allow_empty: bool,
        options: dict[str, Any],
    ) -> BackupStats:
        repo = self._repo
        is_tree = isinstance(source, str | os.PathLike) and os.path.isdir(source)
        # A tree is read by each repository (a tree is not one stream); anything else is
        # read once and given to all.
        tee = None if is_tree else Tee(iter_source(source), len(targets) + 1)
        primary: asyncio.Future[tuple[str, dict[str, Any]]] = (
            asyncio.get_running_loop().create_future()
        )
        # The parent, chosen once for all: each copy chains onto the copy of the primary's
        # parent, never onto an orphan (a copy of a generation the primary never committed).
        parent, _note = repo._parent_for(await repo.generations(name), name, kind)
        parent_copy = f"{repo.id}/{parent.id}" if parent is not None else None

        def replica_options(i: int) -> dict[str, Any]:
            labels = dict(options["labels"])

            async def before_header() -> None:
                # The copy is the primary's generation: its id, creation time and source.
                gen_id, header = await asyncio.shield(primary)
                labels.update(
                    created=header["created"],
                    source=header["source"],
                    copied_from=f"{repo.id}/{gen_id}",
                )

            return {
                "exclude": options["exclude"],
                "strict": options["strict"],
                "labels": labels,
                "before_header": before_header,
                "parents": lambda gens: [
                    g for g in gens if parent_copy is not None and g.copied_from == parent_copy
                ],
            }

        tasks = []
        for i, target in enumerate(targets):
            spec = None if chunker is None else parse_spec(chunker, target.chunker)
            opts = replica_options(i)
            if tee is not None:
                opts["blocks"] = tee.branch(i + 1)
            task = asyncio.create_task(
                target._backup(
                    source if tee is None else opts["blocks"],
                    name,
                    kind,
                    None,
                    label,
                    spec,
                    allow_empty,
                    opts,
                )
            )
            if tee is not None:
                task.add_done_callback(partial(_detach, tee, i + 1))
            tasks.append(task)

        async def before_write(gen_id: str, header: dict[str, Any]) -> None:
            primary.set_result((gen_id, header))
            done = await asyncio.gather(*tasks, return_exceptions=True)
            failed = [
                f"{r.name}: {getattr(e, 'message', e)}"
                for r, e in zip(records, done, strict=True)
                if isinstance(e, BaseException)
            ]
            if failed:
                raise ReplicaError(
                    f"{len(failed)} sync replica(s) failed, so this backup commits nothing: "
                    + "; ".join(failed),
                    hint="see 'dedupe replica status'; a replica that cannot be reached for "
                    "long can be made async ('dedupe replica add --mode async' after remove)",
                )

        spec = None if chunker is None else parse_spec(chunker, repo.chunker)
        mine = {**options, "before_write": before_write}
        if parent is not None:
            mine["parents"] = lambda gens: [g for g in gens if g.id == parent.id]
        if tee is not None:
            mine["blocks"] = tee.branch(0)
        try:
            stats = await repo._backup(source, name, kind, progress, label, spec, allow_empty, mine)
        except BaseException:
            if not primary.done():
                primary.set_exception(
                    ReplicaError("the backup into the primary failed: the copy is not committed")
                )
                primary.exception()  # retrieved: no "never retrieved" warning
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            if tee is not None:
                await tee.close()
        copies = ", ".join(
            f"{r.name} {t.result().id[:12]}" for r, t in zip(records, tasks, strict=True)
        )
        note = f"committed first in the sync replicas: {copies}"
        from dedupe.api import _with_note

        return _with_note(stats, note)

    # --- repair: lost chunks stored again from a replica's copy ----------------------------

    async def repair(
        self,
        *,
        prune: bool = True,
        progress: ProgressCallback | None = None,
        scratch: str | os.PathLike[str] | None = None,
    ) -> ReplicaRepairReport:
        """Verify every pack (`verify --read-data`: damaged and missing chunk copies are
        quarantined), store the chunks every damaged generation lost again from a
        replica's copy of it, then (`prune`) prune, which rewrites the packs that held
        damaged copies and drops the lost ones, and verify again. Admin key."""
        started = time.monotonic()
        key_ops.require_admin(self._store, "repair from replicas")
        repo = self._repo
        before = await repo.verify(read_data=True, progress=progress, repair=False)
        broken = sorted({g for d in before.damaged for g in d.generations})
        healed, unhealed = await self.heal(broken, scratch)
        pruned = after = None
        if prune and not before.ok:
            pruned = await repo.prune(progress=progress)
            after = await repo.verify(read_data=True, progress=progress)
        return ReplicaRepairReport(
            before, healed, unhealed, pruned, after, round(time.monotonic() - started, 3)
        )

    async def heal(
        self, gen_ids: Sequence[str], scratch: str | os.PathLike[str] | None = None
    ) -> tuple[builtins.list[HealedGeneration], dict[str, str]]:
        """Store again, from a replica's copy, the chunks each generation has no usable
        copy of, and say which it could not. Admin key (it writes, and only an admin's
        restore reads what it wrote). -> (healed, {generation: why not})."""
        key_ops.require_admin(self._store, "repair from replicas")
        repo = self._repo
        store = self._store
        healed: builtins.list[HealedGeneration] = []
        unhealed: dict[str, str] = {}
        todo: dict[str, tuple[Generation, list[bytes]]] = {}
        await store.refresh_index()
        for gen_id in gen_ids:
            try:
                gen = await repo.resolve(gen_id)
                lost = await self._lost_chunks(gen)
            except DedupeError as e:  # the manifest itself is damaged: nothing to hold
                unhealed[gen_id] = e.message
                continue
            if lost:
                todo[gen_id] = (gen, lost)
        if not todo:
            return healed, unhealed
        records = self._records()
        if not records:
            for gen_id in todo:
                unhealed[gen_id] = "no replica is configured"
            return healed, unhealed
        for record in records:
            if not todo:
                break
            try:
                async with await self._open(record) as replica:
                    copies = self._copies(
                        await replica.generations(), [gen for gen, _lost in todo.values()]
                    )
                    for gen_id in [g for g in todo if g in copies]:
                        gen, lost = todo[gen_id]
                        # Every copy that says it is this one, until one gives the lost
                        # chunks back (the chunk ids are keyed here: only the same bytes do).
                        for copy in copies[gen_id]:
                            try:
                                stats = await self._store_again(gen, replica, copy, scratch)
                                left = await self._lost_chunks(gen)
                            except DedupeError as e:
                                unhealed[gen_id] = f"replica {record.name}: {e.message}"
                                continue
                            if left:
                                unhealed[gen_id] = (
                                    f"replica {record.name}'s copy {copy.id[:12]} does not "
                                    f"hold {len(left)} of its chunks: it is not the same bytes"
                                )
                                continue
                            unhealed.pop(gen_id, None)
                            del todo[gen_id]
                            healed.append(
                                HealedGeneration(
                                    gen_id,
                                    gen.name,
                                    record.name,
                                    copy.id,
                                    len(lost),
                                    stats.chunks_new,
                                    stats.bytes_stored,
                                )
                            )
                            break
            except DedupeError as e:
                for gen_id in todo:
                    unhealed.setdefault(gen_id, e.message)
        for gen_id in todo:
            unhealed.setdefault(gen_id, "no replica holds a copy of it")
        return healed, unhealed

    async def _lost_chunks(self, gen: Generation) -> builtins.list[bytes]:
        """The chunks of `gen` with no usable copy in the primary (their packs missing, or
        their copies quarantined)."""
        _meta, table = await self._store.generation_chunks(gen.id)
        index = self._store.index
        return [cid for cid, _n in CHUNK_RECORD.iter_unpack(table) if not index.usable(cid)]

    async def _store_again(
        self,
        gen: Generation,
        replica: dedupe.api.Repository,
        copy: Generation,
        scratch: str | os.PathLike[str] | None,
    ) -> BackupStats:
        """Read `copy` from `replica` and store the chunks the primary lacks, cut as
        `gen` was cut, committing nothing."""
        repo = self._repo
        spec = kept_spec(gen.chunker, self._store.chunker_params)
        options: dict[str, Any] = {
            "exclude": (),
            "strict": True,
            "labels": {},
            "store_only": True,
        }
        if copy.source.get("type") != "tree":
            stream = replica.restore_stream(copy)
            return await repo._backup(stream, gen.name, "full", None, None, spec, True, options)
        with tempfile.TemporaryDirectory(prefix="dedupe-repair-", dir=scratch) as tmp:
            tree = os.path.join(tmp, "tree")
            await replica.restore(copy, tree)
            return await repo._backup(tree, gen.name, "full", None, None, spec, True, options)

    async def restore_after_damage(
        self,
        gen: Generation,
        target: dedupe.api.Target,
        overwrite: bool,
        progress: ProgressCallback | None,
        error: DedupeError,
    ) -> RestoreStats:
        """A restore to a path met damaged or missing chunk copies (`error`). An admin key
        (which may write) checks the packs the generation reads, stores its lost chunks
        again from a replica, and restores from the primary again; a reader key restores
        from a replica's copy. Raises `error` when no replica can help."""
        repo = self._repo
        if self._store.role == "admin":  # restores and may write (a reader may only read)
            try:
                await self._quarantine_damage(gen)
                healed, unhealed = await self.heal([gen.id], None)
            except DedupeError as e:
                raise IntegrityError(
                    f"{error.message}; repairing it from a replica failed: {e.message}",
                    error.hint,
                ) from error
            if not healed:
                raise IntegrityError(
                    f"{error.message}; no replica could repair it: "
                    + "; ".join(f"{g[:12]}: {why}" for g, why in unhealed.items()),
                    error.hint,
                ) from error
            h = healed[0]
            stats = await repo._restore_with_lock(gen, target, overwrite, progress)
            note = (
                f"generation {gen.id[:12]} had {h.chunks_lost} damaged or lost chunk copies "
                f"here; they were read from replica {h.replica} ({h.replica_generation[:12]}) "
                "and stored again, and the restore ran again from this repository. The "
                "damaged copies are quarantined: 'dedupe prune' deletes them"
            )
            return dataclasses.replace(stats, note=note)
        if not isinstance(target, str | os.PathLike):
            raise error  # what was written to a file object stays written
        if gen.source.get("type") == "tree":
            raise IntegrityError(
                error.message,
                hint="this repository has replicas: an admin's 'dedupe replica repair' "
                "repairs it from them; then restore again",
            ) from error
        return await self._restore_checked_copy(gen, os.fspath(target), overwrite, error)

    async def _restore_checked_copy(
        self, gen: Generation, target: str, overwrite: bool, error: DedupeError
    ) -> RestoreStats:
        """A reader's restore of a stream generation from a replica: each copy that says
        it is `gen` is restored beside the target and cut again with this repository's
        chunker and keyed ids; only a copy that gives back the generation's own chunk
        table (the same bytes) is renamed into place."""
        from dedupe.api import _file_name

        started = time.monotonic()
        path = os.path.join(target, _file_name(gen)) if os.path.isdir(target) else target
        if os.path.lexists(path) and not overwrite:
            raise error  # the restore from here would have refused it first
        _meta, table = await self._store.generation_chunks(gen.id)
        spec = kept_spec(gen.chunker, self._store.chunker_params)
        where, base = os.path.split(os.path.abspath(path))
        for record in self._records():
            try:
                async with await self._open(record) as replica:
                    candidates = self._copies(await replica.generations(), [gen]).get(gen.id, [])
                    for copy in candidates:
                        scratch = os.path.join(where, f".{base}.dedupe-{secrets.token_hex(4)}")
                        try:
                            stats = await replica.restore(copy, scratch)
                            if not await self._cuts_to(scratch, spec, table):
                                continue
                            os.replace(scratch, path)
                        finally:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(scratch)
                        note = (
                            f"generation {gen.id[:12]} is damaged here ({error.message}); it "
                            f"was restored from replica {record.name} ({copy.id[:12]}), "
                            "checked against this generation's chunk ids. This key may not "
                            "write: run 'dedupe replica repair' with an admin key to repair "
                            "this repository"
                        )
                        return RestoreStats(
                            gen.id,
                            stats.bytes_written,
                            gen.chunks,
                            time.monotonic() - started,
                            note,
                        )
            except DedupeError:
                continue
        raise error

    async def _cuts_to(self, path: str, spec: dict[str, Any] | str, table: bytes) -> bool:
        """Whether the file at `path`, cut with `spec` and this repository's keys, gives
        the chunk table `table` (nothing is stored)."""
        got = await ingest(
            self._store,
            iter_source(path),
            executor=self._repo._executor,
            chunker=spec,
            dry_run=True,
        )
        return bytes(got.table) == bytes(table)

    async def _quarantine_damage(self, gen: Generation) -> None:
        """Read the packs `gen` reads (verify --read-data on them alone), so that its
        damaged copies are quarantined and count as lost."""
        store = self._store
        await store.refresh_index()
        _meta, table = await store.generation_chunks(gen.id)
        index = store.index
        packs = set()
        for cid, _n in CHUNK_RECORD.iter_unpack(table):
            loc = index.get(cid)
            if loc is not None:
                packs.add(index.packs[loc.pack_no].pack_id)
        await verify_repository(
            store, self._repo._executor, read_data=True, subset=frozenset(packs)
        )


def _same_place(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _detach(tee: Tee, branch: int, _task: object) -> None:
    tee.detach(branch)


def _default_name(location: str, taken: set[str]) -> str:
    base = re.sub("[^A-Za-z0-9._-]", "-", location.rstrip("/").rsplit("/", 1)[-1]).strip(".-")
    base = (base or "replica")[:56]
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def _age(created: str) -> float:
    """Seconds since a generation's creation time (its header's `created`)."""
    return round(max(0.0, time.time() - parse_created(created).timestamp()), 3)
