"""each_generation_table: every generation's complete table, as generation_chunks gives it,
with each manifest read once however long the chains (verify and prune use it)."""

from __future__ import annotations

import asyncio
import io
import random
import re
import threading
from pathlib import Path
from typing import Any

import blake3
import pytest
from conftest import PASSPHRASE, make_repo, open_descriptors, settled_descriptors

import dedupe.format.delta as delta_module
import dedupe.store.repository as repository
import dedupe.store.tables as tables
from dedupe import Repository
from dedupe.backends import LocalBackend
from dedupe.errors import DedupeError, IntegrityError, MissingObject
from dedupe.format.delta import apply_delta, compose
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.store.tables import each_generation_table, spill_complete_table

R = CHUNK_RECORD.size

# Two chains of one source and a second source: a differential and incrementals hang
# off the first full, more incrementals off the second.
KINDS = (
    ["full"] + ["incremental"] * 7 + ["differential", "incremental", "full"] + ["incremental"] * 4
)


def count_manifest_reads(store: Any) -> list[str]:
    """The ids of the manifests whose bodies `store` reads from now on, once per read
    (read_manifest reads a body whole, spill_manifest in pieces; a header alone is not
    counted)."""
    reads: list[str] = []
    for name in ("read_manifest", "spill_manifest"):
        real = getattr(store, name)

        async def counting(gen_id: str, *args: Any, _real: Any = real) -> Any:
            reads.append(gen_id)
            return await _real(gen_id, *args)

        setattr(store, name, counting)
    return reads


def same_failure(alone: DedupeError, walked: Exception) -> bool:
    """The walk's failure is of the same type as generation_chunks' and about the same
    generation (the walk reads a manifest in pieces, so the check that trips first, and
    its message, may differ)."""
    ids = [re.findall(r"[0-9a-f]{64}", str(e)) for e in (alone, walked)]
    return type(alone) is type(walked) and ids[0][:1] == ids[1][:1] != []


def joined(outcome: Any) -> Any:
    """An outcome of each_generation_table with its table read into bytes (a Table is
    readable only until the walk's next item), or the exception."""
    if isinstance(outcome, Exception):
        return outcome
    meta, table = outcome
    data = b"".join(table)
    assert table.records == len(data) // R
    return meta, data


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
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            manifest_reads = count_manifest_reads(store)
            order = []
            got = {}
            async for gen_id, outcome in each_generation_table(store, sorted(ids)):
                assert not isinstance(outcome, Exception)
                order.append(gen_id)
                got[gen_id] = joined(outcome)
            assert sorted(order) == sorted(ids)
            assert sorted(manifest_reads) == sorted(ids)  # once each
            # Parents first: every generation after the one it is based on.
            for gen_id in ids:
                parent = (await store.read_manifest_header(gen_id)).get("parent")
                if parent:
                    assert order.index(parent) < order.index(gen_id)
            # The same tables, bytes for bytes, as expanding each chain on its own, which
            # reads far more manifests.
            manifest_reads.clear()
            for gen_id in ids:
                assert got[gen_id] == await store.generation_chunks(gen_id)
            assert len(manifest_reads) > 3 * len(ids)

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
            outcomes = {g: joined(o) async for g, o in each_generation_table(store, ids)}
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
                    except DedupeError as e:  # the same kind of failure as on its own
                        assert same_failure(e, outcome)
                    else:
                        raise AssertionError(f"{gen_id} expanded on its own")
                else:
                    assert outcome == await store.generation_chunks(gen_id)

    run(go())


def test_spilled_complete_tables_match_generation_chunks(run: Any, repo_path: Path) -> None:
    """What an incremental backup compares itself with: every stream generation's
    complete table, expanded file to file through its chain (up to seven incrementals
    deep), equals generation_chunks' in memory; a broken chain fails as it would there,
    and no temporary file stays open either way."""

    async def go() -> None:
        ids = await _backups(repo_path)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            before = open_descriptors()
            streams = ids[: len(KINDS) + 1]  # the chains of "db" and the one-off stream
            for gen_id in streams:
                with await spill_complete_table(store, gen_id) as spilled:
                    got = b"".join(spilled)
                want_meta, table = await store.generation_chunks(gen_id)
                assert got == table and spilled.records == len(table) // CHUNK_RECORD.size
                assert spilled.meta == want_meta
            assert await settled_descriptors(before) == before
            (repo_path / "generations" / ids[3]).unlink()  # a link in the first chain
            with pytest.raises(MissingObject, match=ids[3]):
                await spill_complete_table(store, ids[6])
            damaged = repo_path / "generations" / ids[5]
            data = bytearray(damaged.read_bytes())
            data[-10] ^= 1
            damaged.write_bytes(bytes(data))
            with pytest.raises(IntegrityError, match=ids[5]):
                await spill_complete_table(store, ids[5])
            assert await settled_descriptors(before) == before
            with pytest.raises(IntegrityError, match="not a stream"):
                await spill_complete_table(store, ids[-1])

    run(go())


