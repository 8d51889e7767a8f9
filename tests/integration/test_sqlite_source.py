"""SQLite as a source (`sqlite:PATH`, SQLiteDatabase): snapshots taken with the online
backup API while another process commits continuously, in WAL and rollback-journal mode;
every restored snapshot passes `PRAGMA integrity_check` and is the database as of one
commit (never half of one)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_repo

from dedupe import SQLiteDatabase
from dedupe.errors import SourceError

# Each commit i inserts row i (its payload a function of i, a few hundred bytes) and sets
# meta.last = i, in one transaction. A state of the database at a commit is exactly:
# rows 1..last, each with its payload.
WRITER = """
import hashlib, sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
db.execute("pragma journal_mode = " + sys.argv[2])
if sys.argv[2] == "delete":
    # A rollback-journal commit holds its exclusive lock through its fsyncs; a writer that
    # is always fsyncing starves the snapshot's reader (SQLite's busy handler polls), for
    # seconds to minutes a snapshot. Durability is not what is tested: no fsync, so the
    # writer commits faster (more commits between snapshots), and the reader gets its turn.
    db.execute("pragma synchronous = off")
db.execute("create table if not exists log (seq integer primary key, payload text)")
db.execute("create table if not exists meta (k text primary key, last integer)")
db.execute("insert or ignore into meta values ('last', 0)")
open(sys.argv[3], "w").write("ready")
i = 0
while True:
    i += 1
    db.execute("begin immediate")
    payload = hashlib.sha256(str(i).encode()).hexdigest() * 6
    db.execute("insert into log values (?, ?)", (i, payload))
    db.execute("update meta set last = ? where k = 'last'", (i,))
    db.execute("commit")
    if i % 50 == 0:
        time.sleep(0.001)
"""


def consistent_state(path: Path) -> int:
    """The commit the database at `path` is the state of (asserting that it is one)."""
    db = sqlite3.connect(path)
    try:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        (last,) = db.execute("select last from meta").fetchone()
        rows = db.execute("select seq, payload from log order by seq").fetchall()
    finally:
        db.close()
    assert [seq for seq, _ in rows] == list(range(1, last + 1))
    for seq, payload in rows:
        assert payload == hashlib.sha256(str(seq).encode()).hexdigest() * 6
    return int(last)


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_ten_snapshots_of_a_database_being_written_each_restore_to_one_commit(
    run_asyncio: Any, tmp_path: Path, journal: str
) -> None:
    db = tmp_path / "live.db"
    ready = tmp_path / "ready"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), journal, str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert writer.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)

        async def go() -> list[int]:
            lasts = []
            async with await make_repo(tmp_path / "repo") as repo:
                ids = []
                for _ in range(10):
                    time.sleep(0.05)
                    stats = await repo.backup(SQLiteDatabase(str(db)), name="live")
                    ids.append(stats.id)
                assert writer.poll() is None, "the writer stopped: the snapshots blocked it"
                gens = {g.id: g for g in await repo.generations()}
                for gen_id in ids:
                    out = tmp_path / f"restored-{gen_id[:8]}.db"
                    await repo.restore(gen_id, out)
                    lasts.append(consistent_state(out))
                    source = gens[gen_id].source
                    assert source["engine"] == "sqlite" and source["database"] == str(db)
                    assert source["label"] == f"sqlite:{db}"
            return lasts

        lasts = run_asyncio(go())
    finally:
        writer.kill()
        writer.wait()
    assert lasts == sorted(lasts) and lasts[-1] > lasts[0], lasts  # taken as it went on


def test_a_path_that_is_no_database_fails_and_commits_nothing(
    run_asyncio: Any, tmp_path: Path, cli: Any, cli_env: dict[str, str]
) -> None:
    (tmp_path / "not.db").write_bytes(b"this is not a database" * 100)

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            with pytest.raises(SourceError):
                await repo.backup(SQLiteDatabase(str(tmp_path / "not.db")), name="x")
            with pytest.raises(SourceError):
                await repo.backup(SQLiteDatabase(str(tmp_path / "missing.db")), name="x")
            assert await repo.generations() == []

    run_asyncio(go())
    # The command line: sqlite:PATH.
    good = tmp_path / "good.db"
    con = sqlite3.connect(good)
    con.execute("create table t (x)")
    con.executemany("insert into t values (?)", [(i,) for i in range(1000)])
    con.commit()
    con.close()
    env = {**cli_env, "DEDUPE_REPO": str(tmp_path / "cli-repo")}
    assert cli("init", env=env).returncode == 0
    backed = cli("backup", f"sqlite:{good}", "--name", "good", "--json", env=env)
    assert backed.returncode == 0, backed.stderr.decode()
    gen = json.loads(backed.stdout)["id"]
    assert cli("restore", gen, str(tmp_path / "back.db"), env=env).returncode == 0
    assert sqlite3.connect(tmp_path / "back.db").execute("select count(*) from t").fetchone() == (
        1000,
    )
