"""Recovery objectives per source (issue 16): set by an admin in the signed keyring, and
`status` measuring each source's newest generation against its RPO."""

from __future__ import annotations

import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo

from dedupe import Repository
from dedupe.crypto import KdfParams
from dedupe.engine.forget import parse_created
from dedupe.errors import RoleNotPermitted
from dedupe.hashing import object_id
from dedupe.objectives import STATUS_DRILL, STATUS_OK, STATUS_RPO, parse_objective


def test_objective_durations() -> None:
    assert parse_objective("15m") == 900
    assert parse_objective("1h30m") == 5400
    assert parse_objective("2d") == 2 * 86400
    assert parse_objective("90s") == 90
    for bad in ("", "15", "1x", "0m", "-1h"):
        with pytest.raises(ValueError):
            parse_objective(bad)


def test_status_flips_when_the_newest_generation_is_older_than_the_rpo(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """The same repository judged at two moments: 30 minutes after the backup an RPO of
    one hour is met, two hours after it is missed (exit 70); a name with objectives and
    no generation misses its RPO; a name without objectives is shown, never failed."""

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            await repo.objectives.set("orders", rpo=3600, rto=900)
            await repo.objectives.set("ghost", rpo=3600, rto=900, drill_max_age=86400)
            stats = await repo.backup(io.BytesIO(b"day one" * 1000), name="orders")
            await repo.backup(io.BytesIO(b"scratch" * 100), name="free")
            await repo.objectives.drill(["orders@latest"])
            (gen,) = await repo.generations("orders")
            at = parse_created(gen.created)

            soon = await repo.objectives.status(["orders"], now=at + timedelta(minutes=30))
            (orders,) = soon.sources
            assert orders.ok and orders.last_id == stats.id and soon.exit_code == STATUS_OK
            assert orders.age_seconds == pytest.approx(1800)

            late = await repo.objectives.status(now=at + timedelta(hours=2))
            by = {s.name: s for s in late.sources}
            assert set(by) == {"orders", "ghost", "free"}
            assert [k for k, _ in by["orders"].problems] == ["rpo"]
            assert "older than its RPO of 1.0h" in by["orders"].problems[0][1]
            assert [k for k, _ in by["ghost"].problems] == ["rpo", "drill"]
            assert by["free"].ok and by["free"].policy is None
            assert late.exit_code == STATUS_RPO and not late.ok
            assert json.loads(json.dumps(late.to_json()))["sources"][1]["rpo_met"] is False

    run_asyncio(go())


def test_objectives_are_an_admins_and_live_in_the_signed_keyring(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """They survive a reopen (read from the keyring under the admin's signature); a
    writer may read them but not set or remove them; setting again replaces."""

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            await repo.objectives.set("orders", rpo=3600, rto=900)
            await repo.objectives.set("orders", rpo=7200, rto=600)
            await repo.keys.add("writer pass", role="writer", name="w", kdf=KdfParams.weakest())
        ring = json.loads((tmp_path / "repo" / "keyring" / "1").read_text())
        assert [p["rpo_seconds"] for p in ring["policies"]] == [7200]
        async with await Repository.open(tmp_path / "repo", "writer pass") as writer:
            assert [(p.name, p.rpo, p.rto) for p in writer.objectives.list()] == [
                ("orders", 7200, 600)
            ]
            with pytest.raises(RoleNotPermitted):
                await writer.objectives.set("orders", rpo=60, rto=60)
            with pytest.raises(RoleNotPermitted):
                await writer.objectives.remove("orders")
        async with await Repository.open(tmp_path / "repo", PASSPHRASE) as repo:
            await repo.objectives.remove("orders")
            assert repo.objectives.list() == []
            with pytest.raises(ValueError, match="no objectives"):
                await repo.objectives.remove("orders")

    run_asyncio(go())


def test_a_drill_restores_checks_and_times_and_fails_what_it_cannot_meet(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """A drill of the newest generation of each name with objectives restores every byte
    (counted), passes within its RTO, fails against an RTO it cannot meet, and a drill of
    a generation whose pack is gone fails with the reason instead of raising."""
    data = os.urandom(3 << 20)

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            await repo.objectives.set("orders", rpo=3600, rto=3600)
            stats = await repo.backup(io.BytesIO(data), name="orders")
            (ok,) = await repo.objectives.drill()
            assert ok.passed and ok.generation == stats.id and ok.bytes == len(data)
            assert ok.rto_seconds == 3600 and ok.seconds > 0 and ok.reason is None
            (slow,) = await repo.objectives.drill(["orders@latest"], rto=1e-9)
            assert not slow.passed and "longer than the RTO" in (slow.reason or "")
            for pack in (tmp_path / "repo" / "packs").rglob("*"):
                if pack.is_file():
                    pack.unlink()
            (broken,) = await repo.objectives.drill()
            assert not broken.passed and broken.bytes == 0 and "missing" in (broken.reason or "")

    run_asyncio(go())


def test_status_shows_the_last_drill_and_fails_on_a_failed_or_old_one(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """A failed drill flips status to exit 71 (the RPO is met); so does a passed drill
    once older than its limit; a reopened handle sees the recorded drills; a drill record
    planted without a key map entry (a storage attacker's "passed") is no evidence."""

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            await repo.objectives.set("orders", rpo=86400, rto=3600, drill_max_age=3600)
            await repo.backup(io.BytesIO(os.urandom(200_000)), name="orders")
            (good,) = await repo.objectives.drill()
            assert (await repo.objectives.status()).exit_code == STATUS_OK
            (bad,) = await repo.objectives.drill(rto=1e-9)
            report = await repo.objectives.status()
            (orders,) = report.sources
            assert report.exit_code == STATUS_DRILL and orders.last_drill == bad
            assert "the last drill of orders failed: took" in orders.problems[0][1]
            await repo.objectives.drill()
            later = parse_created(good.started) + timedelta(hours=2)
            old = await repo.objectives.status(now=later)
            assert (
                old.exit_code == STATUS_DRILL and "older than 1.0h" in old.sources[0].problems[0][1]
            )
        # A record altered and stored under the name its new bytes hash to: no key map
        # entry names it, so it is not read as a drill.
        drills = tmp_path / "repo" / "drills"
        real = sorted(drills.iterdir())[0].read_bytes()
        forged = real[:-1] + bytes([real[-1] ^ 1])
        (drills / object_id(forged)).write_bytes(forged)
        async with await Repository.open(tmp_path / "repo", PASSPHRASE) as repo:
            recorded = await repo.objectives.drills("orders")
            assert [d.passed for d in recorded] == [True, False, True]
            assert all(d.generation == recorded[0].generation for d in recorded)

    run_asyncio(go())


def test_a_drill_record_without_its_key_map_entry_is_no_evidence(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """Copied into another repository (or written by someone without its keys), a passed
    drill record is not authenticated there: status still says the source was never
    drilled, and names the record it refused (failing closed: an unreadable record may
    be a failed drill someone damaged)."""

    async def go() -> None:
        async with await make_repo(tmp_path / "a") as a:
            await a.backup(io.BytesIO(b"x" * 5000), name="orders")
            await a.objectives.drill(["orders@latest"])
        async with await make_repo(tmp_path / "b") as b:
            await b.objectives.set("orders", rpo=3600, rto=60)
            await b.backup(io.BytesIO(b"x" * 5000), name="orders")
            (record,) = (tmp_path / "a" / "drills").iterdir()
            (tmp_path / "b" / "drills").mkdir(exist_ok=True)
            (tmp_path / "b" / "drills" / record.name).write_bytes(record.read_bytes())
            report = await b.objectives.status()
            assert report.exit_code == STATUS_DRILL
            problems = [text for _kind, text in report.sources[0].problems]
            assert "orders has never been drilled" in problems
            assert any(record.name in text for text in problems)  # named, not taken

    run_asyncio(go())


def test_prune_keeps_drill_records_within_their_keeping_and_verify_names_forged_ones(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """Prune keeps every drill record younger than 90 days and the newest 30 of each
    name (their key map entries survive its consolidation: they are still read), and
    deletes the rest; verify names a drill record no key map vouches for."""

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            await repo.backup(io.BytesIO(os.urandom(50_000)), name="orders")
            (gen,) = await repo.generations("orders")
            store = repo._store
            old = datetime.now(UTC) - timedelta(days=200)
            for n in range(33):  # 33 old drills and a new one: the 4 oldest go
                started = (old + timedelta(hours=n)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                record = {
                    "name": "orders",
                    "generation": gen.id,
                    "started": started,
                    "seconds": 1.0,
                    "bytes": 50_000,
                    "rto_seconds": None,
                    "passed": True,
                    "reason": None,
                    "target": "null",
                    "check": None,
                }
                await store.write_drill(record)
            await repo.objectives.drill(["orders@latest"])  # a recent one stays anyway
            await repo.prune()
            kept = await repo.objectives.drills("orders")
            assert len(kept) == 30
            assert kept[0].started == (old + timedelta(hours=4)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            assert (await repo.verify()).ok
            real = sorted((tmp_path / "repo" / "drills").iterdir())[0].read_bytes()
            forged = real[:-1] + bytes([real[-1] ^ 1])
            (tmp_path / "repo" / "drills" / object_id(forged)).write_bytes(forged)
            report = await repo.verify()
            assert not report.ok
            assert [d.kind for d in report.damaged] == ["drill"]

    run_asyncio(go())
