"""Encoders and decoders of docs/FORMAT.md agree with each other and reject damage."""

from __future__ import annotations

import os

import pytest

from dedupe.errors import IntegrityError, TruncatedObject
from dedupe.format.index import (
    IndexEntry,
    PackRecord,
    decode_index,
    encode_entry_records,
    encode_index,
)
from dedupe.format.manifest import CHUNK_RECORD, decode_body_v1, encode_body_v1
from dedupe.format.pack import (
    FOOTER_SIZE,
    PackEntry,
    decode_footer,
    decode_trailer,
    encode_footer,
    encode_trailer,
)


def test_pack_trailer_and_footer() -> None:
    entries = [PackEntry(os.urandom(32), 8 + i * 100, 100, 250) for i in range(5)]
    assert decode_trailer(encode_trailer(entries), "p") == entries
    footer = encode_footer(7, bytes(80), 1234)
    assert len(footer) == FOOTER_SIZE
    assert decode_footer(100_000, footer, "p") == (7, bytes(80), 1234)
    with pytest.raises(TruncatedObject):
        decode_footer(100_000, footer[:-1] + b"X", "p")


def test_index_round_trip_and_bad_pack_number() -> None:
    packs = [PackRecord(os.urandom(32), 1, os.urandom(80), 123456) for _ in range(3)]
    entries = [IndexEntry(os.urandom(32), i % 3, i * 10, 10, 20) for i in range(50)]
    got_packs, got_entries = decode_index(encode_index(packs, encode_entry_records(entries)), "i")
    assert got_packs == packs
    assert got_entries == [
        (e.chunk_id, e.pack_no, e.offset, e.stored_length, e.raw_length) for e in entries
    ]
    bad = encode_index(packs[:1], encode_entry_records(entries))
    with pytest.raises(IntegrityError):
        decode_index(bad, "i")


def test_manifest_v1_body_round_trip() -> None:
    chunks = [(os.urandom(32), n) for n in (1, 500, 65536)]
    table = b"".join(CHUNK_RECORD.pack(c, n) for c, n in chunks)
    meta = {"type": "stream", "digest": "00" * 32, "chunk_count": 3}
    assert decode_body_v1(encode_body_v1(meta, table), "g") == (meta, table)
    with pytest.raises(IntegrityError):
        decode_body_v1(encode_body_v1(dict(meta, chunk_count=4), table), "g")
