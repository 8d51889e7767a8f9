"""Replicas (dedupe/replication.py, docs/FORMAT.md 4.3.1): a signed list in the keyring
that only an admin changes, the replica's repository id pinned; async replicas catch up
with `sync` and report their lag; sync replicas commit before the primary, and a failing
one commits nothing anywhere; a restore or verify that meets damaged or missing packs
reads from a replica and the primary is repaired (verify --read-data clean after)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, changing_versions, env_for, make_repo

from dedupe import Repository
from dedupe.crypto import KdfParams
from dedupe.errors import IntegrityError, ReplicaError, RoleNotPermitted, SourceError
from dedupe.format.keyring import Keyring
from dedupe.replication import Tee

REPLICA_PASSPHRASE = "the replica's own passphrase"


async def open_primary(path: Path, passphrase: str = PASSPHRASE) -> Repository:
    repo = await Repository.open(path, passphrase)
    repo.replicas.passphrase = lambda name: REPLICA_PASSPHRASE.encode()
    return repo


async def new_pair(primary: Path, replica: str) -> Repository:
    """A new primary (returned open) and a new, empty replica repository."""
    await (await make_repo(replica, REPLICA_PASSPHRASE, cache=False)).close()
    repo = await make_repo(primary, cache=False)
    repo.replicas.passphrase = lambda name: REPLICA_PASSPHRASE.encode()
    return repo


async def open_replica(location: str) -> Repository:
    return await Repository.open(location, REPLICA_PASSPHRASE, cache=False)


async def restored(repo: Repository, gen_id: str, out: Path) -> bytes:
    stats = await repo.restore(gen_id, out, overwrite=True)
    assert stats.note is None, stats.note
    return out.read_bytes()


def pack_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "packs").rglob("*") if p.is_file())


def flip_a_byte_inside(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40  # inside the blobs, before the trailer
    path.write_bytes(bytes(data))


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- the list: signed, pinned, admin only -------------------------------------------------------


def test_only_an_admin_names_replicas_and_the_list_is_kept_in_the_keyring(
    run_asyncio: Any, tmp_path: Path
) -> None:
    async def go() -> None:
        repo = await new_pair(tmp_path / "p", str(tmp_path / "r"))
        async with repo:
            added = await repo.replicas.add(tmp_path / "r", name="dr-site", mode="async")
            assert added.name == "dr-site" and added.mode == "async"
            assert [r.name for r in await repo.replicas.list()] == ["dr-site"]
            with pytest.raises(ValueError, match="same"):
                await repo.replicas.add(tmp_path / "r", name="again")
            with pytest.raises(ValueError, match="this repository"):
                await repo.replicas.add(tmp_path / "p", name="self")
            with pytest.raises(ValueError, match="replica name"):
                await repo.replicas.add(tmp_path / "r", name="-bad name")
            await repo.keys.add(
                "writer passphrase", role="writer", name="w", kdf=KdfParams.weakest()
            )
        # The keyring holds it, under the admin's signature: a fresh open sees it.
        ring = json.loads((tmp_path / "p" / "keyring" / "1").read_text())
        assert ring["replicas"][0]["name"] == "dr-site"
        assert ring["replicas"][0]["repository"] == (await open_replica(str(tmp_path / "r"))).id
        async with await Repository.open(tmp_path / "p", "writer passphrase") as writer:
            assert [r.name for r in await writer.replicas.list()] == ["dr-site"]
            with pytest.raises(RoleNotPermitted):
                await writer.replicas.add(tmp_path / "elsewhere", name="mine")
            with pytest.raises(RoleNotPermitted):
                await writer.replicas.remove("dr-site")
        async with await open_primary(tmp_path / "p") as repo:
            removed = await repo.replicas.remove("dr-site")
            assert removed.name == "dr-site"
            assert await repo.replicas.list() == []
        assert "replicas" not in json.loads((tmp_path / "p" / "keyring" / "1").read_text())

    run_asyncio(go())


def test_a_keyring_whose_replica_list_is_inconsistent_is_refused(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """The structure check of the keyring (whatever signed it): no repository is its own
    replica, no two replicas share a name, location or repository, known modes only."""

    async def go() -> dict[str, Any]:
        repo = await new_pair(tmp_path / "p", str(tmp_path / "r"))
        async with repo:
            await repo.replicas.add(tmp_path / "r", name="dr")
        record: dict[str, Any] = json.loads((tmp_path / "p" / "keyring" / "1").read_text())
        return record

    record = run_asyncio(go())
    assert Keyring.from_record(record).replicas[0].name == "dr"
    entry = record["replicas"][0]
    broken = [
        [{**entry, "repository": record["repository"]}],
        [entry, {**entry, "location": "/elsewhere", "repository": "ab" * 32}],
        [entry, {**entry, "name": "other", "repository": "ab" * 32}],
        [entry, {**entry, "name": "other", "location": "/elsewhere"}],
        [{**entry, "mode": "sometimes"}],
        [{**entry, "repository": "ab" * 31}],
        [{**entry, "name": "../x"}],
    ]
    for replicas in broken:
        with pytest.raises(IntegrityError):
            Keyring.from_record({**record, "replicas": replicas})


def test_a_replica_planted_in_a_keyring_copy_is_not_used(run_asyncio: Any, tmp_path: Path) -> None:
    """Someone with write access and no keys adds their own location to the list, in a
    keyring copy with a higher serial: the copy fails its signature, the other copy is
    used, and no data goes to the planted location."""

    async def go() -> None:
        theirs = tmp_path / "theirs"
        await (await make_repo(theirs, REPLICA_PASSPHRASE, cache=False)).close()
        repo = await new_pair(tmp_path / "p", str(tmp_path / "r"))
        async with repo:
            await repo.backup(io.BytesIO(os.urandom(50_000)), name="db")
        ring_path = tmp_path / "p" / "keyring" / "1"
        ring = json.loads(ring_path.read_text())
        ring["serial"] += 5
        ring["replicas"] = [
            {
                "name": "theirs",
                "location": str(theirs),
                "mode": "sync",
                "repository": (await open_replica(str(theirs))).id,
                "added": ring["updated"],
            }
        ]
        ring_path.write_text(json.dumps(ring))
        async with await open_primary(tmp_path / "p") as repo:
            assert await repo.replicas.list() == []
            assert any("signature" in p for p in repo.problems)
            await repo.backup(io.BytesIO(os.urandom(50_000)), name="db")
            assert (await repo.replicas.sync()) == []
        async with await open_replica(str(theirs)) as there:
            assert await there.generations() == []

    run_asyncio(go())


def test_another_repository_at_a_replicas_location_is_refused(
    run_asyncio: Any, tmp_path: Path
) -> None:
    async def go() -> None:
        repo = await new_pair(tmp_path / "p", str(tmp_path / "r"))
        async with repo:
            await repo.backup(io.BytesIO(os.urandom(50_000)), name="db")
            await repo.replicas.add(tmp_path / "r", name="dr")
            shutil.rmtree(tmp_path / "r")
            await (await make_repo(tmp_path / "r", REPLICA_PASSPHRASE, cache=False)).close()
            (status,) = await repo.replicas.status()
            assert not status.reachable and "not" in (status.error or "")
            (report,) = await repo.replicas.sync()
            assert report.copy is None and "holds repository" in (report.error or "")
        async with await open_replica(str(tmp_path / "r")) as impostor:
            assert await impostor.generations() == []

    run_asyncio(go())


# --- async: catch up, lag -----------------------------------------------------------------------


def test_an_async_replica_catches_up_and_reports_its_lag(
    run_asyncio: Any, tmp_path: Path, location: str, cli: Any, cli_env: dict[str, str]
) -> None:
    """The replica on a directory and on S3; the primary is local."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.bin").write_bytes(os.urandom(90_000))
    (tree / "sub" / "b.txt").write_bytes(b"row\n" * 3000)
    versions = changing_versions(3, 400_000, 30_000)

    async def go() -> None:
        repo = await new_pair(tmp_path / "p", location)
        async with repo:
            ids = [
                (await repo.backup(io.BytesIO(v), name="db", kind=k)).id
                for v, k in zip(versions, ("full", "incremental", "differential"), strict=True)
            ]
            tree_id = (await repo.backup(tree, name="files")).id
            await repo.replicas.add(location, name="dr", mode="async")
            await asyncio.sleep(0.05)
            (before,) = await repo.replicas.status()
            assert before.behind == [*ids, tree_id] and before.copies == 0
            assert before.lag_seconds is not None and before.lag_seconds > 0
            (report,) = await repo.replicas.sync()
            assert report.error is None and report.copy is not None
            assert len(report.copy.copied) == 4
            (after,) = await repo.replicas.status()
            assert after.behind == [] and after.lag_seconds == 0.0 and after.copies == 4
            newest = (await repo.backup(io.BytesIO(versions[0]), name="db")).id
            (behind,) = await repo.replicas.status()
            assert behind.behind == [newest]
            (again,) = await repo.replicas.sync()
            assert again.copy is not None
            assert [c.source_id for c in again.copy.copied] == [newest]
            assert sorted(again.copy.already_there) == sorted([*ids, tree_id])
        async with await open_replica(location) as replica:
            copies = {
                g.copied_from.split("/")[1]: g for g in await replica.generations() if g.copied_from
            }
            for gen_id, data in zip([*ids, newest], [*versions, versions[0]], strict=True):
                assert await restored(replica, copies[gen_id].id, tmp_path / "out") == data
            await replica.restore(copies[tree_id].id, tmp_path / "tree-out")
            assert tree_files(tmp_path / "tree-out") == tree_files(tree)

    run_asyncio(go())
    env = {
        **env_for(str(tmp_path / "p"), cli_env),
        "DEDUPE_REPLICA_DR_PASSWORD": REPLICA_PASSPHRASE,
    }
    listed = cli("replica", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr.decode()
    (row,) = json.loads(listed.stdout)
    assert row["replica"]["name"] == "dr" and row["behind"] == [] and row["lag_seconds"] == 0


# --- sync: commit in every sync replica first ---------------------------------------------------


def test_a_sync_replica_holds_every_generation_the_primary_commits(
    run_asyncio: Any, tmp_path: Path, location: str
) -> None:
    data = os.urandom(700_000)
    dump = tmp_path / "dump.sql"
    dump.write_bytes(os.urandom(300_000))
    os.chmod(dump, 0o640)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "one").write_bytes(os.urandom(70_000))

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 65_536):
            yield data[i : i + 65_536]

    async def go() -> None:
        repo = await new_pair(tmp_path / "p", location)
        async with repo:
            await repo.replicas.add(location, name="dr", mode="sync")
            made = {
                (await repo.backup(io.BytesIO(data), name="db", kind="full")).id: data,
                (await repo.backup(chunks(), name="db")).id: data,
                (await repo.backup(dump, name="dump")).id: dump.read_bytes(),
            }
            tree_stats = await repo.backup(tree, name="files")
            assert "sync replicas: dr" in (tree_stats.note or "")
            mine = {g.id: g for g in await repo.generations()}
        async with await open_replica(location) as replica:
            copies = {
                g.copied_from.split("/")[1]: g for g in await replica.generations() if g.copied_from
            }
            assert set(copies) == set(mine)
            for gen_id, g in mine.items():
                copy = copies[gen_id]
                assert (copy.name, copy.kind, copy.created, copy.source) == (
                    g.name,
                    g.kind,
                    g.created,
                    g.source,
                )
            for gen_id, want in made.items():
                assert await restored(replica, copies[gen_id].id, tmp_path / "out") == want
            await replica.restore(copies[tree_stats.id].id, tmp_path / "tree-out")
            assert tree_files(tmp_path / "tree-out") == tree_files(tree)

    run_asyncio(go())


