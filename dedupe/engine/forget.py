"""Forget: choose which generations to drop, following pgBackRest's retention rules, and
delete their manifests. Data goes away later, with prune.

The choice is a pure function, `plan_forget(generations, policy, now)`, over the
generations' headers; `run_forget` applies it under the exclusive repository lock.

Dependencies. A generation depends on its `parent` (an incremental on the generation it
was taken against, a differential on its full), and transitively on the parent's chain
up to a full. The rules:

- keep_last N: per name, the N newest generations (any kind) and everything they depend on.
- keep_full N: per name, the N newest fulls and every generation that depends on them.
- keep_within D: per name, the generations created within D before `now`, and everything
  they depend on.
- keep_daily / keep_weekly / keep_monthly / keep_yearly N (restic's rules): per name, for
  the N most recent days (ISO weeks, months, years; in UTC) that have generations, the
  newest generation of each, and everything it depends on.
- With any keep_* option, a generation of a name in scope that no rule keeps is removed;
  generations of other names (with `name` given) are never touched by the policy.
- Explicit ids are removed. A generation is never removed while a kept generation depends
  on it: asking for that raises ValueError, unless `with_dependents` is set, in which case
  the dependents are removed too (and listed, with the reason).
- No keep_* option and no id: ValueError. Nothing is ever removed by default.

Crash safety: manifests are deleted dependents first (children before their parents),
so an interrupted forget never leaves a generation whose parent is gone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from dedupe._types import Generation
from dedupe.errors import (
    AmbiguousGeneration,
    DedupeError,
    GenerationNotFound,
    MissingObject,
)
from dedupe.store import RepositoryStore
from dedupe.store.locks import RepositoryLock

_DURATION = re.compile(r"(\d+)([hdwy])")
_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
_UNITS["y"] = timedelta(days=365)


def parse_duration(text: str) -> timedelta:
    """'30d', '12h', '2w', '1y', or sums like '1w3d'. Raises ValueError otherwise."""
    s = text.strip().lower()
    if not s or _DURATION.sub("", s):
        raise ValueError(f"{text!r} is not a duration: use e.g. 12h, 30d, 2w, 1y or 1w3d")
    total = sum((int(n) * _UNITS[u] for n, u in _DURATION.findall(s)), timedelta())
    if total <= timedelta():
        raise ValueError(f"duration {text!r} must be positive")
    return total


class DependentsBlock(ValueError):
    """A generation named for removal has dependents that were not named. The message ends
    with the API's way out; the command line says its own (--with-dependents)."""


# restic's calendar rules: the period a generation falls in, by its creation time (UTC).
def _week(t: datetime) -> str:
    year, week, _day = t.isocalendar()
    return f"{year:04d}-W{week:02d}"


CALENDAR: dict[str, Callable[[datetime], str]] = {
    "keep_daily": lambda t: t.strftime("%Y-%m-%d"),
    "keep_weekly": _week,
    "keep_monthly": lambda t: t.strftime("%Y-%m"),
    "keep_yearly": lambda t: t.strftime("%Y"),
}


@dataclass(frozen=True)
class ForgetPolicy:
    """What to keep (per source name) and what to remove. See the module docstring."""

    name: str | None = None
    keep_last: int | None = None
    keep_full: int | None = None
    keep_within: timedelta | None = None
    ids: tuple[str, ...] = ()
    with_dependents: bool = False
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None

    def __post_init__(self) -> None:
        for opt in ("keep_last", "keep_full", *CALENDAR):
            v = getattr(self, opt)
            if v is not None and v < 1:
                raise ValueError(f"{opt} must be at least 1")
        if self.keep_within is not None and self.keep_within <= timedelta():
            raise ValueError("keep_within must be positive")

    @property
    def has_keep_rules(self) -> bool:
        rules = (self.keep_last, self.keep_full, self.keep_within)
        return any(v is not None for v in rules) or any(
            getattr(self, opt) is not None for opt in CALENDAR
        )


