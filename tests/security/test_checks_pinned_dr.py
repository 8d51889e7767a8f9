"""Pins found by a mutation audit of the disaster-recovery code (docs/FORMAT.md 15,
docs/OPERATIONS.md "Disaster recovery"): drill records, `status`, prune's keeping of drill
records, what this machine remembers, database names and tablespaces, the restore of a
physical PostgreSQL generation into a data directory, the tar chunker, and the metrics and
alert rules monitoring reads. Each test below holds one check that a
deliberately weakened copy of the product code (the check deleted, its condition negated,
a bound moved by one) got past the rest of the suite with; its docstring names the check.

As in tests/security/test_drill_adversary.py, the attacker is often a reader key, which
may seal any drill record it likes: only such a record reaches the checks behind the
signature.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from conftest import PASSPHRASE, make_repo
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import dedupe
from dedupe.chunking import DEFAULT_PARAMS, Chunker, gear_table
from dedupe.chunking.tarcut import TarChunker, looks_like_tar
from dedupe.crypto import KdfParams
from dedupe.engine.commands import Command
from dedupe.engine.databases import (
    BASEBACKUP_FORMAT,
    BASEBACKUP_TARS,
    _tablespaces,
    postgres_restore_into,
    tablespace_map,
)
from dedupe.engine.forget import parse_created
from dedupe.errors import (
    IntegrityError,
    RollbackDetected,
    TargetError,
    UnsupportedFormat,
)
from dedupe.format.keymap import DRILL
from dedupe.hashing import object_id
from dedupe.metrics import status_metrics
from dedupe.objectives import STATUS_DRILL, STATUS_OK, STATUS_RPO
from dedupe.store.drills import (
    DRILL_AAD,
    DRILL_MAGIC,
    DRILL_PREFIX,
    KEEP_DRILLS,
    decode_drill,
)
from dedupe.store.sealed import seal_record

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent.parent
Run = Callable[[Coroutine[Any, Any, T]], T]


def stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record(gen_id: str, **fields: Any) -> dict[str, Any]:
    """A drill record's fields (FORMAT.md 15), as a reader key may fill them in."""
    return {
        "version": 1,
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
        "keyring_serial": 1,
        **fields,
    }


def sealed(plain: bytes) -> tuple[bytes, str, bytes]:
    """(key, name, bytes) of a drill record of exactly `plain`, sealed as a reader key
    can seal it."""
    key = os.urandom(32)
    data = seal_record(DRILL_MAGIC, DRILL_AAD, key, plain)
    return key, f"{DRILL_PREFIX}{object_id(data)}", data


