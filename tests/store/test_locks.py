"""Repository locks (dedupe/store/locks.py, docs/FORMAT.md section 13): conflicts, stale
detection by age and by dead process, release on every exit path, refresh, races."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, closed, make_repo, part_live_packs

import dedupe.store.locks as locks_module
from dedupe import Repository
from dedupe.backends import Backend
from dedupe.backends.local import LocalBackend
from dedupe.backends.s3 import S3Backend
from dedupe.errors import RepositoryLocked
from dedupe.store.locks import LockInfo, RepositoryLock, list_locks, remove_locks


def _record(
    *, exclusive: bool, host: str, pid: int, age: float, operation: str = "backup"
) -> bytes:
    t = (datetime.now(UTC) - timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return json.dumps(
        {
            "version": 1,
            "exclusive": exclusive,
            "host": host,
            "pid": pid,
            "operation": operation,
            "created": t,
            "refreshed": t,
        }
    ).encode()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


async def _names(backend: Backend) -> list[str]:
    return sorted(await backend.list("locks/"))


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Where the locks live: a local directory, or an S3 API server (conditional PUTs)."""
    if request.param == "s3":
        return S3Backend(request.getfixturevalue("s3_location"))
    return LocalBackend(tmp_path)


def test_exclusive_and_shared_conflicts(run, backend: Backend) -> None:  # type: ignore[no-untyped-def]

    async def go() -> None:
        async with RepositoryLock(backend, exclusive=False, operation="backup"):
            async with RepositoryLock(backend, exclusive=False, operation="backup"):
                assert len(await _names(backend)) == 2  # shared locks coexist
                with pytest.raises(RepositoryLocked) as e:
                    async with RepositoryLock(backend, exclusive=True, operation="prune"):
                        pass
                msg = str(e.value)
                assert "backup" in msg and socket.gethostname() in msg and "unlock" in msg
                assert len(await _names(backend)) == 2  # the refused lock left nothing
        async with RepositoryLock(backend, exclusive=True, operation="prune"):
            with pytest.raises(RepositoryLocked, match="exclusive lock of 'prune'"):
                async with RepositoryLock(backend, exclusive=False, operation="backup"):
                    pass
            with pytest.raises(RepositoryLocked):
                async with RepositoryLock(
                    backend, exclusive=True, operation="forget", race_wait=0.1
                ):
                    pass
        assert await _names(backend) == []

    run(closed(backend, go()))


def test_stale_by_age_blocks_no_one_and_is_removed_by_whoever_it_conflicts_with(  # type: ignore[no-untyped-def]
    run, backend: Backend
) -> None:

    async def go() -> None:
        await backend.put(
            "locks/" + "a" * 32,
            _record(exclusive=True, host="elsewhere", pid=1, age=1000, operation="prune"),
        )
        fresh = _record(exclusive=False, host="elsewhere", pid=1, age=10)
        # A shared locker goes past the stale exclusive lock, and removes it (its holder,
        # if only stopped, must find it gone).
        async with RepositoryLock(backend, exclusive=False, operation="backup") as lk:
            assert [s.name for s in lk.removed_stale] == ["locks/" + "a" * 32]
            assert "not refreshed" in (lk.removed_stale[0].stale_reason() or "")
        assert await _names(backend) == []
        # A stale shared lock: a shared locker leaves it, an exclusive one removes it.
        await backend.put(
            "locks/" + "c" * 32,
            _record(exclusive=False, host="elsewhere", pid=1, age=1000, operation="backup"),
        )
        async with RepositoryLock(backend, exclusive=False, operation="backup") as lk:
            assert lk.removed_stale == []
        async with RepositoryLock(backend, exclusive=True, operation="prune") as lk:
            assert [s.name for s in lk.removed_stale] == ["locks/" + "c" * 32]
        assert await _names(backend) == []
        # A fresh lock of another host blocks, whatever its pid.
        await backend.put("locks/" + "b" * 32, fresh)
        with pytest.raises(RepositoryLocked, match="elsewhere"):
            async with RepositoryLock(backend, exclusive=True, operation="prune"):
                pass
        # The stale time is a parameter.
        async with RepositoryLock(
            backend, exclusive=True, operation="prune", refresh_interval=1, stale_after=5
        ):
            pass
        assert await _names(backend) == []

    run(closed(backend, go()))


