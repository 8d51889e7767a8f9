"""The native chunk table (csrc/chunkindex.c) against a dict model, its memory bound,
and its argument checks."""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedupe.store._chunkindex import NO_PACK, RECORD_BYTES, ChunkTable

ENTRY = struct.Struct("<32sIIII")  # dedupe.format.index: an index object's entry record
Value = tuple[int, int, int, int]

# The table keeps the first KEY_BYTES of an id (csrc/chunkindex.h): ids that agree in
# them are one key, which the model says by keying on them.
KEY_BYTES = 24
# Ids that share their first 8 bytes (the hash) but differ later, so probing, tag
# matches and the key comparison are all exercised; the all-zero id among them. The
# tails differ at both ends of the key's last 16 bytes, and past the key (one key then).
PREFIXES = [bytes(8), b"\xff" * 8, b"\x01" * 8, bytes(7) + b"\x01", b"\x01" + bytes(7)]
TAILS = [
    bytes(24),
    b"\x01" * 24,
    bytes(15) + b"\x01" + bytes(8),
    b"\x80" + bytes(23),
    bytes(23) + b"\x01",
    bytes(16) + b"\xff" * 8,
]
ids = st.one_of(
    st.builds(lambda p, t: p + t, st.sampled_from(PREFIXES), st.sampled_from(TAILS)),
    st.binary(min_size=32, max_size=32),
)
u32 = st.integers(0, 0xFFFFFFFF)
values = st.tuples(st.integers(0, NO_PACK - 1), u32, u32, u32)


def records(entries: list[tuple[bytes, int, int, int, int]]) -> bytes:
    return b"".join(ENTRY.pack(*e) for e in entries)


def random_entries(n: int, seed: int, packs: int = 7) -> list[tuple[bytes, int, int, int, int]]:
    rng = random.Random(seed)
    return [
        (rng.randbytes(32), rng.randrange(packs), rng.getrandbits(32), rng.getrandbits(32), i)
        for i in range(n)
    ]


def check_model(table: ChunkTable, model: dict[bytes, Value], extra: list[bytes]) -> None:
    """model: the table's keys (an id's first KEY_BYTES) and values; extra: more ids."""
    assert len(table) == len(model)
    # A model key is looked up with a tail of its own: the table must not compare it.
    probe = [k + os.urandom(32 - KEY_BYTES) for k in model] + extra
    for k in probe:
        assert table.get(k) == model.get(k[:KEY_BYTES])
        assert (k in table) == (k[:KEY_BYTES] in model)
    want_flags = bytes(k[:KEY_BYTES] in model for k in probe)
    joined = b"".join(probe)
    assert table.contains_many(joined) == want_flags
    for stride in (32, 36, 48):  # ids where they lie in records (a chunk table's: 36)
        filler = bytes(range(stride - 32))
        recs = b"".join(k + filler for k in probe)
        assert table.contains_records(recs, stride) == want_flags
    got = memoryview(table.get_many(joined)).cast("I").tolist()
    want = [x for k in probe for x in model.get(k[:KEY_BYTES], (NO_PACK, 0, 0, 0))]
    assert got == want


op = st.one_of(
    st.tuples(st.just("put"), ids, values, st.booleans()),
    st.tuples(
        st.just("bulk"),
        st.lists(st.tuples(ids, st.integers(0, 2), u32, u32, u32), max_size=40),
        st.lists(st.integers(0, NO_PACK - 1), min_size=3, max_size=3),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=60), extra=st.lists(ids, max_size=10))
def test_against_dict_model(ops: list[tuple[object, ...]], extra: list[bytes]) -> None:
    table = ChunkTable()
    model: dict[bytes, Value] = {}
    for o in ops:
        if o[0] == "put":
            _, key, value, overwrite = o
            assert isinstance(key, bytes) and isinstance(value, tuple)
            new = table.put(key, *value, overwrite=bool(overwrite))
            assert new == (key[:KEY_BYTES] not in model)
            if new or overwrite:
                model[key[:KEY_BYTES]] = value
        else:
            _, entries, pack_map = o
            assert isinstance(entries, list) and isinstance(pack_map, list)
            want_dups = []
            for i, (key, local, off, stored, raw) in enumerate(entries):
                if key[:KEY_BYTES] in model:
                    want_dups.append(i)
                else:
                    model[key[:KEY_BYTES]] = (pack_map[local], off, stored, raw)
            assert table.add_records(records(entries), pack_map) == want_dups
    check_model(table, model, extra)


