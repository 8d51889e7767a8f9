"""Repository locks (docs/FORMAT.md section 14): who may change the repository right now.

A lock is a small plain-JSON object `locks/<32 hex>` (locks hold no secrets). Backups take
a *shared* lock; forget and prune take an *exclusive* one, so prune never deletes a chunk
that a running backup is about to reference.

Contract of `RepositoryLock` (an async context manager):

- Acquire: create our lock object first (`Backend.create_new`), then list `locks/`. An
  exclusive lock conflicts with every other live lock; a shared lock conflicts with live
  exclusive locks. On a conflict our object is removed again and `RepositoryLocked` is
  raised, naming the holder (host, pid, operation, age) and what to do. Writing before
  listing makes the check race-free on any store whose list is consistent after put (a
  local directory, S3): of two racing lockers at least one sees the other. Two racing
  *exclusive* lockers that both see each other break the tie by name: the larger name
  gives up at once, the smaller one waits up to `race_wait` seconds for it to go away (if
  it stays, its owner did not see us and holds the lock, so we give up). A conflicting
  lock created more than RACE_RECENT seconds ago is an established holder: no waiting.
- Hold: a background task rewrites the object with a new `refreshed` time every
  `refresh_interval` seconds, by compare-and-swap (`Backend.swap`): only if the object
  still holds what we last wrote. If it vanished or changed (someone judged it stale and
  removed it), `lost` becomes true; a removed lock is never brought back.
- Fail safe: the holder calls `confirm()` right before each commit and each destructive
  step. It renews the lock by the same compare-and-swap, and raises if the lock is gone
  or changed: nobody can have judged it stale and acted on that, and nobody will for
  `stale_after` seconds (less clock skew between hosts). `check()`, for synchronous
  callers, does not renew: it raises if the lock was lost or if more than `stale_after -
  margin` seconds passed since the last renewal that succeeded, on a clock that keeps
  counting while the process is stopped or the machine suspended (CLOCK_BOOTTIME).
  What remains is the step itself: a holder stopped *after* confirm() for longer than
  `stale_after` is not caught (an object store's conditional writes on the lock, or
  fencing by the storage, would be needed for that).
- Stale: a lock whose `refreshed` is older than `stale_after` seconds, or one written on
  this host by a process that no longer exists, is stale. Stale locks never block
  anyone; a locker that would conflict with one removes it (by `delete_if`; listed in
  `removed_stale` and logged), so that its holder, if only stopped, finds it gone.
- Wait: with `wait` > 0 a conflict is not final at once: our object is removed, and the
  whole acquisition is tried again after a growing, jittered pause (0.5 s up to 10 s),
  until it succeeds or `wait` seconds have passed (restic's --retry-lock). Each attempt
  is a fresh lock object with a fresh `created` time, so a waiter never looks like an
  established holder to a racing locker.
- Release: on leaving the block (normally, by exception or by cancellation) the refresh
  task is stopped and our object is deleted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from dedupe.backends.base import Backend
from dedupe.errors import MissingObject, ObjectChanged, RepositoryLocked

log = logging.getLogger(__name__)

LOCKS_PREFIX = "locks/"
LOCK_VERSION = 1
REFRESH_INTERVAL = 60.0
STALE_AFTER = 300.0
RACE_WAIT = 2.0
RACE_RECENT = 10.0  # seconds: a lock younger than this may still be racing us
MARGIN = 60.0  # seconds of a lease a holder keeps for the step confirm() guards
_EPOCH = "1970-01-01T00:00:00.000000Z"


def _now() -> datetime:
    return datetime.now(UTC)


def _fmt(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(s: str) -> datetime:
    t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _lease_clock() -> float:
    """Seconds on a clock that also runs while this process is stopped (SIGSTOP) or the
    machine is suspended, where the system has one (CLOCK_BOOTTIME on Linux)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is not None:
        return time.clock_gettime(boottime)
    return time.monotonic()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists but is not ours, or we cannot tell
        return True
    return True