# --- long chains: read ahead, composed, each record moved once -------------------------------


class SlowReads(LocalBackend):
    """Manifest reads take a few milliseconds (an object store's round trip), and the
    most in flight at once is counted."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.in_flight = 0
        self.most = 0

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if not name.startswith("generations/"):
            return await super().get(name, offset, length)
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0.003)
            return await super().get(name, offset, length)
        finally:
            self.in_flight -= 1


async def _chain(repo_path: Path, links: int) -> tuple[list[str], list[bytes]]:
    """A full and `links` incrementals of a small stream, a few bytes changed a day."""
    rng = random.Random(links)
    data = bytearray(rng.randbytes(200_000))
    ids, versions = [], []
    async with await make_repo(repo_path) as repo:
        for day in range(links + 1):
            if day:
                at = rng.randrange(len(data) - 64)
                data[at : at + 64] = rng.randbytes(64)
            versions.append(bytes(data))
            kind = "incremental" if day else "full"
            ids.append((await repo.backup(io.BytesIO(versions[-1]), name="db", kind=kind)).id)
    return ids, versions


def _stream_header(records: int, kind: str, parent: str | None) -> dict[str, Any]:
    return {
        "name": "n",
        "kind": kind,
        "parent": parent,
        "created": "2026-01-01T00:00:00.000000Z",
        "source": {"type": "stream", "label": ""},
        "chunker": {"algorithm": "fixed", "block_size": 4096},
        "size": records * 4096,
        "chunks": records,
        "new_chunks": 0,
        "new_bytes": 0,
        "stored_bytes": 0,
        "seconds": 0.0,
    }


async def _applied_one_by_one(store: Any, gen_id: str) -> bytes:
    """The complete table by the spec: apply_delta link by link from the full up."""
    chain = await store.manifest_chain(gen_id)
    _g, _m, table, _h = chain.pop()
    while chain:
        gid, meta, literal, header = chain.pop()
        table = apply_delta(table, literal, meta["delta"]["ops"], gid, int(header["chunks"]))
    return table


def test_a_long_chain_is_expanded_moving_each_record_of_its_table_once(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """spill_complete_table of the last of 25 incrementals composes the deltas and
    writes the complete table once. With its own tables in memory (a day's literals are
    a few records) it opens one scratch file, the table it returns; with none in memory
    (SPOOL_MEMORY 0: each own table in a file of its own) it reads from them exactly the
    records of the complete table, once each (one copy of the table per link would read
    25 times as many). Either way the table is the one apply_delta makes link by link.

    Property: an incremental backup's or a restore's cost grows with the chain's deltas,
    not with its length times its table (fails if each delta is applied to a copy of
    the table below, or each own table is spilled to a file of its own)."""
    opened: list[int] = []
    read: list[int] = []
    real_open, real_read = tables.open_scratch, tables.read_scratch

    def counting_open() -> Any:
        opened.append(1)
        return real_open()

    def counting_read(f: Any, start: int, end: int, piece: int) -> Any:
        read.append(end - start)
        return real_read(f, start, end, piece)

    monkeypatch.setattr(tables, "open_scratch", counting_open)
    monkeypatch.setattr(tables, "read_scratch", counting_read)

    async def go() -> None:
        ids, _versions = await _chain(repo_path, 25)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            want = await _applied_one_by_one(store, ids[-1])
            records = len(want) // CHUNK_RECORD.size
            assert records > 5
            for memory in (tables.SPOOL_MEMORY, 0):
                monkeypatch.setattr(tables, "SPOOL_MEMORY", memory)
                opened.clear()
                read.clear()
                spilled = await spill_complete_table(store, ids[-1])
                files, moved = len(opened), sum(read)
                with spilled:
                    assert b"".join(spilled) == want and spilled.records == records
                if memory:
                    assert (files, moved) == (1, 0)
                else:
                    assert files <= len(ids) + 1
                    # Read through windows, at most four times what the table needs (and
                    # one window): never once per link.
                    window = tables.COPY_RECORDS * CHUNK_RECORD.size
                    assert len(want) <= moved <= 4 * len(want) + window

    run_asyncio(go())


def _pieces_through_a_scratch_spool(
    monkeypatch: pytest.MonkeyPatch, table: bytes, firsts: list[int], counts: list[int]
) -> tuple[bytes, list[int]]:
    """_write_pieces of `table`'s records (first, count), read from a spool in a scratch
    file from its first byte: (what it wrote, the size of each read of the file)."""
    reads: list[int] = []
    real_read = tables.read_scratch

    def counting_read(f: Any, start: int, end: int, piece: int) -> Any:
        reads.append(end - start)
        return real_read(f, start, end, piece)

    monkeypatch.setattr(tables, "read_scratch", counting_read)
    spool = tables._Spool(tables._Budget(0))
    try:
        spool.write(table)
        pieces = (
            delta_module.array("q", [0] * len(firsts)),
            delta_module.array("q", firsts),
            delta_module.array("q", counts),
        )
        out = io.BytesIO()
        tables._write_pieces(out, [spool], pieces)
    finally:
        spool.close()
    return out.getvalue(), reads


@pytest.mark.parametrize("order", ["forward", "jumping"])
def test_pieces_are_read_through_windows_that_never_read_more_than_four_times_the_table(
    monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    """_write_pieces reads a source in a scratch file through windows: a day's delta
    (short pieces running forward) costs a read per window, not per piece; pieces that
    jump about (a hostile delta's) read at most four times what they take, plus one window,
    not a window each. Either way the output is the pieces' records in order."""
    rnd = random.Random(4)
    n = 3 * tables.COPY_RECORDS
    table = rnd.randbytes(n * R)
    if order == "forward":
        firsts = list(range(0, n - 3, 3))  # a record kept, two changed: 1 in 3
    else:
        firsts = [rnd.randrange(n) for _ in range(4000)]
    out, reads = _pieces_through_a_scratch_spool(monkeypatch, table, firsts, [1] * len(firsts))
    assert out == b"".join(table[f * R : (f + 1) * R] for f in firsts)
    needed = len(firsts) * R
    window = tables.COPY_RECORDS * R
    assert sum(reads) <= 4 * needed + window
    if order == "forward":
        assert len(reads) <= 4  # a window each, not a read per piece (29,126 pieces)


def test_long_pieces_count_toward_the_read_bound_as_what_they_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A piece longer than a window is read on its own, exactly: it counts as read and as
    needed alike. Long pieces between jumping short ones (a hostile delta can mix them)
    leave the short ones bound by the same four times, not read a window each."""
    rnd = random.Random(8)
    n = 6 * tables.COPY_RECORDS
    table = rnd.randbytes(n * R)
    firsts: list[int] = []
    counts: list[int] = []
    for _ in range(10):
        long = tables.COPY_RECORDS + 1
        firsts.append(rnd.randrange(n - long))
        counts.append(long)
        for _ in range(50):
            firsts.append(rnd.randrange(n))
            counts.append(1)
    out, reads = _pieces_through_a_scratch_spool(monkeypatch, table, firsts, counts)
    assert out == b"".join(table[f * R : (f + c) * R] for f, c in zip(firsts, counts, strict=True))
    needed = sum(counts) * R
    assert sum(reads) <= 4 * needed + tables.COPY_RECORDS * R


def test_pieces_from_many_sources_hold_a_bounded_number_of_windows() -> None:
    """A chain whose every link's literal table is still used (a hostile writer's, or a
    long honest one) makes pieces cycle through all of them between runs of the full's
    table; runs long enough keep the four-times rule reading ahead. _write_pieces keeps
    WINDOWS_HELD windows, not one per source: a window of a file is a copy of up to
    ~1 MiB (found by an adversary's review: 64 links held 65 MiB, 256 links 298 MiB)."""
    import tracemalloc

    rnd = random.Random(7)
    n_literal = 24
    run = 12_000  # records of the full's table between two literal records (~420 KiB)
    sources = []

    class Digest:
        def __init__(self) -> None:
            self.hash = blake3.blake3()

        def write(self, data: Any) -> None:
            self.hash.update(data)

    try:
        full = tables._Spool(tables._Budget(0))  # in a scratch file from the first byte
        full.write(rnd.randbytes(n_literal * run * R))
        sources.append(full)
        for _ in range(n_literal):
            spool = tables._Spool(tables._Budget(0))
            spool.write(rnd.randbytes(tables.COPY_RECORDS * R))  # a full window each
            sources.append(spool)
        ss, firsts, counts = [], [], []
        for i in range(n_literal):
            ss += [0, 1 + i]
            firsts += [i * run, 0]
            counts += [run, 1]
        pieces = (
            delta_module.array("q", ss),
            delta_module.array("q", firsts),
            delta_module.array("q", counts),
        )
        out = Digest()
        tracemalloc.start()
        try:
            tables._write_pieces(out, sources, pieces)  # type: ignore[arg-type]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        want = blake3.blake3()
        for s, f, n in zip(ss, firsts, counts, strict=True):
            for piece in sources[s].pieces(f * R, (f + n) * R):
                want.update(piece)
    finally:
        for spool in sources:
            spool.close()
    assert out.hash.digest() == want.digest()
    window = tables.COPY_RECORDS * R
    assert peak < (tables.WINDOWS_HELD + 3) * window < n_literal * window / 2


def test_a_listed_chain_is_read_ahead_and_a_broken_one_still_fails_cleanly(
    run_asyncio: Any, repo_path: Path
) -> None:
    """Once a handle has listed the generations (as every backup does to find its
    parent), the manifests of a chain are read several at once, by spill_complete_table
    (backup, restore) and by manifest_chain (generation_chunks); a handle that listed
    nothing walks the chain one manifest at a time. The tables are the same. A chain
    with a link gone fails with MissingObject naming it, with no scratch file left open
    and no read left running, read ahead or not.

    Property: the latency of a long chain on an object store is paid CHAIN_AHEAD
    manifests at a time, not one (fails without the read ahead)."""

    async def go() -> None:
        ids, versions = await _chain(repo_path, 20)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            want = await _applied_one_by_one(repo._store, ids[-1])
        for listed in (False, True):
            for how in ("spill", "chunks", "restore"):
                backend = SlowReads(repo_path)
                async with await Repository.open(backend, PASSPHRASE) as repo:
                    store = repo._store
                    if listed:
                        await repo.generations("db")
                    backend.most = 0
                    if how == "spill":
                        with await spill_complete_table(store, ids[-1]) as spilled:
                            assert b"".join(spilled) == want
                    elif how == "chunks":
                        assert (await store.generation_chunks(ids[-1]))[1] == want
                    else:
                        out = io.BytesIO()
                        await repo.restore(ids[-1], out)
                        assert out.getvalue() == versions[-1]
                    # A restore by id opens the generation's header first: its parent
                    # is known, and read beside it.
                    alone = 2 if how == "restore" else 1
                    assert backend.most >= 4 if listed else backend.most <= alone, how
        gone = repo_path / "generations" / ids[5]
        kept = gone.read_bytes()
        gone.unlink()
        async with await Repository.open(SlowReads(repo_path), PASSPHRASE) as repo:
            store = repo._store
            await repo.generations("db")
            store._parents_seen[ids[5]] = ids[4]  # as if it had been listed before it went
            before = open_descriptors()
            for _ in range(2):
                with pytest.raises(MissingObject, match=ids[5]):
                    await spill_complete_table(store, ids[-1])
                with pytest.raises(MissingObject, match=ids[5]):
                    await store.generation_chunks(ids[-1])
            assert await settled_descriptors(before) == before
            assert len(asyncio.all_tasks()) == 1  # this test's own: no read left running
        gone.write_bytes(kept)

    run_asyncio(go())


def test_composed_tables_stay_within_their_pieces_however_fragmented(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With MAX_PIECES lowered to 3, a chain whose deltas cut the table into many pieces
    is written out (spill_complete_table) or joined (generation_chunks) whenever the
    composed table counts more, and composing goes on from one piece: no composition
    ever starts from more than MAX_PIECES pieces, and the tables are still the ones
    apply_delta makes.

    Property: what expanding a chain holds in memory is bounded however a chain of
    authenticated deltas fragments the table (fails without the write-out)."""
    most: list[int] = [0]

    def counting(parent: Any, ranges: Any, own: int) -> Any:
        most[0] = max(most[0], len(parent[0]))
        return compose(parent, ranges, own)

    # Both expansions compose through dedupe.format.delta.compose_chain.
    monkeypatch.setattr(delta_module, "MAX_PIECES", 3)
    monkeypatch.setattr(delta_module, "compose", counting)

    async def go() -> None:
        ids, _versions = await _chain(repo_path, 12)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            for gen_id in ids:
                want = await _applied_one_by_one(store, gen_id)
                with await spill_complete_table(store, gen_id) as spilled:
                    assert b"".join(spilled) == want
                assert (await store.generation_chunks(gen_id))[1] == want
        assert 0 < most[0] <= 3

    run_asyncio(go())


@pytest.mark.parametrize(
    ("body", "records"), [("small", 3), ("large", 2 * 16_384 + 99), ("repeated", 2 * 16_384 + 99)]
)
def test_a_small_manifest_is_opened_on_the_calling_thread_a_large_one_on_a_worker(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, records: int
) -> None:
    """spill_manifest opens the frames of a body of at most INLINE_FRAMES bytes (a day's
    incremental) on the event loop's thread, without a worker thread's round trip; those
    of a larger one (three frames of random records) on a worker; and those of a small
    body that decompresses to more than INLINE_PLAIN (three frames of one record
    repeated: a few hundred bytes) first on the loop's thread, then, from the frame
    that passed INLINE_PLAIN on, on a worker. The records, the count and the meta are
    the same every way.

    Property: reading a chain costs no thread round trip per small manifest (fails when
    every piece goes through a worker thread), and neither a large body nor a small one
    that expands blocks the loop for long (fails without the INLINE_PLAIN limit)."""
    calls: list[tuple[bool, int]] = []  # (on the loop's thread, frames taken)
    take = repository._BodyFrames.take

    def recording(self: Any, buf: bytearray, complete: bool, limit: int | None = None) -> bool:
        before = self.frame_no
        done = take(self, buf, complete, limit)
        calls.append(
            (threading.current_thread() is threading.main_thread(), self.frame_no - before)
        )
        return done

    monkeypatch.setattr(repository._BodyFrames, "take", recording)
    rng = random.Random(records)
    one = CHUNK_RECORD.pack(rng.randbytes(32), 4096)
    if body == "repeated":
        table = one * records
    else:
        table = b"".join(CHUNK_RECORD.pack(rng.randbytes(32), 4096) for _ in range(records))
    meta = {"type": "stream", "digest": "ab" * 32, "chunk_count": records}
    header = _stream_header(records, "full", None)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            gen_id = await store.write_manifest(header, meta, table)
            sink = io.BytesIO()
            calls.clear()
            _h, got_meta, n = await store.spill_manifest(gen_id, sink)
            assert (sink.getvalue(), got_meta, n) == (table, meta, records)
            on_loop = sum(frames for inline, frames in calls if inline)
            on_worker = sum(frames for inline, frames in calls if not inline)
            # Three table frames (one for the small table) and the meta frame.
            assert on_loop + on_worker == (2 if body == "small" else 4)
            if body == "small":
                assert (on_loop, on_worker) == (2, 0)
            elif body == "large":
                assert on_loop <= 1  # the meta frame, when the last piece holds it alone
            else:
                assert (repository.INLINE_PLAIN < 16_384 * R, on_loop) == (True, 1)

    run_asyncio(go())


def test_stats_reads_each_manifest_of_a_chain_once(run_asyncio: Any, repo_path: Path) -> None:
    """`stats` over a full and 15 incrementals reads each manifest whole once (each
    generation's table is built on its parent's), and counts the same chunks as the
    tables apply_delta makes.

    Property: stats costs O(n) manifests for a chain of n, not n(n+1)/2 (fails when
    each generation's table is expanded through its whole chain on its own)."""

    async def go() -> None:
        ids, versions = await _chain(repo_path, 15)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            manifest_reads = count_manifest_reads(store)
            (db, everything) = await repo.stats()
            assert sorted(manifest_reads) == sorted(ids)
            chunks = set()
            for gen_id in ids:
                table = await _applied_one_by_one(store, gen_id)
                chunks.update(CHUNK_RECORD.iter_unpack(table))
            assert db.name == "db" and db.generations == len(ids)
            assert db.unique_bytes == sum(length for _id, length in chunks)
            assert everything.logical_bytes == sum(len(v) for v in versions)

    run_asyncio(go())


def test_the_walk_holds_no_complete_table_in_memory(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full of 600k records (21.6 MiB of table) and a chain of three incrementals off
    it plus a differential, each a few records changed, written as manifests (the walk
    reads manifests only). With SPOOL_MEMORY at 256 KiB, each_generation_table gives the
    tables generation_chunks gives, and the most memory Python allocates while the walk
    runs and its caller reads each table piece by piece (tracemalloc) stays under 8 MiB:
    a few pieces of a manifest being read and of a table being written out or read.

    Property: verify, prune and stats hold bounded memory however large a generation's
    table (fails when the walk reads a manifest whole, or holds a parent's and a child's
    complete tables in memory, as it did: three tables at once)."""
    import tracemalloc

    from dedupe.format.delta import make_delta

    monkeypatch.setattr(tables, "SPOOL_MEMORY", 256 << 10)
    rng = random.Random(5)
    records = 600_000
    table = bytearray(b"".join(CHUNK_RECORD.pack(rng.randbytes(32), 4096) for _ in range(records)))

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            meta = {"type": "stream", "digest": "ab" * 32, "chunk_count": records}
            full = await store.write_manifest(_stream_header(records, "full", None), meta, table)
            ids, parent, parent_table = [full], full, bytes(table)
            for kind in ("incremental", "incremental", "incremental", "differential"):
                child = bytearray(parent_table if kind == "incremental" else table)
                for _ in range(5):
                    at = rng.randrange(records) * R
                    child[at : at + R] = CHUNK_RECORD.pack(rng.randbytes(32), 4096)
                base = full if kind == "differential" else parent
                literal, ops = make_delta(parent_table if base == parent else table, child)
                meta = {
                    "type": "stream",
                    "digest": "ab" * 32,
                    "chunk_count": len(literal) // R,
                    "delta": {"parent": base, "ops": ops},
                }
                gen_id = await store.write_manifest(
                    _stream_header(records, kind, base), meta, literal
                )
                ids.append(gen_id)
                if kind == "incremental":
                    parent, parent_table = gen_id, bytes(child)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            want = {g: (await store.generation_chunks(g))[1] for g in ids}
            seen = []
            before = open_descriptors()
            tracemalloc.start()
            try:
                async for gen_id, outcome in each_generation_table(store, ids):
                    assert not isinstance(outcome, Exception)
                    digest = blake3.blake3()
                    for piece in outcome[1]:
                        digest.update(piece)
                    seen.append(gen_id)
                    assert digest.digest() == blake3.blake3(want[gen_id]).digest(), gen_id
                _now, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert sorted(seen) == sorted(ids)
            assert peak < 8 << 20 < len(table) // 2, peak
            assert await settled_descriptors(before) == before  # every scratch file closed
            # A caller that stops part way (verify on an error it raises) leaves none open.
            walk = each_generation_table(store, ids)
            async for _gen_id, _outcome in walk:
                if open_descriptors() > before:  # the full's table, kept in a scratch file
                    break
            else:
                raise AssertionError("the walk kept no table in a scratch file")
            await walk.aclose()
            assert await settled_descriptors(before) == before

    run_asyncio(go())


def test_the_walk_gives_back_the_memory_of_each_table_it_is_done_with(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full and 12 incrementals of a small stream, walked with SPOOL_MEMORY at three
    times a complete table: what each step holds (its own table, its complete table
    written out for its child, its parent's) fits, so no scratch file is ever opened,
    and the tables are the ones apply_delta makes link by link.

    Property: a long chain's walk stays in memory when its tables are small, and its
    memory stays bounded when they are large (fails when a step's spools, or a parent's
    table once its last child is done, are dropped without giving their share back:
    the budget drains and every later table goes to a file)."""
    opened: list[int] = []
    real_open = tables.open_scratch

    def counting_open() -> Any:
        opened.append(1)
        return real_open()

    monkeypatch.setattr(tables, "open_scratch", counting_open)

    async def go() -> None:
        ids, _versions = await _chain(repo_path, 12)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            want = {g: await _applied_one_by_one(store, g) for g in ids}
            monkeypatch.setattr(tables, "SPOOL_MEMORY", 3 * max(len(t) for t in want.values()))
            opened.clear()  # the backups' own (an incremental spills its parent's table)
            got = {g: joined(o)[1] async for g, o in each_generation_table(store, ids)}
        assert got == want
        assert opened == []

    run_asyncio(go())
