"""Chunking strategies: fixed blocks are split-independent, auto recognises SQLite
databases, and a page file backed up with auto stores a changed page, not a region."""

from __future__ import annotations

import io
import os
import random
import sqlite3
from pathlib import Path

import pytest
from conftest import make_repo
from hypothesis import given
from hypothesis import strategies as st

from dedupe.chunking import DEFAULT_PARAMS, FixedChunker, parse_spec, sniff


@given(
    data=st.binary(max_size=20_000),
    cuts=st.lists(st.integers(0, 20_000), max_size=8),
    size=st.sampled_from([512, 1024, 4096]),
)
def test_fixed_chunks_do_not_depend_on_feeds(data: bytes, cuts: list[int], size: int) -> None:
    ch = FixedChunker(size)
    out: list[bytes] = []
    prev = 0
    for c in sorted(cuts) + [len(data)]:
        out += [bytes(m) for m in ch.feed(data[prev:c])]
        prev = max(prev, c)
    out += [bytes(m) for m in ch.finish()]
    assert b"".join(out) == data
    assert all(len(c) == size for c in out[:-1])
    assert out == [data[i : i + size] for i in range(0, len(data), size)]


def test_fixed_chunks_of_a_mutable_buffer_do_not_change_with_it() -> None:
    """Chunks are slices of the fed bytes when those cannot change (bytes, a reader's
    Block), and of a copy otherwise: a caller reusing its bytearray for the next read
    must not rewrite the chunks it was given."""
    ch = FixedChunker(512)
    buf = bytearray(os.urandom(1300))
    want = bytes(buf)
    got = ch.feed(buf)
    buf[:] = bytes(len(buf))
    rest = ch.finish()
    assert [bytes(m) for m in got + rest] == [want[:512], want[512:1024], want[1024:]]
    assert all(m.readonly for m in got + rest)


def test_sniff_and_parse(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    con = sqlite3.connect(db)
    con.execute("pragma page_size = 8192")
    con.execute("create table t (x)")
    con.commit()
    con.close()
    assert sniff(db.read_bytes()[:64], DEFAULT_PARAMS) == {"algorithm": "fixed", "block_size": 8192}
    assert sniff(b"-- PostgreSQL database dump\n", DEFAULT_PARAMS) == DEFAULT_PARAMS.to_dict()
    assert parse_spec("fixed:4096", DEFAULT_PARAMS) == {"algorithm": "fixed", "block_size": 4096}
    assert parse_spec("fastcdc", DEFAULT_PARAMS) == DEFAULT_PARAMS.to_dict()
    with pytest.raises(ValueError):
        parse_spec("fixed:3", DEFAULT_PARAMS)
    with pytest.raises(ValueError):
        parse_spec("rabin", DEFAULT_PARAMS)


def _page_file(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    con = sqlite3.connect(path)
    con.execute("create table m (id integer primary key, body text)")
    con.executemany(
        "insert into m values (?, ?)",
        ((i, rng.randbytes(rng.randrange(50, 400)).hex()) for i in range(rows)),
    )
    con.commit()
    con.close()


def test_auto_stores_changed_pages_of_a_sqlite_file(run_asyncio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    day1 = tmp_path / "day1.db"
    _page_file(day1, 20_000, 1)
    day2 = tmp_path / "day2.db"
    day2.write_bytes(day1.read_bytes())
    con = sqlite3.connect(day2)
    rng = random.Random(2)
    for i in rng.sample(range(20_000), 60):  # scattered updates, as a day of traffic
        con.execute("update m set body = ? where id = ?", (os.urandom(40).hex(), i))
    con.commit()
    con.close()

    async def new_bytes(chunker: str) -> int:
        async with await make_repo(tmp_path / f"repo-{chunker}") as repo:
            await repo.backup(day1, name="db", kind="full", chunker=chunker)
            stats = await repo.backup(day2, name="db", chunker=chunker)
            out = io.BytesIO()
            await repo.restore(stats.id, out)
            assert out.getvalue() == day2.read_bytes()
            gen = (await repo.generations())[-1]
            return stats.bytes_new if gen.kind == "incremental" else -1

    auto = run_asyncio(new_bytes("auto"))
    cdc = run_asyncio(new_bytes("fastcdc"))
    assert 0 < auto < cdc / 2, (auto, cdc)
