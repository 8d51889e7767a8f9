"""Backup then restore gives back exactly the bytes, whatever the size, chunk parameters,
source kind and target kind; and a second backup of the same bytes stores (almost) nothing."""

from __future__ import annotations

import io
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo, open_descriptors, settled_descriptors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedupe import Repository
from dedupe.chunking import ChunkerParams
from dedupe.errors import AmbiguousGeneration, DedupeError, TargetError
from dedupe.format.manifest import CHUNK_RECORD


def _params() -> st.SearchStrategy[ChunkerParams]:
    @st.composite
    def build(draw: st.DrawFn) -> ChunkerParams:
        avg_bits = draw(st.integers(min_value=9, max_value=16))
        avg = 1 << avg_bits
        min_size = draw(st.integers(min_value=64, max_value=avg - 1))
        max_size = draw(st.integers(min_value=avg + 1, max_value=avg * 8))
        return ChunkerParams(min_size, avg, max_size, draw(st.integers(0, 2)))

    return build()


def _interesting_size(params: ChunkerParams) -> st.SearchStrategy[int]:
    edges = [
        0,
        1,
        params.min_size - 1,
        params.min_size,
        params.min_size + 1,
        params.avg_size,
        params.max_size - 1,
        params.max_size,
        params.max_size + 1,
        3 * params.max_size + 7,
    ]
    return st.one_of(st.sampled_from(edges), st.integers(0, 6 * 1024 * 1024))


