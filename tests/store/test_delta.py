"""make_delta/apply_delta reproduce any chunk table from any parent, and stay small when
the tables share most records; the native make_delta computes exactly what its spec,
make_delta_py, computes."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dedupe.errors import IntegrityError
from dedupe.format.delta import apply_delta, make_delta, make_delta_py
from dedupe.format.manifest import CHUNK_RECORD

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
