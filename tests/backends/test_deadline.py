"""A directory that stops answering (dedupe/backends/deadline.py): each call of a
LocalBackend with `io_timeout` fails with BackendTimeout once its deadline passes, every
later call fails at once, an abandoned call changes nothing when the storage answers
again, and a replica sync or a backup with a sync replica ends with an error instead of
waiting for ever.

The stall is real: the test takes the exclusive flock that LocalBackend's conditional
calls (create_new, swap, delete_if) take on an object's directory, so the backend's
thread blocks in the kernel as it would on an NFS mount whose server is gone."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import io
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import env_for, make_repo

import dedupe.backends.deadline as deadline_module
from dedupe import Repository
from dedupe.backends import LocalBackend, open_backend
from dedupe.backends.deadline import Deadline, check_abandoned
from dedupe.errors import BackendTimeout, ObjectChanged, ReplicaError
from dedupe.replication import DEFAULT_REPLICA_IO_TIMEOUT, replica_io_timeout

REPLICA_PASSPHRASE = "the replica's own passphrase"


@contextmanager
def stalled(directory: Path) -> Iterator[None]:
    """Hold the flock a conditional call on `directory` needs: such calls block until
    the block ends."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def wait_for_io_threads(limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while any(t.name == "dedupe-io" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a deadline thread never ended"
        time.sleep(0.01)


def test_a_stalled_call_times_out_the_next_fails_at_once_and_nothing_is_created(
    run_asyncio: Any, tmp_path: Path
) -> None:
    async def go() -> None:
        backend = LocalBackend(tmp_path, io_timeout=0.5)
        await backend.put("locks/other", b"x")
        await backend.create_new("locks/first", b"made")  # a call that answers in time
        assert await backend.get("locks/first") == b"made"
        with stalled(tmp_path / "locks"):
            started = time.monotonic()
            with pytest.raises(BackendTimeout, match=r"within 0.5 s \(creating locks/mine\)"):
                await asyncio.wait_for(backend.create_new("locks/mine", b"ours"), 30)
            assert time.monotonic() - started >= 0.45  # it waited its deadline
            # The storage is gone: the next call fails without starting a thread to wait.
            threads = threading.active_count()
            with pytest.raises(BackendTimeout, match="stopped answering at creating locks/mine"):
                await backend.get("locks/other")
            assert threading.active_count() <= threads
        # The storage answers again: the abandoned call stops at its commit point.
        wait_for_io_threads()
        assert sorted(os.listdir(tmp_path / "locks")) == ["first", "other"]

    run_asyncio(go())


def test_an_abandoned_swap_or_delete_changes_nothing(run_asyncio: Any, tmp_path: Path) -> None:
    async def go() -> None:
        for call in ("swap", "delete_if"):
            root = tmp_path / call
            backend = LocalBackend(root, io_timeout=0.3)
            await backend.put("locks/lock", b"old")
            with stalled(root / "locks"), pytest.raises(BackendTimeout):
                if call == "swap":
                    await backend.swap("locks/lock", b"new", b"old")
                else:
                    await backend.delete_if("locks/lock", b"old")
            wait_for_io_threads()
            assert (root / "locks" / "lock").read_bytes() == b"old"
            assert os.listdir(root / "locks") == ["lock"]  # no temporary file left

    run_asyncio(go())


def test_errors_of_a_call_with_a_deadline_are_its_own(run_asyncio: Any, tmp_path: Path) -> None:
    """A call that fails in time fails with its own error, as without a deadline."""

    async def go() -> None:
        backend = LocalBackend(tmp_path, io_timeout=5)
        await backend.create_new("locks/a", b"1")
        with pytest.raises(ObjectChanged):
            await backend.create_new("locks/a", b"2")
        assert await backend.list("locks/") == ["locks/a"]

    run_asyncio(go())


def test_the_replica_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEDUPE_REPLICA_IO_TIMEOUT", raising=False)
    assert replica_io_timeout() == DEFAULT_REPLICA_IO_TIMEOUT
    monkeypatch.setenv("DEDUPE_REPLICA_IO_TIMEOUT", "2.5")
    assert replica_io_timeout() == 2.5
    monkeypatch.setenv("DEDUPE_REPLICA_IO_TIMEOUT", "0")
    assert replica_io_timeout() is None
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv("DEDUPE_REPLICA_IO_TIMEOUT", bad)
        with pytest.raises(ReplicaError, match="not a number of seconds"):
            replica_io_timeout()
    assert isinstance(open_backend(str(Path("somewhere")), io_timeout=3), LocalBackend)