def test_a_failing_sync_replica_or_source_commits_nothing_anywhere(
    run_asyncio: Any, tmp_path: Path
) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield os.urandom(200_000)
        raise SourceError("the dump command failed half way")

    async def go() -> None:
        repo = await new_pair(tmp_path / "p", str(tmp_path / "r"))
        async with repo:
            await repo.replicas.add(tmp_path / "r", name="dr", mode="sync")
            await repo.backup(io.BytesIO(os.urandom(100_000)), name="db")
            # The source fails: neither repository commits.
            with pytest.raises(SourceError):
                await asyncio.wait_for(repo.backup(failing(), name="db"), 120)
            # The replica cannot store (its packs/ is a file): the primary commits nothing.
            packs = tmp_path / "r" / "packs"
            shutil.move(packs, tmp_path / "packs-aside")
            packs.write_bytes(b"not a directory")
            with pytest.raises(ReplicaError, match="dr"):
                await asyncio.wait_for(
                    repo.backup(io.BytesIO(os.urandom(2_000_000)), name="db"), 120
                )
            assert len(await repo.generations()) == 1
            # The replica cannot be opened: nothing is read, nothing committed.
            repo.replicas.passphrase = lambda name: b"a wrong passphrase"
            with pytest.raises(ReplicaError, match="cannot be opened"):
                await repo.backup(io.BytesIO(os.urandom(100_000)), name="db")
            assert len(await repo.generations()) == 1
            assert (await repo.verify()).ok
        packs.unlink()
        shutil.move(tmp_path / "packs-aside", packs)
        async with await open_replica(str(tmp_path / "r")) as replica:
            assert len(await replica.generations()) == 1

    run_asyncio(go())