@dataclass(frozen=True)
class LockInfo:
    """One lock object as read from the repository."""

    name: str  # "locks/<hex>"
    exclusive: bool
    host: str
    pid: int
    operation: str
    created: str
    refreshed: str
    raw: bytes = field(default=b"", repr=False, compare=False)  # the object as read

    @property
    def age(self) -> float:
        """Seconds since the lock was last refreshed (negative if the clocks disagree)."""
        return (_now() - _parse_time(self.refreshed)).total_seconds()

    def stale_reason(self, stale_after: float | None = None) -> str | None:
        """Why this lock no longer counts, or None while it is live."""
        stale_after = STALE_AFTER if stale_after is None else stale_after
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return f"process {self.pid} on this host no longer exists"
        if self.age > stale_after:
            return f"not refreshed for {self.age:.0f} s (stale after {stale_after:.0f} s)"
        return None

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        return (
            f"{kind} lock of '{self.operation}' by pid {self.pid} on {self.host}, "
            f"refreshed {self.age:.0f} s ago"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["raw"]
        d["age"] = round(self.age, 3)
        return d

    @classmethod
    def parse(cls, name: str, data: bytes) -> LockInfo:
        """A lock object as written by any version. A newer version's lock counts as
        exclusive (it blocks everything we cannot reason about); an object that is not a
        lock at all counts as long stale, so that it never blocks anyone."""
        try:
            obj = json.loads(data)
            return cls(
                name=name,
                exclusive=bool(obj["exclusive"]) if obj["version"] == LOCK_VERSION else True,
                host=str(obj["host"]),
                pid=int(obj["pid"]),
                operation=str(obj["operation"]),
                created=str(obj["created"]),
                refreshed=_fmt(_parse_time(str(obj["refreshed"]))),
                raw=data,
            )
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            return cls(name, True, "?", 0, "unreadable lock object", _EPOCH, _EPOCH, data)


async def list_locks(backend: Backend) -> list[LockInfo]:
    """Every lock object in the repository, sorted by name."""
    out = []
    for name in sorted(await backend.list(LOCKS_PREFIX)):
        try:
            data = await backend.get(name)
        except MissingObject:  # released between list and get
            continue
        out.append(LockInfo.parse(name, data))
    return out


async def remove_locks(
    backend: Backend, *, all_locks: bool = False, stale_after: float | None = None
) -> list[LockInfo]:
    """Remove stale locks (every lock with `all_locks`); returns what was removed.
    `all_locks` is for an operator who knows no dedupe process is running."""
    removed = []
    for lock in await list_locks(backend):
        if all_locks or lock.stale_reason(stale_after) is not None:
            if await _delete_as_read(backend, lock):
                removed.append(lock)
    return removed


async def _delete_as_read(backend: Backend, lock: LockInfo) -> bool:
    """Delete a lock object only if it still holds the bytes it was judged by: a holder
    that refreshed it meanwhile is alive again and keeps it. Whether it was deleted."""
    try:
        await backend.delete_if(lock.name, lock.raw)
    except (MissingObject, ObjectChanged):
        return False
    return True


class RepositoryLock:
    """`async with RepositoryLock(backend, exclusive=True, operation="prune"): ...`

    See the module docstring for the full contract. Not reentrant; one use per object."""

    def __init__(
        self,
        backend: Backend,
        *,
        exclusive: bool,
        operation: str,
        refresh_interval: float | None = None,
        stale_after: float | None = None,
        race_wait: float = RACE_WAIT,
        margin: float | None = None,
        wait: float = 0.0,
    ) -> None:
        # The module's values when not given, read now (a test child process lowers them).
        refresh_interval = REFRESH_INTERVAL if refresh_interval is None else refresh_interval
        stale_after = STALE_AFTER if stale_after is None else stale_after
        if refresh_interval <= 0 or stale_after <= refresh_interval:
            raise ValueError("need 0 < refresh_interval < stale_after")
        if margin is None:
            margin = min(MARGIN, (stale_after - refresh_interval) / 2)
        if not 0 < margin < stale_after - refresh_interval:
            raise ValueError("need 0 < margin < stale_after - refresh_interval")
        self.backend = backend
        self.exclusive = exclusive
        self.operation = operation
        self.refresh_interval = refresh_interval
        self.stale_after = stale_after
        self.race_wait = race_wait
        self.margin = margin
        self.wait = max(0.0, wait)
        self.name = f"{LOCKS_PREFIX}{secrets.token_hex(16)}"
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.created = _fmt(_now())
        self.removed_stale: list[LockInfo] = []
        self.lost = False
        self._written = b""  # the lock object as we last wrote it
        self._renewed = 0.0  # _lease_clock() when it was written
        self._renewing = asyncio.Lock()  # one compare-and-swap of our object at a time
        self._refresher: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._held = False

    def _record(self) -> bytes:
        return json.dumps(
            {
                "version": LOCK_VERSION,
                "exclusive": self.exclusive,
                "host": self.host,
                "pid": self.pid,
                "operation": self.operation,
                "created": self.created,
                "refreshed": _fmt(_now()),
            },
            indent=2,
        ).encode()

    def check(self) -> None:
        """Raise RepositoryLocked if the lock was lost, or its lease ran out, while held
        (see the module docstring); `confirm()` also renews it and sees a removal at once."""
        if self.lost:
            raise RepositoryLocked(
                f"the {self.operation} lock {self.name} was removed or replaced by someone "
                "else while held (it was judged stale): stopping before changing anything",
                hint="this process was paused or stalled for longer than the stale time, or "
                "someone ran 'dedupe unlock --all'; run it again",
            )
        held_for = _lease_clock() - self._renewed
        if held_for > self.stale_after - self.margin:
            raise RepositoryLocked(
                f"the {self.operation} lock {self.name} was last renewed {held_for:.0f} s ago, "
                f"and others may judge it stale after {self.stale_after:.0f} s: stopping "
                "before changing anything",
                hint="this process was paused or stalled for too long; run it again",
            )

    async def confirm(self) -> None:
        """Renew the lock now, by compare-and-swap, and raise as `check()` does if it is
        gone, changed or its lease ran out. Call it right before a commit or a deletion."""
        if not self._held:
            raise RuntimeError("this RepositoryLock is not held")
        await self._renew()
        self.check()

    async def _renew(self) -> None:
        """One compare-and-swap of our object with a new `refreshed` time. A vanished or
        changed object sets `lost` (and is left alone); other failures propagate."""
        async with self._renewing:
            if self.lost:
                return
            record = self._record()
            try:
                await self.backend.swap(self.name, record, self._written)
            except (MissingObject, ObjectChanged) as e:
                self.lost = True
                log.error("lock %s was removed or replaced while held: %s", self.name, e.message)
                return
            self._written, self._renewed = record, _lease_clock()

    async def _conflicts(self) -> list[LockInfo]:
        live = []
        for lock in await list_locks(self.backend):
            if lock.name == self.name:
                continue
            conflicting = self.exclusive or lock.exclusive
            reason = lock.stale_reason(self.stale_after)
            if reason is not None:
                # A stale lock we would conflict with is removed, not merely ignored: its
                # holder, stopped and not dead, must find it gone at its next confirm()
                # (a prune stopped past the stale time must not go on deleting beside the
                # backup that ignored its lock).
                if conflicting and await _delete_as_read(self.backend, lock):
                    log.warning("removed stale lock %s: %s", lock.name, reason)
                    self.removed_stale.append(lock)
                elif conflicting and await self.backend.exists(lock.name):
                    live.append(lock)  # refreshed since we read it: its holder is back
                continue
            if conflicting:
                live.append(lock)
        return live

    async def acquire(self) -> None:
        if self._held:
            raise RuntimeError("this RepositoryLock is already held")
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.wait
        pause = 0.5
        while True:
            try:
                await self._attempt()
                break
            except RepositoryLocked as e:
                left = give_up - loop.time()
                if left <= 0:
                    raise
                log.info("%s: trying again for up to %.0f s", e.message, left)
                await asyncio.sleep(min(left, random.uniform(pause / 2, pause)))
                pause = min(pause * 2, 10.0)
                self.created = _fmt(_now())
        self._held = True
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def _attempt(self) -> None:
        """Create our object, then look for conflicts; on one, delete it and raise."""
        record = self._record()
        await self.backend.create_new(self.name, record)
        self._written, self._renewed = record, _lease_clock()
        try:
            conflicts = await self._conflicts()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.race_wait
            # Tie-break between exclusive lockers: only wait for larger names (they will
            # give up if they saw us); any other conflict is final.
            while conflicts and all(self._racing(c) for c in conflicts):
                if loop.time() >= deadline:
                    break
                await asyncio.sleep(min(0.05, self.race_wait / 10))
                conflicts = await self._conflicts()
            if conflicts:
                raise self._locked_error(conflicts)
        except BaseException:
            await self._delete_own()
            raise

    def _racing(self, other: LockInfo) -> bool:
        """Whether `other` may be a racer that will give up for us: an exclusive lock with
        a larger name, created moments ago (an older one is an established holder, so we
        fail at once instead of waiting; misjudging either way stays safe)."""
        if not (self.exclusive and other.exclusive and other.name > self.name):
            return False
        created = (_now() - _parse_time(other.created)).total_seconds()
        return created < RACE_RECENT

    def _locked_error(self, conflicts: list[LockInfo]) -> RepositoryLocked:
        holder = conflicts[0]
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        want = "an exclusive" if self.exclusive else "a shared"
        return RepositoryLocked(
            f"cannot take {want} lock for {self.operation}: the repository holds a "
            f"{holder.describe()}{more}",
            hint="wait for that operation to finish and retry; if its process is gone, "
            f"the lock turns stale after {self.stale_after:.0f} s or can be removed with "
            "'dedupe unlock' ('dedupe unlock --all' only if no dedupe process is running)",
        )

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._stop.wait(), self.refresh_interval)
                return
            except TimeoutError:
                pass
            try:
                await self._renew()
            except Exception as e:  # a failed refresh is retried at the next tick
                log.warning("refreshing lock %s failed: %s", self.name, e)
            if self.lost:
                return

    async def _delete_own(self) -> None:
        # Shielded: a second cancellation must not leave the object behind.
        job = asyncio.ensure_future(self.backend.delete(self.name))
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            await asyncio.wait([job])
            raise
        except MissingObject:
            pass

    async def release(self) -> None:
        """Stop refreshing, then delete our object. The refresher is stopped by an event,
        not cancelled: a refresh put already running on a thread would otherwise land after
        the delete and bring the lock back."""
        if not self._held:
            return
        self._held = False
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            self._stop.set()
            try:
                await asyncio.shield(refresher)
            except asyncio.CancelledError:
                await asyncio.wait([refresher])
                await self._delete_own()
                raise
        await self._delete_own()

    async def __aenter__(self) -> RepositoryLock:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()
