"""PostgreSQL as a source, against a real server on 127.0.0.1 (tests/pgserver.py): a
logical full, incremental and differential of a database that changes between them, each
restored into a fresh database that matches the source at that moment, table by table;
a dump that fails half way commits nothing."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, dedupe_cli, make_repo

from dedupe import Command, Repository, postgres_basebackup, postgres_dump
from dedupe.errors import IntegrityError, SourceError, TargetError

TABLES = ("customers", "orders")

SCHEMA = """
create table customers (id serial primary key, name text not null, city text);
create table orders (
    id bigserial primary key,
    customer int not null references customers(id),
    amount numeric(12, 2) not null,
    note text
);
insert into customers (name, city)
    select 'customer ' || g, (array['Oslo','Lyon','Porto','Graz'])[1 + g % 4]
    from generate_series(1, 2000) g;
insert into orders (customer, amount, note)
    select 1 + g % 2000, (g % 997) * 1.25, repeat('line item ' || g, 3)
    from generate_series(1, 60000) g;
"""

# About 1% of the rows change a day, as on a real system: the recent orders are amended,
# a few old ones purged, new ones arrive, some customers move.
DAY = """
update orders set amount = amount + 1, note = note || ' (amended {n})'
    where id > 60000 - 400 * {n};
delete from orders where id between 1000 * {n} and 1000 * {n} + 40;
insert into orders (customer, amount, note)
    select 1 + g % 2000, g * 0.5, 'new on day {n}' from generate_series(1, 200) g;
update customers set city = 'Bergen' where id between 100 * {n} and 100 * {n} + 5;
"""


HALF_WAY = """
import subprocess, sys
dump = subprocess.Popen(["pg_dump", *sys.argv[1:]], stdout=subprocess.PIPE)
sys.stdout.buffer.write(dump.stdout.read(300_000))
sys.stdout.flush()
dump.kill()
dump.wait()
sys.stderr.write("pg_dump: killed half way\\n")
sys.exit(137)
"""


def psql(db: str, sql: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        ["psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql],
        check=True,
        capture_output=True,
        timeout=120,
        env=env,
    )
    return out.stdout.decode().strip()


def state(db: str, env: dict[str, str] | None = None) -> dict[str, tuple[int, str]]:
    """Each table's row count and a checksum of its rows in key order."""
    found = {}
    for table in TABLES:
        row = psql(
            db,
            f"select count(*), coalesce(md5(string_agg(t::text, '|' order by t.id)), '') "
            f"from {table} t",
            env,
        )
        count, digest = row.split("|")
        found[table] = (int(count), digest)
    return found


def test_logical_full_incremental_differential_each_restore_into_a_new_database(
    run_asyncio: Any, tmp_path: Path, pg: dict[str, str]
) -> None:
    db = pg["db"]
    psql(db, SCHEMA)

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            made: dict[str, dict[str, tuple[int, str]]] = {}
            for n, kind in enumerate(("full", "incremental", "differential", "incremental")):
                if n:
                    psql(db, DAY.format(n=n))
                stats = await repo.backup(await postgres_dump(db), name="shop", kind=kind)
                made[stats.id] = state(db)
                assert stats.kind == kind
            gens = await repo.generations("shop")
            assert [g.kind for g in gens] == ["full", "incremental", "differential", "incremental"]
            first = gens[0]
            assert first.source["database"] == db and first.source["engine"] == "postgresql"
            assert first.source["server_version"] and first.source["dump_started"]
            assert first.source["label"] == f"pg:{db}"
            # The day's change is about 1% of the rows: the incrementals store a fraction.
            assert gens[1].new_bytes < gens[0].new_bytes / 4
            for i, (gen_id, want) in enumerate(made.items()):
                target = f"{db}_restored_{i}"
                stats = await repo.restore_into_postgres(gen_id, target)
                assert stats.note and target in stats.note
                assert state(target) == want, f"generation {i} does not match its moment"

    run_asyncio(go())


def test_a_drill_into_a_fresh_database_restores_checks_records_and_drops_it(
    run_asyncio: Any, tmp_path: Path, pg: dict[str, str]
) -> None:
    """Issue 16: a drill of a logical generation into a new database, with a check
    command run against it ({} is the database), passes, is recorded, and leaves no
    database behind; a check that fails makes a failed drill, recorded with its reason;
    status then reports the failure."""
    db = pg["db"]
    psql(db, SCHEMA)
    rows = psql(db, "select count(*) from orders")
    check = [
        "psql",
        "-XAtq",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        "{}",
        "-c",
        "select count(*) from orders",
    ]
    target = f"{db}_drill"

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            await repo.objectives.set("shop", rpo=3600, rto=600)
            await repo.backup(await postgres_dump(db), name="shop")
            (good,) = await repo.objectives.drill(into_db=target, check=check)
            assert good.passed and good.bytes > 0 and good.rto_seconds == 600, good.reason
            assert (
                psql("postgres", f"select count(*) from pg_database where datname = '{target}'")
                == "0"
            )
            wrong = [*check[:-1], "select count(*) from no_such_table"]
            (bad,) = await repo.objectives.drill(into_db=target, check=wrong)
            assert not bad.passed and "no_such_table" in (bad.reason or "")
            (orders,) = (await repo.objectives.status()).sources
            assert orders.last_drill == bad and orders.problems[0][0] == "drill"
            assert [d.passed for d in await repo.objectives.drills("shop")] == [True, False]

    assert rows == "60000"
    run_asyncio(go())


