"""The restore window plan (csrc/windowplan.c through ChunkTable.plan_window) against a
model written plainly in Python: the distinct chunks of the window in (pack, offset)
order, each placed at its first occurrence; every repeat a copy from that place; ranges
grouping the blobs of one pack (read through gaps of at most `gap`, never past
`max_range` unless one blob alone is larger); jobs cutting each range into runs of about
`batch` stored bytes. And the two refusals: a chunk the index lacks, and a length that
is not the index's. Also verify's sorting of index entries by pack (entries_by_pack),
against its own model."""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dedupe.engine.restore import COALESCE_GAP, DECODE_BATCH, MAX_RANGE
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.store._chunkindex import PLAN_LENGTH, PLAN_MISSING, ChunkTable, entries_by_pack
from dedupe.store.blobs import PLAN_COPY, PLAN_ITEM

GAP, LIMIT, BATCH = 1000, 20_000, 5000  # small, so that few blobs reach every bound


def _model(
    records: list[tuple[bytes, int]], where: dict[bytes, tuple[int, int, int]], lead: int
) -> tuple[int, list[tuple[bytes, tuple[int, ...]]], list[tuple[int, int, int]], list]:
    first: dict[bytes, int] = {}
    length = dict(records)
    copies = []
    pos = lead  # the window's output starts `lead` bytes into its buffer
    for cid, n in records:
        if cid in first:
            copies.append((pos, first[cid], n))
        else:
            first[cid] = pos
        pos += n
    items = sorted(
        ((cid, (*where[cid], length[cid], at)) for cid, at in first.items()),
        key=lambda it: (it[1][0], it[1][1]),
    )
    groups: list[list[int]] = []  # item numbers of each range
    start = end = 0
    for i, (_cid, (pack, offset, stored, _raw, _at)) in enumerate(items):
        if (
            not groups
            or items[groups[-1][0]][1][0] != pack
            or offset - end > GAP
            or offset + stored - start > LIMIT
        ):
            groups.append([])
            start, end = offset, 0
        groups[-1].append(i)
        end = max(end, offset + stored)
    ranges = []
    for group in groups:
        members = [items[i][1] for i in group]
        jobs, lo, size = [], group[0], 0
        for i, it in zip(group, members, strict=True):
            size += it[2]
            if size >= BATCH:
                jobs.append((lo, i + 1))
                lo, size = i + 1, 0
        if lo <= group[-1]:
            jobs.append((lo, group[-1] + 1))
        ranges.append((members[0][0], members[0][1], max(it[1] + it[2] for it in members), jobs))
    return pos, items, copies, ranges


def _plan(table: ChunkTable, records: list[tuple[bytes, int]], lead: int = 0) -> tuple:
    raw = b"".join(CHUNK_RECORD.pack(cid, n) for cid, n in records)
    return table.plan_window(raw, GAP, LIMIT, BATCH, lead)