# --- repair: damage on the primary, read from the replica ----------------------------------------


async def damage_five_packs(primary: Path) -> list[str]:
    """Delete 3 packs and flip a byte inside 2 others; returns the names of the 2."""
    packs = pack_files(primary)
    assert len(packs) >= 10
    for p in packs[1:4]:
        p.unlink()
    for p in packs[-3:-1]:
        flip_a_byte_inside(p)
    return [p.name for p in packs[-3:-1]]


def test_five_damaged_packs_restore_from_the_replica_and_the_primary_is_repaired(
    run_asyncio: Any, tmp_path: Path, location: str, cli: Any, cli_env: dict[str, str]
) -> None:
    """Acceptance: 3 packs deleted and 2 corrupted on the primary; every generation still
    restores byte for byte (read from the replica, with a note), and after `replica
    repair` verify --read-data is clean."""
    versions = changing_versions(4, 500_000, 60_000)

    flipped: list[str] = []

    async def go() -> list[str]:
        repo = await new_pair(tmp_path / "p", location)
        async with repo:
            ids = [(await repo.backup(io.BytesIO(v), name="db")).id for v in versions]
            await repo.replicas.add(location, name="dr")
            await repo.replicas.sync()
        flipped.extend(await damage_five_packs(tmp_path / "p"))
        notes = []
        async with await open_primary(tmp_path / "p") as repo:
            assert not (await repo.verify(read_data=True, repair=False, quarantine=False)).ok
            for gen_id, want in zip(ids, versions, strict=True):
                stats = await repo.restore(gen_id, tmp_path / "out", overwrite=True)
                assert (tmp_path / "out").read_bytes() == want
                if stats.note:
                    assert "replica dr" in stats.note and "stored again" in stats.note
                    notes.append(gen_id)
            # An admin's restore repaired what it read: they all restore from here now.
            for gen_id, want in zip(ids, versions, strict=True):
                assert await restored(repo, gen_id, tmp_path / "out") == want
        return notes

    assert run_asyncio(go()), "no restore met the damage"
    env = {**env_for(str(tmp_path / "p"), cli_env), "DEDUPE_REPLICA_PASSWORD": REPLICA_PASSPHRASE}
    repaired = cli("replica", "repair", "--json", env=env)
    assert repaired.returncode == 0, repaired.stderr.decode()
    r = json.loads(repaired.stdout)
    assert r["ok"] and r["after"]["ok"]
    # Prune rewrote each pack that held a damaged copy, or deleted it when the damaged
    # copy was all it held that anything used (which of the two depends on the chunking
    # of random data: a pack of a single chunk happens).
    assert set(flipped) <= set(r["prune"]["removed_packs"])
    assert not set(flipped) & {p.name for p in pack_files(tmp_path / "p")}
    verified = cli("verify", "--read-data", "--json", env=env)
    assert verified.returncode == 0, verified.stdout.decode()

    async def every_generation_restores_from_the_primary_alone() -> None:
        async with await open_primary(tmp_path / "p") as repo:
            for g, want in zip(await repo.generations(), versions, strict=True):
                assert await restored(repo, g.id, tmp_path / "out") == want

    run_asyncio(every_generation_restores_from_the_primary_alone())


