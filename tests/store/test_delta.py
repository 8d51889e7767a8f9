"""make_delta/apply_delta reproduce any chunk table from any parent, and stay small when
the tables share most records; the native make_delta computes exactly what its spec,
make_delta_py, computes."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import tempfile
import tracemalloc
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dedupe.errors import IntegrityError
from dedupe.format.delta import (
    DeltaBuilder,
    PackedOps,
    apply_delta,
    compose,
    delta_ranges,
    join_pieces,
    make_delta,
    make_delta_py,
    whole,
)
from dedupe.format.manifest import CHUNK_RECORD

R = CHUNK_RECORD.size

POOL = [CHUNK_RECORD.pack(os.urandom(32), n) for n in range(1, 40)]


@given(
    parent=st.lists(st.sampled_from(POOL), max_size=60),
    table=st.lists(st.sampled_from(POOL), max_size=60),
)
def test_delta_round_trip(parent: list[bytes], table: list[bytes]) -> None:
    p, t = b"".join(parent), b"".join(table)
    literal, ops = make_delta(p, t)
    assert apply_delta(p, literal, ops, "g") == t
    # Literals are only records the parent does not have.
    parent_set = set(parent)
    n = CHUNK_RECORD.size
    assert all(literal[i : i + n] not in parent_set for i in range(0, len(literal), n))


@given(
    parent=st.lists(st.sampled_from(POOL), max_size=80),
    table=st.lists(st.sampled_from(POOL), max_size=80),
)
def test_native_matches_the_spec(parent: list[bytes], table: list[bytes]) -> None:
    """Repeats, reorderings, records the parent lacks: the same literal table and the
    same ops, op for op (copies start at a record's first occurrence)."""
    p, t = b"".join(parent), b"".join(table)
    assert make_delta(p, t) == make_delta_py(p, t)


def test_native_matches_the_spec_on_a_day_of_changes() -> None:
    """A large parent (most records unique) and a child with scattered replacements,
    insertions, deletions and a moved block; bytearray input, as a backup passes it."""
    rnd = random.Random(5)
    parent = [CHUNK_RECORD.pack(rnd.randbytes(32), rnd.randrange(1, 65536)) for _ in range(50_000)]
    child = list(parent)
    for _ in range(300):
        i = rnd.randrange(len(child))
        what = rnd.random()
        if what < 0.4:
            child[i] = CHUNK_RECORD.pack(rnd.randbytes(32), 7)
        elif what < 0.7:
            child.insert(i, CHUNK_RECORD.pack(rnd.randbytes(32), 9))
        else:
            del child[i]
    child[1000:1000] = child[30_000:30_500]  # a block that now appears twice
    p, t = b"".join(parent), bytearray(b"".join(child))
    literal, ops = make_delta(p, t)
    assert (literal, ops) == make_delta_py(p, bytes(t))
    assert apply_delta(p, literal, ops, "g") == t


@given(
    parent=st.lists(st.sampled_from(POOL), max_size=80),
    table=st.lists(st.sampled_from(POOL), max_size=80),
)
def test_the_ops_as_text_are_what_json_writes_of_the_ops(
    parent: list[bytes], table: list[bytes]
) -> None:
    """ops_json() is the manifest's text of the ops: byte for byte json.dumps of the
    spec's ops (the empty delta included), so a manifest's meta is what it was when the
    ops went through Python lists."""
    p, t = b"".join(parent), b"".join(table)
    builder = DeltaBuilder(p)
    builder.feed(t)
    _literal, ops = make_delta_py(p, t)
    assert builder.ops_json() == json.dumps(ops).encode()


def test_the_ops_as_text_carry_numbers_of_every_width() -> None:
    """Positions and counts of 1 to 6 digits, in a delta of 7,000 ops: every digit
    written, none dropped at a power of ten."""
    rnd = random.Random(3)
    parent = [CHUNK_RECORD.pack(rnd.randbytes(32), 1) for _ in range(140_000)]
    child = [r if i % 40 else CHUNK_RECORD.pack(rnd.randbytes(32), 2) for i, r in enumerate(parent)]
    child[:0] = parent[99_990:100_010] + parent[:10]  # copies starting at 99990 and 0
    builder = DeltaBuilder(b"".join(parent))
    builder.feed(b"".join(child))
    text = builder.ops_json()
    assert json.loads(text) == builder.ops()
    assert text == json.dumps(builder.ops()).encode()
    assert b"[0, 99990, 20]" in text and b"[0, 0, 10]" in text
    assert len(builder.ops()) > 7_000


@given(
    parent=st.lists(st.sampled_from(POOL), max_size=60),
    table=st.lists(st.sampled_from(POOL), max_size=60),
)
def test_packed_ops_read_as_the_lists_they_were_made_from(
    parent: list[bytes], table: list[bytes]
) -> None:
    """PackedOps of a delta's ops equal the ops, give the same ranges and the same
    composed table: a reader that packs them expands every generation as before."""
    p, t = b"".join(parent), b"".join(table)
    literal, ops = make_delta_py(p, t)
    packed = PackedOps.of(json.loads(json.dumps(ops)))  # as a reader gets them
    assert packed is not None and len(packed) == len(ops)
    assert packed == ops and packed.as_lists() == ops and packed == PackedOps.of(ops)
    n_parent, n_literal = len(parent), len(literal) // R
    assert list(delta_ranges(packed, n_parent, n_literal, "g")) == list(
        delta_ranges(ops, n_parent, n_literal, "g")
    )
    assert apply_delta(p, literal, packed, "g", len(table)) == t
    pieces = compose(whole(n_parent), delta_ranges(packed, n_parent, n_literal, "g"), 1)
    assert join_pieces([p, literal], pieces) == t


def test_packed_ops_hold_a_sixth_of_what_the_lists_do() -> None:
    """100,000 ops of a scattered day: the lists json.loads makes hold ~110 bytes an op,
    PackedOps 17 (tracemalloc, what each keeps once made)."""
    rnd = random.Random(2)
    ops = [[0, rnd.randrange(1 << 20), rnd.randrange(300, 1 << 12)] for _ in range(50_000)]
    ops += [[1, rnd.randrange(1, 4)] for _ in range(50_000)]
    text = json.dumps(ops)
    tracemalloc.start()
    try:
        lists = json.loads(text)
        as_lists = tracemalloc.get_traced_memory()[0]
        packed = PackedOps.of(lists)
        del lists
        as_packed = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert packed is not None and packed == ops
    per_op_lists, per_op_packed = as_lists / len(ops), as_packed / len(ops)
    assert per_op_lists > 80 and per_op_packed < 20, (per_op_lists, per_op_packed)


@pytest.mark.parametrize(
    "ops",
    [
        {"0": [0, 1, 2]},
        [(0, 1, 2)],
        [[]],
        [[True, 1]],
        [[0, 1.0, 2]],
        [[0, 1, "2"]],
        [[0, 1, 2, 3]],
        [[1, 2, 3]],
        [[0, 1]],
        [[2, 1]],
        [[0, -1, 2]],
        [[1, 1 << 63]],
    ],
)
def test_ops_of_any_other_shape_are_not_packed(ops: Any) -> None:
    """Only the shape writers make is packed; anything else stays as json.loads made it,
    for delta_ranges to judge as it did before packing existed."""
    assert PackedOps.of(ops) is None


def test_small_change_gives_small_delta() -> None:
    parent = [CHUNK_RECORD.pack(os.urandom(32), 16384) for _ in range(10_000)]
    table = list(parent)
    table[5000] = CHUNK_RECORD.pack(os.urandom(32), 100)  # one chunk changed
    table.insert(7000, CHUNK_RECORD.pack(os.urandom(32), 200))  # one inserted
    literal, ops = make_delta(b"".join(parent), b"".join(table))
    assert len(literal) == 2 * CHUNK_RECORD.size
    assert len(ops) <= 5


def test_damaged_delta_is_an_integrity_error() -> None:
    p = b"".join(POOL[:3])
    with pytest.raises(IntegrityError):
        apply_delta(p, b"", [[0, 2, 5]], "g")
    with pytest.raises(IntegrityError):
        apply_delta(p, POOL[4], [[0, 0, 1]], "g")  # literal left unused
    with pytest.raises(IntegrityError):
        apply_delta(p, b"", [[7, 0, 1]], "g")


# --- the kernel over a parent in a file, fed in pieces, as a backup uses it -------------


def _from_file(parent: bytes, table: bytes, cuts: list[int]) -> tuple[bytes, list[list[Any]]]:
    """The delta with the parent read from a file and the table fed in pieces cut at
    record positions `cuts`."""
    with tempfile.TemporaryFile() as f:
        f.write(parent)
        f.flush()
        builder = DeltaBuilder(fd=f.fileno(), n_parent=len(parent) // R)
        literal = bytearray()
        bounds = [0, *sorted(c for c in cuts if 0 < c < len(table) // R), len(table) // R]
        for lo, hi in itertools.pairwise(bounds):
            literal += builder.feed(table[lo * R : hi * R])
        return bytes(literal), builder.ops()


@given(
    parent=st.lists(st.sampled_from(POOL), max_size=80),
    table=st.lists(st.sampled_from(POOL), max_size=80),
    cuts=st.lists(st.integers(0, 80), max_size=6),
)
def test_the_file_kernel_fed_in_pieces_matches_the_spec(
    parent: list[bytes], table: list[bytes], cuts: list[int]
) -> None:
    p, t = b"".join(parent), b"".join(table)
    assert _from_file(p, t, cuts) == make_delta_py(p, t)


def test_the_file_kernel_on_a_day_of_changes_across_many_windows() -> None:
    """50,000 parent records are 27 read windows: copy runs start, continue and end in
    windows other than the one the last lookup loaded."""
    rnd = random.Random(11)
    parent = [CHUNK_RECORD.pack(rnd.randbytes(32), rnd.randrange(1, 65536)) for _ in range(50_000)]
    parent[40_000:40_000] = parent[100:2100]  # repeats the kernel must not index twice
    child = list(parent)
    for _ in range(300):
        i = rnd.randrange(len(child))
        if rnd.random() < 0.5:
            child[i] = CHUNK_RECORD.pack(rnd.randbytes(32), 7)
        else:
            del child[i]
    child[9000:9000] = child[45_000:47_000]
    p, t = b"".join(parent), b"".join(child)
    cuts = [rnd.randrange(len(child)) for _ in range(40)]
    got = _from_file(p, t, cuts)
    assert got == make_delta_py(p, t)
    assert apply_delta(p, got[0], got[1], "g") == t


def test_records_alike_in_their_first_id_bytes_are_told_apart() -> None:
    """The kernel's slots keep tags made from the first 16 bytes of a record's id. Records
    that share those bytes, or differ only in their length, share every tag and probe:
    the records themselves decide, in memory and through the file's window alike."""
    rnd = random.Random(3)
    head = rnd.randbytes(16)
    pool = [CHUNK_RECORD.pack(head + rnd.randbytes(16), 7) for _ in range(300)]
    pool += [CHUNK_RECORD.pack(CHUNK_RECORD.unpack(r)[0], 8) for r in pool[:60]]
    parent = rnd.choices(pool[:250], k=3000)
    child = rnd.choices(pool, k=1500) + parent[500:2000]
    p, t = b"".join(parent), b"".join(child)
    want = make_delta_py(p, t)
    assert make_delta(p, t) == want
    assert _from_file(p, t, [700, 1400, 2500]) == want
    assert len(want[0]) >= 50 * R and len(want[1]) > 100


# Records built to collide in the kernel's tags: two 16-byte heads (both tags come from
# the first 16 id bytes), three tails, two lengths.
ALIKE = [
    CHUNK_RECORD.pack(head + tail, length)
    for head in (b"\x00" * 16, os.urandom(16))
    for tail in (b"\x00" * 16, b"\x01" * 16, os.urandom(16))
    for length in (7, 8)
]


@given(
    parent=st.lists(st.sampled_from(ALIKE), max_size=80),
    table=st.lists(st.sampled_from(ALIKE), max_size=80),
    cuts=st.lists(st.integers(0, 80), max_size=4),
)
def test_records_that_collide_in_every_tag_give_the_spec_delta(
    parent: list[bytes], table: list[bytes], cuts: list[int]
) -> None:
    p, t = b"".join(parent), b"".join(table)
    want = make_delta_py(p, t)
    assert make_delta(p, t) == want
    assert _from_file(p, t, cuts) == want


def test_one_feed_of_many_records_matches_the_spec_and_holds_little_besides() -> None:
    """A backup feeds the kernel whole batches (up to ~170,000 records, most of them in
    the parent). One feed of 60,000 records, literals strewn through it, gives the spec's
    delta, and its Python allocations stay far below the 2.2 MB a room for every record's
    literal would take."""
    rnd = random.Random(5)
    parent = [CHUNK_RECORD.pack(rnd.randbytes(32), 9) for _ in range(60_000)]
    child = list(parent)
    for i in rnd.sample(range(len(child)), 200):
        child[i] = CHUNK_RECORD.pack(rnd.randbytes(32), 7)
    p, t = b"".join(parent), b"".join(child)
    with tempfile.TemporaryFile() as f:
        f.write(p)
        f.flush()
        builder = DeltaBuilder(fd=f.fileno(), n_parent=len(parent))
        tracemalloc.start()
        try:
            literal = builder.feed(t)
            _now, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert (literal, builder.ops()) == make_delta_py(p, t)
    assert len(literal) == 200 * R
    assert peak < 600_000, peak


def test_the_kernel_holds_slots_for_distinct_records_not_for_records() -> None:
    """What lets an incremental's memory not grow with its snapshot: a parent of 300,000
    records that repeat 50 distinct ones costs the kernel a few KiB, where 300,000
    distinct records cost slots at most 3/4 full, grown by half (4/3 to 2 slots a
    record), of 6 bytes each once the parent is indexed."""
    distinct = [CHUNK_RECORD.pack(os.urandom(32), 65536) for _ in range(50)]
    repeating = b"".join(distinct[i % 50] for i in range(300_000))
    unique = b"".join(CHUNK_RECORD.pack(os.urandom(32), 1) for _ in range(300_000))
    with tempfile.TemporaryFile() as f:
        f.write(repeating)
        f.flush()
        small = DeltaBuilder(fd=f.fileno(), n_parent=300_000).memory_bytes()
    big = DeltaBuilder(unique).memory_bytes()
    assert small < 80 * 1024 < 6 * 300_000 * 4 // 3 <= big <= 6 * 300_000 * 2 + 128 * 1024


def test_the_slot_table_stays_between_4_3_and_2_slots_per_distinct_record() -> None:
    """At most 3/4 full, grown by half: whatever the count, 4/3 to 2 slots per distinct
    parent record, 6 bytes each once the parent is indexed (a position and a 16-bit tag).
    Counts spread over a range meet every point of the growth cycle, so a table doubled
    (up to 2.67 slots a record), filled past 3/4, or left at 8 bytes a slot (the 32-bit
    tags of the indexing) fails."""
    pool = os.urandom(32 * 400_000)
    for n in range(100_000, 400_001, 23_000):
        parent = b"".join(CHUNK_RECORD.pack(pool[32 * i : 32 * i + 32], 1) for i in range(n))
        held = DeltaBuilder(parent).memory_bytes()
        assert 6 * n * 4 / 3 <= held <= 6 * n * 2 + 64 * 1024, n


def test_a_parent_file_shorter_than_its_count_is_an_error() -> None:
    with tempfile.TemporaryFile() as f:
        f.write(b"".join(POOL[:10]))
        f.flush()
        with pytest.raises(OSError, match="Input/output"):
            DeltaBuilder(fd=f.fileno(), n_parent=11)
        with pytest.raises(ValueError):
            DeltaBuilder(fd=f.fileno())
        with pytest.raises(ValueError, match="whole"):
            DeltaBuilder(fd=f.fileno(), n_parent=10).feed(b"x" * 35)


# --- composing a chain of deltas -----------------------------------------------------------


def _random_ops(rnd: random.Random, n_parent: int, n_literal: int) -> list[list[int]]:
    """Valid ops of any shape: copies anywhere in the parent (repeated, reordered,
    overlapping), literal runs that use the literal table up; every count at least 1."""
    ops: list[list[int]] = []
    left = n_literal
    while left or rnd.random() < 0.8:
        if left and rnd.random() < 0.4:
            take = rnd.randint(1, left)
            ops.append([1, take])
            left -= take
        elif n_parent:
            start = rnd.randrange(n_parent)
            ops.append([0, start, rnd.randint(1, n_parent - start)])
        elif not left:
            break
    return ops


def _compose_chain(full: bytes, deltas: list[tuple[bytes, list[list[int]]]]) -> bytes:
    sources = [full]
    total = len(full) // R
    pieces = whole(total)
    for literal, ops in deltas:
        ranges = delta_ranges(ops, total, len(literal) // R, "g")
        sources.append(literal)
        pieces = compose(pieces, ranges, len(sources) - 1)
        total = sum(n for _k, _s, n in ranges)
        assert sum(pieces[2]) == total and all(pieces[2])  # no empty piece
    return join_pieces(sources, pieces)


@pytest.mark.parametrize("seed", range(40))
def test_composed_deltas_make_what_applying_them_one_by_one_makes(seed: int) -> None:
    """A full and a chain of up to 30 deltas of every shape, composed into pieces of the
    full's and the literal tables and joined once: the same table as apply_delta (the
    spec) applied link by link. Each record carries its source and position, so a piece
    taken from the wrong table or the wrong place shows."""
    rnd = random.Random(seed)
    full = b"".join(CHUNK_RECORD.pack(bytes(32), i) for i in range(rnd.randint(0, 40)))
    deltas = []
    expected = full
    for link in range(1, rnd.randint(1, 30)):
        n_literal = rnd.randint(0, 6)
        literal = b"".join(
            CHUNK_RECORD.pack(link.to_bytes(32, "little"), i) for i in range(n_literal)
        )
        ops = _random_ops(rnd, len(expected) // R, n_literal)
        deltas.append((literal, ops))
        expected = apply_delta(expected, literal, ops, "g")
    assert _compose_chain(full, deltas) == expected


def test_a_chain_of_daily_deltas_composes_into_few_pieces() -> None:
    """500 days of a few changed records in a table of 10,000: the composed table is
    the one applied day by day, held in about as many pieces as the changes cut it
    into, not one per record."""
    rnd = random.Random(7)
    table = [CHUNK_RECORD.pack(rnd.randbytes(32), i) for i in range(10_000)]
    full = b"".join(table)
    sources = [full]
    pieces = whole(len(table))
    expected = full
    for _day in range(500):
        new = list(table)
        for _ in range(3):
            new[rnd.randrange(len(new))] = CHUNK_RECORD.pack(rnd.randbytes(32), 0)
        literal, ops = make_delta(b"".join(table), b"".join(new))
        ranges = delta_ranges(ops, len(table), len(literal) // R, "g", len(new))
        sources.append(literal)
        pieces = compose(pieces, ranges, len(sources) - 1)
        expected = apply_delta(expected, literal, ops, "g")
        table = new
    assert join_pieces(sources, pieces) == expected == b"".join(table)
    assert len(pieces[0]) <= 2 * 3 * 500 + 1


@pytest.mark.parametrize(
    ("ops", "n_parent", "n_literal", "expected", "says"),
    [
        ({"0": [0, 0, 1]}, 3, 0, None, "its ops are not a list"),
        ([[0, 0, 1], 5], 3, 0, None, "an op is not a list of integers"),
        ([[True, 0, 1]], 3, 0, None, "an op is not a list of integers"),
        ([[0, 0, 1.0]], 3, 0, None, "an op is not a list of integers"),
        ([[1, "1"]], 3, 1, None, "an op is not a list of integers"),
        ([[0, 0]], 3, 0, None, "unknown delta op"),
        ([[2, 0, 1]], 3, 0, None, "unknown delta op"),
        ([[0, 0, 0]], 3, 0, None, "a copy of 0 records"),
        ([[1, 0]], 3, 0, None, "a literal run of 0 records"),
        ([[0, 2, 2]], 3, 0, None, "copies past its parent's table"),
        ([[0, -1, 2]], 3, 0, None, "copies past its parent's table"),
        ([[1, 3]], 3, 2, None, "reads past its literal table"),
        ([[1, 1], [1, 2]], 3, 2, None, "reads past its literal table"),
        ([[1, 1]], 3, 2, None, "leaves literal records unused"),
        ([[0, 0, 2]], 3, 0, 3, "makes 2 records, its header says 3"),
        # Stops as soon as the counts pass the header's: the object after is never read.
        ([[0, 0, 3], {}], 3, 0, 2, "more than the 2 records its header says"),
        ([[0, 0, 1], [0, 0, 2], {}], 3, 0, 2, "more than the 2 records its header says"),
    ],
)
def test_each_malformed_delta_is_refused_for_what_it_is(
    ops: Any, n_parent: int, n_literal: int, expected: int | None, says: str
) -> None:
    """FORMAT.md 8.1, as list ops (the meta's JSON) and, where they pack, as PackedOps:
    one refusal per rule, each with its own message, before anything is expanded."""
    with pytest.raises(IntegrityError, match="^g: .*" + re.escape(says)):
        delta_ranges(ops, n_parent, n_literal, "g", expected)
    packed = PackedOps.of(ops)
    if packed is not None:
        with pytest.raises(IntegrityError, match=re.escape(says)):
            delta_ranges(packed, n_parent, n_literal, "g", expected)


def test_packed_ops_iterate_as_kind_and_two_operands_the_second_0_for_a_literal() -> None:
    """The documented shape every reader of PackedOps relies on."""
    packed = PackedOps.of([[1, 5], [0, 2, 3]])
    assert packed is not None
    assert list(packed) == [(1, 5, 0), (0, 2, 3)]
