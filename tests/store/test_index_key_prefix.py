"""What the native index's 24-byte keys (csrc/chunkindex.h) rest on, checked below the
repository with a simulated collision: a real 192-bit collision of keyed BLAKE3 cannot be
made, so `twin` is an id that agrees with a stored one in its first 24 bytes only, with
an index record of its own. The table takes one for the other (csrc/chunkindex.h lists
what follows from that); a restore must not: it plans with the manifest's full ids and
opens each blob under its full id."""

from __future__ import annotations

import os
import struct

import pytest

from dedupe.crypto import OVERHEAD, new_key
from dedupe.errors import IntegrityError
from dedupe.format.index import PackRecord
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.hashing import ChunkHasher
from dedupe.store.blobs import BlobCodec, seal_batch
from dedupe.store.index import ChunkIndex

ENTRY = struct.Struct("<32sIIII")
KEY_BYTES = 24
HASHER = ChunkHasher(bytes(range(32)))


def _twin(cid: bytes) -> bytes:
    """Another id equal to cid in the table's key bytes (the first 24) only."""
    return cid[:KEY_BYTES] + bytes(b ^ 0xA5 for b in cid[KEY_BYTES:])


def _index(*objects: tuple[bytes, bytes, int]) -> ChunkIndex:
    """A ChunkIndex loaded from one index object per (chunk id, pack id, offset)."""
    index = ChunkIndex()
    for i, (cid, pack_id, offset) in enumerate(objects):
        index.add_records(
            [PackRecord(pack_id, 1 << 20)], ENTRY.pack(cid, 0, offset, 100, 50), f"index {i}"
        )
    return index


def test_the_table_takes_a_twin_for_the_chunk() -> None:
    """The premise of the tests below (and of chunkindex.h's list of consequences)."""
    a = os.urandom(32)
    index = _index((_twin(a), b"P" * 32, 0))
    assert index.usable(a)
    assert index.absent_from_table(CHUNK_RECORD.pack(a, 50)) == []


@pytest.mark.parametrize("native", [True, False])
def test_restore_of_a_twin_resolved_chunk_fails_loudly(native: bool) -> None:
    """The claim in chunkindex.h, checked end to end below the repository: the plan
    hands out the manifest's full ids (windowplan.c copies them from the records), and
    opening the twin's blob under a's id fails the AEAD (blobcodec.c passes the 32-byte
    id as associated data) instead of restoring the twin's bytes."""
    key = new_key()
    codec = BlobCodec(1, HASHER, native=native)
    chunk = os.urandom(3000)
    cid = HASHER.chunk_id(chunk)
    batch = codec.frame([chunk], [cid])
    dst = bytearray(len(chunk) + 1 + OVERHEAD)
    end = seal_batch(key, batch, dst, 0, len(dst), bytearray())
    blob = bytes(dst[:end])
    a = _twin(cid)  # the chunk a manifest names; only its twin `cid` is stored
    index = _index((cid, b"P" * 32, 0))
    index._table.put(cid, 0, 0, len(blob), len(chunk), True)
    status, _bad, plan = index.plan_window(
        CHUNK_RECORD.pack(a, len(chunk)), 1 << 18, 1 << 23, 1 << 20
    )
    assert status == 0 and plan is not None
    total, ids, items, _copies, ranges = plan
    assert ids == a  # the full id of the record, not anything out of the table
    out = codec.window_buffer(total)
    with pytest.raises(IntegrityError):
        codec.open_planned(key, blob, 0, ids, items, 0, 1, out)


def test_two_twins_in_one_window_are_two_items_each_opened_under_its_own_id() -> None:
    """windowplan.c's own repeat table compares 32 bytes: twins are not made one item
    (which would copy one's bytes into the other's place without opening it)."""
    a = os.urandom(32)
    twin = _twin(a)
    index = _index((a, b"P" * 32, 0))
    records = CHUNK_RECORD.pack(a, 50) + CHUNK_RECORD.pack(twin, 50)
    status, _bad, plan = index.plan_window(records, 1 << 18, 1 << 23, 1 << 20)
    assert status == 0 and plan is not None
    _total, ids, _items, copies, _ranges = plan
    assert copies == b""
    assert sorted([ids[:32], ids[32:]]) == sorted([a, twin])
