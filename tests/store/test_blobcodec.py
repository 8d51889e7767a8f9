"""The native blob codec (csrc/blobcodec.c) and its pure-Python twin write the same
format: each opens what the other sealed, both refuse every kind of damage, and packs
built from either carry trailers that describe their blobs exactly."""

from __future__ import annotations

import io
import os
import random
import struct
import zlib
from pathlib import Path

import pytest
from conftest import make_repo
from hypothesis import given, settings
from hypothesis import strategies as st

from dedupe.crypto import OVERHEAD, new_key
from dedupe.crypto.aead import open_sealed, seal_into
from dedupe.errors import IntegrityError
from dedupe.format.pack import (
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    FOOTER_SIZE,
    decode_footer,
    decode_trailer,
)
from dedupe.hashing import ChunkHasher
from dedupe.store import FinishedPack, PackWriter
from dedupe.store.blobs import NATIVE_AVAILABLE, PLAN_COPY, PLAN_ITEM, BlobCodec, seal_batch

TRAILER = struct.Struct("<32sIII")

HASHER = ChunkHasher(bytes(range(32)))


def test_native_codec_is_built_and_used(tmp_path: Path, run) -> None:  # type: ignore[no-untyped-def]
    """`pip install .` builds the kernels and the zstandard and PyNaCl wheels carry their
    cffi modules: an install where the fast path silently fell back fails here."""
    assert NATIVE_AVAILABLE

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            assert repo._store.codec.native

    run(go())


def codecs() -> tuple[BlobCodec, BlobCodec]:
    return BlobCodec(1, HASHER, native=True), BlobCodec(1, HASHER, native=False)


def sample_chunks(rnd: random.Random) -> list[bytes]:
    """Compressible text, random bytes (stored raw), zeros, one byte, and a mix."""
    text = b"".join(b"row %d: %s\n" % (i, b"x" * (i % 17)) for i in range(2000))
    return [
        text[: rnd.randrange(1, len(text))],
        rnd.randbytes(rnd.randrange(1, 70_000)),
        bytes(rnd.randrange(1, 70_000)),
        b"\x07",
        rnd.randbytes(3000) + bytes(30_000),
    ]


def seal_all(codec: BlobCodec, chunks: list[bytes], key: bytes) -> tuple[bytearray, list]:
    """Frame and seal chunks into one buffer; -> (buffer, trailer entries)."""
    batch = codec.frame(chunks, HASHER.chunk_ids(chunks))
    dst = bytearray(sum(len(c) + 1 + OVERHEAD for c in chunks))
    records = bytearray()
    pos = seal_batch(key, batch, dst, 0, len(dst), records)
    assert batch.pending == 0 and pos <= len(dst)
    entries = decode_trailer(len(chunks).to_bytes(4, "little") + records, "t")
    return dst, entries


@pytest.mark.parametrize("seal_native", [True, False])
def test_each_codec_opens_what_the_other_sealed(seal_native: bool) -> None:
    native, pure = codecs()
    sealer, opener = (native, pure) if seal_native else (pure, native)
    rnd = random.Random(1)
    chunks = sample_chunks(rnd)
    key = new_key()
    dst, entries = seal_all(sealer, chunks, key)
    items = [(e.chunk_id, e.offset, e.stored_length, e.raw_length) for e in entries]
    assert [bytes(c) for c in opener.open_many(key, dst, 0, items)] == chunks
    # One at a time too, and from a slice of the pack that starts at an offset.
    for e, chunk in zip(entries, chunks, strict=True):
        assert (
            opener.open(key, e.chunk_id, dst[e.offset : e.offset + e.stored_length], len(chunk))
            == chunk
        )
    base = entries[1].offset
    tail = items[1:]
    assert [bytes(c) for c in opener.open_many(key, dst[base:], base, tail)] == chunks[1:]


