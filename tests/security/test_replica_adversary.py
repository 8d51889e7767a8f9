"""Adversary review of replicas (docs/FORMAT.md 4.3.1, dedupe/replication.py).

Attackers, as in section 11: write access to the primary's and/or the replica's storage
and no key; a holder of a key *of the replica* that may back up there (every host that
runs a sync backup, or `replica sync`, holds one: the primary's writers included); a
reader key of the primary.

The first tests are the attacks the review found the change accepting, each asserting
the secure outcome (fixed since: copies checked against the generation's chunk ids, the
lock confirmed after every wait, heal for admins only, copies chaining onto the copy of
their original's parent, locations stored absolute). The others pin checks of the change
that no other test would miss if they were deleted.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo

from dedupe import Repository
from dedupe.crypto import KdfParams
from dedupe.errors import (
    DedupeError,
    IntegrityError,
    ReplicaError,
    RepositoryLocked,
    RoleNotPermitted,
    RollbackDetected,
)
from dedupe.format.keyring import Keyring
from dedupe.store.repository import RepositoryStore

REPLICA_PASSPHRASE = "the replica's own passphrase"
HOSTS_PASSPHRASE = "the replica key the primary's hosts hold"
READER_PASSPHRASE = "a reader of the primary"
FAR_FUTURE = "2999-01-01T00:00:00.000000Z"


async def open_primary(
    path: Path, passphrase: str = PASSPHRASE, replica: str = REPLICA_PASSPHRASE
) -> Repository:
    """The primary, opening its replica with `replica` (by default the replica's admin
    key: a repair both restores from the replica and, with sync, backs up into it)."""
    repo = await Repository.open(path, passphrase, cache=False)
    repo.replicas.passphrase = lambda name: replica.encode()
    return repo


async def new_pair(tmp_path: Path, mode: str = "async") -> tuple[Path, Path]:
    """A primary (admin PASSPHRASE, a reader) and a replica (admin REPLICA_PASSPHRASE)
    added as `dr`, which has a writer key (HOSTS_PASSPHRASE) for the hosts that back up
    into it: the primary's writers hold it."""
    primary, replica = tmp_path / "p", tmp_path / "r"
    async with await make_repo(replica, REPLICA_PASSPHRASE, cache=False) as r:
        await r.keys.add(HOSTS_PASSPHRASE, role="writer", name="hosts", kdf=KdfParams.weakest())
    async with await make_repo(primary, cache=False) as p:
        p.replicas.passphrase = lambda name: HOSTS_PASSPHRASE.encode()
        await p.keys.add(READER_PASSPHRASE, role="reader", name="r", kdf=KdfParams.weakest())
        await p.replicas.add(replica, name="dr", mode=mode)
    return primary, replica


async def plant_copy(replica: Path, primary_id: str, gen_id: str, data: bytes, name: str) -> str:
    """What a holder of the replica's writer key can do: a generation there that claims to
    be the copy of the primary's `gen_id`, holding `data`, dated after any real copy."""
    async with await Repository.open(replica, HOSTS_PASSPHRASE, cache=False) as there:
        labels = {
            "host": "h",
            "tags": [],
            "created": FAR_FUTURE,
            "copied_from": f"{primary_id}/{gen_id}",
        }
        options = {"exclude": (), "strict": True, "labels": labels}
        stats = await there._backup(io.BytesIO(data), name, "full", None, None, None, True, options)
        return stats.id


def pack_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "packs").rglob("*") if p.is_file())


# --- findings ------------------------------------------------------------------------------------


