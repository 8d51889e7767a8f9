"""each_generation_table: every generation's complete table, as generation_chunks gives it,
with each manifest read once however long the chains (verify and prune use it)."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo

from dedupe import Repository
from dedupe.backends import LocalBackend
from dedupe.errors import DedupeError, IntegrityError, MissingObject
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.store.tables import each_generation_table, spill_complete_table

# Two chains of one source and a second source: a differential and incrementals hang
# off the first full, more incrementals off the second.
KINDS = (
    ["full"] + ["incremental"] * 7 + ["differential", "incremental", "full"] + ["incremental"] * 4
)


class CountingReads(LocalBackend):
    """Counts whole-object reads of manifests (header probes are ranged reads)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.manifest_reads: list[str] = []

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if name.startswith("generations/") and length is None:
            self.manifest_reads.append(name)
        return await super().get(name, offset, length)


async def _backups(repo_path: Path) -> list[str]:
    """Ids of: KINDS of a stream ("db"), a one-off stream, and a directory tree ("dir")
    backed up as a full, then incrementals and a differential as files change, appear
    and go."""
    rng = random.Random(7)
    data = bytearray(rng.randbytes(400_000))
    ids = []
    async with await make_repo(repo_path) as repo:
        for kind in KINDS:
            at = rng.randrange(len(data) - 64)
            data[at : at + 64] = rng.randbytes(64)
            ids.append((await repo.backup(io.BytesIO(bytes(data)), name="db", kind=kind)).id)
        ids.append((await repo.backup(io.BytesIO(b"other" * 999), name="other")).id)
        tree = repo_path.parent / "tree"
        (tree / "sub").mkdir(parents=True)
        for i in range(5):
            (tree / f"f{i}").write_bytes(rng.randbytes(30_000))
        for step, kind in enumerate(["full", "incremental", "incremental", "differential"]):
            if step:
                (tree / f"f{step}").write_bytes(rng.randbytes(20_000))
                (tree / "sub" / f"new{step}").write_bytes(rng.randbytes(5_000))
                (tree / f"f{step + 1}").unlink()
            ids.append((await repo.backup(tree, name="dir", kind=kind)).id)
    return ids


def test_tables_match_generation_chunks_each_manifest_read_once(run: Any, repo_path: Path) -> None:
    async def go() -> None:
        ids = await _backups(repo_path)
        backend = CountingReads(repo_path)
        async with await Repository.open(backend, PASSPHRASE) as repo:
            store = repo._store
            order = []
            got = {}
            async for gen_id, outcome in each_generation_table(store, sorted(ids)):
                assert not isinstance(outcome, Exception)
                order.append(gen_id)
                got[gen_id] = outcome
            reads = list(backend.manifest_reads)
            assert sorted(order) == sorted(ids)
            assert sorted(reads) == sorted(f"generations/{g}" for g in ids)  # once each
            # Parents first: every generation after the one it is based on.
            for gen_id in ids:
                parent = (await store.read_manifest_header(gen_id)).get("parent")
                if parent:
                    assert order.index(parent) < order.index(gen_id)
            # The same tables, bytes for bytes, as expanding each chain on its own, which
            # reads far more manifests.
            backend.manifest_reads.clear()
            for gen_id in ids:
                assert got[gen_id] == await store.generation_chunks(gen_id)
            assert len(backend.manifest_reads) > 3 * len(ids)

    run(go())


def test_a_damaged_manifest_fails_itself_and_what_is_based_on_it(run: Any, repo_path: Path) -> None:
    async def go() -> None:
        ids = await _backups(repo_path)
        broken = ids[3]  # the third incremental of the first chain
        path = repo_path / "generations" / broken
        damaged = bytearray(path.read_bytes())
        damaged[len(damaged) // 2] ^= 0x01
        path.write_bytes(bytes(damaged))
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            outcomes = {g: o async for g, o in each_generation_table(store, ids)}
            failed = {g for g, o in outcomes.items() if isinstance(o, Exception)}
            # Itself and the incrementals after it in its chain; the differential hangs
            # off the full, the second full starts a new chain.
            assert failed == {broken, *ids[4:8]}
            for gen_id in ids:
                outcome = outcomes[gen_id]
                if gen_id in failed:
                    assert isinstance(outcome, DedupeError)
                    try:
                        await store.generation_chunks(gen_id)
                    except DedupeError as e:  # the same failure as on its own
                        assert type(e) is type(outcome) and e.message == outcome.message
                    else:
                        raise AssertionError(f"{gen_id} expanded on its own")
                else:
                    assert outcome == await store.generation_chunks(gen_id)

    run(go())


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_spilled_complete_tables_match_generation_chunks(run: Any, repo_path: Path) -> None:
    """What an incremental backup compares itself with: every stream generation's
    complete table, expanded file to file through its chain (up to seven incrementals
    deep), equals generation_chunks' in memory; a broken chain fails as it would there,
    and no temporary file stays open either way."""

    async def go() -> None:
        ids = await _backups(repo_path)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            before = _open_descriptors()
            streams = ids[: len(KINDS) + 1]  # the chains of "db" and the one-off stream
            for gen_id in streams:
                with await spill_complete_table(store, gen_id) as spilled:
                    got = b"".join(spilled)
                want_meta, table = await store.generation_chunks(gen_id)
                assert got == table and spilled.records == len(table) // CHUNK_RECORD.size
                assert spilled.meta == want_meta
            assert _open_descriptors() == before
            (repo_path / "generations" / ids[3]).unlink()  # a link in the first chain
            with pytest.raises(MissingObject, match=ids[3]):
                await spill_complete_table(store, ids[6])
            damaged = repo_path / "generations" / ids[5]
            data = bytearray(damaged.read_bytes())
            data[-10] ^= 1
            damaged.write_bytes(bytes(data))
            with pytest.raises(IntegrityError, match=ids[5]):
                await spill_complete_table(store, ids[5])
            assert _open_descriptors() == before
            with pytest.raises(IntegrityError, match="not a stream"):
                await spill_complete_table(store, ids[-1])

    run(go())