def test_all_zero_id_is_a_key() -> None:
    table = ChunkTable()
    zero = bytes(32)
    assert table.get(zero) is None and zero not in table
    assert table.put(zero, 0, 0, 0, 0)
    assert table.get(zero) == (0, 0, 0, 0) and zero in table
    assert not table.put(zero, 1, 2, 3, 4)
    assert table.get(zero) == (0, 0, 0, 0)
    assert not table.put(zero, 1, 2, 3, 4, overwrite=True)
    assert table.get(zero) == (1, 2, 3, 4)
    assert table.add_records(records([(zero, 0, 9, 9, 9)]), [5]) == [0]
    assert table.contains_many(zero + bytes(23) + b"\x01" + bytes(8)) == b"\x01\x00"
    assert len(table) == 1


def test_an_id_is_its_first_24_bytes_to_the_table() -> None:
    """What csrc/chunkindex.h's safety argument rests on, both ways: bytes past the key
    are neither kept nor compared, and every byte of the key is."""
    table = ChunkTable()
    a = os.urandom(32)
    past_the_key = a[:KEY_BYTES] + bytes(x ^ 0xFF for x in a[KEY_BYTES:])
    assert table.put(a, 1, 2, 3, 4)
    assert table.get(past_the_key) == (1, 2, 3, 4)
    assert not table.put(past_the_key, 5, 6, 7, 8)
    # Every byte of the key, those of the hash included: one that differs from a only
    # in the low bits of byte 0 has a's home slot and tag, so only the comparison tells.
    for at in range(KEY_BYTES):
        other = a[:at] + bytes([a[at] ^ 1]) + a[at + 1 :]
        assert table.get(other) is None and other not in table, at
        assert table.put(other, at, 0, 0, 0)
        assert table.get(other) == (at, 0, 0, 0)
    assert len(table) == 1 + KEY_BYTES
    assert table.get(a) == (1, 2, 3, 4)


def test_growth_across_many_rebuilds() -> None:
    table = ChunkTable()
    model: dict[bytes, Value] = {}
    rng = random.Random(1)
    capacities = {table.capacity()}
    for i in range(60_000):
        key = rng.randbytes(32)
        value = (i, i + 1, i + 2, i + 3)
        assert table.put(key, *value)
        model[key[:KEY_BYTES]] = value
        capacities.add(table.capacity())
    assert len(capacities) > 20  # grown 1.5x at a time from 12 entries
    check_model(table, model, [rng.randbytes(32) for _ in range(1000)])


def test_bulk_duplicates_first_copy_wins_and_resumes() -> None:
    """More duplicates than the wrapper collects per kernel call (4096): it resumes."""
    entries = random_entries(10_000, seed=2)
    table = ChunkTable()
    assert table.add_records(records(entries[:6000]), list(range(7))) == []
    again = [(k, (p + 1) % 7, o + 1, s, r) for k, p, o, s, r in entries]
    twice = entries[6000:8000]  # within one call: the first of the two copies wins
    body = records(again) + records(twice)
    dups = table.add_records(memoryview(bytearray(body)), [10, 11, 12, 13, 14, 15, 16])
    assert dups == list(range(6000)) + list(range(10_000, 12_000))
    assert len(table) == 10_000
    for i, (k, p, o, s, r) in enumerate(entries):
        want = (p, o, s, r) if i < 6000 else (10 + (p + 1) % 7, o + 1, s, r)
        assert table.get(k) == want


def test_reserve_avoids_growth() -> None:
    entries = random_entries(50_000, seed=3)
    table = ChunkTable(len(entries))
    cap = table.capacity()
    assert cap >= len(entries)
    table.add_records(records(entries), list(range(7)))
    assert table.capacity() == cap
    table.reserve(200_000)
    assert table.capacity() >= 200_000
    assert table.get(entries[123][0]) == entries[123][1:]