def test_a_stalled_replica_fails_a_sync_backup_and_the_sync_command_in_time(
    run_asyncio: Any, tmp_path: Path, cli: Any, cli_env: dict[str, str]
) -> None:
    """A sync replica whose storage stops answering: the backup fails with ReplicaError
    after the deadline and commits nothing; `dedupe replica sync` of an async replica
    ends with an error naming the deadline, then catches up once the storage answers."""
    replica = tmp_path / "r"

    async def go() -> None:
        await (await make_repo(str(replica), REPLICA_PASSPHRASE, cache=False)).close()
        async with await make_repo(tmp_path / "p", cache=False) as repo:
            repo.replicas.passphrase = lambda name: REPLICA_PASSPHRASE.encode()
            repo.replicas.io_timeout = 0  # no limit, as in DEDUPE_REPLICA_IO_TIMEOUT
            assert repo.replicas.io_timeout is None
            repo.replicas.io_timeout = 1.0
            await repo.replicas.add(replica, name="dr", mode="sync")
            await repo.backup(io.BytesIO(os.urandom(300_000)), name="db")
            with stalled(replica / "locks"):
                with pytest.raises(ReplicaError, match="did not answer within 1 s"):
                    await asyncio.wait_for(
                        repo.backup(io.BytesIO(os.urandom(300_000)), name="db"), 60
                    )
            assert len(await repo.generations()) == 1
            await repo.replicas.remove("dr")
            await repo.replicas.add(replica, name="dr", mode="async")
            await repo.backup(io.BytesIO(os.urandom(300_000)), name="db")

    run_asyncio(go())
    env = {
        **env_for(str(tmp_path / "p"), cli_env),
        "DEDUPE_REPLICA_DR_PASSWORD": REPLICA_PASSPHRASE,
        "DEDUPE_REPLICA_IO_TIMEOUT": "1",
    }
    with stalled(replica / "locks"):
        stuck = cli("replica", "sync", env=env)  # without the deadline: waits for ever
    assert stuck.returncode == ReplicaError.exit_code, stuck.stderr.decode()
    assert b"did not answer within 1 s (creating locks/" in stuck.stdout, stuck.stdout.decode()
    synced = cli("replica", "sync", env=env)
    assert synced.returncode == 0, synced.stderr.decode()

    async def check() -> None:
        async with await Repository.open(str(replica), REPLICA_PASSPHRASE, cache=False) as r:
            assert len(await r.generations()) == 2

    run_asyncio(check())