@dataclass(frozen=True)
class ForgetDecision:
    generation: Generation
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        g = self.generation
        return {
            "id": g.id,
            "name": g.name,
            "kind": g.kind,
            "parent": g.parent,
            "created": g.created,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class ForgetReport:
    """Kept and removed generations (in scope), oldest first, each with its reasons.
    With `dry_run`, nothing was deleted: `removed` is what would have been."""

    kept: list[ForgetDecision] = field(default_factory=list)
    removed: list[ForgetDecision] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "kept": [d.to_dict() for d in self.kept],
            "removed": [d.to_dict() for d in self.removed],
        }


def _short(gen_id: str) -> str:
    return gen_id[:12]


def _order(g: Generation) -> tuple[str, str]:
    return (g.created, g.id)


def parse_created(s: str) -> datetime:
    t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def resolve_ids(generations: Sequence[Generation], specs: Iterable[str]) -> list[str]:
    """Full ids for ids or unique id prefixes (at least 4 hex digits)."""
    ids = [g.id for g in generations]
    out = []
    for spec in specs:
        spec = spec.lower()
        if spec in ids:
            out.append(spec)
            continue
        matches = [i for i in ids if i.startswith(spec)] if len(spec) >= 4 else []
        if not matches:
            raise GenerationNotFound(
                f"no generation id starts with {spec!r}",
                hint="give an id or a unique prefix of at least 4 hex digits; list them "
                "with 'dedupe generations'",
            )
        if len(matches) > 1:
            raise AmbiguousGeneration(
                f"{len(matches)} generations start with {spec}", hint="give more digits"
            )
        out.append(matches[0])
    return out


def plan_forget(
    generations: Sequence[Generation], policy: ForgetPolicy, now: datetime | None = None
) -> ForgetReport:
    """Decide, without I/O, which generations the policy keeps and which it removes.

    Returns every generation in scope (of `policy.name`, or all) as kept or removed, with
    reasons; generations explicitly named by id are in scope whatever their name.
    Raises ValueError for an empty policy, or when an explicitly removed generation is
    needed by a kept one and `with_dependents` is not set."""
    if not policy.has_keep_rules and not policy.ids:
        raise ValueError(
            "no retention policy given: use keep_last / keep_full / keep_within / "
            "keep_daily / keep_weekly / keep_monthly / keep_yearly or name generation ids "
            "(nothing is forgotten by default)"
        )
    now = now or datetime.now(UTC)
    by_id = {g.id: g for g in generations}
    children: dict[str, list[str]] = {}
    for g in generations:
        if g.parent is not None and g.parent in by_id:
            children.setdefault(g.parent, []).append(g.id)

    def ancestors(gid: str) -> list[str]:
        out: list[str] = []
        parent = by_id[gid].parent
        while parent is not None and parent in by_id and parent not in out:
            out.append(parent)
            parent = by_id[parent].parent
        return out

    def descendants(gid: str) -> list[str]:
        out: list[str] = []
        todo = list(children.get(gid, ()))
        while todo:
            c = todo.pop()
            if c not in out:
                out.append(c)
                todo.extend(children.get(c, ()))
        return out

    explicit = resolve_ids(generations, policy.ids)
    in_scope = [g for g in generations if policy.name is None or g.name == policy.name]
    scope_ids = {g.id for g in in_scope} | set(explicit)

    keep: dict[str, list[str]] = {}  # id -> reasons it is kept
    remove: dict[str, list[str]] = {}  # id -> reasons it is removed

    def mark_keep(gid: str, reason: str) -> None:
        keep.setdefault(gid, []).append(reason)

    if policy.has_keep_rules:
        names = sorted({g.name for g in in_scope})
        for name in names:
            gens = sorted((g for g in in_scope if g.name == name), key=_order)
            if policy.keep_last is not None:
                for g in gens[-policy.keep_last :]:
                    mark_keep(g.id, f"keep-last {policy.keep_last}")
            if policy.keep_full is not None:
                fulls = [g for g in gens if g.kind == "full"][-policy.keep_full :]
                for g in fulls:
                    mark_keep(g.id, f"keep-full {policy.keep_full}")
                    for d in descendants(g.id):
                        mark_keep(d, f"depends on kept full {_short(g.id)}")
            if policy.keep_within is not None:
                since = now - policy.keep_within
                for g in gens:
                    if parse_created(g.created) >= since:
                        mark_keep(g.id, f"keep-within {_fmt_delta(policy.keep_within)}")
            for opt, period_of in CALENDAR.items():
                n = getattr(policy, opt)
                if n is None:
                    continue
                periods: set[str] = set()
                for g in reversed(gens):  # newest first: the newest of each period
                    period = period_of(parse_created(g.created))
                    if period not in periods and len(periods) < n:
                        periods.add(period)
                        mark_keep(g.id, f"{opt.replace('_', '-')} {n} ({period})")
        # Everything a kept generation depends on is kept (its chain up to the full).
        for gid in list(keep):
            for a in ancestors(gid):
                mark_keep(a, f"needed by {_short(gid)}")
        for g in in_scope:
            if g.id not in keep:
                remove[g.id] = ["matched no keep rule"]
    else:
        for g in in_scope:
            mark_keep(g.id, "not named")

    for gid in explicit:
        remove.setdefault(gid, []).append("named for removal")
        blocked = [d for d in descendants(gid) if d not in remove and d not in explicit]
        if blocked and not policy.with_dependents:
            deps = ", ".join(f"{by_id[d].kind} {_short(d)}" for d in blocked)
            raise DependentsBlock(
                f"generation {_short(gid)} cannot be removed alone: {deps} "
                f"{'depends' if len(blocked) == 1 else 'depend'} on it; name them too, or "
                "remove them with it (with_dependents=True)"
            )
        for d in descendants(gid):
            remove.setdefault(d, []).append(f"depends on removed {_short(gid)}")
            scope_ids.add(d)
    for gid in remove:
        keep.pop(gid, None)

    # The invariant everything above exists for: no kept generation loses its chain.
    for gid in keep:
        for a in ancestors(gid):
            assert a not in remove, f"bug: kept {gid} would lose {a}"

    ordered = sorted((by_id[i] for i in scope_ids), key=_order)
    return ForgetReport(
        kept=[
            ForgetDecision(g, tuple(keep.get(g.id, ["other name"])))
            for g in ordered
            if g.id not in remove
        ],
        removed=[ForgetDecision(g, tuple(remove[g.id])) for g in ordered if g.id in remove],
    )