def test_verify_repairs_from_the_replica_and_prune_makes_it_clean(
    run_asyncio: Any, tmp_path: Path
) -> None:
    versions = changing_versions(3, 400_000, 50_000)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(600_000))

    async def go() -> None:
        repo = await new_pair(tmp_path / "p", str(tmp_path / "r"))
        async with repo:
            ids = [(await repo.backup(io.BytesIO(v), name="db")).id for v in versions]
            tree_id = (await repo.backup(tree, name="files")).id
            await repo.replicas.add(tmp_path / "r", name="dr", mode="async")
            await repo.replicas.sync()
        await damage_five_packs(tmp_path / "p")
        async with await open_primary(tmp_path / "p") as repo:
            report = await repo.verify(read_data=True)
            assert not report.ok
            broken = {g for d in report.damaged for g in d.generations}
            assert broken and {h["generation"] for h in report.repaired} == broken
            assert any("prune" in n for n in report.notes)
            await repo.prune()
            assert (await repo.verify(read_data=True)).ok
            for gen_id, want in zip(ids, versions, strict=True):
                assert await restored(repo, gen_id, tmp_path / "out") == want
            await repo.restore(tree_id, tmp_path / "tree-out")
            assert tree_files(tmp_path / "tree-out") == tree_files(tree)

    run_asyncio(go())


