"""The tar strategy: member-aware cuts that keep PostgreSQL relation pages deduplicating
wherever they sit in the archive, lossless and independent of how the stream is fed."""

from __future__ import annotations

import io
import os
import random
import tarfile

from hypothesis import given, settings
from hypothesis import strategies as st

from dedupe.chunking import DEFAULT_PARAMS, Chunker, gear_table, make_chunker, sniff
from dedupe.chunking.strategy import kept_spec, parse_spec
from dedupe.chunking.tarcut import TarChunker, looks_like_tar

GEAR = gear_table(bytes(32))
PAGE = 8192


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _chunker() -> TarChunker:
    return TarChunker(PAGE, lambda: Chunker(DEFAULT_PARAMS, GEAR))


def _cut(data: bytes, feeds: list[int] | None = None) -> list[bytes]:
    ch = _chunker()
    out: list[bytes] = []
    prev = 0
    for c in sorted(feeds or []) + [len(data)]:
        out += [bytes(m) for m in ch.feed(data[prev:c])]
        prev = max(prev, c)
    return out + [bytes(m) for m in ch.finish()]


def _pages(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n * PAGE)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    other=st.integers(0, 70_000),
    cuts=st.lists(st.integers(0, 200_000), max_size=6),
    gnu=st.booleans(),
)
def test_cuts_are_lossless_and_do_not_depend_on_feeds(
    sizes: list[int], other: int, cuts: list[int], gnu: bool
) -> None:
    """Relation files of 0..5 pages among other members, the archive's end padding, any
    split into feeds: the chunks join to the stream, and are the same chunks."""
    members = [("PG_VERSION", b"15\n"), ("postgresql.auto.conf", os.urandom(other))]
    members += [(f"base/5/{1000 + i}", _pages(n, i)) for i, n in enumerate(sizes)]
    data = _tar(members, tarfile.GNU_FORMAT if gnu else tarfile.USTAR_FORMAT)
    whole = _cut(data)
    assert b"".join(whole) == data
    assert _cut(data, [c % (len(data) + 1) for c in cuts]) == whole


def test_a_relation_page_dedupes_wherever_the_file_sits_in_the_archive() -> None:
    """Day 2 grew a file ahead of the relation file (every later byte moved by 3000) and
    changed one of its 40 pages: exactly one page is a chunk day 1 did not have among
    the relation's pages, and each page is one chunk."""
    rel = bytearray(_pages(40, 7))
    day1 = _tar([("global/pg_control", os.urandom(5000)), ("base/16384/2619", bytes(rel))])
    rel[17 * PAGE + 100] ^= 0xFF
    day2 = _tar([("global/pg_control", os.urandom(8000)), ("base/16384/2619", bytes(rel))])
    first, second = set(_cut(day1)), _cut(day2)
    pages = {bytes(rel[i : i + PAGE]) for i in range(0, len(rel), PAGE)}
    assert pages <= set(second)
    assert [c for c in second if c in pages and c not in first] == [rel[17 * PAGE : 18 * PAGE]]


def test_not_a_tar_after_all_is_still_stored_whole() -> None:
    """A header whose checksum fails, or garbage after a good one, hands the rest to
    FastCDC: nothing is lost and the cuts stay deterministic."""
    good = _tar([("base/1/1", _pages(2, 1)), ("x", b"y" * 900)])
    torn = bytearray(good)
    torn[2 * 512 + 2 * PAGE + 10] ^= 1  # the second header's name: its checksum fails
    for data in (bytes(torn), good[:512] + os.urandom(50_000), good[: 512 + PAGE + 77]):
        assert b"".join(_cut(data)) == data
        assert _cut(data, [1, 513, 9000]) == _cut(data)


def test_auto_picks_tar_for_a_tar_and_keeps_it() -> None:
    data = _tar([("base/1/1", _pages(1, 1))])
    spec = sniff(data[:512], DEFAULT_PARAMS)
    assert spec == {"algorithm": "tar", "page_size": PAGE, "fastcdc": DEFAULT_PARAMS.to_dict()}
    assert looks_like_tar(data[:512]) and not looks_like_tar(data[:511])
    assert sniff(b"-- PostgreSQL database dump\n" * 40, DEFAULT_PARAMS) == DEFAULT_PARAMS.to_dict()
    assert kept_spec(spec, DEFAULT_PARAMS) == spec
    assert parse_spec("tar", DEFAULT_PARAMS) == spec
    assert isinstance(make_chunker(spec, DEFAULT_PARAMS, GEAR), TarChunker)
    bad = dict(spec, page_size=1000)
    assert kept_spec(bad, DEFAULT_PARAMS) == DEFAULT_PARAMS.to_dict()


def test_relation_files_are_recognised_by_their_place_in_a_cluster() -> None:
    """Relation files (forks, segments) of base.tar and of a tablespace's tar are cut
    into pages; configuration, WAL and other files are not."""
    from dedupe.chunking.tarcut import RELATION_FILE

    for path in (
        "base/16384/16400",
        "./base/1/1259_fsm",
        "global/1262",
        "base/16384/16400.1",
        "base/16384/16400_vm",
        "pg_tblspc/16390/PG_15_202209061/16384/16391",
        "PG_15_202209061/16384/16391_init",
    ):
        assert RELATION_FILE.fullmatch(path.encode()), path
    for path in (
        "postgresql.auto.conf",
        "pg_wal/000000010000000000000003",
        "global/pg_control",
        "base/16384/PG_VERSION",
        "base/16384/pg_filenode.map",
        "pg_xact/0000",
    ):
        assert not RELATION_FILE.fullmatch(path.encode()), path
