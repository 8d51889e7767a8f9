"""Recovery objectives per source name, and where each source stands against them
(docs/OPERATIONS.md, "Disaster recovery").

An admin sets, per generation name, a recovery point objective (RPO: the newest
generation must be younger than it), a recovery time objective (RTO: a drill must restore
the newest generation within it) and how old the last drill may be. They live in the
keyring (docs/FORMAT.md 4.3.2), signed by an admin and refused when rolled back, like the
replica list. `status` reads every generation header once and says, per name, what is
met and what is not; the CLI turns that into an exit code for cron, Nagios-style checks
and systemd's OnFailure=.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import dedupe
from dedupe._types import Generation
from dedupe.engine import keys as key_ops
from dedupe.engine.commands import Command
from dedupe.engine.databases import postgres_restore_into, run_command
from dedupe.engine.forget import parse_created
from dedupe.errors import RollbackDetected
from dedupe.format.keyring import PolicyRecord
from dedupe.store.keyring import record_drills, seen_drills
from dedupe.store.locks import RepositoryLock
from dedupe.store.repository import utc_now

# The handle is named by module (`dedupe.api.Repository`): the annotations must resolve
# at run time (typing.get_type_hints), and dedupe.api, which imports this module lazily,
# is loaded by then.

log = logging.getLogger("dedupe")

CLOCK_SKEW = 300  # seconds a generation or drill may be dated ahead of this clock

DEFAULT_DRILL_MAX_AGE = 7 * 86400
_OBJECTIVE = re.compile(r"(\d+)([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

# What `dedupe status` exits with (docs/OPERATIONS.md): the worse finding wins.
STATUS_OK = 0
STATUS_DRILL = 71  # a drill failed, was slower than the RTO, is overdue or never ran
STATUS_RPO = 70  # a source's newest generation is older than its RPO (or there is none)


def parse_objective(text: str) -> int:
    """'90s', '15m', '1h', '2d', '1w' or sums like '1h30m' -> whole seconds (m is
    minutes here, as in a monitoring system; forget's durations have no minutes)."""
    s = text.strip().lower()
    if not s or _OBJECTIVE.sub("", s):
        raise ValueError(f"{text!r} is not a duration: use e.g. 90s, 15m, 1h, 2d, 1w or 1h30m")
    total = sum(int(n) * _SECONDS[u] for n, u in _OBJECTIVE.findall(s))
    if total <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return total


@dataclass(frozen=True)
class Policy:
    """The objectives of one source name, in seconds."""

    name: str
    rpo: int
    rto: int
    drill_max_age: int
    set: str

    @classmethod
    def of(cls, r: PolicyRecord) -> Policy:
        return cls(r.name, r.rpo_seconds, r.rto_seconds, r.drill_max_age_seconds, r.set)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rpo_seconds": self.rpo,
            "rto_seconds": self.rto,
            "drill_max_age_seconds": self.drill_max_age,
            "set": self.set,
        }


@dataclass(frozen=True)
class SourceStatus:
    """Where one source name stands. `problems` are (kind, text): kind "rpo" or "drill"."""

    name: str
    policy: Policy | None
    generations: int
    last_id: str | None
    last_created: str | None
    last_size: int | None
    age_seconds: float | None
    last_drill: DrillResult | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "policy": None if self.policy is None else self.policy.to_json(),
            "generations": self.generations,
            "last": None
            if self.last_id is None
            else {
                "id": self.last_id,
                "created": self.last_created,
                "size": self.last_size,
                "age_seconds": self.age_seconds,
            },
            "last_drill": None if self.last_drill is None else self.last_drill.to_json(),
            "rpo_met": None
            if self.policy is None
            else not any(kind == "rpo" for kind, _ in self.problems),
            "ok": self.ok,
            "problems": [{"kind": kind, "message": text} for kind, text in self.problems],
        }


@dataclass(frozen=True)
class StatusReport:
    checked: str
    sources: list[SourceStatus]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.sources)

    @property
    def exit_code(self) -> int:
        kinds = {kind for s in self.sources for kind, _ in s.problems}
        return STATUS_RPO if "rpo" in kinds else STATUS_DRILL if kinds else STATUS_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "sources": [s.to_json() for s in self.sources],
        }


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