layouts = st.lists(
    st.tuples(
        st.integers(0, 3),  # pack
        st.integers(0, 2 * GAP),  # gap before the blob in its pack
        st.integers(41, 3 * BATCH),  # stored length
        st.integers(1, 5000),  # raw length
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    layouts,
    st.lists(st.integers(0, 10**6), max_size=60),
    st.randoms(use_true_random=False),
    st.sampled_from([0, 0, 1, 4095, 4096, 70_000]),  # lead
)
@example([(0, 0, 100, 10), (0, GAP, 100, 10)], [0, 1], random.Random(0), 0)  # gap == GAP
@example([(0, 0, LIMIT - 100, 10), (0, 0, 100, 10)], [0, 1], random.Random(0), 0)  # == LIMIT
def test_plan_matches_the_model(
    layout: list[tuple[int, int, int, int]], picks: list[int], rng: random.Random, lead: int
) -> None:
    table = ChunkTable()
    where: dict[bytes, tuple[int, int, int]] = {}
    raw_of: dict[bytes, int] = {}
    ends = [0, 0, 0, 0]
    chunks = []
    for pack, gap, stored, raw in layout:
        cid = os.urandom(32)
        offset = ends[pack] + gap
        ends[pack] = offset + stored
        table.put(cid, pack, offset, stored, raw)
        where[cid], raw_of[cid] = (pack, offset, stored), raw
        chunks.append(cid)
    rng.shuffle(chunks)  # the stream's order is not the packs' order
    # Every chunk once, then repeats picked from anywhere.
    order = chunks + [chunks[p % len(chunks)] for p in picks]
    records = [(cid, raw_of[cid]) for cid in order]

    status, bad, plan = _plan(table, records, lead)
    assert (status, bad) == (0, 0) and plan is not None
    total, ids, items, copies, ranges = plan
    want_total, want_items, want_copies, want_ranges = _model(records, where, lead)

    assert total == want_total == lead + sum(n for _c, n in records)
    got_items = [
        (ids[i * 32 : i * 32 + 32], PLAN_ITEM.unpack_from(items, i * PLAN_ITEM.size))
        for i in range(len(items) // PLAN_ITEM.size)
    ]
    assert got_items == want_items
    assert list(PLAN_COPY.iter_unpack(copies)) == want_copies
    assert [(p, s, e) for p, s, e, _j in ranges] == [(p, s, e) for p, s, e, _j in want_ranges]
    # Jobs: consecutive, covering every item once, each range's own.
    flat = [job for _p, _s, _e, jobs in ranges for job in jobs]
    assert flat[0][0] == 0 and flat[-1][1] == len(got_items)
    assert all(a[1] == b[0] for a, b in zip(flat, flat[1:], strict=False))
    for pack, start, end, jobs in ranges:
        members = got_items[jobs[0][0] : jobs[-1][1]]
        assert all(it[1][0] == pack for it in members)
        assert start == members[0][1][1]
        assert end == max(it[1][1] + it[1][2] for it in members)
        for lo, hi in jobs:
            sizes = [it[1][2] for it in got_items[lo:hi]]
            assert hi > lo
            assert sum(sizes[:-1]) < BATCH  # a job ends with the blob that fills it
    assert [j for _p, _s, _e, j in ranges] == [j for _p, _s, _e, j in want_ranges]


def test_a_missing_chunk_and_a_wrong_length_are_named() -> None:
    table = ChunkTable()
    known = [os.urandom(32) for _ in range(3)]
    for i, cid in enumerate(known):
        table.put(cid, 0, i * 100, 100, 4096)
    stranger = os.urandom(32)
    status, bad, plan = _plan(table, [(known[0], 4096), (known[1], 4096), (stranger, 4096)])
    assert (status, bad, plan) == (PLAN_MISSING, 2, None)
    status, bad, plan = _plan(table, [(known[0], 4096), (known[2], 4095)])
    assert (status, bad, plan) == (PLAN_LENGTH, 1, None)
    # The same chunk with another length further on is refused too (not copied).
    status, bad, plan = _plan(table, [(known[0], 4096), (known[0], 100)])
    assert (status, bad, plan) == (PLAN_LENGTH, 1, None)


def test_an_empty_window_and_ragged_records() -> None:
    table = ChunkTable()
    assert table.plan_window(b"", GAP, LIMIT, BATCH) == (0, 0, (0, b"", b"", b"", []))
    with pytest.raises(ValueError, match="36 bytes each"):
        table.plan_window(b"x" * 35, GAP, LIMIT, BATCH)


def test_ids_that_share_their_first_eight_bytes_stay_distinct() -> None:
    """The plan's repeat table hashes the first 8 bytes of an id; a writer knows the id
    key and could make ids that share them. They must still be told apart."""
    table = ChunkTable()
    prefix = os.urandom(8)
    ids = [prefix + os.urandom(24) for _ in range(50)]
    for i, cid in enumerate(ids):
        table.put(cid, 0, i * 64, 64, 10)
    records = [(cid, 10) for cid in ids] + [(ids[7], 10)]
    _s, _b, plan = _plan(table, records)
    assert plan is not None
    total, got_ids, items, copies, _ranges = plan
    assert len(got_ids) == 50 * 32 and len(items) == 50 * PLAN_ITEM.size
    assert list(PLAN_COPY.iter_unpack(copies)) == [(500, 70, 10)]


def test_restore_constants_make_sense() -> None:
    """The plan is called with restore's own bounds: a batch fits in a range."""
    assert 0 < DECODE_BATCH <= MAX_RANGE and COALESCE_GAP < MAX_RANGE
    assert struct.calcsize("=IIIIQ") == PLAN_ITEM.size == 24


# --- verify's index entries sorted out by pack (_chunkindex.entries_by_pack) ----------------

ENTRY = struct.Struct("<32sIIII")
TRAILER = struct.Struct("<32sIII")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 300), st.integers(0, 300)), max_size=50),
    st.lists(st.tuples(st.integers(0, 100), st.integers(0, 400)), min_size=4, max_size=4),
)
def test_entries_by_pack_matches_the_model(
    spec: list[tuple[int, int, int]], bounds: list[tuple[int, int]]
) -> None:
    entries = [(os.urandom(32), pack, off, st_, 7) for pack, off, st_ in spec]
    records = b"".join(ENTRY.pack(*e) for e in entries)
    parts, outside = entries_by_pack(records, bounds)
    want_parts: dict[int, bytes] = {}
    want_outside = []
    for cid, pack, off, stored, raw in entries:
        first, end = bounds[pack]
        if off < first or off + stored > end:
            want_outside.append((pack, cid))
        else:
            want_parts[pack] = want_parts.get(pack, b"") + TRAILER.pack(cid, off, stored, raw)
    assert parts == want_parts
    assert outside == want_outside


def test_entries_by_pack_refuses_an_unknown_pack_number() -> None:
    with pytest.raises(ValueError, match="pack number 2 of 2"):
        entries_by_pack(ENTRY.pack(b"x" * 32, 2, 0, 1, 1), [(0, 10), (0, 10)])
    with pytest.raises(ValueError, match="48 bytes each"):
        entries_by_pack(b"x" * 47, [(0, 10)])
