"""Adversary review of recovery objectives (docs/FORMAT.md 4.3.2) and drill records
(section 15): can `status` be made to say OK (exit 0) when a source's RPO is missed, its
newest drill failed or no drill ran; can the objectives be changed or rolled back without
the admin key; can a drill record crash or mislead prune, verify or status; can a drill
do more than the operator asked.

Three attackers, as in tests/security/test_adversary.py:

- **write access to the repository, no key**: deletes, replays, copies, plants objects;
- **a writer key**: signs key maps of kinds 1-3, writes manifests whose headers it chooses;
- **a reader key**: signs key maps of kinds 4 and 5, so writes drill records it chooses.

Tests marked `accepted(...)` (xfail, strict) assert the secure outcome and fail today on
that assertion: each pins a finding of this review. Should one be fixed, it XPASSes,
which strict mode reports: remove the marker then. The others pin a defence that holds.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import PASSPHRASE, make_repo, manifest_header

import dedupe
from dedupe.crypto import KdfParams
from dedupe.engine.databases import POSTGRES_FORMAT, postgres_restore_into
from dedupe.engine.forget import parse_created
from dedupe.errors import DedupeError, IntegrityError, RoleNotPermitted, RollbackDetected
from dedupe.format.keymap import DRILL
from dedupe.hashing import object_id
from dedupe.objectives import STATUS_DRILL, STATUS_OK, STATUS_RPO
from dedupe.store.drills import DRILL_AAD, DRILL_MAGIC, DRILL_PREFIX, encode_drill
from dedupe.store.sealed import seal_record

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
FAR_FUTURE = "2099-01-01T00:00:00.000000Z"


def accepted(reason: str) -> pytest.MarkDecorator:
    """An attack the product accepts today (see the module docstring)."""
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)


# --- tools ------------------------------------------------------------------------------------


def stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def with_key(repo: dedupe.Repository, root: Path, role: str, name: str) -> dedupe.Repository:
    """A new key holder of `role`, opened with its own passphrase."""
    await repo.keys.add(f"{name} pw", role=role, name=name, kdf=KdfParams.weakest())
    return await dedupe.Repository.open(root, f"{name} pw")


async def orders(repo: dedupe.Repository, *, rpo: int = 3600, drill_age: int = 86400) -> str:
    """Objectives for "orders" and one generation of it; -> its id."""
    await repo.objectives.set("orders", rpo=rpo, rto=900, drill_max_age=drill_age)
    return (await repo.backup(io.BytesIO(os.urandom(20_000)), name="orders")).id


def record(gen_id: str, **fields: Any) -> dict[str, Any]:
    """A drill record's fields as a reader key may fill them in (FORMAT.md 15)."""
    return {
        "name": "orders",
        "generation": gen_id,
        "started": stamp(datetime.now(UTC)),
        "seconds": 1.0,
        "bytes": 20_000,
        "rto_seconds": 900,
        "passed": True,
        "reason": None,
        "target": "null",
        "check": None,
        **fields,
    }


async def write_raw_drill(store: Any, plain: bytes) -> str:
    """A drill record of exactly `plain` (no checks on it), sealed under a fresh key whose
    key map entry this key holder signs: what a reader key can store."""
    key = os.urandom(32)
    data = seal_record(DRILL_MAGIC, DRILL_AAD, key, plain)
    return str(await store._write_meta_record(DRILL, DRILL_PREFIX, key, data))


def keymap_files(root: Path) -> set[Path]:
    return {p for p in (root / "keymaps").rglob("*") if p.is_file()}


async def status_code(root: Path, passphrase: str = PASSPHRASE) -> int:
    async with await dedupe.Repository.open(root, passphrase) as repo:
        return (await repo.objectives.status()).exit_code


# =============================================================================================
# write access to the storage, no key
# =============================================================================================


