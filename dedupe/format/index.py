"""Index object plaintext (docs/FORMAT.md section 7): a pack table and chunk entries."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dedupe.errors import IntegrityError

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

INDEX_MAGIC = b"DDPIDX02"
INDEX_AAD = b"dedupe-index v2"

_PACK = struct.Struct("<32sQ")  # pack_id, pack length (its key is in a key map)
_ENTRY = struct.Struct("<32sIIII")  # chunk_id, pack_no, offset, stored_length, raw_length
_COUNT = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class PackRecord:
    pack_id: bytes
    length: int


@dataclass(frozen=True, slots=True)
class IndexEntry:
    chunk_id: bytes
    pack_no: int
    offset: int
    stored_length: int
    raw_length: int


def encode_entry_records(entries: Iterable[IndexEntry]) -> bytes:
    """Entries packed back to back as an index object stores them (ENTRY_RECORD)."""
    return b"".join(
        _ENTRY.pack(e.chunk_id, e.pack_no, e.offset, e.stored_length, e.raw_length) for e in entries
    )


def encode_index(packs: list[PackRecord], records: bytes | bytearray) -> bytes:
    """An index object's plaintext: the pack table, then `records` (ENTRY_RECORDs whose
    pack numbers index `packs`)."""
    head, body = index_parts(packs, records)
    return head + body


def index_parts(packs: list[PackRecord], records: Buffer) -> tuple[bytes, memoryview]:
    """An index object's plaintext in two pieces, its head (pack table and entry count)
    and the records themselves, not copied: a writer compresses them one after the other
    rather than join a plaintext as large as the records (50 MiB a million entries)."""
    body = memoryview(records).cast("B")
    if len(body) % _ENTRY.size:
        raise ValueError("index entry records must be whole entries")
    parts = [_COUNT.pack(len(packs))]
    parts += [_PACK.pack(p.pack_id, p.length) for p in packs]
    parts.append(_COUNT.pack(len(body) // _ENTRY.size))
    return b"".join(parts), body


def decode_index_records(plain: bytes, what: str) -> tuple[list[PackRecord], memoryview]:
    """-> (pack table, entry records back to back, 48 bytes each, `<32sIIII`). Callers
    must check each record's pack_no against the pack table (the native index does)."""
    mv = memoryview(plain)
    try:
        (n_packs,) = _COUNT.unpack_from(mv, 0)
        pos = _COUNT.size
        end = pos + n_packs * _PACK.size
        packs = [PackRecord(*t) for t in _PACK.iter_unpack(mv[pos:end])]
        (n_entries,) = _COUNT.unpack_from(mv, end)
    except struct.error as e:
        raise IntegrityError(f"{what} is malformed: {e}") from None
    pos = end + _COUNT.size
    if len(mv) - pos != n_entries * _ENTRY.size:
        raise IntegrityError(f"{what}: entry table length does not match its count")
    return packs, mv[pos:]


ENTRY_RECORD = _ENTRY


def max_plaintext(sealed_length: int) -> int:
    """The largest plaintext a reader accepts from an index object whose sealed part has
    `sealed_length` bytes (docs/FORMAT.md section 7): ids do not compress, so anything
    larger is a decompression bomb."""
    return 4 * sealed_length + 4096


def decode_index(
    plain: bytes, what: str
) -> tuple[list[PackRecord], list[tuple[bytes, int, int, int, int]]]:
    """-> (pack table, entries as tuples in IndexEntry field order), every entry's pack
    number checked against the pack table."""
    packs, records = decode_index_records(plain, what)
    entries = list(_ENTRY.iter_unpack(records))
    highest = max((entry[1] for entry in entries), default=-1)
    if highest >= len(packs):
        raise IntegrityError(f"{what}: an entry names pack {highest} of {len(packs)}")
    return packs, entries
