"""The native chunker against its pure-Python twin, the invariants, and streaming."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedupe.chunking import (
    DEFAULT_PARAMS,
    Chunker,
    ChunkerParams,
    PyChunker,
    gear_table,
)

GEAR = gear_table(bytes(range(32)))
SMALL = ChunkerParams(64, 256, 1024, 2)
PARAMS = [
    SMALL,
    ChunkerParams(100, 512, 2000, 0),
    ChunkerParams(256, 1024, 4096, 3),
    ChunkerParams(65, 256, 257, 1),
    DEFAULT_PARAMS,
]
Impl = type[Chunker] | type[PyChunker]
IMPLS: list[Impl] = [Chunker, PyChunker]


def lengths(chunks: Sequence[memoryview]) -> list[int]:
    return [len(c) for c in chunks]


def fed(impl: Impl, params: ChunkerParams, data: bytes, splits: Sequence[int]) -> list[bytes]:
    """Chunks of data fed in pieces cut at the given offsets; every third piece is a
    bytearray (copied by the native chunker), the others bytes (chunked in place)."""
    ch = impl(params, GEAR)
    out: list[memoryview] = []
    prev = 0
    for i, cut in enumerate([*sorted(splits), len(data)]):
        piece = data[prev:cut]
        out += ch.feed(bytearray(piece) if i % 3 == 2 else piece)
        prev = max(prev, cut)
    out += ch.finish()
    return [bytes(c) for c in out]


def check_invariants(params: ChunkerParams, data: bytes, chunks: Sequence[memoryview]) -> None:
    assert b"".join(chunks) == data
    for c in chunks[:-1]:
        assert params.min_size < len(c) <= params.max_size
    if chunks:
        assert 0 < len(chunks[-1]) <= params.max_size
    else:
        assert data == b""


def random_params(draw: st.DrawFn) -> ChunkerParams:
    bits = draw(st.integers(8, 12))
    avg = 1 << bits
    norm = draw(st.integers(0, 3))
    min_size = draw(st.integers(64, avg - 1))
    max_size = draw(st.integers(avg + 1, 4 * avg))
    return ChunkerParams(min_size, avg, max_size, norm)


@st.composite
def params_and_data(draw: st.DrawFn) -> tuple[ChunkerParams, bytes]:
    params = random_params(draw)
    size = draw(st.integers(0, 6 * params.max_size))
    rng = random.Random(draw(st.integers(0, 2**32)))
    # Full-entropy bytes, or a small alphabet (long repeats, low-entropy hashes).
    alphabet = draw(st.sampled_from([256, 2, 1]))
    data = bytes(rng.randrange(alphabet) for _ in range(size))
    return params, data


SLOW = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(params_and_data())
def test_native_and_twin_agree(case: tuple[ChunkerParams, bytes]) -> None:
    params, data = case
    native = Chunker(params, GEAR).chunk_all(data)
    twin = PyChunker(params, GEAR).chunk_all(data)
    assert lengths(native) == lengths(twin)
    check_invariants(params, data, native)


@SLOW
@given(params_and_data(), st.data())
def test_cut_points_do_not_depend_on_feed_splits(
    case: tuple[ChunkerParams, bytes], draw: st.DataObject
) -> None:
    params, data = case
    whole = [bytes(c) for c in Chunker(params, GEAR).chunk_all(data)]
    n = len(data)
    splits = draw.draw(st.lists(st.integers(0, n), max_size=30))
    assert fed(Chunker, params, data, splits) == whole
    assert fed(PyChunker, params, data, splits) == whole


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("params", [SMALL, ChunkerParams(256, 1024, 4096, 3)])
def test_one_byte_and_empty_feeds(impl: Impl, params: ChunkerParams) -> None:
    data = random.Random(7).randbytes(5 * params.max_size)
    whole = [bytes(c) for c in Chunker(params, GEAR).chunk_all(data)]
    ch = impl(params, GEAR)
    out: list[memoryview] = []
    for i in range(len(data)):
        out += ch.feed(b"")
        out += ch.feed(data[i : i + 1])
    out += ch.feed(b"")
    out += ch.finish()
    assert [bytes(c) for c in out] == whole


def edge_sizes(p: ChunkerParams) -> list[int]:
    return [
        0,
        1,
        p.min_size - 1,
        p.min_size,
        p.min_size + 1,
        p.min_size + 2,
        p.avg_size - 1,
        p.avg_size,
        p.avg_size + 1,
        p.max_size - 1,
        p.max_size,
        p.max_size + 1,
        2 * p.max_size,
        5 * p.max_size + 3,
    ]


@pytest.mark.parametrize("params", PARAMS, ids=str)
@pytest.mark.parametrize("kind", ["random", "zeros", "ab"])
def test_edge_sizes(params: ChunkerParams, kind: str) -> None:
    rng = random.Random(params.avg_size)
    for size in edge_sizes(params):
        if kind == "random":
            data = rng.randbytes(size)
        elif kind == "zeros":
            data = bytes(size)
        else:
            data = (b"ab" * size)[:size]
        native = Chunker(params, GEAR).chunk_all(data)
        check_invariants(params, data, native)
        assert lengths(native) == lengths(PyChunker(params, GEAR).chunk_all(data)), size
        streamed = fed(Chunker, params, data, range(0, size, 97))
        assert streamed == [bytes(c) for c in native], size


def test_sizes_up_to_min_are_one_chunk() -> None:
    for size in (1, 63, 64):
        assert lengths(Chunker(SMALL, GEAR).chunk_all(bytes(size))) == [size]
    assert Chunker(SMALL, GEAR).chunk_all(b"") == []
    ch = Chunker(SMALL, GEAR)
    assert ch.feed(b"") == [] and ch.finish() == []


def test_zeros_cut_at_max_when_the_mask_never_matches() -> None:
    # Whether zeros ever match depends on the gear table; either way: invariants hold.
    data = bytes(10 * SMALL.max_size)
    check_invariants(SMALL, data, Chunker(SMALL, GEAR).chunk_all(data))


@pytest.mark.parametrize("impl", IMPLS)
def test_accepts_any_bytes_like_and_copies_mutable_input(impl: Impl) -> None:
    data = random.Random(3).randbytes(4000)
    expect = [bytes(c) for c in Chunker(SMALL, GEAR).chunk_all(data)]
    ch = impl(SMALL, GEAR)
    buf = bytearray(data[:2500])
    out = ch.feed(buf)
    buf[:] = bytes(len(buf))  # mutating the caller's buffer must not change any chunk
    out += ch.feed(memoryview(data)[2500:3000])
    out += ch.feed(data[3000:])
    out += ch.finish()
    assert [bytes(c) for c in out] == expect
    assert all(isinstance(c, memoryview) for c in out)


@pytest.mark.parametrize("impl", IMPLS)
def test_finish_resets_for_a_new_stream(impl: Impl) -> None:
    a = random.Random(1).randbytes(3000)
    b = random.Random(2).randbytes(3000)
    ch = impl(SMALL, GEAR)
    first = ch.feed(a) + ch.finish()
    second = ch.feed(b) + ch.finish()
    assert [bytes(c) for c in first] == [bytes(c) for c in impl(SMALL, GEAR).chunk_all(a)]
    assert [bytes(c) for c in second] == [bytes(c) for c in impl(SMALL, GEAR).chunk_all(b)]


@pytest.mark.parametrize("impl", IMPLS)
def test_chunk_all_leaves_the_stream_alone(impl: Impl) -> None:
    data = random.Random(5).randbytes(3000)
    ch = impl(SMALL, GEAR)
    out = ch.feed(data[:1500])
    ch.chunk_all(b"unrelated" * 100)
    out += ch.feed(data[1500:]) + ch.finish()
    assert b"".join(out) == data
    assert lengths(out) == lengths(impl(SMALL, GEAR).chunk_all(data))


def test_chunks_outlive_the_chunker() -> None:
    data = random.Random(9).randbytes(5000)
    ch = Chunker(SMALL, GEAR)
    out = ch.feed(bytearray(data)) + ch.finish()
    del ch
    assert b"".join(out) == data


def test_many_chunks_in_one_buffer_grow_the_output() -> None:
    # 1 MiB of random data at 64/256/1024: ~3000 chunks, more than the initial guess.
    data = random.Random(11).randbytes(1 << 20)
    chunks = Chunker(SMALL, GEAR).chunk_all(data)
    check_invariants(SMALL, data, chunks)
    assert fed(Chunker, SMALL, data, [1 << 19]) == [bytes(c) for c in chunks]


def test_gear_key_changes_cut_points() -> None:
    data = random.Random(4).randbytes(50_000)
    other = gear_table(bytes(32))
    assert lengths(Chunker(SMALL, GEAR).chunk_all(data)) != lengths(
        Chunker(SMALL, other).chunk_all(data)
    )


def test_native_rejects_bad_gear_and_params() -> None:
    with pytest.raises(ValueError, match="2048"):
        Chunker(SMALL, GEAR[:-1])

    class Bogus:
        min_size, avg_size, max_size, normalization = 64, 300, 1024, 2

    with pytest.raises(ValueError, match="invalid chunker parameters"):
        Chunker(Bogus(), GEAR)  # type: ignore[arg-type]
    assert Chunker(SMALL, GEAR).params is SMALL


def test_held_chunks_never_change_while_buffers_are_reused() -> None:
    # The native chunker reuses its feed buffers once nothing refers to them; chunks,
    # and anything derived from them, must keep their bytes whatever is fed later.
    rng = random.Random(13)
    data = rng.randbytes(200_000)
    ch = Chunker(SMALL, GEAR)
    held: list[tuple[memoryview, bytes]] = []
    kept_obj = None
    for i, off in enumerate(range(0, len(data), 5000)):
        out = ch.feed(bytearray(data[off : off + 5000]))
        if i % 3 == 0:
            held += [(c, bytes(c)) for c in out]
        if i == 4 and out:
            kept_obj = (out[0].obj, bytes(memoryview(out[0].obj)))
        del out  # the rest is dropped at once: its buffer may be reused
    held += [(c, bytes(c)) for c in ch.finish()]
    for view, copy in held:
        assert bytes(view) == copy
    if kept_obj is not None:
        assert bytes(memoryview(kept_obj[0])) == kept_obj[1]


def test_native_chunks_are_read_only() -> None:
    ch = Chunker(SMALL, GEAR)
    out = ch.feed(bytearray(random.Random(1).randbytes(3000))) + ch.finish()
    assert all(c.readonly for c in out)
    with pytest.raises(TypeError):
        out[0][0] = 1