def test_a_drill_record_copied_with_its_key_map_from_another_repository_is_no_evidence(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    """The attacker copies a passed drill of another repository (same source name) and
    the key map that vouches for it: the key map's signature covers its repository id and
    its signer is no key holder here, so the record is not authenticated."""

    async def go() -> None:
        async with await make_repo(tmp_path / "a") as a:
            await a.backup(io.BytesIO(b"x" * 5000), name="orders")
            before = keymap_files(tmp_path / "a")
            await a.objectives.drill(["orders@latest"])
            (km,) = keymap_files(tmp_path / "a") - before
        async with await make_repo(tmp_path / "b") as b:
            await orders(b)
            (rec,) = (tmp_path / "a" / "drills").iterdir()
            (tmp_path / "b" / "drills").mkdir(exist_ok=True)
            (tmp_path / "b" / "drills" / rec.name).write_bytes(rec.read_bytes())
            target = tmp_path / "b" / km.relative_to(tmp_path / "a")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(km.read_bytes())
        assert await status_code(tmp_path / "b") == STATUS_DRILL

    run_asyncio(go())


def test_a_drill_record_moved_or_cut_is_no_evidence(run_asyncio: Run[None], tmp_path: Path) -> None:
    """A failed drill's bytes stored under another id, or cut short (and renamed to match),
    are not authenticated: the failed drill stays the newest evidence, status stays 71."""

    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            await orders(repo)
            await repo.objectives.drill(rto=1e-9)  # fails
        (rec,) = (root / "drills").iterdir()
        data = rec.read_bytes()
        rec.rename(root / "drills" / ("0" * 64))
        (root / "drills" / object_id(data[:-16])).write_bytes(data[:-16])
        assert await status_code(root) == STATUS_DRILL

    run_asyncio(go())


@pytest.mark.parametrize(
    "how",
    [
        pytest.param("delete the record"),
        pytest.param("delete its key map"),
    ],
)
def test_hiding_the_newest_failed_drill_brings_back_an_older_pass(
    run_asyncio: Run[None], tmp_path: Path, how: str
) -> None:
    """Within its drill age, a passed drill and then a failed one: status is 71. The
    attacker removes the failed record (or the one key map the drill wrote for it): the
    passed one is the newest again and status says 0. Prune keeps the newest 30 records of
    every name, so the newest one vanishing is never legitimate."""

    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            await orders(repo)
            await repo.objectives.drill()
            records = set((root / "drills").iterdir())
            maps = keymap_files(root)
            (failed,) = await repo.objectives.drill(rto=1e-9)
            assert not failed.passed
            assert (await repo.objectives.status()).exit_code == STATUS_DRILL
        (rec,) = set((root / "drills").iterdir()) - records
        (km,) = keymap_files(root) - maps
        (rec if how == "delete the record" else km).unlink()
        assert await status_code(root) == STATUS_DRILL

    run_asyncio(go())


def test_objectives_edited_in_the_keyring_are_refused(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    """Loosening the RPO (or dropping the policy) in both keyring copies breaks the admin
    signature: the repository does not open, rather than using them."""

    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            await orders(repo)
        for copy in ("keyring/1", "keyring/2"):
            ring = json.loads((root / copy).read_text())
            ring["policies"][0]["rpo_seconds"] = 315_360_000
            (root / copy).write_text(json.dumps(ring))
        with pytest.raises(IntegrityError, match="signature"):
            await dedupe.Repository.open(root, PASSPHRASE)

    run_asyncio(go())


def test_an_older_keyring_without_the_objectives_is_refused_where_the_newer_was_seen(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            old = {c: (root / c).read_bytes() for c in ("keyring/1", "keyring/2")}
            await orders(repo, rpo=1)  # missed as soon as it is set
        for copy, raw in old.items():
            (root / copy).write_bytes(raw)
        with pytest.raises(RollbackDetected):
            await dedupe.Repository.open(root, PASSPHRASE)

    run_asyncio(go())


def test_an_older_keyring_on_a_fresh_monitoring_client_drops_the_objectives(
    run_asyncio: Run[None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            await repo.backup(io.BytesIO(b"y" * 5000), name="orders")
            old = {c: (root / c).read_bytes() for c in ("keyring/1", "keyring/2")}
            await repo.objectives.set("orders", rpo=1, rto=1, drill_max_age=1)
            await repo.objectives.drill()  # evidence, by the reader/admin, that they exist
        for copy, raw in old.items():
            (root / copy).write_bytes(raw)
        monkeypatch.setenv("DEDUPE_STATE_DIR", str(tmp_path / "monitoring-host"))
        try:
            code = await status_code(root)
        except DedupeError:
            return  # refusing is the secure outcome
        assert code != STATUS_OK

    run_asyncio(go())


def test_odd_files_planted_under_drills_neither_hang_nor_crash_status_verify_prune(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    """A FIFO, a sparse 4 GiB file, a file not named by an id, a directory, and garbage
    named by its hash: each is refused unread or as not authenticated. Status still says
    the source was never drilled; verify names them; prune runs."""

    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            await orders(repo)
        drills = root / "drills"
        drills.mkdir(exist_ok=True)
        os.mkfifo(drills / ("f" * 64))
        with open(drills / ("e" * 64), "wb") as f:
            f.truncate(4 << 30)
        (drills / "README").write_bytes(b"x")
        (drills / ("d" * 64)).mkdir()
        garbage = DRILL_MAGIC + b"[" * 100_000
        (drills / object_id(garbage)).write_bytes(garbage)
        async with await dedupe.Repository.open(root, PASSPHRASE) as repo:
            report = await repo.objectives.status()
            assert report.exit_code == STATUS_DRILL
            assert report.sources[0].problems[-1] == ("drill", "orders has never been drilled")
            assert not (await repo.verify()).ok
            await repo.prune()
        assert stat.S_ISFIFO(os.stat(drills / ("f" * 64)).st_mode)

    run_asyncio(go())


# =============================================================================================
# a writer key
# =============================================================================================


def test_a_writer_cannot_vouch_for_a_drill_record(run_asyncio: Run[None], tmp_path: Path) -> None:
    """The writer seals a passed drill under a key of its own and signs a kind 5 entry for
    it: its role may not sign that kind, so the whole key map is refused."""

    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            gen_id = await orders(repo)
            async with await with_key(repo, root, "writer", "w") as writer:
                store = writer._store
                key = os.urandom(32)
                data = encode_drill(key, record(gen_id))
                oid = bytes.fromhex(object_id(data))
                await store.keymaps.write([store.keymaps.meta_entry(DRILL, oid, key)])
                await store.backend.put(f"{DRILL_PREFIX}{oid.hex()}", data)
            assert (await repo.objectives.status()).exit_code == STATUS_DRILL

    run_asyncio(go())


def test_a_writer_reusing_a_real_drills_key_cannot_make_a_new_record(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    """Every key holder opens a drill record's key (meta_wrap). The writer seals a passed
    record under the key of a real failed one: the entry names the failed record's id, and
    the new bytes hash to another, so the new record is not authenticated."""

    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            gen_id = await orders(repo)
            await repo.objectives.drill(rto=1e-9)
            async with await with_key(repo, root, "writer", "w") as writer:
                store = writer._store
                (rec,) = (root / "drills").iterdir()
                oid = bytes.fromhex(rec.name)
                km = store.keymaps
                (key,) = km.meta_keys(await km.find(DRILL, oid, "it"), "the real drill")
                forged = encode_drill(key, record(gen_id, started=stamp(datetime.now(UTC))))
                await store.backend.put(f"{DRILL_PREFIX}{object_id(forged)}", forged)
            assert (await repo.objectives.status()).exit_code == STATUS_DRILL

    run_asyncio(go())


async def _writer_generation(
    repo: dedupe.Repository, root: Path, name: str, created: str, **source: Any
) -> str:
    """A generation (an empty stream) with the header a writer chooses."""
    async with await with_key(repo, root, "writer", "w") as writer:
        header = manifest_header(
            name, created=created, source={"type": "stream", "label": "x", **source}
        )
        digest = writer._store.hasher.stream_digest().hexdigest()  # of the empty stream
        meta = {"type": "stream", "digest": digest, "chunk_count": 0, "delta": None}
        return str(await writer._store.write_manifest(header, meta, b""))


def test_a_future_dated_generation_keeps_the_rpo_met(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            gen_id = await orders(repo, drill_age=10 * 365 * 86400)
            await repo.objectives.drill()
            (gen,) = await repo.generations("orders")
            await _writer_generation(repo, root, "orders", FAR_FUTURE)
            # The real backups stopped a day ago.
            later = parse_created(gen.created) + timedelta(days=1)
            report = await repo.objectives.status(now=later)
            # The future-dated one is no evidence: the real newest is judged, and the
            # future date is a problem of its own.
            assert report.sources[0].last_id == gen_id
            assert report.exit_code == STATUS_RPO, report.to_json()
            assert any("dated in the future" in t for _k, t in report.sources[0].problems)

    run_asyncio(go())


def test_a_generation_with_a_malformed_created_does_not_crash_status(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            await orders(repo)
            await _writer_generation(repo, root, "orders", "zz not a time")
            try:
                report = await repo.objectives.status()
            except ValueError as e:
                raise AssertionError(f"status crashed: {e!r}") from None
            assert report.exit_code == STATUS_RPO

    run_asyncio(go())


@accepted(
    "any writer key's generation of the name counts for the RPO (by design today): the "
    "source's own host may have stopped backing up while another key keeps it green"
)
def test_another_writers_generation_under_the_name_meets_the_rpo(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            async with await with_key(repo, root, "writer", "db-host") as host:
                await host.backup(io.BytesIO(os.urandom(5000)), name="orders")
            await repo.objectives.set("orders", rpo=3600, rto=900)
            await repo.objectives.drill()
            (real,) = await repo.generations("orders")
            # The database host stops. A day later another writer key (a laptop's, a
            # CI runner's) stores something as "orders", honestly dated.
            day_later = parse_created(real.created) + timedelta(days=1)
            await _writer_generation(repo, root, "orders", stamp(day_later))
            report = await repo.objectives.status(now=day_later + timedelta(minutes=10))
            assert report.exit_code == STATUS_RPO  # would need the author pinned

    run_asyncio(go())


def test_a_drill_into_a_directory_stays_inside_it(run_asyncio: Run[None], tmp_path: Path) -> None:
    """The path is `into/drill-<name>-<id12>`: a name `x/../../escaped` resolves through
    `into/drill-x`, which must exist (an earlier --keep drill of a tree left it, or another
    local user made it in a shared `into` such as /tmp)."""

    async def go() -> None:
        root = tmp_path / "repo"
        into = tmp_path / "drills" / "here"
        (into / "drill-x").mkdir(parents=True)
        async with await make_repo(root) as repo:
            now = stamp(datetime.now(UTC))
            gen_id = await _writer_generation(repo, root, "x/../../escaped", now)
            (result,) = await repo.objectives.drill([gen_id], into=into, keep=True)
        outside = [p for p in tmp_path.rglob("*escaped*") if not p.resolve().is_relative_to(into)]
        assert outside == [], (result, outside)

    run_asyncio(go())


# =============================================================================================
# a reader key
# =============================================================================================


def test_a_reader_cannot_change_the_objectives(run_asyncio: Run[None], tmp_path: Path) -> None:
    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            await orders(repo)
            async with await with_key(repo, root, "reader", "r") as reader:
                with pytest.raises(RoleNotPermitted):
                    await reader.objectives.set("orders", rpo=10**8, rto=10**8)
                with pytest.raises(RoleNotPermitted):
                    await reader.objectives.remove("orders")
            assert [p.rpo for p in repo.objectives.list()] == [3600]

    run_asyncio(go())


def test_a_readers_drill_counts_and_its_key_map_may_vouch_for_nothing_else(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    """Drills are a reader's to record (FORMAT.md 4.4): its passed drill counts (a reader
    key is trusted to attest restores: one that records a drill it never ran cannot be
    told from a real one; section 11 does not say so). A key map mixing a drill entry with
    a generation entry is refused whole: the failed record it vouched for is not taken."""

    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            gen_id = await orders(repo)
            async with await with_key(repo, root, "reader", "r") as reader:
                (real,) = await reader.objectives.drill()
                assert real.passed
                store = reader._store
                km = store.keymaps
                key = os.urandom(32)
                data = encode_drill(key, record(gen_id, passed=False, reason="forged"))
                oid = bytes.fromhex(object_id(data))
                gen_entry = km.generation_entry(
                    bytes.fromhex(gen_id), os.urandom(32), os.urandom(32)
                )
                await km.write([km.meta_entry(DRILL, oid, key), gen_entry])
                await store.backend.put(f"{DRILL_PREFIX}{oid.hex()}", data)
            # Not taken as a drill; but a record that cannot be read may hide a failed
            # drill, so status fails closed and names it.
            async with await dedupe.Repository.open(root, PASSPHRASE) as admin:
                report = await admin.objectives.status()
            assert report.exit_code == STATUS_DRILL
            assert report.sources[0].last_drill == real
            assert any(oid.hex() in text for _k, text in report.sources[0].problems)

    run_asyncio(go())


def test_a_drill_dated_in_the_future_does_not_hide_later_failures(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            gen_id = await orders(repo)
            async with await with_key(repo, root, "reader", "r") as reader:
                await reader._store.write_drill(record(gen_id, started=FAR_FUTURE))
            (failed,) = await repo.objectives.drill(rto=1e-9)
            assert not failed.passed
            assert (await repo.objectives.status()).exit_code == STATUS_DRILL

    run_asyncio(go())


@pytest.mark.parametrize(
    "which",
    [
        pytest.param("another name's generation"),
        pytest.param("no such generation"),
        pytest.param(
            "an older generation",
            marks=accepted(
                "by design: a drill proves the restore path of the source, the drill age "
                "bounds how stale that proof may be; requiring a drill of the newest "
                "generation would fail every status after each backup"
            ),
        ),
    ],
)
def test_a_drill_counts_only_for_the_newest_generation_of_its_name(
    run_asyncio: Run[None], tmp_path: Path, which: str
) -> None:
    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            old_id = await orders(repo)
            other = (await repo.backup(io.BytesIO(b"z" * 3000), name="other")).id
            new_id = (await repo.backup(io.BytesIO(os.urandom(9000)), name="orders")).id
            assert new_id != old_id
            gen = {
                "another name's generation": other,
                "no such generation": "ab" * 32,
                "an older generation": old_id,
            }[which]
            async with await with_key(repo, root, "reader", "r") as reader:
                await reader._store.write_drill(record(gen))
            assert (await repo.objectives.status()).exit_code == STATUS_DRILL

    run_asyncio(go())


MALFORMED = {
    "started not a time": {"started": "zz"},
    "seconds NaN": {"seconds": float("nan")},
    "seconds Infinity": {"seconds": float("inf")},
    "seconds a bool": {"seconds": True},
    "rto_seconds NaN": {"rto_seconds": float("nan")},
    "bytes negative": {"bytes": -1},
    "deep nesting": {"extra": "DEEP"},
}


def _plain(fields: dict[str, Any]) -> bytes:
    text = json.dumps({"version": 1, **fields}, sort_keys=True, separators=(",", ":"))
    return text.replace('"DEEP"', "[" * 50_000 + "]" * 50_000).encode()


@pytest.mark.parametrize(
    "case",
    [pytest.param(c) for c in MALFORMED],
)
def test_a_malformed_drill_record_is_refused_and_crashes_nothing(
    run_asyncio: Run[None], tmp_path: Path, case: str
) -> None:
    """A reader key seals a record that breaks FORMAT.md 15's types: it must be refused
    like a damaged one (named by verify, no evidence for status), and status, verify and
    prune must still run; status --json must stay valid JSON."""

    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            gen_id = await orders(repo)
            async with await with_key(repo, root, "reader", "r") as reader:
                await write_raw_drill(reader._store, _plain(record(gen_id, **MALFORMED[case])))
            outcome: dict[str, Any] = {}
            for step, call in (
                ("status", repo.objectives.status),
                ("verify", repo.verify),
                ("prune", repo.prune),
            ):
                try:
                    result = await call()
                except (ValueError, RecursionError, TypeError) as e:
                    outcome[step] = f"crashed: {type(e).__name__}"
                    continue
                if step == "status":
                    json.loads(json.dumps(result.to_json()), parse_constant=_no_constants)
                    outcome[step] = result.exit_code
                elif step == "verify":
                    outcome[step] = [d.kind for d in result.damaged]
            assert outcome == {"status": STATUS_DRILL, "verify": ["drill"]}, outcome

    run_asyncio(go())


def _no_constants(name: str) -> Any:
    raise AssertionError(f"status JSON holds {name}, which strict JSON parsers refuse")


def test_a_drill_record_with_a_bad_started_does_not_stop_prune(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            gen_id = await orders(repo)
            async with await with_key(repo, root, "reader", "r") as reader:
                store = reader._store
                for _ in range(30):
                    await store.write_drill(record(gen_id))
                await write_raw_drill(store, _plain(record(gen_id, started="")))
            try:
                await repo.prune()
            except ValueError as e:
                raise AssertionError(f"prune crashed: {e!r}") from None

    run_asyncio(go())


# =============================================================================================
# what a drill runs, and what it leaves behind
# =============================================================================================


@pytest.mark.parametrize("name", ["dbname=production", "postgresql://db.example/production"])
def test_a_drill_database_name_is_a_name_not_a_connection_string(name: str) -> None:
    try:
        create, fill, drop = postgres_restore_into(name)
    except ValueError:
        return
    assert fill.argv[fill.argv.index("-d") + 1] == create.argv[-1] == drop.argv[-1]
    assert "=" not in name and "://" not in name, fill.argv


def test_a_drill_database_name_starting_with_a_dash_is_refused() -> None:
    with pytest.raises(ValueError):
        postgres_restore_into("--maintenance-db=production")


def _fake_postgres(bin_dir: Path, log: Path, createdb_fails: bool) -> None:
    bin_dir.mkdir()
    for prog, body in (
        ("createdb", "exit 1" if createdb_fails else "exit 0"),
        ("pg_restore", "cat >/dev/null; exit 0"),
        ("dropdb", "exit 0"),
    ):
        script = bin_dir / prog
        script.write_text(f'#!/bin/sh\necho "{prog} $*" >> {log}\n{body}\n')
        script.chmod(0o755)


@pytest.mark.parametrize("createdb_fails", [False, True], ids=["check fails", "db exists"])
def test_a_failed_database_drill_drops_what_it_made_and_only_that(
    run_asyncio: Run[None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, createdb_fails: bool
) -> None:
    """createdb, pg_restore and dropdb are stand-ins that log their arguments. A drill
    whose check fails drops the database it created; one whose createdb fails (the
    database exists: the operator's) drops nothing. Either is a failed drill."""
    log = tmp_path / "log"
    _fake_postgres(tmp_path / "bin", log, createdb_fails)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")

    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            await repo.objectives.set("orders", rpo=3600, rto=900)
            source = {"engine": "postgresql", "format": POSTGRES_FORMAT}
            gen_id = await _writer_generation(
                repo, root, "orders", stamp(datetime.now(UTC)), **source
            )
            (result,) = await repo.objectives.drill(
                [gen_id], into_db="drill_db", check=[sys.executable, "-c", "raise SystemExit(3)"]
            )
            assert not result.passed
            expected = "createdb" if createdb_fails else "exited with status 3"
            assert expected in (result.reason or ""), result
        calls = log.read_text().splitlines()
        if createdb_fails:
            assert calls == ["createdb --no-password drill_db"]
        else:
            assert calls[0] == "createdb --no-password drill_db"
            assert calls[-1] == "dropdb --no-password --if-exists drill_db"

    run_asyncio(go())


def test_a_check_gets_the_place_as_one_argument_and_no_shell(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    """'{}' is replaced inside one argv element: a place with spaces and shell syntax stays
    one argument and nothing interprets it. (An operator who writes `sh -c '... {}'` hands
    the place, which holds the generation's name, to a shell: see the report.)"""

    async def go() -> None:
        root = tmp_path / "repo"
        into = tmp_path / "a dir; touch pwned"
        async with await make_repo(root) as repo:
            await orders(repo)
            probe = (
                "import sys, os; "
                "sys.exit(0 if len(sys.argv) == 2 and os.path.isfile(sys.argv[1]) else 9)"
            )
            (result,) = await repo.objectives.drill(
                into=into, check=[sys.executable, "-c", probe, "{}"]
            )
            assert result.passed, result
        assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
        assert list(into.iterdir()) == []  # removed again

    run_asyncio(go())


@pytest.mark.parametrize("failure", ["check fails", "generation damaged"])
def test_a_failed_directory_drill_leaves_nothing_behind(
    run_asyncio: Run[None], tmp_path: Path, failure: str
) -> None:
    async def go() -> None:
        root = tmp_path / "repo"
        into = tmp_path / "drills"
        async with await make_repo(root) as repo:
            await orders(repo)
            check = None
            if failure == "check fails":
                check = [sys.executable, "-c", "raise SystemExit(1)", "{}"]
            else:
                for pack in (root / "packs").rglob("*"):
                    if pack.is_file():
                        data = bytearray(pack.read_bytes())
                        data[len(data) // 2] ^= 1
                        pack.write_bytes(bytes(data))
            (result,) = await repo.objectives.drill(into=into, check=check)
            assert not result.passed
            expected = "exited with status 1" if check else "does not authenticate"
            assert expected in (result.reason or ""), result
        assert list(into.iterdir()) == []

    run_asyncio(go())


def test_a_directory_drill_never_removes_what_it_did_not_create(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    async def go() -> None:
        root = tmp_path / "repo"
        into = tmp_path / "drills"
        async with await make_repo(root) as repo:
            gen_id = await orders(repo)
            place = into / f"drill-orders-{gen_id[:12]}"
            place.mkdir(parents=True)
            (place / "precious").write_bytes(b"the operator's")
            (result,) = await repo.objectives.drill(into=into)
        assert (place / "precious").exists(), result

    run_asyncio(go())