def test_a_deadline_passes_results_and_errors_through_and_a_late_call_commits_nothing(
    run_asyncio: Any,
) -> None:
    """Deadline.run on a function blocked on an event (a real blocked thread): in time,
    its result or its exception; late, BackendTimeout, and the function stops at its
    commit point (check_abandoned) once it is let go; cancelled, the same."""
    committed: list[str] = []

    def call(gate: threading.Event, what: str) -> str:
        gate.wait(10)
        check_abandoned()
        committed.append(what)
        return what

    def fail() -> None:
        raise ValueError("its own error")

    async def go() -> None:
        deadline = Deadline(0.3, "here")
        opened = threading.Event()
        opened.set()
        assert await deadline.run("in time", call, opened, "in time") == "in time"
        with pytest.raises(ValueError, match="its own error"):
            await deadline.run("failing", fail)
        gate = threading.Event()
        with pytest.raises(BackendTimeout, match=r"here did not answer within 0.3 s \(late\)"):
            await deadline.run("late", call, gate, "late")
        gate.set()
        cancelled = Deadline(30, "there")
        second = threading.Event()
        task = asyncio.ensure_future(cancelled.run("cancelled", call, second, "cancelled"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        second.set()
        wait_for_io_threads()
        assert committed == ["in time"]
        with pytest.raises(ValueError, match="positive"):
            Deadline(0, "nowhere")

    run_asyncio(go())


def test_a_calls_own_timeout_error_is_its_own_and_stalls_nothing(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """ETIMEDOUT from the storage (a soft mount) is an OSError and a TimeoutError: it
    reaches the caller as itself, at once, and later calls still run."""

    def timed_out() -> None:
        raise OSError(errno.ETIMEDOUT, "Connection timed out")

    async def go() -> None:
        deadline = Deadline(30, "here")
        with pytest.raises(OSError) as raised:
            await asyncio.wait_for(deadline.run("soft", timed_out), 25)
        assert not isinstance(raised.value, BackendTimeout)
        assert await deadline.run("next", lambda: "answered") == "answered"

    run_asyncio(go())


def test_a_cancel_that_lands_with_the_answer_is_not_lost(
    run_asyncio: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C or SIGTERM cancels the task in the same loop iteration as the call's answer
    arrives: the caller is cancelled, as with asyncio.to_thread (Python 3.11's wait_for
    returned the answer and dropped the cancel)."""
    real = asyncio.get_running_loop

    class CancelOnAnswer:
        def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
            self._loop, self._task = loop, task

        def __getattr__(self, name: str) -> Any:
            return getattr(self._loop, name)

        def create_future(self) -> asyncio.Future[Any]:
            future = self._loop.create_future()
            future.add_done_callback(lambda _f: self._task.cancel())
            return future

    outcome: list[str] = []

    async def go() -> None:
        task = asyncio.current_task()
        assert task is not None
        monkeypatch.setattr(
            deadline_module.asyncio, "get_running_loop", lambda: CancelOnAnswer(real(), task)
        )
        try:
            await Deadline(30, "here").run("answer", lambda: "answer")
            outcome.append("returned")
        except asyncio.CancelledError:
            outcome.append("cancelled")
        finally:
            monkeypatch.undo()

    run_asyncio(go())
    assert outcome == ["cancelled"]


def test_a_swap_given_up_while_it_compares_changes_nothing(
    run_asyncio: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """swap reads the object to compare it before it replaces it; a stall in that read
    (simulated: the flock cannot stall a read) gives the call up before its commit point."""
    gate = threading.Event()

    async def go() -> None:
        backend = LocalBackend(tmp_path, io_timeout=0.3)
        await backend.put("locks/lock", b"old")
        read = backend._get_sync

        def stalling_read(name: str, offset: int, length: int | None) -> bytes:
            if threading.current_thread().name == "dedupe-io":
                gate.wait(10)
            return read(name, offset, length)

        monkeypatch.setattr(backend, "_get_sync", stalling_read)
        with pytest.raises(BackendTimeout):
            await backend.swap("locks/lock", b"new", b"old")
        gate.set()
        wait_for_io_threads()

    run_asyncio(go())
    assert (tmp_path / "locks" / "lock").read_bytes() == b"old"
    assert os.listdir(tmp_path / "locks") == ["lock"]


def test_a_stream_given_up_is_not_read_on(run_asyncio: Any, tmp_path: Path) -> None:
    """put_stream's parts come from the caller's scratch file, which the caller closes
    once it gave up: the abandoned call asks for no part after the one it was stalled
    in, and leaves nothing behind."""
    gate = threading.Event()
    asked: list[int] = []

    def parts() -> Iterator[bytes]:
        for i in range(6):
            asked.append(i)
            if i == 2:
                gate.wait(10)  # the scratch file's read stalls here
            yield bytes([i]) * 1000

    async def go() -> None:
        backend = LocalBackend(tmp_path, io_timeout=0.3)
        with pytest.raises(BackendTimeout):
            await backend.put_stream("generations/g", parts())
        gate.set()
        wait_for_io_threads()

    run_asyncio(go())
    assert asked == [0, 1, 2]
    assert os.listdir(tmp_path / "generations") == []


def test_naming_a_replica_on_a_stalled_mount_ends_in_time(
    run_asyncio: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`replica add` resolves the replica's path (to refuse this repository itself) under
    the deadline too: a stat on a stalled mount (simulated: realpath waits) does not block
    the event loop."""
    replica = str(tmp_path / "r")
    resolve = os.path.realpath

    def stalled_realpath(path: Any, *args: Any, **kwargs: Any) -> str:
        if os.fspath(path).startswith(replica):
            time.sleep(3)
        return resolve(path, *args, **kwargs)

    async def go() -> None:
        await (await make_repo(replica, REPLICA_PASSPHRASE, cache=False)).close()
        async with await make_repo(tmp_path / "p", cache=False) as repo:
            repo.replicas.passphrase = lambda name: REPLICA_PASSPHRASE.encode()
            repo.replicas.io_timeout = 0.5
            monkeypatch.setattr(os.path, "realpath", stalled_realpath)
            # realpath answers after 3 s: only the deadline raises this.
            with pytest.raises(BackendTimeout, match="resolving its path"):
                await repo.replicas.add(replica, name="dr")
            monkeypatch.undo()
        wait_for_io_threads()

    run_asyncio(go())


def test_a_put_given_up_while_it_writes_leaves_no_object(
    run_asyncio: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put stalled while it writes its temporary file (simulated: the flock does not
    stall a write) stops before its rename once given up: its caller may reuse the buffer,
    so no object appears under the name, and the temporary file goes."""
    gate = threading.Event()

    async def go() -> None:
        backend = LocalBackend(tmp_path, io_timeout=0.3)
        write = backend._write_tmp

        def stalling_write(directory: str, parts: Any) -> str:
            tmp = write(directory, parts)
            if threading.current_thread().name == "dedupe-io":
                gate.wait(10)
            return tmp

        monkeypatch.setattr(backend, "_write_tmp", stalling_write)
        with pytest.raises(BackendTimeout, match="writing packs/ab/pack"):
            await backend.put("packs/ab/pack", b"sealed pack")
        gate.set()
        wait_for_io_threads()

    run_asyncio(go())
    assert os.listdir(tmp_path / "packs" / "ab") == []