def test_stale_by_dead_process_on_this_host(run, backend: Backend) -> None:  # type: ignore[no-untyped-def]
    host = socket.gethostname()

    async def go() -> None:
        await backend.put(
            "locks/" + "c" * 32, _record(exclusive=False, host=host, pid=_dead_pid(), age=0)
        )
        async with RepositoryLock(backend, exclusive=True, operation="prune") as lk:
            assert len(lk.removed_stale) == 1
            assert "no longer exists" in (lk.removed_stale[0].stale_reason() or "")
        # A live process of this host holds its lock.
        await backend.put(
            "locks/" + "d" * 32, _record(exclusive=False, host=host, pid=os.getpid(), age=0)
        )
        with pytest.raises(RepositoryLocked):
            async with RepositoryLock(backend, exclusive=True, operation="prune"):
                pass

    run(closed(backend, go()))


def test_released_on_exception_and_cancellation(run, backend: Backend) -> None:  # type: ignore[no-untyped-def]

    async def go() -> None:
        with pytest.raises(KeyError):
            async with RepositoryLock(backend, exclusive=True, operation="prune"):
                assert len(await _names(backend)) == 1
                raise KeyError("boom")
        assert await _names(backend) == []

        entered = asyncio.Event()

        async def holder() -> None:
            async with RepositoryLock(
                backend, exclusive=True, operation="prune", refresh_interval=0.01, stale_after=5
            ):
                entered.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(holder())
        await entered.wait()
        await asyncio.sleep(0.05)  # let a refresh or two run
        assert len(await _names(backend)) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _names(backend) == []

    run(closed(backend, go()))


def test_refresh_rewrites_the_timestamp_and_notices_loss(run, backend: Backend) -> None:  # type: ignore[no-untyped-def]

    async def go() -> None:
        async with RepositoryLock(
            backend, exclusive=False, operation="backup", refresh_interval=0.02, stale_after=1
        ) as lk:
            first = (await list_locks(backend))[0]
            await asyncio.sleep(0.2)
            second = (await list_locks(backend))[0]
            assert second.refreshed > first.refreshed
            assert second.created == first.created
            lk.check()
            await backend.delete(lk.name)  # someone judged us stale
            for _ in range(100):
                if lk.lost:
                    break
                await asyncio.sleep(0.02)
            assert lk.lost
            with pytest.raises(RepositoryLocked, match="removed or replaced by someone else"):
                lk.check()
            with pytest.raises(RepositoryLocked, match="removed or replaced by someone else"):
                await lk.confirm()
            await asyncio.sleep(0.1)  # five more refresh intervals
            assert await _names(backend) == []  # never brought back by the refresher

    run(closed(backend, go()))


def test_confirm_sees_a_removed_or_replaced_lock_at_once(run, backend: Backend) -> None:  # type: ignore[no-untyped-def]
    """confirm() renews by compare-and-swap: it does not wait for the next refresh to
    notice that the lock was removed (or overwritten by another writer), and it renews a
    lock that is still its own."""

    async def go() -> None:
        for how in ("removed", "replaced"):
            async with RepositoryLock(backend, exclusive=False, operation="backup") as lk:
                before = await backend.get(lk.name)
                await asyncio.sleep(0.01)
                await lk.confirm()
                assert await backend.get(lk.name) != before  # renewed: a new `refreshed`
                if how == "removed":
                    await backend.delete(lk.name)
                else:
                    await backend.put(lk.name, before)
                with pytest.raises(RepositoryLocked):
                    await lk.confirm()
                assert lk.lost
                assert await _names(backend) == ([] if how == "removed" else [lk.name])

    run(closed(backend, go()))