def test_a_reader_restores_from_the_replica_and_leaves_the_repair_to_an_admin(
    run_asyncio: Any, tmp_path: Path
) -> None:
    versions = changing_versions(2, 500_000, 60_000)

    async def go() -> None:
        repo = await new_pair(tmp_path / "p", str(tmp_path / "r"))
        async with repo:
            ids = [(await repo.backup(io.BytesIO(v), name="db")).id for v in versions]
            await repo.replicas.add(tmp_path / "r", name="dr")
            await repo.replicas.sync()
            await repo.keys.add(
                "reader passphrase", role="reader", name="r", kdf=KdfParams.weakest()
            )
        for p in pack_files(tmp_path / "p"):
            p.unlink()  # every pack gone: every generation needs the replica
        async with await open_primary(tmp_path / "p", "reader passphrase") as reader:
            # Into a file object what was written stays written: no second try, a hint.
            with pytest.raises(IntegrityError) as raised:
                await reader.restore(ids[0], io.BytesIO())
            assert "restore to a path" in (raised.value.hint or "")
            for gen_id, want in zip(ids, versions, strict=True):
                stats = await reader.restore(gen_id, tmp_path / "out", overwrite=True)
                assert (tmp_path / "out").read_bytes() == want
                assert stats.note is not None and "admin" in stats.note
            report = await reader.verify()
            assert not report.ok and report.repaired == []
        async with await open_primary(tmp_path / "p") as admin:
            report = await admin.verify()
            assert len(report.repaired) == 2
            await admin.prune()
            assert (await admin.verify(read_data=True)).ok

    run_asyncio(go())