class Objectives:
    """`repo.objectives`: set, remove and list the recovery objectives; `status`."""

    def __init__(self, repo: dedupe.api.Repository) -> None:
        self._repo = repo

    def list(self) -> list[Policy]:
        """The objectives in the keyring this handle has (refresh with `status`)."""
        return sorted((Policy.of(p) for p in self._repo._store.keyring.policies), key=_by_name)

    async def set(
        self, name: str, *, rpo: int, rto: int, drill_max_age: int | None = None
    ) -> Policy:
        """Set (or replace) the objectives of source `name`, in seconds: its newest
        generation younger than `rpo`, a drill of it done within `rto`, the last drill
        younger than `drill_max_age` (default 7 days). Admin key; exclusive lock."""
        record = PolicyRecord.from_record(
            {
                "name": name,
                "rpo_seconds": rpo,
                "rto_seconds": rto,
                "drill_max_age_seconds": DEFAULT_DRILL_MAX_AGE
                if drill_max_age is None
                else drill_max_age,
                "set": utc_now(),
            }
        )

        def replaced(current: tuple[PolicyRecord, ...]) -> tuple[PolicyRecord, ...]:
            return (*(p for p in current if p.name != name), record)

        await self._change("policy set", replaced)
        return Policy.of(record)

    async def remove(self, name: str) -> Policy:
        """Drop the objectives of `name` (its generations stay). Admin key."""
        found = [p for p in self._repo._store.keyring.policies if p.name == name]
        if not found:
            raise ValueError(f"no objectives are set for {name!r}")

        def without(current: tuple[PolicyRecord, ...]) -> tuple[PolicyRecord, ...]:
            return tuple(p for p in current if p.name != name)

        await self._change("policy remove", without)
        return Policy.of(found[0])

    async def _change(self, operation: str, change: Any) -> None:
        store = self._repo._store
        key_ops.require_admin(store, "change the recovery objectives")
        async with RepositoryLock(
            store.backend, exclusive=True, operation=operation, wait=store.lock_wait
        ) as lock:
            await key_ops.set_policies(store, change, lock.confirm)

    async def drill(
        self,
        targets: Iterable[str] = (),
        *,
        rto: float | None = None,
        into: str | os.PathLike[str] | None = None,
        into_db: str | None = None,
        check: Sequence[str] | None = None,
        keep: bool = False,
        record: bool = True,
    ) -> builtins.list[DrillResult]:
        """Restore each target (a generation id or NAME[@...]; by default the newest
        generation of every name with objectives), checking every chunk and the stream
        digest, and time it: into nothing (default), into a new directory under `into`,
        or into the new PostgreSQL database `into_db` (a logical generation). `check`
        then runs (argv; "{}" stands for the restored path or database): with neither
        target it reads the restored bytes on its standard input. The drill passes when
        all of that succeeds within `rto` seconds (default: the name's RTO; no objective:
        any time). What a drill restored is removed again unless `keep`. Each result is
        recorded in the repository (docs/FORMAT.md 15) unless `record` is false. A
        damaged generation or a failing check is a failed drill, not an error."""
        from dedupe.errors import DedupeError

        if into is not None and into_db is not None:
            raise ValueError("a drill restores into a directory or a database, not both")
        repo = self._repo
        repo._require("restore")
        store = repo._store
        await store.refresh_keys()
        policies = {p.name: Policy.of(p) for p in store.keyring.policies}
        wanted = list(targets) or [f"{name}@latest" for name in sorted(policies)]
        if not wanted:
            raise ValueError("nothing to drill: name a generation, or set objectives first")
        if into_db is not None and len(wanted) > 1:
            raise ValueError("a drill into a database restores one generation")
        results = []
        for target in wanted:
            gen = await repo.resolve(target)
            policy = policies.get(gen.name)
            limit = rto if rto is not None else None if policy is None else policy.rto
            started = utc_now()
            clock = time.monotonic()
            try:
                written = await self._restore_and_check(gen, into, into_db, check, keep)
            except DedupeError as e:
                seconds = time.monotonic() - clock
                result = DrillResult(gen.name, gen.id, started, seconds, 0, limit, False, e.message)
            else:
                seconds = time.monotonic() - clock
                slow = limit is not None and seconds > limit
                reason = (
                    f"took {seconds:.2f} s, longer than the RTO of {limit:g} s" if slow else None
                )
                result = DrillResult(
                    gen.name, gen.id, started, seconds, written, limit, not slow, reason
                )
            if record:
                await self._record(
                    result, "database" if into_db else "directory" if into else "null", check
                )
            results.append(result)
        return results

    async def _restore_and_check(
        self,
        gen: Generation,
        into: str | os.PathLike[str] | None,
        into_db: str | None,
        check: Sequence[str] | None,
        keep: bool,
    ) -> int:
        """Restore `gen` where the drill says and run its check; -> bytes restored."""
        repo = self._repo

        def checked(place: str) -> Command:
            assert check is not None
            return Command(tuple(a.replace("{}", place) for a in check))

        if into_db is not None:
            stats = await repo.restore_into_postgres(gen, into_db)
            try:
                if check:
                    await run_command(checked(into_db))
            finally:
                if not keep:
                    await run_command(postgres_restore_into(into_db)[2])
            return stats.bytes_written
        if into is not None:
            # A directory of its own, made here (never one that was there: it would be
            # removed after), named by the id alone: a name is a writer's choice.
            os.makedirs(into, exist_ok=True)
            own = tempfile.mkdtemp(prefix=f"drill-{gen.id[:12]}-", dir=os.fspath(into))
            place = os.path.join(own, "restored")
            try:
                stats = await repo.restore(gen, place)
                if check:
                    await run_command(checked(place))
            finally:
                if not keep:
                    shutil.rmtree(own, ignore_errors=True)
            return stats.bytes_written
        sink: Any = Command(tuple(check), discard_stdout=True) if check else _Discard()
        return (await repo.restore(gen, sink)).bytes_written

    async def _record(self, result: DrillResult, target: str, check: Sequence[str] | None) -> None:
        store = self._repo._store
        fields = {
            **result.to_json(),
            "target": target,
            "check": check[0] if check else None,
            # The keyring this drill was judged under: a status that meets a record of a
            # newer keyring than its own knows that keyring was rolled back (FORMAT.md 15).
            "keyring_serial": store.keyring.serial,
        }
        async with RepositoryLock(
            store.backend, exclusive=False, operation="drill", wait=store.lock_wait
        ) as lock:
            await lock.confirm()
            await store.write_drill(fields)

    async def drills(self, name: str | None = None) -> builtins.list[DrillResult]:
        """The drills recorded (of `name`, if given), oldest first. Records that are not
        authenticated or are malformed are left out (and logged)."""
        found = await self._repo._store.read_drills(log.warning)
        results = [DrillResult.of(r) for _n, r in found if name is None or r["name"] == name]
        return sorted(results, key=lambda d: parse_created(d.started))

    async def status(
        self, names: Iterable[str] = (), *, now: datetime | None = None
    ) -> StatusReport:
        """Per source name (the ones asked for; else every name with objectives or
        generations): its newest generation, its age, and the objectives it misses.
        A name with objectives and no generation misses its RPO. Fails closed: a
        generation or drill record dated in the future, a drill record that cannot be
        read, and the newest drill record this machine saw gone are problems too.
        RollbackDetected when a drill record was made under a newer keyring."""
        store = self._repo._store
        await store.refresh_keys()
        moment = now or datetime.now(UTC)
        policies = {p.name: Policy.of(p) for p in store.keyring.policies}
        gens = await self._repo.generations()
        unreadable: list[str] = []
        records = await store.read_drills(unreadable.append)
        for _obj, r in records:
            if (r.get("keyring_serial") or 0) > store.keyring.serial:
                raise RollbackDetected(
                    f"a drill record was made under keyring serial {r['keyring_serial']}, "
                    f"but the repository's keyring is at serial {store.keyring.serial}: an "
                    "older keyring was put back, with older objectives",
                    hint="find out who replaced keyring/1 and keyring/2",
                )
        by_name: dict[str, list[tuple[datetime, Any]]] = {}
        dated: dict[str, list[str]] = {}
        for g in gens:
            try:
                when = parse_created(g.created)
            except ValueError:
                dated.setdefault(g.name, []).append(f"generation {g.id[:12]} has no valid date")
                continue
            if (when - moment).total_seconds() > CLOCK_SKEW:
                dated.setdefault(g.name, []).append(
                    f"generation {g.id[:12]} is dated in the future ({g.created})"
                )
                continue
            by_name.setdefault(g.name, []).append((when, g))
        drills, drill_notes = self._newest_drills(records, gens, moment)
        wanted = list(names) or sorted(set(policies) | set(by_name) | set(dated))
        sources = []
        for name in wanted:
            mine = [g for _w, g in sorted(by_name.get(name, []), key=lambda x: x[0])]
            policy = policies.get(name)
            last = mine[-1] if mine else None
            age = None if last is None else (moment - parse_created(last.created)).total_seconds()
            problems: list[tuple[str, str]] = []
            if policy is not None:
                problems += [("rpo", text) for text in dated.get(name, [])]
                if last is None or age is None:
                    problems.append(("rpo", f"{name} has no generation (RPO {_human(policy.rpo)})"))
                elif age > policy.rpo:
                    problems.append(
                        (
                            "rpo",
                            f"the newest generation of {name} is {_human(age)} old, "
                            f"older than its RPO of {_human(policy.rpo)}",
                        )
                    )
            drill = drills.get(name)
            if policy is not None:
                problems += [("drill", text) for text in drill_notes.get(name, [])]
                problems += [("drill", text) for text in unreadable]
                problems += _drill_problems(name, policy, drill, moment)
            sources.append(
                SourceStatus(
                    name,
                    policy,
                    len(mine),
                    None if last is None else last.id,
                    None if last is None else last.created,
                    None if last is None else last.size,
                    age,
                    drill,
                    problems,
                )
            )
        return StatusReport(moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), sources)

    def _newest_drills(
        self, records: builtins.list[tuple[str, dict[str, Any]]], gens: Any, moment: datetime
    ) -> tuple[dict[str, DrillResult], dict[str, builtins.list[str]]]:
        """The newest drill of each name that is evidence (of a generation listed under
        that name, not dated in the future), and what the others say. The newest record
        of each name this machine saw before must still be there (prune keeps it): if it
        is gone and nothing newer replaced it, someone removed it."""
        store = self._repo._store
        names_of = {g.id: g.name for g in gens}
        notes: dict[str, builtins.list[str]] = {}
        newest: dict[str, tuple[datetime, str, DrillResult]] = {}
        # Records of a generation not listed under their name: history once their
        # generation was forgotten, unless one is newer than the evidence that is left
        # (then it may be the failed drill someone made look like another's).
        unlisted: builtins.list[tuple[str, datetime, str, str]] = []
        for obj, r in records:
            name, when = r["name"], parse_created(r["started"])
            if names_of.get(r["generation"]) != name:
                unlisted.append((name, when, obj, r["generation"]))
                continue
            if (when - moment).total_seconds() > CLOCK_SKEW:
                notes.setdefault(name, []).append(
                    f"drill record {obj} is dated in the future ({r['started']})"
                )
                continue
            if name not in newest or when > newest[name][0]:
                newest[name] = (when, obj, DrillResult.of(r))
        for name, when, obj, gen_id in unlisted:
            if name not in newest or when > newest[name][0]:
                notes.setdefault(name, []).append(
                    f"drill record {obj} is of {gen_id[:12]}, no generation of {name}: "
                    "it is no evidence"
                )
        seen = seen_drills(store.repository_id)
        present = {obj for obj, _r in records}
        remember = {
            name: f"{obj} {stamp}" for name, (_w, obj, d) in newest.items() for stamp in [d.started]
        }
        for name, entry in seen.items():
            obj, _sep, started = entry.partition(" ")
            try:
                before = parse_created(started)
            except ValueError:
                continue
            if obj in present or (name in newest and newest[name][0] > before):
                continue
            notes.setdefault(name, []).append(
                f"the newest drill record of {name} this machine saw ({obj}, started "
                f"{started}) is gone: removing it may have hidden a failed drill"
            )
            remember[name] = entry  # the evidence stays until a newer drill supersedes it
        record_drills(store.repository_id, remember)
        return {name: d for name, (_w, _o, d) in newest.items()}, notes