def _fmt_delta(d: timedelta) -> str:
    if d.days and not d.seconds:
        return f"{d.days}d"
    return f"{int(d.total_seconds() // 3600)}h"


def removal_order(removed: Sequence[Generation]) -> list[Generation]:
    """Dependents before the generations they depend on (deepest first), so that a crash
    between deletions never leaves a generation without its parent."""
    ids = {g.id: g for g in removed}

    def depth(g: Generation) -> int:
        n, parent = 0, g.parent
        while parent is not None and parent in ids:
            n += 1
            parent = ids[parent].parent
        return n

    return sorted(removed, key=lambda g: (-depth(g), g.created, g.id))


async def list_generations(store: RepositoryStore) -> list[Generation]:
    """Every authenticated generation; one that is not is left out and reported, never
    considered (it is no generation of this repository's keys)."""
    gens = []
    for _gen_id, header in await store.generation_headers():
        if isinstance(header, GenerationNotFound):
            continue
        if isinstance(header, DedupeError):
            store.report(f"{header.message}; it is not considered")
            continue
        gens.append(Generation.from_header(header))
    return sorted(gens, key=_order)


async def run_forget(
    store: RepositoryStore,
    policy: ForgetPolicy,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
) -> ForgetReport:
    """Apply `policy` under the exclusive lock: delete the removed generations' manifests
    (dependents first). With `dry_run` no lock is taken and nothing is deleted."""
    if dry_run:
        report = plan_forget(await list_generations(store), policy, now)
        return ForgetReport(report.kept, report.removed, dry_run=True)
    async with RepositoryLock(
        store.backend, exclusive=True, operation="forget", wait=store.lock_wait
    ) as held:
        report = plan_forget(await list_generations(store), policy, now)
        for g in removal_order([d.generation for d in report.removed]):
            # A forget stopped past the stale time may have a backup beside it now whose
            # parent is this generation.
            await held.confirm()
            try:
                await store.backend.delete(f"generations/{g.id}")
            except MissingObject:  # removed meanwhile by an interrupted earlier run
                pass
    return report