def test_a_readers_restore_from_a_replica_writes_only_the_generations_bytes(
    run_asyncio: Any, tmp_path: Path
) -> None:
    data, evil = os.urandom(300_000), b"#!/bin/sh\nrm -rf ~\n" * 1000

    async def go() -> None:
        primary, replica = await new_pair(tmp_path)
        async with await open_primary(primary) as p:
            gen_id = (await p.backup(io.BytesIO(data), name="db")).id
            (report,) = await p.replicas.sync()
            assert report.error is None
            await plant_copy(replica, p.id, gen_id, evil, "db")
        for f in pack_files(primary):  # write access to the primary's storage
            f.unlink()
        out = tmp_path / "out"
        async with await open_primary(primary, READER_PASSPHRASE) as reader:
            try:
                await reader.restore(gen_id, out)
            except IntegrityError:
                assert not out.exists()
                return
        assert out.read_bytes() == data, "the reader restored bytes that are not the generation's"

    run_asyncio(go())


def test_a_planted_copy_does_not_stop_sync_from_copying_the_generation(
    run_asyncio: Any, tmp_path: Path
) -> None:
    data = os.urandom(300_000)

    async def go() -> None:
        primary, replica = await new_pair(tmp_path)
        async with await open_primary(primary) as p:
            gen_id = (await p.backup(io.BytesIO(data), name="db")).id
            await plant_copy(replica, p.id, gen_id, os.urandom(1000), "db")
            await p.replicas.sync()
            (status,) = await p.replicas.status()
            assert status.behind == []
        async with await Repository.open(replica, REPLICA_PASSPHRASE, cache=False) as r:
            restored = []
            for g in await r.generations():
                if g.copied_from == f"{p.id}/{gen_id}":
                    buf = io.BytesIO()
                    await r.restore(g.id, buf)
                    restored.append(buf.getvalue())
        assert data in restored, "the replica holds no copy of the generation's bytes"

    run_asyncio(go())


def test_a_planted_copy_does_not_shadow_the_real_one_in_a_repair(
    run_asyncio: Any, tmp_path: Path
) -> None:
    data = os.urandom(300_000)

    async def go() -> None:
        primary, replica = await new_pair(tmp_path)
        async with await open_primary(primary) as p:
            gen_id = (await p.backup(io.BytesIO(data), name="db")).id
            await p.replicas.sync()
            await plant_copy(replica, p.id, gen_id, os.urandom(1000), "db")
        for f in pack_files(primary)[:2]:
            f.unlink()
        out = tmp_path / "out"
        async with await open_primary(primary) as p:
            try:
                await p.restore(gen_id, out)
            except IntegrityError as e:
                raise AssertionError(f"the real copy in the replica was not used: {e}") from e
        assert out.read_bytes() == data

    run_asyncio(go())


def _hook_commit(monkeypatch: pytest.MonkeyPatch, which: str, attack: Any) -> list[Exception]:
    """Run `attack()` inside RepositoryStore.commit_manifest of the repository whose id is
    `which`, before the original; errors of the attack are kept, not raised."""
    original = RepositoryStore.commit_manifest
    errors: list[Exception] = []
    done: list[bool] = []

    async def hooked(self: RepositoryStore, *args: Any, **kwargs: Any) -> str:
        if self.repository_id.hex() == which and not done:
            done.append(True)
            try:
                await attack()
            except Exception as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(RepositoryStore, "commit_manifest", hooked)
    return errors


async def _lose_lock_and_prune(root: Path, passphrase: str) -> None:
    """Write access, no key: the running backup's lock goes; the repository's own
    scheduled prune then runs (it would have waited for the lock)."""
    for f in (root / "locks").iterdir():
        f.unlink()
    async with await Repository.open(root, passphrase, cache=False) as admin:
        await admin.prune()