def test_frames_are_compressed_only_when_smaller() -> None:
    native, pure = codecs()
    rnd = random.Random(2)
    chunks = sample_chunks(rnd)
    key = new_key()
    for codec in (native, pure):
        dst, entries = seal_all(codec, chunks, key)
        kinds = []
        for e in entries:
            plain = open_sealed(key, dst[e.offset : e.offset + e.stored_length], e.chunk_id, "c")
            kinds.append(plain[0])
            assert len(plain) <= e.raw_length + 1
        # text and zeros compress; random bytes and a single byte do not
        assert kinds == [
            COMPRESSION_ZSTD,
            COMPRESSION_NONE,
            COMPRESSION_ZSTD,
            COMPRESSION_NONE,
            COMPRESSION_ZSTD,
        ]
        assert entries[1].stored_length == len(chunks[1]) + 1 + OVERHEAD


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=5000), min_size=1, max_size=30), st.data())
def test_round_trip_any_batch(chunks: list[bytes], data: st.DataObject) -> None:
    native, pure = codecs()
    key = new_key()
    sealer = data.draw(st.sampled_from([native, pure]))
    opener = data.draw(st.sampled_from([native, pure]))
    dst, entries = seal_all(sealer, chunks, key)
    items = [(e.chunk_id, e.offset, e.stored_length, e.raw_length) for e in entries]
    assert [bytes(c) for c in opener.open_many(key, dst, 0, items)] == chunks


def damaged_cases(key: bytes) -> list[tuple[str, bytes, bytes, int]]:
    """(what, sealed blob, chunk id, raw length) for blobs that must not open."""
    chunk = b"hello world " * 400
    cid = HASHER.chunk_id(chunk)
    dst, entries = seal_all(BlobCodec(1, HASHER, native=False), [chunk], key)
    good = bytes(dst[: entries[0].stored_length])

    def sealed(plaintext: bytes, aad: bytes = cid) -> bytes:
        out = bytearray(len(plaintext) + OVERHEAD)
        seal_into(key, plaintext, aad, out, 0)
        return bytes(out)

    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x01
    other = (b"other content " * 400)[: len(chunk)]  # the chunk's length: only the id tells
    return [
        ("flipped byte", bytes(flipped), cid, len(chunk)),
        ("wrong key", _reseal(chunk, cid), cid, len(chunk)),
        ("cut short", good[:30], cid, len(chunk)),
        ("unknown compression byte", sealed(b"\x07" + chunk), cid, len(chunk)),
        ("no compression byte", sealed(b""), cid, 0),
        ("not zstd", sealed(b"\x01" + zlib.compress(chunk)), cid, len(chunk)),
        ("raw length too long", good, cid, len(chunk) + 1),
        ("raw length too short", good, cid, len(chunk) - 1),
        ("stored raw, wrong length", sealed(b"\x00" + chunk[:-1]), cid, len(chunk)),
        ("authentic but wrong content", sealed(b"\x00" + other[: len(chunk)]), cid, len(chunk)),
    ]


def _reseal(chunk: bytes, cid: bytes) -> bytes:
    out = bytearray(len(chunk) + 1 + OVERHEAD)
    seal_into(new_key(), b"\x00" + chunk, cid, out, 0)
    return bytes(out)


@pytest.mark.parametrize("native", [True, False])
def test_damage_is_refused_and_named(native: bool) -> None:
    """By every way of opening: open() and open_many, verify's check_records (packed
    trailer records) and restore's open_planned (a window's plan)."""
    key = new_key()
    codec = BlobCodec(1, HASHER, native=native)
    good_chunk = os.urandom(2000)
    good_id = HASHER.chunk_id(good_chunk)
    good_dst, good_entries = seal_all(codec, [good_chunk], key)
    good = bytes(good_dst[: good_entries[0].stored_length])
    for what, blob, cid, raw in damaged_cases(key):
        # The damaged blob sits after a good one: the error names the damaged chunk.
        data = good + blob
        items = [(good_id, 0, len(good), len(good_chunk)), (cid, len(good), len(blob), raw)]
        with pytest.raises(IntegrityError) as info:
            codec.open_many(key, data, 0, items)
        assert cid.hex()[:16] in str(info.value), what
        with pytest.raises(IntegrityError):
            codec.open(key, cid, blob, raw)

        records = b"".join(TRAILER.pack(*it) for it in items)
        with pytest.raises(IntegrityError) as info:
            codec.check_records(key, data, records, 0, 2)
        assert cid.hex()[:16] in str(info.value), what
        codec.check_records(key, data, records, 0, 1)  # the good one alone opens

        plan = PLAN_ITEM.pack(0, 0, len(good), len(good_chunk), 0) + PLAN_ITEM.pack(
            0, len(good), len(blob), raw, len(good_chunk)
        )
        out = codec.window_buffer(len(good_chunk) + raw)
        with pytest.raises(IntegrityError) as info:
            codec.open_planned(key, data, 0, good_id + cid, plan, 0, 2, out)
        assert cid.hex()[:16] in str(info.value), what


