"""Locks between real processes (dedupe.store.locks, docs/FORMAT.md 14): a backup whose lock
was taken from it never commits, a prune never runs beside a backup, and two backups run
side by side; on a local directory and on an S3 API server (conditional PUTs).

Every actor is a real `dedupe` process. A backup reads its data from a pipe that the test
feeds, so the test decides where the backup is when something happens (its first packs
written, then stopped with SIGSTOP as a suspended VM or a long stall would be). Where a
test needs the stale time to pass, the processes run with the lock module's STALE_AFTER
and REFRESH_INTERVAL lowered (set from `python -c`; no product code changes), both the
stopped backup and the prune that judges its lock.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PASSPHRASE, SMALL_PACK, env_for, make_repo

from dedupe import Repository
from dedupe.backends.s3 import S3Backend

REPOSITORY_LOCKED = 13  # exit code of RepositoryLocked (docs/API.md)
MiB = 1024 * 1024
FIRST = 12 * MiB  # fed before the backup is stopped: several read blocks, many packs
CHILD = (
    "import sys; import dedupe.store.locks as locks; "
    "locks.STALE_AFTER = {stale}; locks.REFRESH_INTERVAL = {refresh}; "
    "from dedupe.cli import main; sys.argv = ['dedupe', *sys.argv[1:]]; main()"
)


@dataclass
class Place:
    """Where the repository is: a local directory or an S3 bucket (the S3 API server the
    tests start), and the environment of a `dedupe` process that uses it."""

    location: str
    env: dict[str, str]

    def _names(self, prefix: str) -> list[str]:
        if not self.location.startswith("s3://"):
            top = Path(self.location) / prefix
            return [str(p.relative_to(top)) for p in top.rglob("*") if p.is_file()]

        async def names() -> list[str]:
            backend = S3Backend(self.location)
            try:
                return [n[len(prefix) :] for n in await backend.list(prefix)]
            finally:
                await backend.close()

        return asyncio.run(names())

    def packs(self) -> set[str]:
        names = (n.rsplit("/", 1)[-1] for n in self._names("packs/"))
        return {n for n in names if not n.startswith(".")}  # not a put in flight

    def locks(self) -> list[str]:
        return sorted(self._names("locks/"))


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, repo_path: Path, cli_env: dict[str, str]) -> Place:
    if request.param == "local":
        return Place(str(repo_path), cli_env)
    location = request.getfixturevalue("s3_location")
    return Place(location, env_for(location, cli_env))


def _wait_for(what: str, cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _start(env: dict[str, str], *args: str, stale: float | None = None) -> subprocess.Popen[bytes]:
    """A `dedupe` process; with `stale`, its locks go stale after that many seconds."""
    if stale is None:
        cmd = [sys.executable, "-m", "dedupe", *args]
    else:
        code = CHILD.format(stale=stale, refresh=stale / 4)
        cmd = [sys.executable, "-c", code, *args]
    return subprocess.Popen(
        cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _run(env: dict[str, str], *args: str, stale: float | None = None) -> tuple[int, str]:
    proc = _start(env, *args, stale=stale)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, (out + err).decode()


def _finish(proc: subprocess.Popen[bytes], rest: bytes) -> tuple[int, str]:
    assert proc.stdin is not None
    try:
        proc.stdin.write(rest)
    except BrokenPipeError:
        pass  # it stopped reading: it failed, and says why
    out, err = proc.communicate(timeout=120)
    return proc.returncode, (out + err).decode()


def _feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.flush()


async def _state(repo: str) -> dict[str, bytes]:
    """Every generation's bytes by name, after `verify --read-data` passed."""
    async with await Repository.open(repo, PASSPHRASE) as r:
        report = await r.verify(read_data=True)
        assert report.ok, report.to_dict()
        out: dict[str, bytes] = {}
        for g in await r.generations():
            buf = io.BytesIO()
            await r.restore(g.id, buf)
            out[g.name] = buf.getvalue()
        return out


