"""Prune and quarantine records (docs/FORMAT.md 13): prune never chooses a quarantined
copy, rewrites a pack that holds one (its other live blobs move), and deletes a record
once every pack it names is gone from the backend, and only then: a dry run keeps both."""

from __future__ import annotations

import io
import os
from pathlib import Path

from conftest import make_repo

from dedupe.format.manifest import CHUNK_RECORD


def test_a_pack_holding_a_quarantined_copy_is_rewritten_and_its_record_goes_with_it(  # type: ignore[no-untyped-def]
    run_asyncio, repo_path: Path
) -> None:
    """A live chunk's copy is quarantined, a full stores the chunk again, and an older
    generation is forgotten. The quarantined copy's pack holds other live chunks: a dry
    run keeps it and its record; prune rewrites it (its live blobs move, none is lost),
    the damaged copy is not the one the new index lists, and the record goes once the
    pack has. A second prune has nothing to change."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            old = await repo.backup(io.BytesIO(os.urandom(200_000)), name="a", kind="full")
            data = os.urandom(200_000)
            kept = await repo.backup(io.BytesIO(data), name="b", kind="full")
            _meta, table = await store.generation_chunks(kept.id)
            cid = next(CHUNK_RECORD.iter_unpack(table))[0]
            loc = store.index.get(cid)
            assert loc is not None
            damaged_pack = store.index.packs[loc.pack_no].pack_id
            record = await store.write_quarantine([(cid, damaged_pack, "id mismatch")])
            again = await repo.backup(io.BytesIO(data), name="b", kind="full")
            await repo.forget(ids=[old.id, kept.id])

            def packs_now() -> set[str]:
                return {p.name for p in (repo_path / "packs").rglob("*") if p.is_file()}

            assert damaged_pack.hex() in packs_now()
            dry = await repo.prune(dry_run=True)
            assert dry.packs_repacked >= 1
            assert damaged_pack.hex() in packs_now()
            assert await store.backend.list("quarantine/") == [record]

            report = await repo.prune()
            assert report.packs_repacked >= 1 and report.index_objects_written == 1
            assert damaged_pack.hex() not in packs_now()
            assert await store.backend.list("quarantine/") == []
            now = store.index.get(cid)
            assert now is not None and store.index.packs[now.pack_no].pack_id != damaged_pack
            out = io.BytesIO()
            await repo.restore(again.id, out)
            assert out.getvalue() == data
            assert (await repo.verify(read_data=True)).ok

            report = await repo.prune()
            assert (report.packs_deleted, report.packs_repacked) == (0, 0)
            assert report.index_objects_written == 0

    run_asyncio(go())
