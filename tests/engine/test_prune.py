"""Prune: frees exactly what no generation references, repacks sparse packs by the
threshold, keeps every remaining generation restorable byte for byte, is idempotent,
and a dry run changes nothing."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import PASSPHRASE, dedupe_cli, make_repo

from dedupe import Repository
from dedupe.engine.prune import pack_overhead
from dedupe.errors import RepositoryLocked
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.store import PackWriter
from dedupe.store.locks import RepositoryLock


def evolving(seed: int, count: int, size: int = 400_000) -> list[bytes]:
    """`count` versions of a snapshot; each rewrites a few regions of the previous one."""
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(size))
    out = []
    for _ in range(count):
        for _ in range(3):
            at = rnd.randrange(0, size - 30_000)
            data[at : at + 30_000] = rnd.randbytes(30_000)
        out.append(bytes(data))
    return out


async def fill(repo: Repository, versions: list[bytes], kind: str = "full") -> dict[str, bytes]:
    by_id = {}
    for v in versions:
        s = await repo.backup(io.BytesIO(v), name="db", kind=kind)
        by_id[s.id] = v
    return by_id


async def pack_bytes(repo: Repository) -> dict[str, int]:
    backend = repo._store.backend
    return {n: await backend.stat(n) for n in await backend.list("packs/")}


async def snapshot(repo: Repository) -> dict[str, int]:
    backend = repo._store.backend
    names = [
        n for p in ("packs/", "index/", "generations/", "locks/") for n in await backend.list(p)
    ]
    return {n: await backend.stat(n) for n in names}


async def live_chunks(repo: Repository) -> set[bytes]:
    live: set[bytes] = set()
    for g in await repo.generations():
        _meta, table = await repo._store.generation_chunks(g.id)
        live.update(cid for cid, _ in CHUNK_RECORD.iter_unpack(table))
    return live


async def check_restores(repo: Repository, expected: dict[str, bytes]) -> None:
    gens = await repo.generations()
    assert sorted(g.id for g in gens) == sorted(expected)
    for g in gens:
        out = io.BytesIO()
        await repo.restore(g.id, out)
        assert out.getvalue() == expected[g.id], g.id


def test_prune_frees_what_forget_released(run_asyncio, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            data = await fill(repo, evolving(1, 20))
            before = await pack_bytes(repo)
            await repo.forget(keep_last=4)
            kept = {g.id: data[g.id] for g in await repo.generations()}
            assert len(kept) == 4

            report = await repo.prune()
            after = await pack_bytes(repo)
            assert report.bytes_before == sum(before.values())
            assert report.bytes_after == sum(after.values())
            assert report.bytes_freed == sum(before.values()) - sum(after.values())
            assert report.packs_after == len(after)
            assert report.generations == 4
            assert report.bytes_freed > sum(before.values()) // 2  # most data was released

            # What remains: the live chunks' stored bytes, pack overhead, and at most as
            # much dead space per pack as the threshold allows.
            live = await live_chunks(repo)
            index = repo._store.index
            live_stored = sum(index.get(c).stored_length for c in live)  # type: ignore[union-attr]
            assert report.chunks_live == len(live)
            overhead = sum(pack_overhead(1) for _ in after)
            assert (
                live_stored < sum(after.values()) <= 2 * (live_stored + overhead) + 44 * len(index)
            )
            assert len(await repo._store.backend.list("index/")) == 1
            assert await repo._store.backend.list("locks/") == []
            await check_restores(repo, kept)

            again = await repo.prune()
            assert (again.packs_deleted, again.packs_repacked, again.bytes_freed) == (0, 0, 0)
            assert again.index_objects_written == 0 and again.chunks_removed == 0
            assert await pack_bytes(repo) == after

        # A fresh process sees the same, restorable repository, and it verifies.
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            await check_restores(repo, kept)
            report = await repo.verify(read_data=True)
            assert report.ok, report.to_dict()
            assert report.generations == 4 and report.packs_read == len(after)

    run_asyncio(go())


def test_repack_threshold(run_asyncio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # One repository (chunk boundaries depend on its keys), copied before each prune.
    origin = tmp_path / "origin"

    async def setup() -> dict[str, bytes]:
        async with await make_repo(origin) as repo:
            data = await fill(repo, evolving(2, 8))
            await repo.forget(keep_last=2)
            return {g.id: data[g.id] for g in await repo.generations()}

    kept = run_asyncio(setup())

    async def scenario(threshold: float) -> tuple[int, int, int]:
        path = tmp_path / f"t{threshold}"
        shutil.copytree(origin, path)
        async with await Repository.open(path, PASSPHRASE) as repo:
            report = await repo.prune(repack_threshold=threshold)
            await check_restores(repo, kept)
            packs = await pack_bytes(repo)
            index = repo._store.index
            if threshold == 0.0:
                # Every pack left holds live blobs only: its size is exactly their
                # stored bytes plus the pack's own overhead.
                live = await live_chunks(repo)
                assert len(index) == len(live)
                per_pack = Counter(index.get(c).pack_no for c in live)  # type: ignore[union-attr]
                live_stored = sum(index.get(c).stored_length for c in live)  # type: ignore[union-attr]
                assert sum(packs.values()) == live_stored + sum(
                    pack_overhead(n) for n in per_pack.values()
                )
            again = await repo.prune(repack_threshold=threshold)
            assert (again.packs_deleted, again.packs_repacked) == (0, 0)
            return report.packs_repacked, report.packs_written, sum(packs.values())

    never = run_asyncio(scenario(1.0))
    default = run_asyncio(scenario(0.5))
    always = run_asyncio(scenario(0.0))
    assert never[:2] == (0, 0)
    assert always[0] >= default[0] and always[0] > 0 and always[1] > 0
    assert always[2] <= default[2] <= never[2]


def test_dry_run_changes_nothing(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            await fill(repo, evolving(3, 6))
            await repo.forget(keep_last=2)
            files = await snapshot(repo)
            dry = await repo.prune(dry_run=True)
            assert dry.dry_run and dry.packs_deleted > 0
            assert await snapshot(repo) == files
            real = await repo.prune()
            for field in ("packs_deleted", "packs_repacked", "chunks_removed", "chunks_live"):
                assert getattr(dry, field) == getattr(real, field), field
            assert sorted(dry.removed_packs) == sorted(real.removed_packs)

    run(go())


def test_prune_after_forgetting_incrementals(run_asyncio, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            versions = evolving(4, 6)
            data = await fill(repo, versions[:1], kind="full")
            data.update(await fill(repo, versions[1:], kind="incremental"))
            gens = await repo.generations()
            assert [g.kind for g in gens][:2] == ["full", "incremental"]
            with pytest.raises(ValueError, match="cannot be removed alone"):
                await repo.forget(ids=[gens[2].id])
            await repo.forget(ids=[gens[-1].id])
            kept = {g.id: data[g.id] for g in await repo.generations()}
            report = await repo.prune(repack_threshold=0.0)
            assert report.packs_deleted + report.packs_repacked > 0
            await check_restores(repo, kept)

    run_asyncio(go())


def test_unindexed_packs_are_removed_and_nothing_live_is(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            data = await fill(repo, evolving(5, 2))
            store = repo._store
            # A pack an interrupted backup wrote but never indexed.
            writer = PackWriter(store.pack_size)
            writer.add(store.codec.frame([os.urandom(1000)], [os.urandom(32)]))
            stray = writer.flush()
            assert stray is not None
            stray_id = await store.write_pack(stray.data)
            report = await repo.prune()
            assert report.unindexed_packs == 1 and stray_id.hex() in report.removed_packs
            assert report.packs_repacked == 0 and report.packs_deleted == 1
            await check_restores(repo, data)
            # With no generation at all, everything goes.
            await repo.forget(ids=list(data))
            report = await repo.prune()
            assert await store.backend.list("packs/") == []
            assert await store.backend.list("index/") == []
            assert report.bytes_after == 0

    run(go())


def test_prune_needs_the_exclusive_lock(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            await fill(repo, evolving(6, 3))
            await repo.forget(keep_last=1)
            files = await snapshot(repo)
            async with RepositoryLock(repo._store.backend, exclusive=False, operation="backup"):
                with pytest.raises(RepositoryLocked, match="backup"):
                    await repo.prune()
                files_held = await snapshot(repo)
            assert {k: v for k, v in files_held.items() if not k.startswith("locks/")} == files
            await repo.prune()

    run(go())


def test_prune_command(run_asyncio, repo_path: Path, cli_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    async def setup() -> None:
        async with await make_repo(repo_path) as repo:
            await fill(repo, evolving(7, 4))

    run_asyncio(setup())
    dedupe_cli("forget", "--keep-last", "1", env=cli_env, check=True)
    r = dedupe_cli("prune", "--dry-run", "--json", env=cli_env, check=True)
    dry = json.loads(r.stdout)
    assert dry["dry_run"] and dry["packs_deleted"] > 0
    r = dedupe_cli("prune", env=cli_env, check=True)
    assert b"freed" in r.stdout and b"packs deleted" in r.stdout
    r = dedupe_cli("prune", "--json", env=cli_env, check=True)
    assert json.loads(r.stdout)["bytes_freed"] == 0
    r = dedupe_cli("prune", "--repack-threshold", "2", env=cli_env)
    assert r.returncode == 2
    r = dedupe_cli("unlock", "--json", env=cli_env, check=True)
    assert json.loads(r.stdout) == {"removed": [], "remaining": []}


def test_quarantine_records(run_asyncio, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    from dedupe.errors import MissingObject

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            old = await repo.backup(io.BytesIO(os.urandom(200_000)), name="a", kind="full")
            new_data = os.urandom(200_000)
            new = await repo.backup(io.BytesIO(new_data), name="b", kind="full")

            async def quarantine(gen_id: str) -> str:
                _meta, table = await store.generation_chunks(gen_id)
                cid = next(CHUNK_RECORD.iter_unpack(table))[0]
                pack = store.index.packs[store.index.get(cid).pack_no].pack_id  # type: ignore[union-attr]
                return await store.write_quarantine([(cid, pack, "id mismatch")])

            # A live chunk whose only copy is quarantined: prune refuses, changes nothing.
            bad = await quarantine(new.id)
            files = await snapshot(repo)
            with pytest.raises(MissingObject, match="no copy"):
                await repo.prune()
            assert await snapshot(repo) == files
            await store.backend.delete(bad)
            # A record naming only packs that prune deletes goes with them.
            gone = await quarantine(old.id)
            await repo.forget(ids=[old.id])
            await repo.prune()
            assert await store.backend.list("quarantine/") == []
            assert gone
            await check_restores(repo, {new.id: new_data})

    run_asyncio(go())


def test_a_pack_with_a_damaged_copy_is_rewritten_once_the_chunk_is_stored_again(
    run_asyncio,
    repo_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """One flipped byte in a blob of a pack that holds other live blobs: verify
    quarantines that copy, a full backup stores the chunk again, and prune rewrites the
    damaged pack whatever its waste (threshold 1.0: never for waste alone), so verify
    --read-data is clean again and nothing live was lost."""
    data = os.urandom(1_500_000)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen = await repo.backup(io.BytesIO(data), name="db", kind="full")
            store = repo._store
            _meta, table = await store.generation_chunks(gen.id)
            chunks_in = Counter(
                store.index.packs[loc.pack_no].pack_id.hex()
                for loc in (
                    store.index.get(cid) for cid, _length in CHUNK_RECORD.iter_unpack(table)
                )
                if loc is not None
            )
            # A pack of other live blobs (a pack of one chunk happens, and would be
            # deleted whole rather than rewritten).
            victim = next(
                p
                for p in sorted((repo_path / "packs").rglob("*"))
                if p.is_file() and chunks_in[p.name] >= 2
            )
            raw = bytearray(victim.read_bytes())
            raw[len(raw) // 3] ^= 0x10
            victim.write_bytes(bytes(raw))
            first = await repo.verify(read_data=True)
            assert not first.ok and first.quarantine is not None
            second = await repo.backup(io.BytesIO(data), name="db", kind="full")
            report = await repo.prune(repack_threshold=1.0)
            assert report.packs_repacked >= 1
            assert not victim.exists()
            assert await repo._store.backend.list("quarantine/") == []
            assert (await repo.verify(read_data=True)).ok
            await check_restores(repo, {gen.id: data, second.id: data})

    run_asyncio(go())


def test_prune_deletes_every_unused_pack_batch_after_batch(  # type: ignore[no-untyped-def]
    run, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deletions go in batches of DELETE_BATCH (2 here, so many batches): every unused pack
    is gone afterwards, none that a kept generation needs, and the report counts what the
    backend really lost. (A loop that stopped after the first batches would leave garbage
    and a report that lies.)"""
    import dedupe.engine.prune as prune_module

    monkeypatch.setattr(prune_module, "DELETE_BATCH", 2)
    kept = os.urandom(100_000)

    def packs() -> set[str]:
        return {p.name for p in (repo_path / "packs").rglob("*") if p.is_file()}

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            keep = await repo.backup(io.BytesIO(kept), name="a", kind="full")
            only_keep = packs()
            gone = await repo.backup(io.BytesIO(os.urandom(900_000)), name="b", kind="full")
            assert len(packs() - only_keep) > 6  # several batches to delete
            before = packs()
            await repo.forget(ids=[gone.id])
            report = await repo.prune(repack_threshold=1.0)
            assert packs() == only_keep
            assert report.packs_deleted == len(before - only_keep)
            out = io.BytesIO()
            await repo.restore(keep.id, out)
            assert out.getvalue() == kept

    run(go())


def test_after_prune_the_same_handle_dedupes_as_a_fresh_one(
    run, repo_path: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Prune replaces the index objects and renumbers packs; the handle that ran it loads
    the index again, so its next backup finds every chunk the repacked packs hold, exactly
    as a handle opened afterwards does (on a copy of the repository)."""
    a, b = os.urandom(600_000), os.urandom(600_000)
    twin = tmp_path / "twin"

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            both = await repo.backup(io.BytesIO(a + b), name="a", kind="full")
            only_b = await repo.backup(io.BytesIO(b), name="b", kind="full")
            await repo.forget(ids=[both.id])
            await repo.prune(repack_threshold=0.0)  # b's chunks move to new packs
            shutil.copytree(repo_path, twin)
            again = await repo.backup(io.BytesIO(a + b), name="a", kind="full")
            for gen, data in ((only_b, b), (again, a + b)):
                out = io.BytesIO()
                await repo.restore(gen.id, out)
                assert out.getvalue() == data
        async with await Repository.open(twin, PASSPHRASE) as fresh:
            expected = await fresh.backup(io.BytesIO(a + b), name="a", kind="full")
        assert (again.chunks_new, again.bytes_new) == (expected.chunks_new, expected.bytes_new)

    run(go())