def test_a_sync_backup_whose_lock_is_lost_while_it_waits_for_a_replica_commits_nothing(
    run_asyncio: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(400_000)

    async def go() -> None:
        primary, replica = await new_pair(tmp_path, mode="sync")
        async with await Repository.open(replica, REPLICA_PASSPHRASE, cache=False) as r:
            replica_id = r.id
        errors = _hook_commit(
            monkeypatch, replica_id, lambda: _lose_lock_and_prune(primary, PASSPHRASE)
        )
        async with await open_primary(primary) as p:
            try:
                gen_id = (await p.backup(io.BytesIO(data), name="db")).id
            except DedupeError:
                return  # refused: the secure outcome
            assert not errors, errors
            monkeypatch.undo()
            out = io.BytesIO()
            try:
                await p.restore(gen_id, out)
            except IntegrityError as e:
                raise AssertionError(f"committed a generation that does not restore: {e}") from e
            assert out.getvalue() == data

    run_asyncio(go())


def test_a_sync_replica_whose_lock_is_lost_while_it_waits_for_the_primary_commits_nothing(
    run_asyncio: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(400_000)

    async def attack() -> None:
        await asyncio.sleep(1.0)  # the replica is waiting in before_header by now
        await _lose_lock_and_prune(tmp_path / "r", REPLICA_PASSPHRASE)

    async def go() -> None:
        primary, replica = await new_pair(tmp_path, mode="sync")
        async with await open_primary(primary) as p:
            errors = _hook_commit(monkeypatch, p.id, attack)
            try:
                gen_id = (await p.backup(io.BytesIO(data), name="db")).id
            except DedupeError:
                return
            assert not errors, errors
            monkeypatch.undo()
        async with await Repository.open(replica, REPLICA_PASSPHRASE, cache=False) as r:
            (copy,) = [g for g in await r.generations() if g.copied_from == f"{p.id}/{gen_id}"]
            out = io.BytesIO()
            try:
                await r.restore(copy.id, out)
            except IntegrityError as e:
                raise AssertionError(f"the replica's copy does not restore: {e}") from e
            assert out.getvalue() == data

    run_asyncio(go())


def files_of(root: Path, *, data_only: bool = False) -> set[str]:
    """Every object of a local repository but its locks (`data_only`: packs and index
    objects)."""
    kept = ("packs", "index") if data_only else None
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file()
        and p.relative_to(root).parts[0] != "locks"
        and (kept is None or p.relative_to(root).parts[0] in kept)
    }


async def damaged_pair(tmp_path: Path, mode: str = "async") -> tuple[Path, Path, str, bytes]:
    """A pair whose one generation is in the replica and has lost two packs here."""
    data = os.urandom(300_000)
    primary, replica = await new_pair(tmp_path, mode)
    async with await open_primary(primary) as p:
        gen_id = (await p.backup(io.BytesIO(data), name="db")).id
        if mode == "async":
            await p.replicas.sync()
    for f in pack_files(primary)[:2]:
        f.unlink()
    return primary, replica, gen_id, data


def test_a_reader_key_cannot_store_chunks_through_heal(run_asyncio: Any, tmp_path: Path) -> None:
    async def go() -> None:
        primary, _replica, gen_id, _data = await damaged_pair(tmp_path)
        async with await open_primary(primary) as p:
            await p.verify(read_data=True, repair=False)  # the lost copies quarantined
        before = files_of(primary)
        async with await open_primary(primary, READER_PASSPHRASE) as reader:
            try:
                healed, _unhealed = await reader.replicas.heal([gen_id])
            except RoleNotPermitted:
                healed = []
        assert healed == [], "a reader key reported a repair"
        assert files_of(primary) == before, "a reader key wrote data objects"

    run_asyncio(go())


def test_an_orphan_copy_can_be_forgotten_without_losing_real_copies(
    run_asyncio: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = RepositoryStore.commit_manifest

    async def primary_dies_after_the_replicas(
        self: RepositoryStore,
        writer: Any,
        header: dict[str, Any],
        meta: dict[str, Any],
        batch: Any = None,
        before_write: Any = None,
    ) -> str:
        if before_write is not None:
            bw = before_write

            async def then_fail(gen_id: str, header: dict[str, Any]) -> None:
                await bw(gen_id, header)
                raise ConnectionError("the primary's storage went away")

            before_write = then_fail
        return await original(self, writer, header, meta, batch, before_write)

    async def go() -> None:
        primary, replica = await new_pair(tmp_path, mode="sync")
        async with await open_primary(primary) as p:
            await p.backup(io.BytesIO(os.urandom(200_000)), name="db")
            monkeypatch.setattr(RepositoryStore, "commit_manifest", primary_dies_after_the_replicas)
            with pytest.raises(ConnectionError):
                await p.backup(io.BytesIO(os.urandom(200_000)), name="db", kind="incremental")
            monkeypatch.undo()
            await p.backup(io.BytesIO(os.urandom(200_000)), name="db", kind="incremental")
            (status,) = await p.replicas.status()
            assert status.orphans == 1
            mine = {g.id for g in await p.generations()}
        async with await Repository.open(replica, REPLICA_PASSPHRASE, cache=False) as r:
            orphans = [
                g.id
                for g in await r.generations()
                if (g.copied_from or "/").split("/")[1] not in mine
            ]
            try:
                await r.forget(ids=orphans)
            except (DedupeError, ValueError) as e:
                raise AssertionError(f"the orphan cannot be forgotten: {e}") from e

    run_asyncio(go())


# --- claims of the change that hold (and pin checks no other test pins) -------------------------


def test_a_replica_list_rolled_back_with_the_keyring_is_refused(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """FORMAT 4.3.1: the list is rolled back only with the keyring, which a client that saw
    the newer one refuses: a removed replica does not come back."""

    async def go() -> None:
        primary, _replica = await new_pair(tmp_path, mode="sync")
        old = {n: (primary / "keyring" / n).read_bytes() for n in ("1", "2")}
        async with await open_primary(primary) as p:
            await p.replicas.remove("dr")
        for n, data in old.items():
            (primary / "keyring" / n).write_bytes(data)
        with pytest.raises(RollbackDetected):
            await open_primary(primary)

    run_asyncio(go())


def test_role_checks_come_before_any_work(run_asyncio: Any, tmp_path: Path) -> None:
    """FORMAT 4.4: a command a role may not run fails (RoleNotPermitted) before it changes
    or opens anything: not after taking the exclusive lock, reading the list, or opening a
    location."""
    from dedupe.engine import keys as key_ops

    async def go() -> None:
        primary, _replica = await new_pair(tmp_path)
        async with await open_primary(primary) as p:
            await p.keys.add("w", role="writer", name="w", kdf=KdfParams.weakest())
        before = files_of(primary)
        async with await open_primary(primary, "w") as writer:
            with pytest.raises(RoleNotPermitted):
                await writer.replicas.remove("no-such-replica")
            with pytest.raises(RoleNotPermitted):
                await writer.replicas.add(tmp_path / "nowhere", name="mine")
            confirmed: list[bool] = []

            async def confirm() -> None:
                confirmed.append(True)

            with pytest.raises(RoleNotPermitted):
                await key_ops.set_replicas(writer._store, lambda current: (), confirm)
            assert confirmed == []
        async with await open_primary(primary, READER_PASSPHRASE) as reader:
            with pytest.raises(RoleNotPermitted):
                await reader.replicas.repair()
        assert files_of(primary) == before

    run_asyncio(go())


def test_a_replica_list_change_whose_lock_is_lost_writes_nothing(
    run_asyncio: Any, tmp_path: Path
) -> None:
    from dedupe.engine import keys as key_ops

    async def go() -> None:
        primary, _replica = await new_pair(tmp_path)
        before = (primary / "keyring" / "1").read_bytes()

        async def lost() -> None:
            raise RepositoryLocked("the lock is gone")

        async with await open_primary(primary) as p:
            with pytest.raises(RepositoryLocked):
                await key_ops.set_replicas(p._store, lambda current: (), lost)
            # A list the keyring cannot hold is refused before the lock is even confirmed.
            with pytest.raises(ValueError, match="same"):
                await key_ops.set_replicas(p._store, lambda current: current + current, lost)
        assert (primary / "keyring" / "1").read_bytes() == before

    run_asyncio(go())


def test_a_replica_entry_the_keyring_cannot_hold_is_refused_when_added(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """A mode the keyring's reader refuses would leave a keyring nobody can open."""

    async def go() -> None:
        primary, replica = await new_pair(tmp_path)
        async with await open_primary(primary) as p:
            await p.replicas.remove("dr")
            with pytest.raises(ValueError, match="mode"):
                await p.replicas.add(replica, name="dr2", mode="sometimes")
        async with await open_primary(primary) as p:
            assert await p.replicas.list() == []

    run_asyncio(go())


def test_a_keyring_with_a_bad_location_or_too_many_replicas_is_refused(
    run_asyncio: Any, tmp_path: Path
) -> None:
    async def go() -> dict[str, Any]:
        primary, _replica = await new_pair(tmp_path)
        ring: dict[str, Any] = json.loads((primary / "keyring" / "1").read_text())
        return ring

    ring = run_asyncio(go())
    entry = ring["replicas"][0]
    assert Keyring.from_record(ring).replicas
    many = [
        {**entry, "name": f"r{i}", "location": f"/r{i}", "repository": f"{i:064x}"}
        for i in range(1, 18)
    ]
    for replicas in ([{**entry, "location": ""}], [{**entry, "location": "/r\n/x"}], many):
        with pytest.raises(IntegrityError):
            Keyring.from_record({**ring, "replicas": replicas})
    assert len(Keyring.from_record({**ring, "replicas": many[:16]}).replicas) == 16


def test_a_replica_key_that_may_not_back_up_is_refused(run_asyncio: Any, tmp_path: Path) -> None:
    """Neither added, nor written to by a sync backup: a reader key's key maps of packs and
    manifests are refused there, so the copy would not exist though the primary commits."""

    async def go() -> None:
        primary, replica = await new_pair(tmp_path, mode="sync")
        async with await Repository.open(replica, REPLICA_PASSPHRASE, cache=False) as r:
            await r.keys.add("replica reader", role="reader", name="rr", kdf=KdfParams.weakest())
        async with await open_primary(primary, replica="replica reader") as p:
            with pytest.raises((RoleNotPermitted, ReplicaError)):
                await p.replicas.add(tmp_path / "r", name="again", mode="async")
            in_replica = files_of(replica)
            with pytest.raises(ReplicaError):
                await p.backup(io.BytesIO(os.urandom(100_000)), name="db")
            assert await p.generations() == []
        assert files_of(replica) == in_replica

    run_asyncio(go())


def test_a_dry_run_does_not_touch_the_sync_replicas(run_asyncio: Any, tmp_path: Path) -> None:
    async def go() -> None:
        primary, replica = await new_pair(tmp_path, mode="sync")
        in_replica = files_of(replica)
        async with await open_primary(primary, replica="a wrong passphrase") as p:
            stats = await p.backup(io.BytesIO(os.urandom(100_000)), name="db", dry_run=True)
            assert stats.chunks > 0
        assert files_of(replica) == in_replica

    run_asyncio(go())


@pytest.mark.parametrize("how", ["repair=False", "quarantine=False"])
def test_verify_heals_only_when_asked_and_allowed_to_write(
    run_asyncio: Any, tmp_path: Path, how: str
) -> None:
    async def go() -> None:
        primary, _replica, _gen_id, _data = await damaged_pair(tmp_path)
        before = files_of(primary, data_only=True)
        async with await open_primary(primary) as p:
            if how == "repair=False":
                await p.verify(read_data=True, repair=False)  # quarantines, stores nothing
            if how == "repair=False":
                report = await p.verify(read_data=True, repair=False)
            else:
                report = await p.verify(read_data=True, quarantine=False)
            assert not report.ok and report.repaired == []
        assert files_of(primary, data_only=True) == before

    run_asyncio(go())


def test_a_restore_that_cannot_use_a_replica_changes_nothing(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """A restore into a file object (bytes already written to it cannot be taken back)
    does not fall back to a replica; a restore in a repository with no replica writes no
    quarantine record and stores nothing."""

    async def go() -> None:
        primary, _replica, gen_id, _data = await damaged_pair(tmp_path)
        before = files_of(primary)
        async with await open_primary(primary) as p:
            with pytest.raises(IntegrityError):
                await p.restore(gen_id, io.BytesIO())
            assert files_of(primary) == before
            await p.replicas.remove("dr")
            before = files_of(primary)
            with pytest.raises(IntegrityError):
                await p.restore(gen_id, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        assert files_of(primary) == before

    run_asyncio(go())


def test_orphans_count_only_copies_of_this_repository(run_asyncio: Any, tmp_path: Path) -> None:
    """A replica shared by two primaries: the other's copies are not this one's orphans."""

    async def go() -> None:
        primary, replica = await new_pair(tmp_path)
        async with await make_repo(tmp_path / "other", cache=False) as other:
            other.replicas.passphrase = lambda name: HOSTS_PASSPHRASE.encode()
            await other.replicas.add(replica, name="dr")
            await other.backup(io.BytesIO(os.urandom(100_000)), name="db")
            await other.replicas.sync()
        async with await open_primary(primary) as p:
            await p.backup(io.BytesIO(os.urandom(100_000)), name="db")
            await p.replicas.sync()
            (status,) = await p.replicas.status()
            assert status.copies == 1 and status.orphans == 0

    run_asyncio(go())


def test_a_repair_of_a_sound_repository_prunes_nothing(run_asyncio: Any, tmp_path: Path) -> None:
    async def go() -> None:
        primary, _replica = await new_pair(tmp_path)
        async with await open_primary(primary) as p:
            await p.backup(io.BytesIO(os.urandom(100_000)), name="db")
            report = await p.replicas.repair()
            assert report.ok and report.prune is None and report.healed == []

    run_asyncio(go())


def test_a_relative_replica_location_is_stored_absolute(
    run_asyncio: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def go() -> None:
        primary, _replica = await new_pair(tmp_path)
        async with await open_primary(primary) as p:
            await p.replicas.remove("dr")
            monkeypatch.chdir(tmp_path)
            info = await p.replicas.add("r", name="dr")
        assert os.path.isabs(info.location), info.location

    run_asyncio(go())


def test_a_tee_branch_closed_early_holds_nobody_back(run_asyncio: Any) -> None:
    """A branch whose reader stops and closes it (no explicit detach) is no longer fed."""
    from dedupe.replication import TEE_DEPTH, Tee

    blocks = [os.urandom(100) for _ in range(TEE_DEPTH * 10)]

    async def source() -> Any:
        for b in blocks:
            yield b

    async def go() -> None:
        tee = Tee(source(), 2)
        quitter, stayer = tee.branch(0), tee.branch(1)
        got = [bytes(await quitter.__anext__()) for _ in range(2)]
        await quitter.aclose()  # type: ignore[attr-defined]
        rest = [bytes(b) async for b in stayer]
        assert got == blocks[:2] and rest == blocks
        await tee.close()

    run_asyncio(asyncio.wait_for(go(), 30))


def test_a_sync_replica_that_fails_before_reading_holds_nothing_back(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """The replica is locked by its own prune: its backup fails before it reads a block.
    The primary reads the whole source and fails with ReplicaError, committing nothing:
    it does not wait forever for a branch nobody reads."""
    from dedupe.backends import open_backend
    from dedupe.store.locks import RepositoryLock

    async def go() -> None:
        primary, replica = await new_pair(tmp_path, mode="sync")
        backend = open_backend(str(replica))
        async with RepositoryLock(backend, exclusive=True, operation="prune"):
            async with await open_primary(primary) as p:
                with pytest.raises(ReplicaError):
                    await asyncio.wait_for(
                        p.backup(io.BytesIO(os.urandom(12_000_000)), name="db"), 30
                    )
                assert await p.generations() == []

    run_asyncio(go())