@pytest.mark.parametrize("n", [10_000, 100_000, 1_000_000])
def test_memory_per_entry(n: int) -> None:
    """At most 56 B per entry at these sizes, whether just before or just after growth."""
    table = ChunkTable()
    body = os.urandom(32 * n)
    recs = b"".join(body[32 * i : 32 * i + 32] + struct.pack("<IIII", 0, i, 1, 1) for i in range(n))
    assert table.add_records(recs, [0]) == []
    assert len(table) == n
    assert table.memory_bytes() / n <= 56
    # Fill up to the next growth and one past it: the two extremes of the load.
    more = table.capacity() - n + 1
    extra = os.urandom(32 * more)
    recs = b"".join(extra[32 * i : 32 * i + 32] + bytes(16) for i in range(more))
    before = len(table)
    table.add_records(recs[: RECORD_BYTES * (more - 1)], [0])
    assert table.memory_bytes() / len(table) <= 56
    table.add_records(recs[RECORD_BYTES * (more - 1) :], [0])
    assert len(table) == before + more
    assert table.memory_bytes() / len(table) <= 56


def test_bulk_load_one_million() -> None:
    n = 1_000_000
    body = os.urandom(32 * n)
    recs = bytearray(RECORD_BYTES * n)
    for i in range(n):
        ENTRY.pack_into(recs, RECORD_BYTES * i, body[32 * i : 32 * i + 32], i % 3, i, 2 * i, 3)
    table = ChunkTable()
    assert table.add_records(recs, [100, 200, 300]) == []
    assert len(table) == n
    rng = random.Random(4)
    for i in rng.sample(range(n), 2000):
        assert table.get(body[32 * i : 32 * i + 32]) == (100 * (i % 3 + 1), i, 2 * i, 3)
    probe = body[: 32 * 10_000] + os.urandom(32 * 10_000)
    flags = table.contains_many(probe)
    assert flags == b"\x01" * 10_000 + b"\x00" * 10_000


def test_argument_checks() -> None:
    table = ChunkTable()
    key = os.urandom(32)
    with pytest.raises(ValueError):
        table.get(key[:31])
    with pytest.raises(ValueError):
        table.put(key + b"x", 0, 0, 0, 0)
    with pytest.raises(ValueError):
        _ = bytearray(33) in table
    with pytest.raises(TypeError):
        table.get("x" * 32)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        table.put(key, NO_PACK, 0, 0, 0)
    with pytest.raises(ValueError):
        table.put(key, 0, -1, 0, 0)
    with pytest.raises((ValueError, OverflowError)):
        table.put(key, 0, 1 << 32, 0, 0)
    with pytest.raises(ValueError):
        table.add_records(bytes(RECORD_BYTES + 1), [0])
    with pytest.raises(ValueError):
        table.add_records(bytes(RECORD_BYTES), [NO_PACK])
    with pytest.raises(ValueError):
        table.contains_many(bytes(33))
    with pytest.raises(ValueError):
        table.get_many(bytes(31))
    with pytest.raises(ValueError, match="whole number of 36-byte records"):
        table.contains_records(bytes(73), 36)
    with pytest.raises(ValueError, match="cannot hold a chunk id"):
        table.contains_records(bytes(62), 31)
    with pytest.raises(ValueError):
        ChunkTable(-1)
    # A record naming a pack outside the map: nothing of the call is stored.
    good = records(random_entries(100, seed=5, packs=2))
    bad = records([(os.urandom(32), 2, 0, 0, 0)])
    with pytest.raises(ValueError, match="record 100 names pack 2 of 2"):
        table.add_records(good + bad, [0, 1])
    assert len(table) == 0
    # Ids as other buffers.
    assert table.put(memoryview(key), 1, 2, 3, 4)
    assert table.get(bytearray(key)) == (1, 2, 3, 4)
    assert table.contains_many(b"") == bytearray()
    assert table.contains_records(b"", 36) == bytearray()
    assert table.get_many(memoryview(key)) == bytearray(struct.pack("=IIII", 1, 2, 3, 4))
    assert table.add_records(b"", []) == []