@pytest.mark.parametrize("native", [True, False])
def test_a_window_is_opened_into_place_and_its_repeats_copied(native: bool) -> None:
    key = new_key()
    codec = BlobCodec(1, HASHER, native=native)
    chunks = sample_chunks(random.Random(3))
    dst, entries = seal_all(codec, chunks, key)
    ids = b"".join(e.chunk_id for e in entries)
    # The stream: chunk 2, chunk 0, chunk 2 again, then the others.
    order = [2, 0, 2, 1, 3, 4]
    place, at = {}, 0
    for i in order:
        place.setdefault(i, at)
        at += len(chunks[i])
    items = b"".join(
        PLAN_ITEM.pack(0, e.offset, e.stored_length, e.raw_length, place[i])
        for i, e in enumerate(entries)
    )
    repeat = len(chunks[2]) + len(chunks[0])
    copies = PLAN_COPY.pack(repeat, place[2], len(chunks[2]))
    out = codec.window_buffer(at)
    codec.open_planned(key, dst, 0, ids, items, 0, 2, out)  # two jobs, as restore splits
    codec.open_planned(key, dst, 0, ids, items, 2, len(entries), out)
    codec.copy_repeats(out, copies)
    assert bytes(out) == b"".join(chunks[i] for i in order)
    # A plan that does not fit what was read, or the window, is refused before any work.
    with pytest.raises(ValueError):
        codec.open_planned(key, dst[:100], 0, ids, items, 0, 2, out)
    with pytest.raises(ValueError):
        codec.open_planned(key, dst, 0, ids, items, 0, 2, codec.window_buffer(10))
    with pytest.raises(ValueError):
        codec.copy_repeats(out, PLAN_COPY.pack(at - 5, 0, 10))  # past the end
    with pytest.raises(ValueError):
        codec.copy_repeats(out, PLAN_COPY.pack(100, 50, 100))  # overlapping
    with pytest.raises(ValueError):
        codec.check_records(key, dst[:100], TRAILER.pack(ids[:32], 0, 200, 10), 0, 1)


@pytest.mark.parametrize("native", [True, False])
def test_packs_list_exactly_their_blobs(native: bool) -> None:
    """Small packs, chunks larger than a pack's buffer, several batches, buffers recycled
    as a backup does: every blob is in exactly one pack's trailer, at the offset where it
    opens, and each pack is exactly magic, blobs, trailer and footer (no stale bytes)."""
    codec = BlobCodec(1, HASHER, native=native)
    writer = PackWriter(4096)
    rnd = random.Random(3)
    batches = [[rnd.randbytes(rnd.randrange(1, 300_000)) for _ in range(4)] for _ in range(3)]
    batches.append([b"small" * 10, b"tail"])  # leaves a partly filled pack for flush()
    seen = []

    def check(pack: FinishedPack) -> None:
        key = pack.key
        assert pack.data[:8] == b"DDPACK02"
        end = 8
        for cid, offset, stored, raw in pack.entries():
            assert offset == end  # blobs back to back from the magic on
            seen.append(codec.open(key, cid, pack.data[offset : offset + stored], raw))
            end = offset + stored
        trailer_length = decode_footer(len(pack.data), bytes(pack.data[-FOOTER_SIZE:]), "p")
        assert end + trailer_length + FOOTER_SIZE == len(pack.data)
        assert pack.key not in pack.data  # no key is in a pack's bytes
        writer.recycle(pack)  # its buffer holds the next pack

    for chunks in batches:
        for pack in writer.add(codec.frame(chunks, HASHER.chunk_ids(chunks))):
            check(pack)
    last = writer.flush()
    assert last is not None and writer.flush() is None
    check(last)
    assert seen == [c for chunks in batches for c in chunks]


def test_a_finished_pack_is_the_only_buffer_held() -> None:
    """Between a finished pack and the next blob the writer holds no buffer of its own:
    the next pack takes the buffer its writer hands back meanwhile, so a backup whose
    store is slower than its sealing holds two pack buffers, not three."""
    codec = BlobCodec(1, HASHER)
    writer = PackWriter(64 * 1024)
    rnd = random.Random(6)
    chunks = [rnd.randbytes(20_000) for _ in range(4)]  # the 4th crosses the target
    (first,) = writer.add(codec.frame(chunks, HASHER.chunk_ids(chunks)))
    assert writer.flush() is None  # nothing after the finished pack
    buffer = first.data
    writer.recycle(first)
    more = [rnd.randbytes(20_000)]
    writer.add(codec.frame(more, HASHER.chunk_ids(more)))
    last = writer.flush()
    assert last is not None and last.data is buffer  # the handed-back buffer, reused
    assert [cid for cid, *_ in last.entries()] == HASHER.chunk_ids(more)


