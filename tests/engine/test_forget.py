"""Forget: the pure retention policy on synthetic chains (pgBackRest's rules), and the API
and command on real repositories (only manifests go; the lock is taken)."""

from __future__ import annotations

import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import dedupe_cli, make_repo

from dedupe._types import Generation
from dedupe.engine.forget import (
    ForgetPolicy,
    parse_duration,
    plan_forget,
    removal_order,
)
from dedupe.errors import RepositoryLocked
from dedupe.store.locks import RepositoryLock

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def gen(
    gid: str,
    kind: str = "full",
    parent: str | None = None,
    *,
    name: str = "db",
    days_ago: float = 0.0,
) -> Generation:
    created = (NOW - timedelta(days=days_ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return Generation(gid, name, kind, parent, created, 0, 0, 0, 0, 0, 0.0, {})


def chains() -> list[Generation]:
    """db: F1 <- I1 <- I2, F2 <- D1, F2 <- I3 <- I4 (days 10..4); web: W1 <- W2."""
    return [
        gen("f1", days_ago=10),
        gen("i1", "incremental", "f1", days_ago=9),
        gen("i2", "incremental", "i1", days_ago=8),
        gen("f2", days_ago=7),
        gen("d1", "differential", "f2", days_ago=6),
        gen("i3", "incremental", "d1", days_ago=5),
        gen("i4", "incremental", "i3", days_ago=4),
        gen("w1", name="web", days_ago=3),
        gen("w2", "incremental", "w1", name="web", days_ago=2),
    ]


def plan(**kw: object) -> tuple[list[str], list[str]]:
    report = plan_forget(chains(), ForgetPolicy(**kw), NOW)  # type: ignore[arg-type]
    return [d.generation.id for d in report.kept], [d.generation.id for d in report.removed]


def test_no_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="no retention policy"):
        plan()
    with pytest.raises(ValueError):
        ForgetPolicy(keep_last=0)
    with pytest.raises(ValueError):
        ForgetPolicy(keep_within=timedelta(0))


def test_keep_last_keeps_the_chain_it_needs() -> None:
    kept, removed = plan(keep_last=1)
    # db: i4 needs i3 <- d1 <- f2; web: w2 needs w1.
    assert kept == ["f2", "d1", "i3", "i4", "w1", "w2"]
    assert removed == ["f1", "i1", "i2"]
    report = plan_forget(chains(), ForgetPolicy(keep_last=1), NOW)
    reasons = {d.generation.id: d.reasons for d in report.kept}
    assert reasons["i4"] == ("keep-last 1",)
    assert reasons["f2"] == ("needed by i4",)
    assert plan(keep_last=3, name="db") == (["f2", "d1", "i3", "i4"], ["f1", "i1", "i2"])


def test_keep_last_never_orphans() -> None:
    # keep_last=5 of db keeps i2 (5th newest), so i1 and f1 stay too.
    kept, removed = plan(keep_last=5, name="db")
    assert removed == []
    kept, removed = plan(keep_last=4, name="db")
    assert removed == ["f1", "i1", "i2"]


def test_keep_full_keeps_dependents_and_expires_with_the_full() -> None:
    kept, removed = plan(keep_full=1)
    assert kept == ["f2", "d1", "i3", "i4", "w1", "w2"]
    assert removed == ["f1", "i1", "i2"]  # expiring a full expires its dependents
    assert plan(keep_full=2)[1] == []
    kept, removed = plan(keep_full=1, name="web")
    assert removed == [] and kept == ["w1", "w2"]  # other names are out of scope


def test_keep_within() -> None:
    kept, removed = plan(keep_within=timedelta(days=4, hours=12), name="db")
    assert kept == ["f2", "d1", "i3", "i4"]  # i4 is 4 days old and needs its chain
    assert removed == ["f1", "i1", "i2"]
    kept, removed = plan(keep_within=timedelta(days=8, hours=12), name="db")
    assert removed == []  # i2 within: i1 and f1 needed
    kept, removed = plan(keep_within=timedelta(days=1))
    assert kept == [] and len(removed) == 9


def test_rules_combine_as_a_union() -> None:
    kept, removed = plan(keep_last=1, keep_within=timedelta(days=8, hours=12), name="db")
    assert removed == []
    kept, removed = plan(keep_full=1, keep_last=1)
    assert removed == ["f1", "i1", "i2"]


def test_explicit_ids_and_dependents() -> None:
    kept, removed = plan(ids=("i4",))
    assert removed == ["i4"] and "i3" in kept
    # A parent that a kept generation needs is refused alone ...
    with pytest.raises(ValueError, match="cannot be removed alone.*incremental i4"):
        plan(ids=("i3",))
    with pytest.raises(ValueError, match="differential d1"):
        plan(ids=("f2",))
    # ... allowed together with its dependents, or with with_dependents.
    assert plan(ids=("i3", "i4"))[1] == ["i3", "i4"]
    kept, removed = plan(ids=("f2",), with_dependents=True)
    assert removed == ["f2", "d1", "i3", "i4"]
    report = plan_forget(chains(), ForgetPolicy(ids=("f2",), with_dependents=True), NOW)
    assert {d.generation.id: d.reasons for d in report.removed}["i4"] == ("depends on removed f2",)
    # A kept-by-rule generation still loses to an explicit removal of its parent only with
    # with_dependents.
    with pytest.raises(ValueError):
        plan(keep_last=1, ids=("d1",))
    kept, removed = plan(keep_last=1, name="db", ids=("d1",), with_dependents=True)
    assert removed == ["f1", "i1", "i2", "d1", "i3", "i4"]
    assert kept == ["f2"]


def test_ids_accept_unique_prefixes() -> None:
    from dedupe.errors import AmbiguousGeneration, GenerationNotFound

    gens = [gen("abcd1234"), gen("abcd5678"), gen("ef01")]
    report = plan_forget(gens, ForgetPolicy(ids=("abcd5",)), NOW)
    assert [d.generation.id for d in report.removed] == ["abcd5678"]
    with pytest.raises(AmbiguousGeneration):
        plan_forget(gens, ForgetPolicy(ids=("abcd",)), NOW)
    with pytest.raises(GenerationNotFound):
        plan_forget(gens, ForgetPolicy(ids=("abc",)), NOW)  # too short for a prefix
    with pytest.raises(GenerationNotFound):
        plan_forget(gens, ForgetPolicy(ids=("ffff",)), NOW)


def test_removal_order_is_dependents_first() -> None:
    order = [g.id for g in removal_order(chains()[:7])]
    assert order.index("i4") < order.index("i3") < order.index("d1") < order.index("f2")
    assert order.index("i2") < order.index("i1") < order.index("f1")


def test_parse_duration() -> None:
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("2w") == timedelta(weeks=2)
    assert parse_duration("1w3d") == timedelta(days=10)
    assert parse_duration("1y") == timedelta(days=365)
    for bad in ("", "30", "d", "3x", "0d", "-1d"):
        with pytest.raises(ValueError):
            parse_duration(bad)


# --- on a real repository ---------------------------------------------------------------------


def test_forget_deletes_only_the_right_manifests(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            data = {}
            for _ in range(4):
                for name in ("a", "b"):
                    payload = os.urandom(20_000)
                    s = await repo.backup(io.BytesIO(payload), name=name, kind="full")
                    data[s.id] = payload
            before = await repo.generations()
            packs_before = sorted(await repo._store.backend.list("packs/"))
            index_before = sorted(await repo._store.backend.list("index/"))

            dry = await repo.forget(keep_last=2, name="a", dry_run=True)
            assert dry.dry_run and len(dry.removed) == 2 and len(dry.kept) == 2
            assert await repo.generations() == before  # nothing deleted

            report = await repo.forget(keep_last=2, name="a")
            a_gens = [g for g in before if g.name == "a"]
            assert [d.generation.id for d in report.removed] == [g.id for g in a_gens[:2]]
            after = await repo.generations()
            assert [g.id for g in after] == [g.id for g in before if g not in a_gens[:2]]
            # Only manifests: packs and index objects are prune's business.
            assert sorted(await repo._store.backend.list("packs/")) == packs_before
            assert sorted(await repo._store.backend.list("index/")) == index_before
            assert await repo._store.backend.list("locks/") == []
            for g in after:
                out = io.BytesIO()
                await repo.restore(g.id, out)
                assert out.getvalue() == data[g.id]

            b_last = [g for g in after if g.name == "b"][-1]
            report = await repo.forget(ids=[b_last.id[:10]])
            assert [d.generation.id for d in report.removed] == [b_last.id]

            with pytest.raises(ValueError):
                await repo.forget()
            # Under someone else's lock forget refuses and deletes nothing.
            async with RepositoryLock(repo._store.backend, exclusive=False, operation="backup"):
                with pytest.raises(RepositoryLocked):
                    await repo.forget(keep_last=1)
            assert len(await repo.generations()) == 5

    run(go())


def test_forget_command(repo_path: Path, cli_env: dict[str, str], run_asyncio) -> None:  # type: ignore[no-untyped-def]
    async def setup() -> None:
        async with await make_repo(repo_path) as repo:
            for _ in range(3):
                await repo.backup(io.BytesIO(os.urandom(10_000)), name="db", kind="full")

    run_asyncio(setup())
    r = dedupe_cli("forget", env=cli_env)
    assert r.returncode == 2 and b"nothing is forgotten by default" in r.stderr
    r = dedupe_cli("forget", "--keep-within", "3x", env=cli_env)
    assert r.returncode == 2
    r = dedupe_cli("forget", "--keep-last", "1", "--dry-run", "--json", env=cli_env, check=True)
    out = json.loads(r.stdout)
    assert out["dry_run"] and len(out["removed"]) == 2 and len(out["kept"]) == 1
    r = dedupe_cli("forget", "--keep-last", "1", env=cli_env, check=True)
    assert b"removed 2 generations, kept 1" in r.stdout
    r = dedupe_cli("generations", "--json", env=cli_env, check=True)
    assert len(json.loads(r.stdout)) == 1


def _at(gid: str, when: str, kind: str = "full", parent: str | None = None) -> Generation:
    return Generation(gid, "db", kind, parent, when, 0, 0, 0, 0, 0, 0.0, {})


CALENDAR_GENS = [
    _at("y2024", "2024-06-01T10:00:00.000000Z"),
    _at("m-sep", "2026-09-15T10:00:00.000000Z"),
    _at("m-oct-a", "2026-10-01T10:00:00.000000Z"),
    _at("m-oct-b", "2026-10-20T10:00:00.000000Z"),
    _at("d29-a", "2026-11-29T01:00:00.000000Z"),  # ISO week 48 (a Sunday)
    _at("d29-b", "2026-11-29T23:00:00.000000Z"),
    _at("d30", "2026-11-30T12:00:00.000000Z", "incremental", "d29-b"),  # week 49 (Monday)
]


@pytest.mark.parametrize(
    ("rule", "n", "kept"),
    [
        ("keep_daily", 1, {"d30", "d29-b"}),  # the newest day's newest, and its parent
        ("keep_daily", 2, {"d30", "d29-b"}),  # day 29: its newest only (d29-b)
        ("keep_daily", 3, {"d30", "d29-b", "m-oct-b"}),
        ("keep_weekly", 2, {"d30", "d29-b"}),  # week 49: d30; week 48: d29-b
        ("keep_weekly", 3, {"d30", "d29-b", "m-oct-b"}),
        ("keep_monthly", 2, {"d30", "d29-b", "m-oct-b"}),
        ("keep_monthly", 4, {"d30", "d29-b", "m-oct-b", "m-sep", "y2024"}),
        ("keep_yearly", 1, {"d30", "d29-b"}),
        ("keep_yearly", 5, {"d30", "d29-b", "y2024"}),
    ],
)
def test_restic_calendar_rules(rule: str, n: int, kept: set[str]) -> None:
    """For the N latest periods that have generations, the newest of each (restic's
    rules, by UTC creation time), plus the chain it depends on."""
    report = plan_forget(CALENDAR_GENS, ForgetPolicy(**{rule: n}), NOW)  # type: ignore[arg-type]
    assert {d.generation.id for d in report.kept} == kept
    assert {d.generation.id for d in report.removed} == {g.id for g in CALENDAR_GENS} - kept
    with pytest.raises(ValueError):
        ForgetPolicy(**{rule: 0})  # type: ignore[arg-type]


def test_calendar_rules_from_the_command(run, repo_path: Path, cli_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            for _ in range(3):  # three fulls today: keep-daily 1 keeps the newest
                await repo.backup(io.BytesIO(os.urandom(20_000)), name="db", kind="full")

    run(go())
    r = dedupe_cli("forget", "--keep-daily", "1", "--json", env=cli_env)
    assert r.returncode == 0, r.stderr.decode()
    report = json.loads(r.stdout)
    assert len(report["kept"]) == 1 and len(report["removed"]) == 2
    assert "keep-daily 1" in report["kept"][0]["reasons"][0]
