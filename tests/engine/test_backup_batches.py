"""The backup's per-batch selection of the chunks to store, and the native packing of its
records, against one-chunk-at-a-time models of the same rules."""

from __future__ import annotations

import asyncio
import io
import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo
from hypothesis import given
from hypothesis import strategies as st

from dedupe import Repository
from dedupe.engine.backup import _unstored
from dedupe.store import PackWriter
from dedupe.store.index import chunk_records, entry_records

MiB = 1 << 20
_IDS = [bytes([i]) * 32 for i in range(6)]


def _model(
    usable: bytes, chunks: list[memoryview], ids: list[bytes], queued: set[bytes]
) -> tuple[list[memoryview], list[bytes]]:
    new_chunks, new_ids = [], []
    for ok, chunk, chunk_id in zip(usable, chunks, ids, strict=True):
        if ok or chunk_id in queued:
            continue
        queued.add(chunk_id)
        new_chunks.append(chunk)
        new_ids.append(chunk_id)
    return new_chunks, new_ids


@given(
    picks=st.lists(st.tuples(st.sampled_from(range(6)), st.booleans()), max_size=40),
    queued_before=st.sets(st.sampled_from(_IDS)),
)
def test_a_batch_stores_each_chunk_the_index_lacks_once(
    picks: list[tuple[int, bool]], queued_before: set[bytes]
) -> None:
    """Whatever the mix of usable, queued and repeated ids (every shortcut of _unstored
    is reached: none new, all new, no repeats, repeats), the chunks chosen and `queued`
    afterwards are those of the chunk-by-chunk rule: a chunk is stored when the index
    cannot serve it and no earlier chunk of this backup was sent to be stored."""
    ids = [_IDS[i] for i, _ in picks]
    chunks = [memoryview(bytes([i, n])) for n, (i, _) in enumerate(picks)]
    usable = bytearray(int(ok) for _, ok in picks)
    want_queued = set(queued_before)
    want = _model(bytes(usable), chunks, ids, want_queued)
    got_queued = set(queued_before)
    got = _unstored(usable, chunks, ids, got_queued)
    assert [bytes(c) for c in got[0]] == [bytes(c) for c in want[0]]
    assert got[1] == want[1]
    assert got_queued == want_queued


@given(
    st.lists(
        st.tuples(st.binary(min_size=32, max_size=32), st.integers(0, 2**32 - 1)), max_size=20
    ),
    st.integers(0, 2**32 - 2),
)
def test_native_records_are_the_formats_records(
    rows: list[tuple[bytes, int]], pack_no: int
) -> None:
    """chunk_records is CHUNK_RECORD (<32sI) per chunk; entry_records turns trailer
    records (<32sIII) into index entries (<32sIIII) with the pack number after the id."""
    ids = [cid for cid, _ in rows]
    lengths = [n % 5000 for _, n in rows]
    chunks = [memoryview(bytes(n)) for n in lengths]
    assert chunk_records(ids, chunks) == b"".join(
        struct.pack("<32sI", cid, n) for cid, n in zip(ids, lengths, strict=True)
    )
    trailer = b"".join(struct.pack("<32sIII", cid, n, n ^ 7, n // 3) for cid, n in rows)
    assert entry_records(trailer, pack_no) == b"".join(
        struct.pack("<32sIIII", cid, pack_no, n, n ^ 7, n // 3) for cid, n in rows
    )


def test_native_records_refuse_what_is_not_a_record() -> None:
    """A torn trailer, an id of the wrong length or an id count that does not match the
    chunks is a ValueError, never records shifted out of step."""
    with pytest.raises(ValueError, match="44 bytes"):
        entry_records(bytes(45), 0)
    with pytest.raises(ValueError, match="not 32 bytes"):
        chunk_records([bytes(31)], [memoryview(b"x")])
    with pytest.raises(ValueError, match="1 ids for 2 chunks"):
        chunk_records([bytes(32)], [memoryview(b"x"), memoryview(b"y")])


def test_a_slow_store_holds_two_pack_buffers(
    run_asyncio: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When writing packs is slower than sealing them, the sealer waits for the writer to
    take each finished pack before it starts the next one: two pack buffers are ever
    made (the one being written and the one being filled), however many packs there
    are. A queue between them, and the next pack started as soon as one was complete,
    made it four (a pack's size each)."""
    made = []
    start = PackWriter._start

    def counting_start(self: PackWriter) -> bytearray:
        if not self._spares:
            made.append(1)
        return start(self)

    monkeypatch.setattr(PackWriter, "_start", counting_start)
    data = random.Random(7).randbytes(1 << 20)  # ~16 packs of 64 KiB

    async def pieces() -> AsyncIterator[bytes]:  # each batch seals less than a pack
        for start in range(0, len(data), 48 * 1024):
            yield data[start : start + 48 * 1024]

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            store = repo._store
            write = store.write_finished_pack

            async def slow_write(*args: Any) -> None:
                await asyncio.sleep(0.02)
                await write(*args)

            monkeypatch.setattr(store, "write_finished_pack", slow_write)
            stats = await repo.backup(pieces(), name="db", kind="full")
            assert stats.packs >= 10
            out = io.BytesIO()
            await repo.restore(stats.id, out)
            assert out.getvalue() == data

    run_asyncio(go())
    assert len(made) == 2


def test_a_backup_cancelled_during_a_slow_write_indexes_every_pack_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sealer waits in the rendezvous (packs_q.join) while the writer is slow; a
    cancellation that lands during a write waits for it and salvages it with the others:
    no pack file on disk is missing from the index."""
    data = random.Random(27).randbytes(3 * MiB)
    root = tmp_path / "repo"

    async def go() -> None:
        async with await make_repo(root) as repo:
            store = repo._store
            write = store.write_finished_pack
            started = 0
            third = asyncio.Event()

            async def slow_write(*args: Any) -> None:
                nonlocal started
                started += 1
                if started == 3:
                    third.set()
                await asyncio.sleep(0.05)
                await write(*args)

            monkeypatch.setattr(store, "write_finished_pack", slow_write)
            task = asyncio.create_task(repo.backup(io.BytesIO(data), name="db"))
            await third.wait()
            await asyncio.sleep(0.01)  # mid-write of the third pack
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        async with await Repository.open(root, PASSPHRASE) as repo:
            store = repo._store
            await store.refresh_index()
            indexed = {p.pack_id.hex() for p in store.index.packs}
            on_disk = {name.rsplit("/", 1)[1] for name in await store.backend.list("packs/")}
            assert len(on_disk) >= 3
            assert on_disk == indexed

    asyncio.run(go())