@pytest.mark.parametrize("native", [True, False])
def test_packs_of_2_kib_blobs_never_grow_their_buffer(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The buffer holds the blob that crosses the target and the trailer of small blobs:
    every byte a pack buffer grows by is zeroed, and so resident, in each buffer kept."""
    codec = BlobCodec(1, HASHER, native=native)
    grew = []
    reserve = PackWriter._reserve

    def spy(self: PackWriter, buf: bytearray, n: int) -> None:
        before = len(buf)
        reserve(self, buf, n)
        if len(buf) != before:
            grew.append(n)

    monkeypatch.setattr(PackWriter, "_reserve", spy)
    writer = PackWriter(4 << 20)
    rnd = random.Random(5)
    # Blobs of ~2 KiB (half random, half zeros): ~2000 per pack, an 88 KB trailer.
    chunks = [rnd.randbytes(2048) + bytes(rnd.randrange(1, 4000)) for _ in range(4200)]
    packs = []
    for start in range(0, len(chunks), 500):
        part = chunks[start : start + 500]
        for pack in writer.add(codec.frame(part, HASHER.chunk_ids(part))):
            packs.append(len(pack.data))
            writer.recycle(pack)
    assert len(packs) >= 2 and not grew


@pytest.mark.parametrize("native", [True, False])
def test_repository_works_with_either_codec(run, tmp_path: Path, native: bool) -> None:  # type: ignore[no-untyped-def]
    """Back up with one codec and restore and verify with the other."""
    rnd = random.Random(4)
    data = b"".join(rnd.randbytes(5000) + bytes(rnd.randrange(1, 20_000)) for _ in range(60))

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            store = repo._store
            store.codec = BlobCodec(store.codec.level, store.hasher, native=native)
            stats = await repo.backup(io.BytesIO(data), name="db", kind="full")
            store.codec = BlobCodec(store.codec.level, store.hasher, native=not native)
            out = io.BytesIO()
            await repo.restore(stats.id, out)
            assert out.getvalue() == data
            report = await repo.verify(read_data=True)
            assert report.ok

    run(go())


def test_opened_chunks_never_change_while_referenced() -> None:
    """The native codec reuses the memory of opened batches: only once nothing refers to
    it, so chunks a reader still holds keep their bytes while later batches are opened."""
    codec = BlobCodec(1, HASHER, native=True)
    rnd = random.Random(5)
    key = new_key()
    batches = []
    for _ in range(40):
        chunks = [rnd.randbytes(rnd.randrange(1, 40_000)) for _ in range(3)]
        dst, entries = seal_all(codec, chunks, key)
        items = [(e.chunk_id, e.offset, e.stored_length, e.raw_length) for e in entries]
        batches.append((bytes(dst), items, chunks))
    held = []
    for i, (dst, items, chunks) in enumerate(batches):
        opened = codec.open_many(key, dst, 0, items)
        assert [bytes(c) for c in opened] == chunks
        if i % 3 == 0:
            held.append((opened, chunks))  # kept: its buffer must not be reused
    for opened, chunks in held:
        assert [bytes(c) for c in opened] == chunks


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_a_blob_that_would_decompress_past_its_length_is_refused_before_it_is(
    native: bool,
) -> None:
    """A small authenticated blob whose zstd frame records 64 MiB, indexed as 4 KiB (a
    writer holds pack keys and can make one): refused from the size the frame records,
    before anything is decompressed (zstd ignores max_output_size for a frame that records
    its size; the mutation audit of issue 12 found it asking for any amount of memory)."""
    import zstandard

    from dedupe.crypto import seal
    from dedupe.format.pack import COMPRESSION_ZSTD

    if native and not NATIVE_AVAILABLE:
        pytest.fail("the native blob codec is not built")
    key, chunk_id = new_key(), os.urandom(32)
    frame = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    assert len(frame) < 8192
    sealed = seal(key, bytes([COMPRESSION_ZSTD]) + frame, chunk_id)
    codec = BlobCodec(3, ChunkHasher(os.urandom(32)), native=native)
    with pytest.raises(IntegrityError, match=f"would decompress to {64 << 20} bytes"):
        codec.open(key, chunk_id, sealed, 4096)
    # The native batch decompresses into a buffer of the indexed length: bounded too.
    said = "does not decompress" if native else "would decompress to"
    with pytest.raises(IntegrityError, match=said):
        codec.open_many(key, sealed, 0, [(chunk_id, 0, len(sealed), 4096)])