@dataclass(frozen=True)
class DrillResult:
    """One restore drill: the generation restored (every chunk and the whole-stream
    digest checked, the bytes discarded), how long it took, and the verdict against the
    RTO. `reason` says why a drill failed."""

    name: str
    generation: str
    started: str
    seconds: float
    bytes: int
    rto_seconds: float | None
    passed: bool
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def of(cls, r: dict[str, Any]) -> DrillResult:
        return cls(
            r["name"],
            r["generation"],
            r["started"],
            float(r["seconds"]),
            r["bytes"],
            r["rto_seconds"],
            r["passed"],
            r["reason"],
        )


def _drill_problems(
    name: str, policy: Policy, drill: DrillResult | None, moment: datetime
) -> builtins.list[tuple[str, str]]:
    """What the newest drill of `name` says against its objectives."""
    if drill is None:
        return [("drill", f"{name} has never been drilled")]
    problems = []
    if not drill.passed:
        problems.append(("drill", f"the last drill of {name} failed: {drill.reason}"))
    elif drill.seconds > policy.rto:
        problems.append(
            (
                "drill",
                f"the last drill of {name} took {drill.seconds:.1f} s, longer than its "
                f"RTO of {_human(policy.rto)}",
            )
        )
    age = (moment - parse_created(drill.started)).total_seconds()
    if age > policy.drill_max_age:
        problems.append(
            (
                "drill",
                f"the last drill of {name} is {_human(age)} old, older than "
                f"{_human(policy.drill_max_age)}",
            )
        )
    return problems


class _Discard:
    """A file object that keeps nothing: what a drill restores into."""

    def write(self, data: Any) -> int:
        return len(data)

    def flush(self) -> None:
        pass


def _by_name(p: Policy) -> str:
    return p.name
