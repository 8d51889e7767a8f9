"""Prune and quarantine records (docs/FORMAT.md 13): prune deletes a record once every
pack it names is gone from the backend, and only then; while the damaged copy's pack
stays, so does the record that says the copy is damaged."""

from __future__ import annotations

import io
import os
from pathlib import Path

from conftest import make_repo

from dedupe.format.manifest import CHUNK_RECORD


def test_a_record_naming_a_pack_that_stays_survives_a_prune_that_changes_things(  # type: ignore[no-untyped-def]
    run_asyncio, repo_path: Path
) -> None:
    """A live chunk's copy is quarantined, a full stores the chunk again, and an older
    generation is forgotten, so that prune deletes packs and writes a new index object.
    The quarantined copy's pack holds other live chunks and stays: its record stays too,
    and the damaged copy is not the one the new index lists. A second prune, with nothing
    to change, keeps it as well."""

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

            report = await repo.prune()
            assert report.packs_deleted > 0 and report.index_objects_written == 1
            packs = {n.rsplit("/", 1)[-1] for n in await store.backend.list("packs/")}
            assert damaged_pack.hex() in packs  # it holds other live chunks
            assert await store.backend.list("quarantine/") == [record]
            now = store.index.get(cid)
            assert now is not None and store.index.packs[now.pack_no].pack_id != damaged_pack
            out = io.BytesIO()
            await repo.restore(again.id, out)
            assert out.getvalue() == data

            # Nothing left to change: prune writes and deletes nothing, the record stays.
            report = await repo.prune()
            assert (report.packs_deleted, report.index_objects_written) == (0, 0)
            assert await store.backend.list("quarantine/") == [record]

    run_asyncio(go())