def test_a_lease_that_ran_out_is_refused_by_check(  # type: ignore[no-untyped-def]
    run, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check() counts on a clock that runs on while the process is stopped: once more
    than stale_after - margin passed since the last renewal, it refuses even though
    nobody took the lock; confirm() then renews it (the object is still ours, so nobody
    acted on it) and all is well again."""
    now = [1000.0]
    monkeypatch.setattr(locks_module, "_lease_clock", lambda: now[0])

    async def go() -> None:
        async with RepositoryLock(
            backend, exclusive=True, operation="prune", refresh_interval=60, stale_after=300
        ) as lk:
            now[0] += 239
            lk.check()
            now[0] += 2  # 241 s > 300 - 60
            with pytest.raises(RepositoryLocked, match="last renewed 241 s ago"):
                lk.check()
            await lk.confirm()
            lk.check()

    run(closed(backend, go()))


def test_stale_lock_removal_spares_a_lock_refreshed_meanwhile(run, backend: Backend) -> None:  # type: ignore[no-untyped-def]
    """Removing a stale lock is a delete_if of the bytes it was judged by: a holder that
    came back and refreshed it between the judgement and the delete keeps it."""

    async def go() -> None:
        lk = RepositoryLock(backend, exclusive=False, operation="backup")
        await lk.acquire()
        try:
            judged = (await list_locks(backend))[0]
            await lk.confirm()  # the holder is back
            assert not await locks_module._delete_as_read(backend, judged)
            assert await _names(backend) == [lk.name]
            lk.check()
        finally:
            await lk.release()

    run(closed(backend, go()))


def test_racing_exclusive_lockers_never_both_win(run, backend: Backend) -> None:  # type: ignore[no-untyped-def]

    async def go() -> None:
        for _ in range(10):
            inside = 0
            most = 0
            outcomes: list[str] = []

            async def attempt(outcomes: list[str] = outcomes) -> None:
                nonlocal inside, most
                try:
                    async with RepositoryLock(
                        backend, exclusive=True, operation="prune", race_wait=0.5
                    ):
                        inside += 1
                        most = max(most, inside)
                        await asyncio.sleep(0.01)
                        inside -= 1
                        outcomes.append("won")
                except RepositoryLocked:
                    outcomes.append("lost")

            await asyncio.gather(attempt(), attempt(), attempt())
            assert most == 1
            assert "won" in outcomes or outcomes == ["lost"] * 3
            assert await _names(backend) == []

    run(closed(backend, go()))


def test_unlock_removes_stale_or_all(run, backend: Backend) -> None:  # type: ignore[no-untyped-def]

    async def go() -> None:
        await backend.put("locks/" + "1" * 32, _record(exclusive=True, host="x", pid=5, age=10_000))
        await backend.put("locks/" + "2" * 32, _record(exclusive=False, host="x", pid=6, age=1))
        await backend.put("locks/" + "3" * 32, b"not json")  # damaged: counts as stale
        removed = await remove_locks(backend)
        assert sorted(lk.name[-1] for lk in removed) == ["1", "3"]
        assert [lk.pid for lk in await list_locks(backend)] == [6]
        removed = await remove_locks(backend, all_locks=True)
        assert [lk.pid for lk in removed] == [6]
        assert await _names(backend) == []

    run(closed(backend, go()))


def test_lock_object_format(run, backend: Backend) -> None:  # type: ignore[no-untyped-def]

    async def go() -> None:
        async with RepositoryLock(backend, exclusive=True, operation="prune") as lk:
            (name,) = await _names(backend)
            assert name == lk.name and len(name) == len("locks/") + 32
            obj = json.loads(await backend.get(name))
            assert set(obj) == {
                "version",
                "exclusive",
                "host",
                "pid",
                "operation",
                "created",
                "refreshed",
            }
            assert obj["version"] == 1 and obj["exclusive"] is True
            info = LockInfo.parse(name, await backend.get(name))
            assert info.operation == "prune" and info.stale_reason() is None

    run(closed(backend, go()))


@pytest.mark.parametrize(
    "stage", ["repacking", "writing index", "deleting index objects", "deleting packs"]
)
def test_a_prune_whose_lock_is_removed_stops_before_its_next_step(  # type: ignore[no-untyped-def]
    run, tmp_path: Path, stage: str
) -> None:
    """Prune confirms its lock before each step that writes or deletes (FORMAT.md 14.1):
    its lock removed when it reaches `stage` (as a prune stopped past the stale time would
    find it), it raises RepositoryLocked before that step does anything, and every
    generation still restores."""
    root = tmp_path / "repo"
    kept = os.urandom(300_000)

    async def go() -> None:
        async with await make_repo(root) as repo:
            gone_id, keep_id = await part_live_packs(repo, kept)
            before = {
                d: sorted(p.name for p in (root / d).rglob("*") if p.is_file())
                for d in ("packs", "index")
            }

            def steal(progress: Any) -> None:
                if progress.stage == stage:
                    for lock in (root / "locks").iterdir():
                        lock.unlink()

            with pytest.raises(RepositoryLocked, match="removed or replaced"):
                await repo.prune(repack_threshold=0.0, progress=steal)
            after = {
                d: sorted(p.name for p in (root / d).rglob("*") if p.is_file())
                for d in ("packs", "index")
            }
            # New packs and the new index object may be there already; no old pack was
            # deleted, nor (before step 3c) any old index object.
            assert set(before["packs"]) <= set(after["packs"])
            if stage != "deleting packs":
                assert set(before["index"]) <= set(after["index"])
        async with await Repository.open(root, PASSPHRASE) as repo:
            out = io.BytesIO()
            await repo.restore(keep_id, out)
            assert out.getvalue() == kept
            assert (await repo.verify(read_data=True)).ok
            await repo.prune()

    run(go())


def test_a_stale_exclusive_lock_a_backup_goes_past_is_removed_not_ignored(  # type: ignore[no-untyped-def]
    run, backend: Backend
) -> None:
    """A prune (exclusive) that stopped past the stale time, then a backup (shared) that
    starts: the backup may go on, but only after removing the stale lock, so that the
    prune, continuing, finds its lock gone at its next confirm() and deletes nothing
    beside the backup. (Ignoring the stale lock would leave it in place, the prune's
    compare-and-swap would succeed, and it would delete packs the backup now uses.)"""

    async def go() -> None:
        prune = RepositoryLock(
            backend, exclusive=True, operation="prune", refresh_interval=30, stale_after=60
        )
        await prune.acquire()
        try:
            await asyncio.sleep(0.7)  # "stopped": no refresh for longer than the others' 0.5 s
            async with RepositoryLock(
                backend, exclusive=False, operation="backup", refresh_interval=0.1, stale_after=0.5
            ) as backup:
                assert [lk.name for lk in backup.removed_stale] == [prune.name]
                with pytest.raises(RepositoryLocked, match="removed or replaced"):
                    await prune.confirm()
                assert await _names(backend) == [backup.name]
        finally:
            await prune.release()

    run(closed(backend, go()))


def test_a_stale_shared_lock_is_left_to_its_holder_by_another_backup(  # type: ignore[no-untyped-def]
    run, backend: Backend
) -> None:
    """Shared locks do not conflict: a backup that finds another backup's stale lock
    leaves it alone (that backup, if only stopped, may still commit safely)."""

    async def go() -> None:
        first = RepositoryLock(
            backend, exclusive=False, operation="backup", refresh_interval=30, stale_after=60
        )
        await first.acquire()
        try:
            await asyncio.sleep(0.7)
            async with RepositoryLock(
                backend, exclusive=False, operation="backup", refresh_interval=0.1, stale_after=0.5
            ) as second:
                assert second.removed_stale == []
                await first.confirm()
                assert sorted(await _names(backend)) == sorted([first.name, second.name])
        finally:
            await first.release()

    run(closed(backend, go()))


def test_a_prune_that_loses_its_lock_half_way_through_its_deletions_stops(  # type: ignore[no-untyped-def]
    run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside the long step "delete the packs nothing lists", prune confirms its lock every
    DELETE_BATCH deletions (2 here): its lock removed after its first deletion, it deletes
    at most the rest of that batch, then stops with RepositoryLocked."""
    import dedupe.engine.prune as prune_module

    monkeypatch.setattr(prune_module, "DELETE_BATCH", 2)
    root = tmp_path / "repo"
    kept = os.urandom(100_000)

    async def go() -> None:
        async with await make_repo(root) as repo:
            keep = await repo.backup(io.BytesIO(kept), name="a", kind="full")
            gone = await repo.backup(io.BytesIO(os.urandom(900_000)), name="b", kind="full")
            await repo.forget(ids=[gone.id])
            packs_before = {p.name for p in (root / "packs").rglob("*") if p.is_file()}
            backend = repo._store.backend
            real_delete = backend.delete
            deleted: list[str] = []

            async def delete(name: str) -> None:
                await real_delete(name)
                if name.startswith("packs/"):
                    deleted.append(name)
                    if len(deleted) == 1:
                        for lock in (root / "locks").iterdir():
                            lock.unlink()  # judged stale by someone, right now

            monkeypatch.setattr(backend, "delete", delete)
            with pytest.raises(RepositoryLocked, match="removed or replaced"):
                await repo.prune()
            monkeypatch.undo()
            assert 1 <= len(deleted) <= 2
            left = {p.name for p in (root / "packs").rglob("*") if p.is_file()}
            assert len(packs_before - left) == len(deleted) and len(packs_before) - 2 > 2
        async with await Repository.open(root, PASSPHRASE) as repo:
            out = io.BytesIO()
            await repo.restore(keep.id, out)
            assert out.getvalue() == kept
            await repo.prune()

    run(go())


def test_a_waiting_locker_gets_the_lock_once_the_holder_goes(run, backend: Backend) -> None:  # type: ignore[no-untyped-def]
    """With `wait`, a conflict is tried again until the holder is gone (then the lock is
    taken) or the wait runs out (then RepositoryLocked, and nothing of the waiter's is
    left in locks/)."""
    events: list[str] = []

    async def go() -> None:
        holder = RepositoryLock(backend, exclusive=True, operation="prune")
        await holder.acquire()
        with pytest.raises(RepositoryLocked):
            async with RepositoryLock(backend, exclusive=False, operation="backup", wait=0.5):
                pass
        assert await _names(backend) == [holder.name]

        async def waiter() -> None:
            async with RepositoryLock(backend, exclusive=False, operation="backup", wait=60):
                events.append("waiter has it")

        task = asyncio.create_task(waiter())
        await asyncio.sleep(1.0)
        assert not task.done()  # still waiting, not failed
        events.append("holder releases")
        await holder.release()
        await asyncio.wait_for(task, 60)
        assert events == ["holder releases", "waiter has it"]
        assert await _names(backend) == []

    run(closed(backend, go()))
