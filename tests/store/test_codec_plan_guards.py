"""The guards of the batch openers (csrc/blobcodec.c, dedupe/store/_blobcodec.pyx) and of
entries_by_pack (_chunkindex.pyx), each against the mutant of a check-deletion review
that it kills (named in each test): the id checked inside the kernel for every entry
point and every chunk of a batch, lengths and short blobs refused, plans and copies that
do not fit their buffers refused before any native code reads or writes."""

from __future__ import annotations

import os
import struct

import pytest

from dedupe.crypto import OVERHEAD, new_key
from dedupe.crypto.aead import seal_into
from dedupe.errors import IntegrityError
from dedupe.hashing import ChunkHasher
from dedupe.store._chunkindex import entries_by_pack
from dedupe.store.blobs import PLAN_COPY, PLAN_ITEM, BlobCodec, seal_batch

HASHER = ChunkHasher(bytes(range(32)))
TRAILER = struct.Struct("<32sIII")
ENTRY = struct.Struct("<32sIIII")
both = pytest.mark.parametrize("native", [True, False])


def _sealed(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    out = bytearray(len(plaintext) + OVERHEAD)
    seal_into(key, plaintext, aad, out, 0)
    return bytes(out)


def _one_good_blob(codec: BlobCodec, key: bytes, chunk: bytes) -> tuple[bytes, bytes]:
    """(chunk id, sealed blob) of `chunk` as a backup stores it."""
    cid = HASHER.chunk_id(chunk)
    batch = codec.frame([chunk], [cid])
    dst = bytearray(len(chunk) + 1 + OVERHEAD)
    records = bytearray()
    end = seal_batch(key, batch, dst, 0, len(dst), records)
    return cid, bytes(dst[:end])


def _every_way_of_opening(codec: BlobCodec, key: bytes, cid: bytes, blob: bytes, raw: int):  # type: ignore[no-untyped-def]
    """The four batch entry points restore / verify / prune use, on one blob."""
    return {
        "open_many": lambda: codec.open_many(key, blob, 0, [(cid, 0, len(blob), raw)]),
        "open_joined": lambda: codec.open_joined(key, blob, 0, [(cid, 0, len(blob), raw)]),
        "check_records": lambda: codec.check_records(
            key, blob, TRAILER.pack(cid, 0, len(blob), raw), 0, 1
        ),
        "open_planned": lambda: codec.open_planned(
            key,
            blob,
            0,
            cid,
            PLAN_ITEM.pack(0, 0, len(blob), raw, 0),
            0,
            1,
            codec.window_buffer(raw),
        ),
    }


# --- the keyed-id check inside the kernel (mutants C1, C6, P1, P2, P3) ---------------------


@both
def test_authentic_content_of_the_right_length_under_another_id_is_refused(native: bool) -> None:
    key = new_key()
    codec = BlobCodec(1, HASHER, native=native)
    chunk, wrong = os.urandom(3000), os.urandom(3000)
    cid = HASHER.chunk_id(chunk)
    blob = _sealed(key, b"\x00" + wrong, cid)  # authentic under cid, exact length
    for name, call in _every_way_of_opening(codec, key, cid, blob, len(chunk)).items():
        with pytest.raises(IntegrityError, match="does not match its id") as info:
            call()
        assert cid.hex()[:16] in str(info.value), name


def test_the_id_of_the_last_chunk_of_a_batch_is_checked_too() -> None:
    """Mutant C6 (the id loop stops one short). Wrong content in the last of 3 blobs."""
    key = new_key()
    codec = BlobCodec(1, HASHER, native=True)
    chunks = [os.urandom(1000) for _ in range(3)]
    ids = [HASHER.chunk_id(c) for c in chunks]
    blobs = [_sealed(key, b"\x00" + c, i) for c, i in zip(chunks[:2], ids[:2], strict=True)]
    blobs.append(_sealed(key, b"\x00" + os.urandom(1000), ids[2]))
    data = b"".join(blobs)
    offs = [0, len(blobs[0]), len(blobs[0]) + len(blobs[1])]
    items = [(ids[i], offs[i], len(blobs[i]), 1000) for i in range(3)]
    with pytest.raises(IntegrityError, match=ids[2].hex()[:16]):
        codec.open_many(key, data, 0, items)
    records = b"".join(TRAILER.pack(*it) for it in items)
    with pytest.raises(IntegrityError, match=ids[2].hex()[:16]):
        codec.check_records(key, data, records, 0, 3)
    plan = b"".join(PLAN_ITEM.pack(0, offs[i], len(blobs[i]), 1000, 1000 * i) for i in range(3))
    with pytest.raises(IntegrityError, match=ids[2].hex()[:16]):
        codec.open_planned(key, data, 0, b"".join(ids), plan, 0, 3, codec.window_buffer(3000))


# --- length and format checks of the kernel (mutants C2, C3, C4) ---------------------------


def test_a_length_mismatch_is_refused_as_such_before_any_copy() -> None:
    """Mutants C2 and C3. The index (restore: open_planned) gives the raw length; a stored
    blob whose payload is shorter must be refused by the ELENGTH check *before* the
    memcpy of raw_length bytes out of a scratch buffer of stored_length bytes: with a
    raw length far beyond the blob, dropping the check reads megabytes past a small heap
    buffer (a crash, or heap bytes in the window). The reason is named exactly."""
    key = new_key()
    codec = BlobCodec(1, HASHER, native=True)
    small = os.urandom(100)
    cid, blob = _one_good_blob(codec, key, small)  # random: stored raw (NONE)
    for raw in (101, 8 << 20):
        for call in _every_way_of_opening(codec, key, cid, blob, raw).values():
            with pytest.raises(IntegrityError, match="does not have its recorded length"):
                call()
    text = b"compressible text " * 500  # zstd-framed: decompresses to fewer bytes than asked
    cid, blob = _one_good_blob(codec, key, text)
    for call in _every_way_of_opening(codec, key, cid, blob, len(text) + 1).values():
        with pytest.raises(IntegrityError, match="does not have its recorded length"):
            call()


@both
@pytest.mark.parametrize("stored", [0, 1, 10, 23, 24, 30, OVERHEAD - 1, OVERHEAD])
def test_blobs_too_short_to_hold_a_nonce_tag_and_byte_are_refused(
    native: bool, stored: int
) -> None:
    """Mutant C4 (the `stored_len < OVERHEAD + 1` check of ddp_codec_open dropped): an index
    entry with a tiny stored length (a writer's index object can say anything) made
    `stored_len - NONCE_BYTES` wrap, and the AEAD read ~2^64 bytes: restore and verify
    crash instead of reporting. Every entry point must refuse it as damage."""
    key = new_key()
    codec = BlobCodec(1, HASHER, native=native)
    cid = HASHER.chunk_id(b"x")
    data = os.urandom(stored) if stored < OVERHEAD else _sealed(key, b"", cid)
    for call in _every_way_of_opening(codec, key, cid, data, 1).values():
        with pytest.raises(IntegrityError):
            call()


# --- open_planned's checks of the plan before the kernel (mutants P4, P7, P8, P14) --------


@both
def test_open_planned_refuses_a_plan_that_does_not_fit_its_buffers(native: bool) -> None:
    key = new_key()
    codec = BlobCodec(1, HASHER, native=native)
    chunks = [os.urandom(500), os.urandom(700)]
    ids = [HASHER.chunk_id(c) for c in chunks]
    blobs = [_sealed(key, b"\x00" + c, i) for c, i in zip(chunks, ids, strict=True)]
    pack = b"MAGIC..." + blobs[0] + blobs[1]
    offs = [8, 8 + len(blobs[0])]
    items = PLAN_ITEM.pack(0, offs[0], len(blobs[0]), 500, 0) + PLAN_ITEM.pack(
        0, offs[1], len(blobs[1]), 700, 500
    )
    out = codec.window_buffer(1200)
    codec.open_planned(key, pack[8:], 8, b"".join(ids), items, 0, 2, out)  # fits: opens
    assert bytes(out) == chunks[0] + chunks[1]
    # A range read from a later offset than the first blob: that blob starts before the
    # data (P4: without the check, offset - base wraps and the kernel reads before it).
    late = offs[0] + 8
    with pytest.raises(ValueError):
        codec.open_planned(key, pack[late:], late, b"".join(ids), items, 0, 1, out)
    if native:  # the pure twin slices; only the kernel would read past `ids`
        # ids must be 32 bytes per item (P7: the kernel would read past the bytes).
        with pytest.raises(ValueError):
            codec.open_planned(key, pack[8:], 8, ids[0], items, 0, 2, out)
        # [lo, hi) within the items (P8: hi - lo < 0 or past the items).
        for lo, hi in ((1, 0), (0, 3), (-1, 1)):
            with pytest.raises(ValueError):
                codec.open_planned(key, pack[8:], 8, b"".join(ids), items, lo, hi, out)


@both
def test_a_job_that_starts_past_item_zero_names_its_own_failing_chunk(native: bool) -> None:
    """Mutant P14 (OpenError's index not offset by lo). Restore opens a range in jobs
    items[lo:hi]; a failure in a later job must name that job's chunk."""
    key = new_key()
    codec = BlobCodec(1, HASHER, native=native)
    chunks = [os.urandom(500), os.urandom(700)]
    ids = [HASHER.chunk_id(c) for c in chunks]
    blobs = [
        _sealed(key, b"\x00" + chunks[0], ids[0]),
        _sealed(key, b"\x00" + os.urandom(700), ids[1]),
    ]
    data = blobs[0] + blobs[1]
    items = PLAN_ITEM.pack(0, 0, len(blobs[0]), 500, 0) + PLAN_ITEM.pack(
        0, len(blobs[0]), len(blobs[1]), 700, 500
    )
    with pytest.raises(IntegrityError) as info:
        codec.open_planned(key, data, 0, b"".join(ids), items, 1, 2, codec.window_buffer(1200))
    assert ids[1].hex()[:16] in str(info.value) and ids[0].hex()[:16] not in str(info.value)
    # check_records numbers from lo too (mutant B4)
    records = TRAILER.pack(ids[0], 0, len(blobs[0]), 500) + TRAILER.pack(
        ids[1], len(blobs[0]), len(blobs[1]), 700
    )
    with pytest.raises(IntegrityError) as info:
        codec.check_records(key, data, records, 1, 2)
    assert ids[1].hex()[:16] in str(info.value) and ids[0].hex()[:16] not in str(info.value)


@both
def test_open_records_refuses_records_and_bounds_that_disagree(native: bool) -> None:
    """Mutant P10."""
    key = new_key()
    codec = BlobCodec(1, HASHER, native=native)
    chunk = os.urandom(100)
    cid, blob = _one_good_blob(codec, key, chunk)
    record = TRAILER.pack(cid, 0, len(blob), 100)
    codec.check_records(key, blob, record, 0, 1)
    for records, lo, hi in ((record + b"x", 0, 1), (record, 0, 2), (record, 1, 0), (record, -1, 1)):
        with pytest.raises(ValueError):
            codec.check_records(key, blob, records, lo, hi)


# --- copy_repeats (mutants P12, P13) -------------------------------------------------------


@both
def test_copy_repeats_refuses_every_copy_outside_the_window(native: bool) -> None:
    codec = BlobCodec(1, HASHER, native=native)
    out = codec.window_buffer(100)
    bad = [
        (0, 95, 10),  # source past the end (P12: read 5 bytes past the block)
        (95, 0, 10),  # destination past the end
        (10, 2, 2**64 - 8),  # a length beyond the window whose sums wrap (P13)
        (0, 2**64 - 5, 10),
    ]
    for dst, src, n in bad:
        with pytest.raises(ValueError):
            codec.copy_repeats(out, PLAN_COPY.pack(dst, src, n))
    codec.copy_repeats(out, PLAN_COPY.pack(90, 0, 10))  # the very end: fine
    codec.copy_repeats(out, PLAN_COPY.pack(10, 0, 10))  # touching, not overlapping: fine


# --- entries_by_pack: a blob end past 2^32 (mutant I3) -------------------------------------


def test_an_entry_whose_end_passes_4_gib_is_outside() -> None:
    """offset + stored is computed in 64 bits: 0xFFFFFFF0 + 0x20 does not wrap to 0x10."""
    cid = os.urandom(32)
    records = ENTRY.pack(cid, 0, 0xFFFFFFF0, 0x20, 1)
    parts, outside = entries_by_pack(records, [(8, 1000)])
    assert parts == {} and outside == [(0, cid)]


# --- what the second review found: wrapping sums and negative arguments ---------------------


@both
def test_a_place_so_large_that_it_wraps_is_refused(native: bool) -> None:
    """out_pos + raw_length past 2**64 wraps to a small sum: the check is written so that
    it cannot (the kernel would write before the window)."""
    key = new_key()
    codec = BlobCodec(1, HASHER, native=native)
    chunk = os.urandom(100)
    cid, blob = _one_good_blob(codec, key, chunk)
    out = codec.window_buffer(100)
    item = PLAN_ITEM.pack(0, 0, len(blob), 100, 2**64 - 10)
    with pytest.raises(ValueError):
        codec.open_planned(key, blob, 0, cid, item, 0, 1, out)
    codec.open_planned(key, blob, 0, cid, PLAN_ITEM.pack(0, 0, len(blob), 100, 0), 0, 1, out)
    assert bytes(out) == chunk
    if native:  # items that are not whole records
        with pytest.raises(ValueError):
            codec.open_planned(key, blob, 0, cid, item + b"x", 0, 1, out)


def test_negative_sizes_and_bounds_are_refused() -> None:
    from dedupe.store._chunkindex import ChunkTable, cut_records

    table = ChunkTable()
    for gap, limit, batch in ((-1, 10, 10), (10, -1, 10), (10, 10, -1)):
        with pytest.raises(ValueError):
            table.plan_window(b"", gap, limit, batch)
    with pytest.raises(ValueError):  # a negative lead would be a lead of 2^64 - 1
        table.plan_window(b"", 10, 10, 10, -1)
    with pytest.raises(ValueError):
        cut_records(b"", 0, -1)
    with pytest.raises(ValueError):
        entries_by_pack(b"", [(0, -1)])
