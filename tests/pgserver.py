"""A throwaway PostgreSQL server for the database tests: initdb in a temporary directory,
listening on 127.0.0.1 only, on a free port, trust authentication for one user; stopped
and removed at the end of the session. PostgreSQL refuses to run as root: under root
(CI) the server runs as the `postgres` user that Debian's package creates.

Not skipped when PostgreSQL is missing: the database tests must run wherever the suite
runs (.ci/run installs it from Debian's packages)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

USER = "dedupe"


def bindir() -> str:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    raise RuntimeError(
        "PostgreSQL's server programs (initdb, pg_ctl) are not installed: "
        "apt-get install postgresql (.ci/run does)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server() -> Iterator[dict[str, str]]:
    """A running server; yields the libpq environment (PGHOST, PGPORT, PGUSER, ...) that
    points clients at it."""
    bin_dir = bindir()
    base = tempfile.mkdtemp(prefix="dedupe-pg-")
    os.chmod(base, 0o755)
    data, sockets = os.path.join(base, "data"), os.path.join(base, "sockets")
    os.mkdir(sockets)
    as_user: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        for path in (base, sockets):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    log = os.path.join(base, "server.log")

    def run(*argv: str) -> None:
        subprocess.run([*as_user, *argv], check=True, capture_output=True, timeout=120)

    try:
        run(
            f"{bin_dir}/initdb",
            "-D",
            data,
            "-U",
            USER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        options = (
            f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c wal_level=replica -c max_wal_senders=4"
        )
        run(f"{bin_dir}/pg_ctl", "-D", data, "-o", options, "-l", log, "-w", "-t", "60", "start")
        yield {
            "PGHOST": "127.0.0.1",
            "PGPORT": str(port),
            "PGUSER": USER,
            "PGDATABASE": "postgres",
            "PGCONNECT_TIMEOUT": "10",
            "PG_BINDIR": bin_dir,
        }
    finally:
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            subprocess.run(
                [*as_user, f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=120,
                check=False,
            )
        shutil.rmtree(base, ignore_errors=True)