def test_a_dump_that_fails_half_way_commits_nothing_and_a_failed_restore_leaves_no_database(
    run_asyncio: Any, tmp_path: Path, pg: dict[str, str]
) -> None:
    db = pg["db"]
    psql(db, SCHEMA)

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            good = await repo.backup(await postgres_dump(db), name="shop")
            # pg_dump of a database that is not there: fails before anything is read.
            with pytest.raises(SourceError, match="connecting to PostgreSQL"):
                await postgres_dump(f"{db}_missing")
            # A dump that dies half way: the real pg_dump, killed once it wrote 300 KB.
            dump = await postgres_dump(db)
            killer = Command(
                (sys.executable, "-c", HALF_WAY, *dump.argv[1:]),
                label=dump.label,
                info=dump.info,
            )
            with pytest.raises(SourceError, match="status 137: pg_dump: killed half way"):
                await repo.backup(killer, name="shop")
            assert [g.id for g in await repo.generations()] == [good.id]
            assert (await repo.verify(read_data=True)).ok
            # A restore into a database that exists fails, and the existing one stays.
            with pytest.raises(TargetError):
                await repo.restore_into_postgres(good.id, db)
            assert state(db)["orders"][0] == 60000
        # A restore that fails half way (a damaged pack) drops the database it created.
        packs = sorted(p for p in (tmp_path / "repo" / "packs").rglob("*") if p.is_file())
        victim = packs[len(packs) // 2]
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 3] ^= 1
        victim.write_bytes(bytes(raw))
        async with await Repository.open(tmp_path / "repo", PASSPHRASE) as repo:
            with pytest.raises(IntegrityError):
                await repo.restore_into_postgres(good.id, f"{db}_half")
        exists = f"select count(*) from pg_database where datname = '{db}_half'"
        assert psql("postgres", exists) == "0"

    run_asyncio(go())


def test_the_cli_backs_up_pg_and_restores_into_a_new_database(
    cli: Any, cli_env: dict[str, str], pg: dict[str, str]
) -> None:
    db = pg["db"]
    psql(db, SCHEMA)
    env = {**cli_env, **{k: v for k, v in os.environ.items() if k.startswith("PG")}}
    assert cli("init", env=env).returncode == 0
    backed = cli("backup", f"pg:{db}", "--name", "shop", "--json", env=env)
    assert backed.returncode == 0, backed.stderr.decode()
    gen = json.loads(backed.stdout)["id"]
    listed = json.loads(cli("generations", "--json", env=env).stdout)
    assert listed[0]["source"]["database"] == db
    restored = cli("restore", gen, "--into-db", f"{db}_cli", env=env)
    assert restored.returncode == 0, restored.stderr.decode()
    assert state(f"{db}_cli") == state(db)
    missing = cli("backup", f"pg:{db}_nope", "--name", "shop", env=env)
    assert missing.returncode == SourceError.exit_code
    assert "does not exist" in missing.stderr.decode()


def test_a_physical_generation_restores_into_a_data_directory_that_starts(
    run_asyncio: Any, tmp_path: Path, pg: dict[str, str]
) -> None:
    """pgbase: a base backup of the running server (with the WAL it needs), restored
    into a new data directory; a second server started on it holds the same tables."""
    db = pg["db"]
    psql(db, SCHEMA)
    psql(db, DAY.format(n=1))
    want = state(db)

    async def go() -> Path:
        async with await make_repo(tmp_path / "repo") as repo:
            stats = await repo.backup(await postgres_basebackup(), name="cluster", kind="full")
            (gen,) = await repo.generations("cluster")
            assert gen.id == stats.id and gen.source["label"] == "pgbase:"
            assert gen.source["wal_start"] and gen.source["wal_end"]
            # auto saw a tar: relation files are cut into pages from their own start.
            assert gen.chunker["algorithm"] == "tar" and gen.chunker["page_size"] == 8192
            datadir = Path(tempfile.mkdtemp(prefix="dedupe-restored-pg-")) / "data"
            restored = await repo.restore_into_datadir(gen.id, datadir)
            assert restored.note and str(datadir) in restored.note
            assert (datadir / "PG_VERSION").exists() and (datadir / "backup_label").exists()
            with pytest.raises(TargetError, match="not an empty directory"):
                await repo.restore_into_datadir(gen.id, datadir)
            return datadir

    datadir = run_asyncio(go())
    with started(datadir) as port:
        assert state(db, {**os.environ, "PGPORT": str(port)}) == want


