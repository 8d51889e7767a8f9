"""The native batch BLAKE3 (csrc/blake3many.c) gives BLAKE3: every implementation this CPU
runs (portable, 4, 8 and 16 lanes) against the blake3 package and the known-answer chunk
ids of tests/vectors/ids.json, over the lengths where the algorithm changes course (block,
chunk and tree boundaries) and over random batches where lanes hold inputs of different
lengths."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dedupe import hashing
from dedupe.hashing import ChunkHasher, _blake3many

IMPLEMENTATIONS = _blake3many.available()
VECTORS = Path(__file__).parent / "vectors" / "ids.json"

# Around every block (64), chunk (1024) and tree-shape boundary: 1, 2, 3, 4, 5, 8, 16,
# 17, 31, 32 and 33 chunks, full and with a short last chunk.
EDGES = sorted(
    {0, 1, 63, 64, 65, 127, 128}
    | {c * 1024 + d for c in (1, 2, 3, 4, 5, 8, 16, 17, 31, 32, 33) for d in (-1, 0, 1, 700)}
    | {65536 + 7, (1 << 20) + 1}
)


def reference(key: bytes, chunks: list[bytes]) -> list[bytes]:
    return [blake3.blake3(c, key=key).digest() for c in chunks]


def test_the_native_kernel_is_built_and_used() -> None:
    """CI builds it (pip install .); the hasher must not fall back to the package unseen."""
    assert hashing._blake3many is not None
    assert "portable" in IMPLEMENTATIONS and "lanes4" in IMPLEMENTATIONS
    assert _blake3many.BEST in IMPLEMENTATIONS


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_every_implementation_is_blake3_at_every_boundary(implementation: str) -> None:
    key = os.urandom(32)
    rng = random.Random(7)
    chunks = [rng.randbytes(n) for n in EDGES]
    want = reference(key, chunks)
    assert _blake3many.keyed_many(key, chunks, implementation) == want
    # The same inputs in another order: other inputs share each input's lanes.
    order = list(range(len(chunks)))
    rng.shuffle(order)
    got = _blake3many.keyed_many(key, [chunks[i] for i in order], implementation)
    assert got == [want[i] for i in order]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_every_implementation_gives_the_known_answer_ids(implementation: str) -> None:
    vectors = json.loads(VECTORS.read_text())
    key = bytes.fromhex(vectors["id_key"])
    lengths = [int(n) for n in vectors["chunk_ids"]]
    chunks = [bytes(i % 251 for i in range(n)) for n in lengths]
    got = _blake3many.keyed_many(key, chunks, implementation)
    assert [g.hex() for g in got] == list(vectors["chunk_ids"].values())


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_many_equal_pages_and_unaligned_views(implementation: str) -> None:
    """The page path's batches: hundreds of 4 KiB views of one buffer, here starting at
    odd addresses, plus a count that does not fill the last lane group."""
    key = os.urandom(32)
    data = os.urandom(4096 * 203 + 1)
    view = memoryview(data)[1:]
    pages = [view[i : i + 4096] for i in range(0, len(view), 4096)]
    assert len(pages) == 203
    assert _blake3many.keyed_many(key, pages, implementation) == reference(
        key, [bytes(p) for p in pages]
    )


@settings(max_examples=60, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    lengths=st.lists(
        st.one_of(
            st.integers(0, 2100),
            st.sampled_from([1024, 2048, 4096, 8192, 16384]),
            st.integers(2100, 40000),
        ),
        max_size=40,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_batches_match_the_blake3_package(key: bytes, lengths: list[int], seed: int) -> None:
    rng = random.Random(seed)
    chunks = [rng.randbytes(n) for n in lengths]
    want = reference(key, chunks)
    for implementation in IMPLEMENTATIONS:
        assert _blake3many.keyed_many(key, chunks, implementation) == want, implementation


def test_the_hasher_gives_the_same_ids_either_way() -> None:
    key = os.urandom(32)
    hasher = ChunkHasher(key)
    chunks = [os.urandom(n) for n in (0, 5, 4096, 4096, 10000)]
    assert hasher.chunk_ids(chunks) == [hasher.chunk_id(c) for c in chunks]
    assert hasher.chunk_ids(iter(chunks)) == reference(key, chunks)  # any iterable
    assert hasher.chunk_ids([]) == []


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        _blake3many.keyed_many(b"short", [b"x"])
    with pytest.raises(KeyError):
        _blake3many.keyed_many(bytes(32), [b"x"], "sse9")
    with pytest.raises(TypeError):
        _blake3many.keyed_many(bytes(32), ["not a buffer"])
    with pytest.raises(TypeError):
        _blake3many.keyed_many(None, [b"x"])  # type: ignore[arg-type]
    missing = [n for n in _blake3many.IMPLEMENTATIONS if n not in IMPLEMENTATIONS]
    for name in missing:  # only on a CPU without AVX2 or AVX-512
        with pytest.raises(ValueError, match="does not run on this CPU"):
            _blake3many.keyed_many(bytes(32), [b"x"], name)