@pytest.fixture
def base(place: Place) -> bytes:
    """A repository holding one committed generation, "base"; returns its bytes."""
    data = os.urandom(3 * MiB)

    async def go() -> None:
        # Fewer, larger packs on S3 (each is a request): still dozens before the stop.
        pack_size = 256 * 1024 if place.location.startswith("s3://") else SMALL_PACK
        async with await make_repo(place.location, pack_size=pack_size) as r:  # type: ignore[arg-type]
            await r.backup(io.BytesIO(data), name="base", kind="full")

    asyncio.run(go())
    return data


def _stopped_backup(
    place: Place, data: bytes, stale: float | None = None
) -> tuple[subprocess.Popen[bytes], set[str]]:
    """A `dedupe backup - --name c` fed the first FIRST bytes of `data`, stopped with
    SIGSTOP once it wrote packs of them. Returns it and the packs it wrote so far."""
    before = place.packs()
    proc = _start(place.env, "backup", "-", "--name", "c", stale=stale)
    _feed(proc, data[:FIRST])
    _wait_for("the backup's first packs", lambda: len(place.packs() - before) >= 8)
    proc.send_signal(signal.SIGSTOP)
    time.sleep(0.2)  # a put in flight lands
    return proc, place.packs() - before


def test_a_stopped_backup_whose_lock_was_removed_never_commits(place: Place, base: bytes) -> None:
    """The reproduction of the data loss: a backup stopped half way, `dedupe unlock --all`
    (what happens to any lock judged stale), `dedupe prune` (which deletes the backup's
    packs: nothing indexes them yet), then the backup continued. It must refuse to commit
    (it used to report a generation that does not restore), and leave the repository as
    it was; run again, it succeeds."""
    data = os.urandom(FIRST + 4 * MiB)
    proc, written = _stopped_backup(place, data)
    try:
        assert len(place.locks()) == 1
        code, out = _run(place.env, "unlock", "--all")
        assert code == 0, out
        code, out = _run(place.env, "prune")
        assert code == 0, out
        assert not written & place.packs(), "prune left the stopped backup's packs alone"
    finally:
        proc.send_signal(signal.SIGCONT)
    code, out = _finish(proc, data[FIRST:])
    assert code == REPOSITORY_LOCKED, out
    assert "removed or replaced by someone else" in out
    assert place.locks() == []  # its lock was not brought back either
    assert asyncio.run(_state(place.location)) == {"base": base}

    code, out = _run(place.env, "prune")  # what the refused backup left goes
    assert code == 0, out
    proc = _start(place.env, "backup", "-", "--name", "c")
    code, out = _finish(proc, data)
    assert code == 0, out
    assert asyncio.run(_state(place.location)) == {"base": base, "c": data}


def test_a_backup_stopped_past_the_stale_time_never_commits(place: Place, base: bytes) -> None:
    """The same without an operator: the backup is stopped for longer than the stale time
    (2 s here, 300 s by default); a prune judges its lock stale, removes it and deletes
    the backup's packs. Continued, the backup refuses to commit."""
    data = os.urandom(FIRST + 4 * MiB)
    proc, written = _stopped_backup(place, data, stale=2.0)
    try:
        time.sleep(2.5)
        code, out = _run(place.env, "prune", stale=2.0)
        assert code == 0, out
        assert place.locks() == [], "prune did not judge the stopped backup's lock stale"
        assert not written & place.packs()
    finally:
        proc.send_signal(signal.SIGCONT)
    code, out = _finish(proc, data[FIRST:])
    assert code == REPOSITORY_LOCKED, out
    assert place.locks() == []
    assert asyncio.run(_state(place.location)) == {"base": base}


def test_a_backup_stopped_past_the_stale_time_that_nobody_touched_commits(
    place: Place, base: bytes
) -> None:
    """Failing safe is not failing always: stopped past the stale time, but with no one
    acting on its lock, the backup finds its lock object as it left it when it renews it
    before the commit (compare-and-swap), so nobody can have removed its packs: it
    commits, and everything restores."""
    data = os.urandom(FIRST + 4 * MiB)
    proc, _written = _stopped_backup(place, data, stale=2.0)
    try:
        time.sleep(2.5)
    finally:
        proc.send_signal(signal.SIGCONT)
    code, out = _finish(proc, data[FIRST:])
    assert code == 0, out
    assert asyncio.run(_state(place.location)) == {"base": base, "c": data}


