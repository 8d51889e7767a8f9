"""Databases as sources: PostgreSQL through its own tools, SQLite through its online
backup API (docs/OPERATIONS.md, "Databases").

- `postgres_dump(dbname)`: a Command running `pg_dump -Fc -Z0`, the custom format,
  uncompressed: compression makes every dump's bytes differ after the first change, so
  nothing deduplicates (docs/CHUNKING.md has the measurement), and the repository
  compresses what it stores anyway. Connection settings come from libpq's environment
  (PGHOST, PGPORT, PGUSER, PGPASSWORD or ~/.pgpass, PGSSLMODE, ...). The generation
  records the database, the server's version and the time the dump started.
- `postgres_restore_into(newdb)`: the Commands that create `newdb` and fill it from a
  logical generation (`pg_restore`), and the one that drops it again if that fails.
- `sqlite_snapshot(path, into)`: a consistent copy of a live SQLite database (rollback
  journal or WAL) made with the online backup API, while other connections keep
  writing; the copy is what is backed up.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

# The two database sources are defined in dedupe._types, where dedupe.api names them
# without loading this module; they are this module's names too, the same classes.
from dedupe._types import PostgresBaseBackupTars as PostgresBaseBackupTars
from dedupe._types import SQLiteDatabase as SQLiteDatabase
from dedupe.engine.commands import Command
from dedupe.errors import SourceError, TargetError

POSTGRES_FORMAT = "pg_dump custom, uncompressed"
_DATABASE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$-]{0,62}")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def _completed(
    argv: tuple[str, ...] | list[str], env: Mapping[str, str] | None
) -> tuple[int, str, str]:
    """Run a short command to its end: (status, stdout, stderr). OSError if it cannot
    start."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=None if env is None else dict(env),
    )
    out, err = await proc.communicate()
    status = proc.returncode if proc.returncode is not None else -1
    return status, out.decode(errors="replace").strip(), err.decode(errors="replace").strip()


async def _output(argv: list[str], env: Mapping[str, str] | None, what: str) -> str:
    try:
        status, out, err = await _completed(argv, env)
    except OSError as e:
        raise SourceError(f"cannot run {argv[0]} ({what}): {e.strerror}") from None
    if status != 0:
        raise SourceError(f"{what} failed (status {status}): {err}")
    return out


async def postgres_dump(dbname: str, env: Mapping[str, str] | None = None) -> Command:
    """The source of a logical backup of PostgreSQL database `dbname` (see the module
    docstring). Asks the server its version first: a database that cannot be reached
    fails here, before anything is read."""
    version = await _output(
        ["psql", "-XAtq", "-d", dbname, "-c", "select current_setting('server_version')"],
        env,
        f"connecting to PostgreSQL database {dbname!r}",
    )
    info: dict[str, Any] = {
        "database": dbname,
        "engine": "postgresql",
        "server_version": version,
        "format": POSTGRES_FORMAT,
        "dump_started": _now(),
    }
    return Command(
        ("pg_dump", "-Fc", "-Z0", "--no-password", "-d", dbname),
        env=env,
        label=f"pg:{dbname}",
        info=info,
    )


BASEBACKUP_FORMAT = "pg_basebackup tar"
_WAL_POINT = re.compile(
    r"write-ahead log (start|end) point: ([0-9A-F]+/[0-9A-F]+)(?: on timeline (\d+))?"
)


def _wal_positions(stderr: str) -> dict[str, Any]:
    """The WAL positions pg_basebackup -v states: where the backup starts and where it
    must be replayed to before the copy is consistent."""
    found: dict[str, Any] = {}
    for kind, lsn, timeline in _WAL_POINT.findall(stderr):
        found[f"wal_{kind}"] = lsn
        if timeline:
            found["timeline"] = int(timeline)
    if "wal_start" not in found or "wal_end" not in found:
        raise SourceError(
            "pg_basebackup did not state its start and end WAL positions: nothing was committed"
        )
    return found


BASEBACKUP_TARS = "pg_basebackup tars"  # a tree: base.tar and one <oid>.tar per tablespace
_BASEBACKUP_OPTIONS = ("-Ft", "-X", "fetch", "--checkpoint=fast", "--no-password", "-v")


async def _tablespaces(env: Mapping[str, str] | None) -> dict[str, str]:
    out = await _output(
        [
            "psql",
            "-XAtq",
            "-F",
            "\t",
            "-d",
            "postgres",
            "-c",
            "select oid, pg_tablespace_location(oid) from pg_tablespace "
            "where spcname not in ('pg_default', 'pg_global') order by oid",
        ],
        env,
        "listing the server's tablespaces",
    )
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