def plain_of(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


async def with_key(repo: dedupe.Repository, root: Path, role: str, name: str) -> dedupe.Repository:
    await repo.keys.add(f"{name} pw", role=role, name=name, kdf=KdfParams.weakest())
    return await dedupe.Repository.open(root, f"{name} pw")


async def orders(repo: dedupe.Repository, *, drill_age: int = 86400) -> str:
    """Objectives for "orders" and one full generation of it; -> its id."""
    await repo.objectives.set("orders", rpo=3600, rto=900, drill_max_age=drill_age)
    stats = await repo.backup(io.BytesIO(os.urandom(20_000)), name="orders", kind="full")
    return stats.id


async def write_raw_drill(store: Any, plain: bytes) -> str:
    """A drill record of exactly `plain`, with the key map entry this key holder signs."""
    key, _name, data = sealed(plain)
    return str(await store._write_meta_record(DRILL, DRILL_PREFIX, key, data))


# =============================================================================================
# drill records: every field of FORMAT.md 15 checked (store/drills.py _checked, decode_drill)
# =============================================================================================

GEN = "ab" * 32
NOW_LONG = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0" * 18 + "+00:00"
REFUSED: dict[str, dict[str, Any]] = {
    "name empty": {"name": ""},
    "name not printable": {"name": "orders\x1b[2J"},
    "name of 256 characters": {"name": "o" * 256},
    "generation in upper case": {"generation": GEN.upper()},
    "generation of 62 digits": {"generation": GEN[:62]},
    "started longer than 40": {"started": NOW_LONG},
    "seconds negative": {"seconds": -1.0},
    "bytes a fraction": {"bytes": 1.5},
    "bytes a string": {"bytes": "20000"},
    "rto_seconds zero": {"rto_seconds": 0},
    "rto_seconds a string": {"rto_seconds": "900"},
    "rto_seconds a bool": {"rto_seconds": True},
    "passed a string": {"passed": "yes"},
    "target unknown": {"target": "tape"},
    "reason of 4097 characters": {"reason": "x" * 4097},
    "reason not text": {"reason": 5},
    "check a list": {"check": ["rm"]},
    "keyring_serial negative": {"keyring_serial": -1},
    "keyring_serial a string": {"keyring_serial": "7"},
}


# Numbers JSON reads as infinite without naming a constant (parse_constant sees nothing),
# and a constant where nothing else would look (FORMAT.md 15: NaN and Infinity are not JSON).
REFUSED_TEXT = {
    "seconds 1e999": ('"seconds":1.0', '"seconds":1e999'),
    "rto_seconds 1e999": ('"rto_seconds":900', '"rto_seconds":1e999'),
    "NaN in a field of its own": ('"version":1}', '"version":1,"x":NaN}'),
}


@pytest.mark.parametrize("case", [*REFUSED, *REFUSED_TEXT])
def test_a_drill_record_breaking_a_field_rule_is_refused_as_malformed(case: str) -> None:
    """_checked: each field of the type and range FORMAT.md 15 gives it (finite numbers:
    1e999 reads as infinity). A record breaking one is IntegrityError (not taken, named
    by verify), never accepted and never a TypeError downstream (a string compared with a
    number)."""
    if case in REFUSED:
        plain = plain_of(record(GEN, **REFUSED[case]))
    else:
        old, new = REFUSED_TEXT[case]
        assert old in plain_of(record(GEN)).decode()
        plain = plain_of(record(GEN)).decode().replace(old, new).encode()
    key, name, data = sealed(plain)
    with pytest.raises(IntegrityError, match="malformed"):
        decode_drill(key, name, data)


def test_the_field_bounds_are_inclusive_where_the_spec_says() -> None:
    """The other side of the bounds above: a name of 255, a reason of 4096
    characters, a started of 40, seconds and bytes 0 and serial 0 are a valid record."""
    fields = record(
        GEN,
        name="o" * 255,
        reason="x" * 4096,
        started=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0" * 8 + "+00:00",
        seconds=0,
        bytes=0,
        keyring_serial=0,
    )
    assert len(fields["started"]) == 40
    key, name, data = sealed(plain_of(fields))
    assert decode_drill(key, name, data)["name"] == "o" * 255


@pytest.mark.parametrize("plain", [b"[1, 2]", b'"a drill"', b"7"], ids=["list", "string", "number"])
def test_a_drill_record_that_is_not_an_object_is_refused(plain: bytes) -> None:
    """decode_drill: the JSON must be an object (a list has no .get: an AttributeError
    would stop status, verify and prune)."""
    key, name, data = sealed(plain)
    with pytest.raises(IntegrityError, match="not an object"):
        decode_drill(key, name, data)


def test_a_drill_record_of_another_version_is_unsupported() -> None:
    """decode_drill: version 2 is not read as version 1 (its fields may mean otherwise)."""
    key, name, data = sealed(plain_of(record(GEN, version=2)))
    with pytest.raises(UnsupportedFormat):
        decode_drill(key, name, data)


def test_decode_keeps_the_keyring_serial() -> None:
    """decode_drill returns the serial the record carries: status refuses a keyring older
    than the one a drill was judged under only if it sees the serial."""
    key, name, data = sealed(plain_of(record(GEN, keyring_serial=42)))
    assert decode_drill(key, name, data)["keyring_serial"] == 42


def test_prune_leaves_a_drill_record_it_cannot_read(run_asyncio: Run[None], tmp_path: Path) -> None:
    """_drop_old_drills judges only the records it reads: one that is malformed (a reader
    key sealed it) or that no key map vouches for stays for verify to name. Deleting it
    would let a storage attacker's damage pass for housekeeping."""

    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            gen_id = await orders(repo)
            async with await with_key(repo, root, "reader", "r") as reader:
                bad = record(gen_id, seconds=-1.0)
                malformed = await write_raw_drill(reader._store, plain_of(bad))
            _key, unvouched, data = sealed(plain_of(record(gen_id)))
            (root / unvouched).write_bytes(data)
            await repo.prune()
            assert (root / malformed).exists() and (root / unvouched).exists()
            assert sorted(d.kind for d in (await repo.verify()).damaged) == ["drill", "drill"]

    run_asyncio(go())


# =============================================================================================
# a physical generation restored into a data directory (api.py restore_into_datadir)
# =============================================================================================


async def not_a_tar(repo: dedupe.Repository) -> str:
    """A generation that says it is a pg_basebackup tar of a cluster with a tablespace
    and is not one: its unpack fails, as a damaged or cut off one would."""
    info = {"engine": "postgresql", "format": BASEBACKUP_FORMAT, "tablespaces": {"16384": "/ts"}}
    source = Command((sys.executable, "-c", "print('not a tar')"), info=info)
    return (await repo.backup(source, name="pg")).id


def test_a_data_directory_that_is_not_empty_is_refused_and_left_as_it_was(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    """restore_into_datadir: a data directory that exists must be empty. Unpacking into
    the operator's files and then, when the unpack fails, emptying the directory again
    would delete them."""

    async def go() -> None:
        datadir = tmp_path / "data"
        datadir.mkdir()
        (datadir / "precious").write_bytes(b"the operator's")
        async with await make_repo(tmp_path / "repo") as repo:
            gen_id = await not_a_tar(repo)
            with pytest.raises(TargetError, match="not an empty directory"):
                await repo.restore_into_datadir(gen_id, datadir)
        assert (datadir / "precious").read_bytes() == b"the operator's"

    run_asyncio(go())


@pytest.mark.parametrize("given", [False, True], ids=["made by the restore", "given empty"])
def test_a_failed_unpack_removes_what_it_made_and_only_that(
    run_asyncio: Run[None], tmp_path: Path, given: bool
) -> None:
    """_remove_made: a data directory (and a tablespace's place) the restore made goes
    again; an empty one the operator gave stays; what is beside them is untouched."""

    async def go() -> None:
        parent = tmp_path / "pg"
        parent.mkdir()
        (parent / "other").write_bytes(b"untouched")
        datadir = parent / "data"
        space = parent / "ts" if given else parent / "data_tablespaces" / "16384"
        if given:
            datadir.mkdir()
            space.mkdir()
        async with await make_repo(tmp_path / "repo") as repo:
            gen_id = await not_a_tar(repo)
            with pytest.raises(TargetError, match="tar"):
                await repo.restore_into_datadir(
                    gen_id, datadir, tablespaces={"16384": str(space)} if given else None
                )
        if given:
            assert list(datadir.iterdir()) == list(space.iterdir()) == []
        else:
            assert not datadir.exists() and not space.exists()
        assert (parent / "other").read_bytes() == b"untouched"

    run_asyncio(go())


# =============================================================================================
# what this machine remembers (store/keyring.py): the keyring serial and the newest drills
# =============================================================================================


def keymap_files(root: Path) -> set[Path]:
    return {p for p in (root / "keymaps").rglob("*") if p.is_file()}


async def passed_then_failed(repo: dedupe.Repository, root: Path) -> Path:
    """A passed drill, then a failed one that status has seen; -> the failed record."""
    await repo.objectives.drill()
    records = set((root / "drills").iterdir())
    (failed,) = await repo.objectives.drill(rto=1e-9)
    assert not failed.passed
    assert (await repo.objectives.status()).exit_code == STATUS_DRILL
    (rec,) = set((root / "drills").iterdir()) - records
    return rec


def test_a_keyring_change_keeps_the_newest_drill_this_machine_saw(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    """check_and_record_serial rewrites the state file with the new serial and keeps its
    other keys: dropping "newest_drills" there would let the newest failed drill vanish
    unnoticed after any keyring change (a policy set, a key added)."""

    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            await orders(repo)
            failed = await passed_then_failed(repo, root)
            await repo.objectives.set("orders", rpo=7200, rto=900, drill_max_age=86400)
        failed.unlink()
        async with await dedupe.Repository.open(root, PASSPHRASE) as repo:
            report = await repo.objectives.status()
        assert report.exit_code == STATUS_DRILL, report.to_json()
        assert any("is gone" in text for _k, text in report.sources[0].problems)

    run_asyncio(go())


def test_recording_the_newest_drills_keeps_the_keyring_serial(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    """record_drills rewrites the state file with the newest drills and keeps the serial:
    dropping "keyring_serial" there would let an older keyring be put back unnoticed
    after any status run."""

    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            await orders(repo)
            old = {c: (root / c).read_bytes() for c in ("keyring/1", "keyring/2")}
            await repo.objectives.set("orders", rpo=60, rto=60, drill_max_age=60)
            await repo.objectives.drill()
            await repo.objectives.status()  # writes the newest drills
        for copy, raw in old.items():
            (root / copy).write_bytes(raw)
        with pytest.raises(RollbackDetected):
            await dedupe.Repository.open(root, PASSPHRASE)

    run_asyncio(go())


def test_a_vanished_newest_drill_stays_a_problem_on_every_later_status(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    """_newest_drills keeps the remembered entry of a record that is gone (until a newer
    drill supersedes it): otherwise the first status after the deletion complains, and
    the second, remembering the older passed drill as the newest, says OK."""

    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            await orders(repo)
            failed = await passed_then_failed(repo, root)
        failed.unlink()
        async with await dedupe.Repository.open(root, PASSPHRASE) as repo:
            first = await repo.objectives.status()
            second = await repo.objectives.status()
            assert (first.exit_code, second.exit_code) == (STATUS_DRILL, STATUS_DRILL)
            (good,) = await repo.objectives.drill()  # a newer drill supersedes it
            assert good.passed
            assert (await repo.objectives.status()).exit_code == STATUS_OK

    run_asyncio(go())


# =============================================================================================
# status judges the newest drill (objectives.py _newest_drills, _drill_problems)
# =============================================================================================


def test_a_future_dated_drill_is_never_the_last_drill_status_reports(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    """_newest_drills skips a record dated in the future after noting it: taken as the
    newest it would stand as the last drill (a pass, whatever failed since) in status
    --json and in the metrics the alerts read."""

    async def go() -> None:
        root = tmp_path / "repo"
        async with await make_repo(root) as repo:
            gen_id = await orders(repo)
            async with await with_key(repo, root, "reader", "r") as reader:
                future = stamp(datetime.now(UTC) + timedelta(days=3650))
                await reader._store.write_drill(record(gen_id, started=future))
            (failed,) = await repo.objectives.drill(rto=1e-9)
            report = await repo.objectives.status()
            assert report.sources[0].last_drill == failed
            assert report.exit_code == STATUS_DRILL

    run_asyncio(go())


def test_a_passed_drill_slower_than_the_objective_is_a_problem(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    """_drill_problems compares the drill's time with the RTO in force now, not only the
    verdict the drill recorded (under an RTO given on its command line, or none): a pass
    that took 1000 s misses an RTO of 900 s."""

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            gen_id = await orders(repo)
            await repo._store.write_drill(record(gen_id, seconds=1000.0, rto_seconds=None))
            report = await repo.objectives.status()
            assert report.exit_code == STATUS_DRILL
            assert "longer than its RTO" in report.sources[0].problems[0][1]

    run_asyncio(go())


# =============================================================================================
# prune keeps drill records (engine/prune.py _drop_old_drills)
# =============================================================================================


def test_prune_keeps_every_drill_record_younger_than_the_keeping_days(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    """More than KEEP_DRILLS records of a name, all 89.5 days old: none is past
    KEEP_DRILL_DAYS (90), so prune deletes none (the age condition, and its bound)."""

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            gen_id = (await repo.backup(io.BytesIO(os.urandom(5000)), name="orders")).id
            young = datetime.now(UTC) - timedelta(days=89, hours=12)
            for n in range(KEEP_DRILLS + 1):
                started = stamp(young + timedelta(minutes=n))
                await repo._store.write_drill(record(gen_id, started=started))
            await repo.prune()
            assert len(await repo.objectives.drills("orders")) == KEEP_DRILLS + 1

    run_asyncio(go())


async def tars_of_a_cluster(repo: dedupe.Repository, tree: Path, base_ok: bool) -> str:
    """A generation as pgbase: makes it of a cluster with tablespace 16384: base.tar
    and 16384.tar as a tree (a base.tar that is no tar when not `base_ok`)."""
    tree.mkdir()
    for tar, member in (("base", "PG_VERSION"), ("16384", "PG_16_202307071/5/16385")):
        payload = tree / "payload"
        payload.write_bytes(b"16\n")
        with tarfile.open(tree / f"{tar}.tar", "w") as t:
            t.add(payload, arcname=member)
        payload.unlink()
    if not base_ok:
        (tree / "base.tar").write_bytes(b"not a tar")
    info = {"engine": "postgresql", "format": BASEBACKUP_TARS, "tablespaces": {"16384": "/ts"}}
    options = {"source_info": info}
    stats = await repo._backup_copy(str(tree), "pg", "full", None, "pgbase:", None, options)
    return stats.id


@pytest.mark.parametrize("base_ok", [True, False], ids=["restored", "unpack fails"])
def test_the_tars_of_a_cluster_are_unpacked_through_a_scratch_directory_that_goes(
    run_asyncio: Run[None], tmp_path: Path, base_ok: bool
) -> None:
    """_restore_pg_tars restores the tars into a scratch directory beside the data
    directory and removes it, whether the unpack succeeds or fails; the tablespace_map
    points PostgreSQL at the tablespace's new place."""

    async def go() -> None:
        parent = tmp_path / "pg"
        parent.mkdir()
        datadir = parent / "data"
        async with await make_repo(tmp_path / "repo") as repo:
            gen_id = await tars_of_a_cluster(repo, tmp_path / "tree", base_ok)
            if base_ok:
                await repo.restore_into_datadir(gen_id, datadir)
            else:
                with pytest.raises(TargetError, match="tar"):
                    await repo.restore_into_datadir(gen_id, datadir)
        if base_ok:
            space = parent / "data_tablespaces" / "16384"
            assert sorted(p.name for p in parent.iterdir()) == ["data", "data_tablespaces"]
            assert (datadir / "tablespace_map").read_text() == f"16384 {space}\n"
            assert (space / "PG_16_202307071" / "5" / "16385").read_bytes() == b"16\n"
        else:
            assert not datadir.exists()
            assert [p.name for p in parent.iterdir()] in ([], ["data_tablespaces"])

    run_asyncio(go())


# =============================================================================================
# tablespaces of a physical generation (engine/databases.py)
# =============================================================================================


@pytest.mark.parametrize(
    "locations",
    [{"16384/../x": "/srv/ts"}, {"": "/srv/ts"}, {"16384": "srv/ts"}, {"16384": "/srv/ts\n1 /etc"}],
    ids=["oid not digits", "oid empty", "relative location", "location with a line break"],
)
def test_a_tablespace_map_refuses_what_postgresql_would_misread(locations: dict[str, str]) -> None:
    """tablespace_map: "<oid> <location>" lines. An oid that is not digits, a relative
    location or one with a line break would make PostgreSQL link a tablespace to another
    place than the restore put it (or add a line of the attacker's)."""
    with pytest.raises(TargetError):
        tablespace_map(locations)


@pytest.mark.parametrize("name", ["-W", "--echo", "-dprod", "$x", "1db"])
def test_a_drill_database_name_starts_with_a_letter_or_underscore(name: str) -> None:
    """_DATABASE_NAME: createdb, pg_restore -d and dropdb would read a name starting with
    '-' as an option (one with no '=' gets past the connection string check)."""
    with pytest.raises(ValueError, match="not a database name"):
        postgres_restore_into(name)


def test_the_tablespaces_are_read_from_psql_a_line_each(
    run_asyncio: Run[None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """_tablespaces: psql's unaligned rows "<oid><TAB><location>"; a location keeps a tab
    of its own, and a line without a tab is no tablespace (and stops nothing)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    psql = bin_dir / "psql"
    psql.write_text(
        "#!/bin/sh\nprintf '16384\\t/srv/a b\\n\\n16385\\t/srv/tab\\there\\nnot a row\\n'\n"
    )
    psql.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    found = run_asyncio(_tablespaces(None))
    assert found == {"16384": "/srv/a b", "16385": "/srv/tab\there"}


# =============================================================================================
# the metrics and alert rules monitoring reads (metrics.py, docs/alerts.yml)
# =============================================================================================


def _orders_samples(text: str) -> dict[str, float]:
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("name") == "orders"
    }


def test_the_metrics_say_what_status_found_missed(run_asyncio: Run[Any], tmp_path: Path) -> None:
    """status_metrics: an RPO missed and a failed drill are 0 in dedupe_rpo_met,
    dedupe_objectives_met and dedupe_drill_success, and the drill's timestamp is when the
    drill started (the overdue alert computes its age from it)."""

    async def go() -> tuple[Any, Any]:
        async with await make_repo(tmp_path / "repo") as repo:
            await orders(repo)
            (failed,) = await repo.objectives.drill(rto=1e-9)
            (gen,) = await repo.generations("orders")
            later = parse_created(gen.created) + timedelta(hours=2)
            return await repo.objectives.status(now=later), failed

    report, failed = run_asyncio(go())
    assert report.exit_code == STATUS_RPO
    got = _orders_samples(generate_latest(status_metrics(report, "r")).decode())
    assert got["dedupe_rpo_met"] == got["dedupe_objectives_met"] == 0
    assert got["dedupe_drill_success"] == 0
    assert got["dedupe_drill_last_timestamp_seconds"] == parse_created(failed.started).timestamp()


def _alert(alertname: str, at: str, severity: str, **labels: str) -> dict[str, Any]:
    return {
        "eval_time": at,
        "alertname": alertname,
        "exp_alerts": [{"exp_labels": {"severity": severity, "repository": "r", **labels}}],
    }


def test_the_alert_rules_the_other_tests_leave_out_fire_when_they_should(tmp_path: Path) -> None:
    """promtool rule tests of DedupeNoBackup (objectives, no generation: pages after
    15 minutes), DedupeDrillOverdue (the last drill older than its limit),
    DedupeStatusStale (status silent for over 3 hours) and DedupeBackupFailed; and none
    of them fires for a source that is fine."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (.ci/run does)"
    rules = yaml.safe_load((ROOT / "docs" / "alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        rule.pop("annotations")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    bad, ok = '{repository="r",name="orders"}', '{repository="r",name="ok"}'
    series = {
        f"dedupe_rpo_seconds{bad}": "3600x240",
        f"dedupe_drill_last_timestamp_seconds{bad}": "0x240",
        f"dedupe_drill_max_age_seconds{bad}": "3600x240",
        f"dedupe_rpo_seconds{ok}": "3600x240",
        f"dedupe_last_success_timestamp_seconds{ok}": "0+60x240",
        f"dedupe_drill_last_timestamp_seconds{ok}": "0+60x240",
        f"dedupe_drill_max_age_seconds{ok}": "3600x240",
        'dedupe_status_timestamp_seconds{repository="r"}': "0x240",
        'dedupe_command_success{repository="r",command="backup",name="orders"}': "1x60 0x180",
        'dedupe_command_success{repository="r",command="backup",name="ok"}': "1x240",
    }
    tests = [
        {"eval_time": "10m", "alertname": "DedupeNoBackup", "exp_alerts": []},
        _alert("DedupeNoBackup", "20m", "page", name="orders"),
        {"eval_time": "50m", "alertname": "DedupeDrillOverdue", "exp_alerts": []},
        _alert("DedupeDrillOverdue", "70m", "warning", name="orders"),
        {"eval_time": "170m", "alertname": "DedupeStatusStale", "exp_alerts": []},
        _alert("DedupeStatusStale", "190m", "warning"),
        {"eval_time": "50m", "alertname": "DedupeBackupFailed", "exp_alerts": []},
        _alert("DedupeBackupFailed", "70m", "page", command="backup", name="orders"),
    ]
    spec = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": k, "values": v} for k, v in series.items()],
                "alert_rule_test": tests,
            }
        ],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(spec))
    out = subprocess.run(
        [promtool, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


# =============================================================================================
# the tar chunker (chunking/tarcut.py): lossless, independent of feeds, never crashing
# =============================================================================================

PAGE = 8192


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _cut(data: bytes, step: int | None = None) -> list[bytes]:
    ch = TarChunker(PAGE, lambda: Chunker(DEFAULT_PARAMS, gear_table(bytes(32))))
    step = step or len(data) or 1
    out: list[bytes] = []
    for at in range(0, len(data), step):
        out += [bytes(m) for m in ch.feed(data[at : at + step])]
    return out + [bytes(m) for m in ch.finish()]


@pytest.mark.parametrize("size", [PAGE + 512, PAGE + 1000, 100], ids=["+512", "+1000", "100"])
def test_a_relation_file_of_no_whole_pages_is_cut_in_order(size: int) -> None:
    """_begin_member cuts a relation file as pages only when its size is whole pages:
    the rest of another size would be held back as a partial page and come out at the
    end of the stream, after the members that follow it."""
    body = os.urandom(size)
    data = _tar([("base/5/1000", body), ("base/5/1001", os.urandom(2 * PAGE)), ("x", b"y")])
    assert b"".join(_cut(data)) == data


def test_a_page_fed_in_pieces_smaller_than_a_page_is_one_chunk() -> None:
    """_cut_pages keeps a page begun in earlier feeds until it is whole, however many
    feeds it spans: the chunks of a stream fed 1000 bytes at a time are those of the
    whole stream (dedupe does not depend on how a pipe delivered it)."""
    data = _tar([("PG_VERSION", b"16\n"), ("base/5/1000", os.urandom(3 * PAGE))])
    whole = _cut(data)
    assert sum(len(c) == PAGE for c in whole) >= 3
    assert _cut(data, 1000) == whole


def _header(name: bytes, size: bytes, *, magic: bytes = b"ustar\x0000", fix: int = 0) -> bytes:
    """A ustar header with these fields, its checksum made to verify (off by `fix`)."""
    h = bytearray(512)
    h[: len(name)] = name
    h[124 : 124 + len(size)] = size
    h[156:157] = b"0"
    h[257 : 257 + len(magic)] = magic
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\x00 " % (sum(h) + fix)
    return bytes(h)


@pytest.mark.parametrize(
    "header",
    [
        _header(b"base/5/1000", b"00000020000\x00", fix=1),
        _header(b"base/5/1000", b"00000020000\x00", magic=b"xxxxx\x0000"),
        _header(b"base/5/1000", b"0000002zz00\x00"),
    ],
    ids=["checksum off by one", "no ustar magic", "size not octal"],
)
def test_a_header_that_does_not_verify_is_not_a_tar(header: bytes) -> None:
    """_parse: magic, checksum and a readable size, or None (the stream goes to FastCDC
    whole). A size that does not read would be None downstream: a TypeError that stops
    the backup."""
    assert not looks_like_tar(header)
    data = header + os.urandom(3 * PAGE)
    assert b"".join(_cut(data)) == data and _cut(data, 1000) == _cut(data)


# =============================================================================================
# a finding of this audit, fixed: records of forgotten generations are history
# =============================================================================================


def test_forgetting_an_older_drilled_generation_keeps_status_ok(
    run_asyncio: Run[None], tmp_path: Path
) -> None:
    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            first = await orders(repo)
            await repo.objectives.drill()
            await repo.backup(io.BytesIO(os.urandom(20_000)), name="orders", kind="full")
            await repo.objectives.drill()  # the newest generation, drilled and passed
            assert (await repo.objectives.status()).exit_code == STATUS_OK
            await repo.forget(ids=[first])
            await repo.prune()
            report = await repo.objectives.status()
            assert report.exit_code == STATUS_OK, report.sources[0].problems

    run_asyncio(go())