def test_a_cluster_with_a_tablespace_restores_with_it_and_starts(
    run_asyncio: Any, tmp_path: Path, pg: dict[str, str]
) -> None:
    """pg_basebackup cannot stream a cluster with tablespaces as one tar: pgbase: then
    backs up a tar per tablespace as a tree, and the restore puts each tablespace in a
    place of its own (tablespace_map); the restored server holds the table that lives
    in the tablespace too. The tablespace is dropped again: the server is shared."""
    db = pg["db"]
    place = Path(tempfile.mkdtemp(prefix="dedupe-tablespace-")) / "ts"
    place.mkdir()
    if os.geteuid() == 0:  # the server runs as postgres
        owner = pwd.getpwnam("postgres")
        os.chmod(place.parent, 0o755)
        os.chown(place, owner.pw_uid, owner.pw_gid)
    space = f"ts_{db}"
    psql(db, SCHEMA)
    psql(db, f"create tablespace {space} location '{place}'")
    try:
        psql(db, f"alter table orders set tablespace {space}")
        psql(db, DAY.format(n=1))
        want = state(db)
        oid = psql(db, f"select oid from pg_tablespace where spcname = '{space}'")

        async def go() -> Path:
            async with await make_repo(tmp_path / "repo") as repo:
                source = await postgres_basebackup()
                await repo.backup(source, name="cluster", kind="full")
                (gen,) = await repo.generations("cluster")
                assert gen.source["type"] == "tree" and gen.source["label"] == "pgbase:"
                assert gen.source["tablespaces"] == {oid: str(place)}
                assert gen.source["wal_start"] and gen.source["wal_end"]
                datadir = Path(tempfile.mkdtemp(prefix="dedupe-restored-pg-")) / "data"
                restored = await repo.restore_into_datadir(gen.id, datadir)
                moved = Path(f"{datadir}_tablespaces") / oid
                assert restored.note and str(moved) in restored.note
                assert (datadir / "tablespace_map").read_text() == f"{oid} {moved}\n"
                assert any(moved.iterdir())
                return datadir

        datadir = run_asyncio(go())
        with started(datadir) as port:
            env = {**os.environ, "PGPORT": str(port)}
            assert state(db, env) == want
            assert psql(db, "select count(*) from pg_tablespace", env) == "3"

        # The CLI: the tablespace where the operator says (by its old location), and a
        # mapping that names no tablespace refused before anything is made.
        cli_env = {**os.environ, "DEDUPE_REPO": str(tmp_path / "repo")}
        cli_env["DEDUPE_PASSWORD"] = PASSPHRASE
        elsewhere = Path(tempfile.mkdtemp(prefix="dedupe-restored-pg-"))
        wrong = dedupe_cli(
            "restore", "cluster@latest", "--into-datadir", str(elsewhere / "data"),
            "--tablespace-map", f"{place}x={elsewhere / 'fast'}", env=cli_env,
        )  # fmt: skip
        assert wrong.returncode == TargetError.exit_code
        assert f"no tablespace {place}x" in wrong.stderr.decode()
        assert list(elsewhere.iterdir()) == []
        dedupe_cli(
            "restore", "cluster@latest", "--into-datadir", str(elsewhere / "data"),
            "--tablespace-map", f"{place}={elsewhere / 'fast'}", env=cli_env, check=True,
        )  # fmt: skip
        assert (elsewhere / "data" / "tablespace_map").read_text() == (
            f"{oid} {elsewhere / 'fast'}\n"
        )
        assert any((elsewhere / "fast").iterdir())
        assert not Path(f"{elsewhere / 'data'}_tablespaces").exists()
        shutil.rmtree(elsewhere)
    finally:
        psql(db, "drop table orders")
        psql(db, f"drop tablespace {space}")
        shutil.rmtree(place.parent, ignore_errors=True)


@contextmanager
def started(datadir: Path) -> Iterator[int]:
    """A server on a restored data directory (as the postgres user under root)."""
    from pgserver import bindir

    base = datadir.parent
    os.chmod(base, 0o755)
    as_user: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        for path in [base, *base.rglob("*")]:
            os.lchown(path, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctl = [*as_user, f"{bindir()}/pg_ctl", "-D", str(datadir)]
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
    log = base / "server.log"
    try:
        subprocess.run(
            [*ctl, "-o", options, "-l", str(log), "-w", "-t", "120", "start"],
            check=True,
            capture_output=True,
            timeout=180,
        )
        yield port
    finally:
        subprocess.run([*ctl, "-m", "immediate", "-w", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)
