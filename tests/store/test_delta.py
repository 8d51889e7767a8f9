"""make_delta/apply_delta reproduce any chunk table from any parent, and stay small when
the tables share most records."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dedupe.errors import IntegrityError
from dedupe.format.delta import apply_delta, make_delta
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