async def postgres_basebackup(
    env: Mapping[str, str] | None = None, scratch: str | None = None
) -> Command | PostgresBaseBackupTars:
    """The source of a physical backup of the PostgreSQL server libpq's environment names:
    `pg_basebackup -D - -Ft -X fetch`, one tar stream with the WAL the copy needs. A
    cluster with tablespaces besides the two built in cannot be streamed as one tar: it
    gets a PostgresBaseBackupTars (one tar per tablespace, in `scratch`) instead. The
    generation records the server's version, the start and end WAL positions and the
    tablespaces. Needs a role with the REPLICATION attribute and a pg_hba.conf
    `replication` line."""
    version = await _output(
        ["psql", "-XAtq", "-d", "postgres", "-c", "select current_setting('server_version')"],
        env,
        "connecting to the PostgreSQL server",
    )
    info: dict[str, Any] = {
        "engine": "postgresql",
        "format": BASEBACKUP_FORMAT,
        "server_version": version,
        "backup_started": _now(),
    }
    tablespaces = await _tablespaces(env)
    if tablespaces:
        info.update(format=BASEBACKUP_TARS, tablespaces=tablespaces)
        return PostgresBaseBackupTars(info, tablespaces, env, scratch)
    return Command(
        ("pg_basebackup", "-D", "-", *_BASEBACKUP_OPTIONS),
        env=env,
        label="pgbase:",
        info=info,
        learn=_wal_positions,
    )


async def write_basebackup_tars(source: PostgresBaseBackupTars, into: str) -> dict[str, Any]:
    """Run pg_basebackup for `source` into the new directory `into` (base.tar, <oid>.tar,
    backup_manifest) -> the WAL positions it stated. SourceError if it fails."""
    argv = ("pg_basebackup", "-D", into, *_BASEBACKUP_OPTIONS)
    try:
        status, _out, err = await _completed(argv, source.env)
    except OSError as e:
        raise SourceError(f"cannot run pg_basebackup: {e.strerror}") from None
    if status != 0:
        tail = "\n".join(err.splitlines()[-8:])
        raise SourceError(f"pg_basebackup failed (status {status}); nothing was committed:\n{tail}")
    return _wal_positions(err)


def is_postgres_basebackup(source: Mapping[str, Any]) -> bool:
    return source.get("engine") == "postgresql" and source.get("format") in (
        BASEBACKUP_FORMAT,
        BASEBACKUP_TARS,
    )


def tablespace_map(locations: Mapping[str, str]) -> str:
    """The `tablespace_map` file of a data directory restored from a base backup: a line
    "<oid> <location>" per tablespace, which PostgreSQL turns into pg_tblspc/<oid> links
    when it starts. Locations are absolute paths without a line break."""
    lines = []
    for oid, location in sorted(locations.items()):
        if not oid.isdigit() or not os.path.isabs(location) or "\n" in location:
            raise TargetError(f"tablespace {oid}: {location!r} is not an absolute path")
        lines.append(f"{oid} {location}\n")
    return "".join(lines)


def postgres_restore_into(
    newdb: str, env: Mapping[str, str] | None = None
) -> tuple[Command, Command, Command]:
    """(create `newdb`, fill it from a custom-format dump on stdin, drop it again)."""
    # A plain name only: pg_restore -d also takes a connection string ("dbname=prod",
    # "postgresql://host/prod"), which would fill another, existing database than the one
    # createdb made and dropdb drops.
    if not _DATABASE_NAME.fullmatch(newdb):
        raise ValueError(
            f"{newdb!r} is not a database name: use letters, digits, '_', '$' and '-' "
            "(63 at most, not starting with a digit, '$' or '-')"
        )
    return (
        Command(("createdb", "--no-password", newdb), env=env),
        Command(
            ("pg_restore", "--no-password", "--no-owner", "--exit-on-error", "-d", newdb), env=env
        ),
        Command(("dropdb", "--no-password", "--if-exists", newdb), env=env),
    )


def is_postgres_dump(source: Mapping[str, Any]) -> bool:
    return source.get("engine") == "postgresql" and source.get("format") == POSTGRES_FORMAT


async def run_command(command: Command) -> None:
    """Run `command` to its end; TargetError with its status and stderr if it fails."""
    try:
        status, _out, err = await _completed(command.argv, command.env)
    except OSError as e:
        raise TargetError(f"cannot run {command.describe()}: {e.strerror}") from None
    if status != 0:
        raise TargetError(f"{command.describe()} exited with status {status}: {err}")


def sqlite_snapshot(path: str, into: str) -> dict[str, Any]:
    """Copy the SQLite database at `path` into the new file `into` with the online backup
    API, in one step: the copy is the database as of one transaction, whatever other
    connections write meanwhile (in WAL mode they go on writing; in rollback-journal mode
    a writer waits, as it would for any reader). -> what the generation records."""
    if not os.path.isfile(path):
        raise SourceError(f"{path} is not a file: no SQLite database to snapshot")
    started = _now()
    try:
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    except sqlite3.Error as e:
        raise SourceError(f"cannot open {path} as a SQLite database: {e}") from None
    try:
        target = sqlite3.connect(into)
        try:
            source.backup(target)  # pages=-1: the whole database in one step
            page_size = target.execute("pragma page_size").fetchone()[0]
            journal = source.execute("pragma journal_mode").fetchone()[0]
        finally:
            target.close()
    except sqlite3.Error as e:
        raise SourceError(f"the online backup of {path} failed: {e}") from None
    finally:
        source.close()
    return {
        "database": os.path.abspath(path),
        "engine": "sqlite",
        "sqlite_version": sqlite3.sqlite_version,
        "page_size": int(page_size),
        "journal_mode": str(journal),
        "snapshot_started": started,
    }
