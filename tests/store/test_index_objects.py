"""Writing index objects (RepositoryStore.seal_index and write_index): what they cost in
memory, and that an object written either way opens to what was written."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import make_repo

from dedupe.format.index import ENTRY_RECORD, INDEX_MAGIC, PackRecord


def _records(n: int, packs: int) -> bytes:
    """n entries with random ids (incompressible, as real ones are) and small numbers."""
    return b"".join(
        ENTRY_RECORD.pack(os.urandom(32), i % packs, (i * 4096) & 0xFFFFFFF, 2000, 4096)
        for i in range(n)
    )


def test_an_index_object_is_sealed_without_copies_of_its_plaintext(
    run_asyncio: Callable[..., Any], tmp_path: Path
) -> None:
    """Prune writes one index object of every entry (50 MiB a million). Sealing it holds
    the compressed bytes twice at most (the frame's pieces while they are joined, then
    the sealed object): not also a joined plaintext, nor the sealed bytes copied twice
    more, as before (~4x the records in all). It opens to what was written."""
    packs = [PackRecord(os.urandom(32), 8 << 20) for _ in range(40)]
    records = _records(200_000, len(packs))  # 9.2 MiB

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            store = repo._store
            tracemalloc.start()
            try:
                sealed = store.seal_index(packs, records)
                _now, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            compressed = len(sealed.data) - len(INDEX_MAGIC)
            assert compressed > len(records) * 0.6  # the ids do not compress
            assert peak < 2 * compressed + (1 << 20), (peak, compressed, len(records))

            # Stored as write_index stores it, it opens to the same pack table and entries
            # (open_index_object refuses a frame that does not record its size).
            await store.keymaps.write([sealed.entry])
            await store.backend.put(sealed.name, sealed.data)
            got_packs, got_records = await store.open_index_object(
                sealed.name, await store.backend.get(sealed.name)
            )
            assert got_packs == packs and bytes(got_records) == records

    run_asyncio(go())


def test_an_index_object_written_unloaded_is_stored_but_not_in_the_index(
    run_asyncio: Callable[..., Any], tmp_path: Path
) -> None:
    """write_index(load=False) (prune, which reloads everything next) stores the object
    and leaves the in-memory index as it was; the next refresh loads it like any other."""

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            store = repo._store
            pack = PackRecord(os.urandom(32), 4096)
            records = _records(10, 1)
            before = len(store.index)
            name = await store.write_index([pack], records, load=False)
            assert name in await store.backend.list("index/")
            assert len(store.index) == before
            assert await store.refresh_index() == 1
            assert len(store.index) == before + 10

    run_asyncio(go())


def test_write_index_reads_the_records_where_they_lie(
    run_asyncio: Callable[..., Any], tmp_path: Path
) -> None:
    """write_index does not copy the records it is given: a backup's index flush lands at
    its memory peak, and prune's holds a million entries (50 MiB). It holds what sealing
    holds (the test above), not that plus a copy of the records."""
    packs = [PackRecord(os.urandom(32), 8 << 20) for _ in range(40)]
    records = bytearray(_records(200_000, len(packs)))  # 9.2 MiB, as a backup's batch

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            store = repo._store
            tracemalloc.start()
            try:
                name = await store.write_index(packs, records, load=False)
                _now, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            size = await store.backend.stat(name)
            assert peak < 2 * size + (1 << 20), (peak, size, len(records))
            assert await store.refresh_index() == 1
            assert len(store.index) == 200_000

    run_asyncio(go())