def test_a_replica_copy_that_is_not_the_same_bytes_repairs_nothing(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """A replica's generation that claims to be a copy of a damaged one but holds other
    bytes: the primary's chunk ids (keyed, its own chunker) do not come back, the restore
    fails and writes nothing."""
    data = os.urandom(600_000)

    async def go() -> None:
        repo = await new_pair(tmp_path / "p", str(tmp_path / "r"))
        async with repo:
            gen = await repo.resolve((await repo.backup(io.BytesIO(data), name="db")).id)
            gen_id = gen.id
            await repo.replicas.add(tmp_path / "r", name="dr")
            await repo.keys.add(
                "reader passphrase", role="reader", name="r", kdf=KdfParams.weakest()
            )
        async with await open_replica(str(tmp_path / "r")) as replica:
            # Its header agrees (name, time, size, source): only its bytes differ.
            labels = {
                "host": "h",
                "tags": [],
                "copied_from": f"{repo.id}/{gen_id}",
                "created": gen.created,
                "source": gen.source,
            }
            options = {"exclude": (), "strict": True, "labels": labels}
            other = os.urandom(600_000)
            await replica._backup(io.BytesIO(other), "db", "full", None, None, None, True, options)
        for p in pack_files(tmp_path / "p")[:3]:
            p.unlink()
        async with await open_primary(tmp_path / "p") as repo:
            with pytest.raises(IntegrityError, match="not the same bytes"):
                await repo.restore(gen_id, tmp_path / "out")
            assert not (tmp_path / "out").exists()
        # A reader, which restores the copy itself, cuts it first: refused, nothing written.
        async with await open_primary(tmp_path / "p", "reader passphrase") as reader:
            with pytest.raises(IntegrityError):
                await reader.restore(gen_id, tmp_path / "out")
            assert list(tmp_path.glob("*out*")) == []

    run_asyncio(go())


# --- the tee a sync backup reads its source through --------------------------------------------


def test_every_branch_of_a_tee_gets_every_block_and_a_gone_one_stops_nobody(
    run_asyncio: Any,
) -> None:
    blocks = [os.urandom(1000) for _ in range(50)]

    async def source() -> AsyncIterator[bytes]:
        for b in blocks:
            yield b

    async def take(it: AsyncIterator[Any], limit: int | None = None) -> list[bytes]:
        got = []
        async for b in it:
            got.append(bytes(b))
            if limit is not None and len(got) == limit:
                break
        return got

    async def go() -> None:
        tee = Tee(source(), 3)
        first, second = tee.branch(0), tee.branch(1)
        # Branch 2 is never read: detached, it must not hold the others back.
        tee.detach(2)
        a, b = await asyncio.wait_for(asyncio.gather(take(first), take(second)), 30)
        assert a == b == blocks
        await tee.close()
        tee = Tee(source(), 2)
        quitter, stayer = tee.branch(0), tee.branch(1)
        early = await take(quitter, 3)
        tee.detach(0)
        assert early == blocks[:3]
        assert await asyncio.wait_for(take(stayer), 30) == blocks
        await tee.close()

    run_asyncio(go())


def test_a_source_error_reaches_every_branch_of_a_tee(run_asyncio: Any) -> None:
    async def source() -> AsyncIterator[bytes]:
        yield b"x" * 100
        raise SourceError("read failed")

    async def drain(it: AsyncIterator[Any]) -> None:
        async for _ in it:
            pass

    async def go() -> None:
        tee = Tee(source(), 2)
        results = await asyncio.gather(
            drain(tee.branch(0)), drain(tee.branch(1)), return_exceptions=True
        )
        assert all(isinstance(r, SourceError) for r in results)
        await tee.close()

    run_asyncio(go())


def test_a_sync_copy_chains_only_onto_copies_never_onto_the_replicas_own_generations(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """The replica holds a generation of its own under the same name: the copy of the
    primary's first backup (a full) is a full there too, and the copy of the next one
    chains onto the first copy."""

    async def go() -> None:
        repo = await new_pair(tmp_path / "p", str(tmp_path / "r"))
        async with await open_replica(str(tmp_path / "r")) as replica:
            own = await replica.backup(io.BytesIO(os.urandom(200_000)), name="db")
        async with repo:
            await repo.replicas.add(tmp_path / "r", name="dr", mode="sync")
            first = await repo.backup(io.BytesIO(os.urandom(200_000)), name="db")
            second = await repo.backup(io.BytesIO(os.urandom(200_000)), name="db")
            assert (first.kind, second.kind) == ("full", "incremental")
        async with await open_replica(str(tmp_path / "r")) as replica:
            copies = {
                g.copied_from.split("/")[1]: g for g in await replica.generations() if g.copied_from
            }
        assert copies[first.id].parent is None and copies[first.id].kind == "full"
        assert copies[second.id].parent == copies[first.id].id != own.id

    run_asyncio(go())