@st.composite
def _case(draw: st.DrawFn) -> tuple[ChunkerParams, bytes]:
    params = draw(_params())
    size = draw(_interesting_size(params))
    seed = draw(st.binary(min_size=8, max_size=8))
    # Mixed content: repeated runs (which dedupe inside the stream) and random bytes.
    block = (seed * 4096)[: 64 * 1024]
    rnd = os.urandom(max(0, size // 2))
    data = (rnd + block * (size // len(block) + 1))[:size]
    return params, data


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=_case())
def test_roundtrip_random_sizes_and_params(
    tmp_path_factory: pytest.TempPathFactory, run_asyncio, case
) -> None:  # type: ignore[no-untyped-def]
    params, data = case
    path = tmp_path_factory.mktemp("rt") / "repo"

    async def go() -> bytes:
        async with await make_repo(path, chunker=params) as repo:
            stats = await repo.backup(io.BytesIO(data), name="rt", allow_empty=True)
            assert stats.bytes_read == len(data)
            out = io.BytesIO()  # a file object with no descriptor: its own write()
            restored = await repo.restore(stats.id, out)
            assert restored.bytes_written == len(data)
            return out.getvalue()

    assert run_asyncio(go()) == data


def test_sources_and_targets(run, tmp_path: Path, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(700_000) + bytes(300_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 12345):
            yield data[i : i + 12345]

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            by_path = await repo.backup(src, name="a")
            by_file = await repo.backup(io.BytesIO(data), name="b")
            by_iter = await repo.backup(chunks(), name="c")
            # 300 kB of zeros are max-size chunks of one id: stored once.
            assert len(data) - 300_000 < by_path.bytes_new < len(data)
            # The same content again, through other kinds of source: nothing new to store.
            assert by_file.bytes_new == 0 and by_iter.bytes_new == 0
            gens = await repo.generations()
            assert [g.name for g in gens] == ["a", "b", "c"]
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            for spec in (by_path.id, by_file.id[:8], "c@latest"):
                out = tmp_path / f"out-{spec.replace('@', '_')}"
                await repo.restore(spec, out)
                assert out.read_bytes() == data
            with pytest.raises(AmbiguousGeneration, match=r"\(a, b, c\)"):
                await repo.restore("latest", tmp_path / "latest")  # which of three names?
            assert not (tmp_path / "latest").exists()
            streamed = b"".join([part async for part in repo.restore_stream("a@latest")])
            assert streamed == data

    run(go())


@pytest.mark.parametrize("kind", ["pipe, buffered", "file, unbuffered"])
def test_a_file_object_is_read_from_where_its_reader_stands(
    run, tmp_path: Path, repo_path: Path, kind: str
) -> None:  # type: ignore[no-untyped-def]
    """A file object over a descriptor (stdin, a pipe from a dump) is read straight from
    the descriptor into reusable blocks: the bytes its buffer already held come first,
    and what its owner read before the backup is not backed up again."""
    import threading

    data = os.urandom(3_000_000)
    skip = 1000  # read by the caller before handing the file over

    async def go(f: io.RawIOBase | io.BufferedReader) -> bytes:
        async with await make_repo(repo_path) as repo:
            assert f.read(skip) == data[:skip]
            gen = (await repo.backup(f, name="s")).id
            out = io.BytesIO()
            await repo.restore(gen, out)
            return out.getvalue()

    if kind.startswith("pipe"):
        r, w = os.pipe()

        def feed() -> None:
            with open(w, "wb") as sink:
                sink.write(data)

        writer = threading.Thread(target=feed)
        writer.start()
        with open(r, "rb") as f:  # a BufferedReader: it buffers past the caller's read
            assert isinstance(f, io.BufferedReader)
            got = run(go(f))
        writer.join()
    else:
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        with open(src, "rb", buffering=0) as raw:
            assert isinstance(raw, io.FileIO)
            got = run(go(raw))
    assert got == data[skip:]


def test_same_256mib_twice_stores_under_1mib(run_asyncio, tmp_path: Path, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(4 * 1024 * 1024))

    def repo_bytes() -> int:
        return sum(p.stat().st_size for p in repo_path.rglob("*") if p.is_file())

    async def go() -> tuple[int, int]:
        async with await make_repo(repo_path, pack_size=16 * 1024 * 1024) as repo:
            first = await repo.backup(src, name="big")
            before = repo_bytes()
            second = await repo.backup(src, name="big")
            grown = repo_bytes() - before
            assert first.bytes_new == 256 * 1024 * 1024
            assert second.bytes_new == 0 and second.chunks_new == 0
            out = tmp_path / "out.bin"
            await repo.restore(second.id, out)
            return grown, out.stat().st_size

    grown, restored = run_asyncio(go())
    assert grown < 1024 * 1024, f"second backup grew the repository by {grown} bytes"
    assert restored == 256 * 1024 * 1024


def test_a_large_backup_writes_several_index_objects(
    run, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """What a backup holds for the chunks it stored is bounded: it writes an index object
    every INDEX_FLUSH_ENTRIES new chunks (here 8). Chunks listed by an earlier index object
    of the same backup are not stored twice, and everything restores from a fresh open."""
    import dedupe.engine.backup as backup_module

    monkeypatch.setattr(backup_module, "INDEX_FLUSH_ENTRIES", 8)
    rng = random.Random(3)  # fixed data: how soon the chunker re-synchronises is data's
    rnd = rng.randbytes(600_000)
    data = rnd + rnd[:300_000] + rng.randbytes(200_000)  # repeats within the one backup

    async def go() -> None:
        async with await make_repo(repo_path, chunker=ChunkerParams(1024, 4096, 16384, 2)) as repo:
            stats = await repo.backup(io.BytesIO(data), name="db", kind="full")
            objects = await repo._store.backend.list("index/")
            assert len(objects) > 1
            # Each distinct chunk is stored once. (How soon the chunker re-synchronises
            # inside the repeat depends on the repository's random chunker key, so the
            # repeat's share of new bytes is not a fixed number.)
            _, table = await repo._store.generation_chunks(stats.id)
            distinct = dict(CHUNK_RECORD.iter_unpack(table))
            assert stats.chunks_new == len(distinct) < stats.chunks
            assert stats.bytes_new == sum(distinct.values()) < len(data)
            again = await repo.backup(io.BytesIO(data), name="db", kind="full")
            assert again.bytes_new == 0
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            out = io.BytesIO()
            await repo.restore(stats.id, out)
            assert out.getvalue() == data
            assert (await repo.verify(read_data=True)).ok

    run(go())


class GoneAfter(io.RawIOBase):
    """A target whose reader goes away once `limit` bytes were written."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.left <= 0:
            raise OSError(32, "the reader went away")
        n = min(len(b), self.left)
        self.left -= n
        return n


def test_restores_read_the_table_from_a_file_they_close(
    run, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A restore reads its generation's complete table from a temporary file, piece by
    piece (an incremental's expanded through its chain): the bytes come back exactly, in
    several windows, and the file is closed whether the restore succeeds, fails at a
    damaged chunk, or stops at a target that fails half way (a pack read already in a
    worker thread, which no cancellation stops, may still hold its pack open for a moment
    after the restore returns: settled_descriptors waits for it, up to 2 s)."""
    import dedupe.engine.restore as restore_module

    rng = random.Random(9)
    base = bytearray(rng.randbytes(3_000_000))

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            full = await repo.backup(io.BytesIO(bytes(base)), name="db", kind="full")
            base[1_000_000:1_000_100] = rng.randbytes(100)
            incr = await repo.backup(io.BytesIO(bytes(base)), name="db", kind="incremental")
            before = open_descriptors()
            out = io.BytesIO()
            await repo.restore(incr.id, out)
            assert out.getvalue() == base
            assert await settled_descriptors(before) == before
            with pytest.raises(TargetError, match="went away"):  # after the first window
                await repo.restore(full.id, GoneAfter(300_000))
            assert await settled_descriptors(before) == before
            # Damage the first blob of every pack: the incremental's own pack holds only
            # chunks it reads (the full's first blob may be one the incremental replaced).
            for victim in (p for p in (repo_path / "packs").rglob("*") if p.is_file()):
                data = bytearray(victim.read_bytes())
                data[100] ^= 1
                victim.write_bytes(bytes(data))
            with pytest.raises(DedupeError):
                await repo.restore(incr.id, io.BytesIO())
            assert await settled_descriptors(before) == before

    monkeypatch.setattr(restore_module, "WINDOW_BYTES", 256 * 1024)
    run(go())