def test_prune_refuses_to_run_beside_a_backup_in_flight(place: Place, base: bytes) -> None:
    """A prune started while a backup is writing (its packs not indexed yet, so garbage
    to a prune) fails with RepositoryLocked, names the backup, and deletes nothing; the
    backup commits, and a prune afterwards keeps everything."""
    data = os.urandom(FIRST + 4 * MiB)
    proc = _start(place.env, "backup", "-", "--name", "c")
    before = place.packs()
    _feed(proc, data[:FIRST])
    _wait_for("the backup's first packs", lambda: len(place.packs() - before) >= 8)
    during = place.packs()
    code, out = _run(place.env, "prune")
    assert code == REPOSITORY_LOCKED, out
    assert "shared lock of 'backup'" in out
    assert during <= place.packs()
    code, out = _finish(proc, data[FIRST:])
    assert code == 0, out
    code, out = _run(place.env, "prune")
    assert code == 0, out
    assert asyncio.run(_state(place.location)) == {"base": base, "c": data}


def test_two_backup_processes_at_once_both_commit_and_dedupe(place: Place, base: bytes) -> None:
    """Two writers on one repository at the same time, both holding their shared lock
    while the other writes: both commit, both restore. What they stored twice (they ran
    side by side, so neither could see the other's chunks) is found by the next backup
    of either (nothing new) and merged by prune."""
    shared = os.urandom(FIRST)
    a = shared + os.urandom(2 * MiB)
    b = shared + os.urandom(3 * MiB)
    pa = _start(place.env, "backup", "-", "--name", "a")
    pb = _start(place.env, "backup", "-", "--name", "b")
    step = 2 * MiB
    for off in range(0, FIRST, step):  # interleaved
        _feed(pa, a[off : off + step])
        _feed(pb, b[off : off + step])
    _wait_for("both locks", lambda: len(place.locks()) == 2)
    code_a, out_a = _finish(pa, a[FIRST:])
    code_b, out_b = _finish(pb, b[FIRST:])
    assert (code_a, code_b) == (0, 0), out_a + out_b
    assert asyncio.run(_state(place.location)) == {"base": base, "a": a, "b": b}

    again = _start(place.env, "backup", "-", "--name", "b", "--type", "full", "--json")
    code, out = _finish(again, b)
    assert code == 0, out
    assert '"chunks_new": 0' in out, out
    code, out = _run(place.env, "prune")
    assert code == 0, out
    assert asyncio.run(_state(place.location)) == {"base": base, "a": a, "b": b}


HOLDER = """
import asyncio, sys
from dedupe.backends import open_backend
from dedupe.store.locks import RepositoryLock

async def main():
    backend = open_backend(sys.argv[1])
    async with RepositoryLock(backend, exclusive=True, operation="prune"):
        print("held", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
    await backend.close()

asyncio.run(main())
"""


def test_a_backup_told_to_retry_the_lock_waits_for_a_prune_to_finish(
    place: Place, base: bytes
) -> None:
    """`--retry-lock`: while another process holds the exclusive lock, a backup without it
    fails at once (13); one with it waits, still running, and commits once the lock is
    released. The option works before and after the command."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, place.location],
        env=place.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    data = os.urandom(2 * MiB)
    try:
        code, out = _finish(_start(place.env, "backup", "-", "--name", "c"), data)
        assert code == REPOSITORY_LOCKED, out
        before = _start(place.env, "--retry-lock", "2m", "backup", "-", "--name", "c")
        after = _start(place.env, "backup", "-", "--name", "d", "--retry-lock", "2m")
        time.sleep(1.5)
        assert before.poll() is None and after.poll() is None  # waiting, not failed
    finally:
        holder.communicate("release\n", timeout=60)
    assert holder.returncode == 0
    for proc in (before, after):  # their input follows once they hold their lock
        code, out = _finish(proc, data)
        assert code == 0, out
    assert asyncio.run(_state(place.location)) == {"base": base, "c": data, "d": data}
