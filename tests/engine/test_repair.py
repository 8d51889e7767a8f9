"""`repair index` (engine/repair.py): index objects lost or damaged are rebuilt from the
packs' trailers, after which every generation restores byte for byte, verify reading
all data is clean and prune runs again; what does not check out (a planted pack, a
damaged blob) is never indexed; the damaged objects go only after their replacement is
stored. On a local directory and on S3."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, changing_versions, dedupe_cli, env_for, make_repo

from dedupe import Repository
from dedupe.backends import Backend, LocalBackend
from dedupe.backends.base import Buffer
from dedupe.crypto import KdfParams, new_key
from dedupe.errors import BackendError, IntegrityError, MissingObject, RoleNotPermitted
from dedupe.format.index import ENTRY_RECORD, PackRecord
from dedupe.format.keymap import INDEX
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.hashing import object_id


async def make(location: str) -> tuple[Repository, dict[str, bytes]]:
    repo = await make_repo(location, cache=False)
    gens = {}
    for i, v in enumerate(changing_versions(3)):
        gens[
            (
                await repo.backup(
                    io.BytesIO(v), name="db", kind="full" if i == 0 else "incremental"
                )
            ).id
        ] = v
    return repo, gens


async def restores(repo: Repository, gens: dict[str, bytes]) -> None:
    for gen_id, data in gens.items():
        out = io.BytesIO()
        await repo.restore(gen_id, out)
        assert out.getvalue() == data, gen_id


async def flip(backend: Backend, name: str, at: int) -> None:
    data = bytearray(await backend.get(name))
    data[at] ^= 0x10
    await backend.delete(name)
    await backend.put(name, bytes(data))


def test_lost_index_objects_are_rebuilt_from_the_packs(run_asyncio: Any, location: str) -> None:
    async def go() -> None:
        repo, gens = await make(location)
        backend = repo._store.backend
        lost = sorted(await backend.list("index/"))
        damaged, gone = lost[0], lost[1:]
        for name in gone:
            await backend.delete(name)
        await flip(backend, damaged, 40)
        await repo.close()

        async with await Repository.open(location, PASSPHRASE) as repo:
            with pytest.raises(MissingObject):
                await restores(repo, gens)
            with pytest.raises(IntegrityError, match=f"{damaged} does not match its name"):
                await repo.prune()  # refuses: it would take the packs for garbage
            report = await repo.repair_index()
            packs = await repo._store.backend.list("packs/")
            assert report.packs == report.packs_uncovered == report.packs_indexed == len(packs)
            assert report.skipped == [] and report.blobs_left_out == 0
            assert report.index_objects_removed == [damaged]
            assert await repo._store.backend.list("index/") == [report.index_object]
            await restores(repo, gens)
            check = await repo.verify(read_data=True)
            assert check.ok, check.damaged
            again = await repo.repair_index()
            assert again.index_object is None and again.packs_uncovered == 0
            await repo.prune()
            await restores(repo, gens)

    run_asyncio(go())


def test_a_planted_pack_and_a_damaged_blob_are_never_indexed(
    run_asyncio: Any, location: str
) -> None:
    """With every index object lost: a pack planted under a name of the right form (no key
    map entry) is skipped; in a real pack with one damaged blob (a flipped bit: the pack
    no longer hashes to its name) the other blobs are indexed and that one is not, so the
    generations that need it fail to restore, naming it, and the others restore."""

    async def go() -> None:
        repo, gens = await make(location)
        store = repo._store
        backend = store.backend
        await store.refresh_index()
        tables = [(await store.generation_chunks(g))[1] for g in gens]
        ids = [set(CHUNK_RECORD.iter_unpack(t)) for t in tables]
        victim = sorted(ids[0] - set.union(*ids[1:]))[0][0]  # in the first generation only
        where = store.index.get(victim)
        assert where is not None
        victim_pack = store.index.packs[where.pack_no].pack_id.hex()
        for name in await backend.list("index/"):
            await backend.delete(name)
        planted = b"DDPACK02" + os.urandom(5000)
        planted_id = object_id(planted)
        await backend.put(f"packs/{planted_id[:2]}/{planted_id}", planted)
        await flip(
            backend,
            f"packs/{victim_pack[:2]}/{victim_pack}",
            where.offset + where.stored_length // 2,
        )
        await repo.close()

        async with await Repository.open(location, PASSPHRASE) as repo:
            report = await repo.repair_index()
            assert [s.pack for s in report.skipped] == [planted_id]
            assert "no key map entry" in report.skipped[0].reason
            assert [s.pack for s in report.damaged] == [victim_pack]
            assert "do not hash to its name" in report.damaged[0].reason
            assert report.blobs_left_out == 1
            await repo._store.refresh_index()
            assert repo._store.index.get(victim) is None
            assert len(repo._store.index) == report.chunks_indexed
            restored = 0
            for gen_id, data in gens.items():
                out = io.BytesIO()
                try:
                    await repo.restore(gen_id, out)
                except MissingObject as e:
                    assert victim.hex()[:16] in str(e) or "not in" in str(e), e
                    continue
                assert out.getvalue() == data
                restored += 1
            assert 0 < restored < len(gens)

    run_asyncio(go())


def test_an_index_object_no_key_map_vouches_for_is_left_to_prune(
    run_asyncio: Any, repo_path: Path
) -> None:
    """Planted (or of a keyring newer than this one): repair does not judge it; prune
    refuses until verify showed it to be planted (delete_unauthenticated)."""

    async def go() -> None:
        repo, gens = await make(str(repo_path))
        planted = b"DDPIDX02" + os.urandom(300)
        name = f"index/{object_id(planted)}"
        await repo._store.backend.put(name, planted)
        await repo.close()
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            report = await repo.repair_index()
            assert report.index_objects_removed == [] and report.index_object is None
            assert (repo_path / name).exists()
            await restores(repo, gens)

    run_asyncio(go())


class FailingIndexPut(LocalBackend):
    """A local directory whose writes of index objects fail (a full disk, say)."""

    async def put(self, name: str, data: Buffer) -> None:
        if name.startswith("index/"):
            raise BackendError(f"writing {name} failed: no space left on device")
        await super().put(name, data)


def test_a_damaged_index_object_stays_until_its_replacement_is_stored(
    run_asyncio: Any, repo_path: Path
) -> None:
    async def go() -> None:
        repo, gens = await make(str(repo_path))
        backend = repo._store.backend
        damaged = sorted(await backend.list("index/"))[-1]
        await flip(backend, damaged, 50)
        await repo.close()
        failing = FailingIndexPut(repo_path)
        async with await Repository.open(failing, PASSPHRASE) as repo:
            with pytest.raises(BackendError, match="no space left"):
                await repo.repair_index()
        assert (repo_path / damaged).exists()
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            report = await repo.repair_index()
            assert report.index_objects_removed == [damaged]
            await restores(repo, gens)
            assert (await repo.verify(read_data=True)).ok

    run_asyncio(go())


def test_only_an_admin_repairs(run_asyncio: Any, repo_path: Path) -> None:
    async def go() -> None:
        repo, _ = await make(str(repo_path))
        async with repo:
            await repo.keys.add("writer pass", role="writer", name="w", kdf=KdfParams.weakest())
            await repo.keys.add("reader pass", role="reader", name="r", kdf=KdfParams.weakest())
        for role, passphrase in (("writer", "writer pass"), ("reader", "reader pass")):
            async with await Repository.open(repo_path, passphrase) as other:
                with pytest.raises(RoleNotPermitted, match=f"a {role} key may not"):
                    await other.repair_index()

    run_asyncio(go())


def test_cli_repair_index(
    run_asyncio: Any, location: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    async def lose_index() -> dict[str, bytes]:
        repo, gens = await make(location)
        for name in await repo._store.backend.list("index/"):
            await repo._store.backend.delete(name)
        await repo.close()
        return gens

    gens = run_asyncio(lose_index())
    env = env_for(location, cli_env)
    done = dedupe_cli("repair", "index", "--json", env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["packs_indexed"] == report["packs"] > 0 and report["index_object"]
    for gen_id, data in gens.items():
        out = tmp_path / gen_id
        assert dedupe_cli("restore", gen_id, str(out), env=env).returncode == 0
        assert out.read_bytes() == data
    again = dedupe_cli("repair", "index", env=env)
    assert again.returncode == 0 and b"nothing to repair" in again.stdout


def test_a_writers_index_naming_every_pack_hides_none_of_their_chunks(
    run_asyncio: Any, repo_path: Path
) -> None:
    """A writer key stores an index object that names every real pack with one made-up
    entry each, then the real index objects are damaged: repair reads each pack's
    trailer, sees chunks no index object lists, and rebuilds them."""

    async def go() -> None:
        repo, gens = await make(str(repo_path))
        async with repo:
            await repo.keys.add("w", role="writer", name="w", kdf=KdfParams.weakest())
        real = sorted((repo_path / "index").iterdir())
        packs = sorted(p for p in (repo_path / "packs").rglob("*") if p.is_file())
        async with await Repository.open(repo_path, "w") as writer:
            records = bytearray()
            for i in range(len(packs)):
                records += ENTRY_RECORD.pack(os.urandom(32), i, 8, 100, 100)
            table = [PackRecord(bytes.fromhex(p.name), p.stat().st_size) for p in packs]
            await writer._store.write_index(table, records)
        for path in real:
            data = bytearray(path.read_bytes())
            data[40] ^= 1
            path.write_bytes(bytes(data))
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            report = await repo.repair_index()
            assert report.packs_uncovered == report.packs_indexed == len(packs)
            assert sorted(report.index_objects_removed) == [f"index/{p.name}" for p in real]
            await restores(repo, gens)

    run_asyncio(go())


def test_an_index_object_that_hashes_right_is_never_deleted(
    run_asyncio: Any, repo_path: Path
) -> None:
    """A writer signs a key map entry for a real index object's id with a key that opens
    nothing, and the real key map is hidden while repair runs: the object fails to open
    but its bytes are intact, so repair keeps it (it can only delete real damage)."""

    async def go() -> None:
        repo, gens = await make(str(repo_path))
        async with repo:
            await repo.keys.add("w", role="writer", name="w", kdf=KdfParams.weakest())
        real = sorted((repo_path / "index").iterdir())
        async with await Repository.open(repo_path, "w") as writer:
            store = writer._store
            entries = [
                store.keymaps.meta_entry(INDEX, bytes.fromhex(p.name), new_key()) for p in real
            ]
            await store.keymaps.write(entries)
        hidden = repo_path.parent / "hidden-keymaps"
        hidden.mkdir()
        for km in (repo_path / "keymaps" / "00000001").iterdir():
            if km.stat().st_mtime_ns < real[-1].stat().st_mtime_ns + 1:
                km.rename(hidden / km.name)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            report = await repo.repair_index()
            assert report.index_objects_removed == []
        for km in hidden.iterdir():
            km.rename(repo_path / "keymaps" / "00000001" / km.name)
        assert sorted((repo_path / "index").iterdir())[: len(real)] == real
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            await restores(repo, gens)

    run_asyncio(go())


def test_repair_judges_the_store_not_the_local_cache(
    run_asyncio: Any, repo_path: Path, tmp_path: Path
) -> None:
    """The index objects were cached intact (a warm cache is the S3 default); one is
    then damaged in the store: repair sees it, and prune runs afterwards."""
    cache = tmp_path / "cache"

    async def go() -> None:
        repo, gens = await make(str(repo_path))
        await repo.close()
        async with await Repository.open(repo_path, PASSPHRASE, cache=cache) as repo:
            await repo.stats()  # caches every index object
        damaged = sorted((repo_path / "index").iterdir())[0]
        data = bytearray(damaged.read_bytes())
        data[60] ^= 1
        damaged.write_bytes(bytes(data))
        async with await Repository.open(repo_path, PASSPHRASE, cache=cache) as repo:
            report = await repo.repair_index()
            assert report.index_objects_removed == [f"index/{damaged.name}"]
            await repo.prune()
            await restores(repo, gens)

    run_asyncio(go())


def test_a_pack_larger_than_any_pack_is_refused_unread(run_asyncio: Any, repo_path: Path) -> None:
    async def go() -> None:
        repo, _gens = await make(str(repo_path))
        await repo.close()
        for name in (repo_path / "index").iterdir():
            name.unlink()
        victim = sorted(p for p in (repo_path / "packs").rglob("*") if p.is_file())[0]
        with open(victim, "r+b") as f:
            f.truncate(8 << 30)  # sparse: reading it whole would need 8 GiB
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            report = await repo.repair_index()
            assert [s.pack for s in report.skipped] == [victim.name]
            assert "larger than any pack" in report.skipped[0].reason

    run_asyncio(go())
