"""Pack layout (docs/FORMAT.md section 6): magic, sealed blobs, sealed trailer, footer."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dedupe.errors import IntegrityError, TruncatedObject, UnsupportedFormat

PACK_MAGIC = b"DDPACK02"
FOOTER_MAGIC = b"DDPKEND2"
_FOOTER = struct.Struct("<I8s")  # trailer length, magic: no key is in a pack's bytes
FOOTER_SIZE = _FOOTER.size  # 12
TRAILER_AAD = b"dedupe-pack-trailer v2"
MAX_PACK_SIZE = (1 << 32) - 1

# First byte of a blob's plaintext.
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_ZSTD_DICT = 2  # then DICT_REF bytes naming the dictionary, then the frame
DICT_REF = 8  # a dictionary's ref: the first 8 bytes of its keyed id (section 16)

TRAILER_RECORD = "<32sIII"  # chunk_id, offset, stored_length, raw_length
_ENTRY = struct.Struct(TRAILER_RECORD)


@dataclass(frozen=True, slots=True)
class PackEntry:
    chunk_id: bytes
    offset: int
    stored_length: int
    raw_length: int


def encode_trailer(entries: list[PackEntry]) -> bytes:
    return encode_trailer_records(
        b"".join(_ENTRY.pack(e.chunk_id, e.offset, e.stored_length, e.raw_length) for e in entries)
    )


def encode_trailer_records(records: bytes | bytearray) -> bytes:
    """The trailer plaintext for entry records already packed back to back."""
    if len(records) % _ENTRY.size:
        raise ValueError("trailer records must be whole entries")
    return struct.pack("<I", len(records) // _ENTRY.size) + records


def decode_trailer(plain: bytes, what: str) -> list[PackEntry]:
    return [PackEntry(*t) for t in decode_trailer_items(plain, what)]


def decode_trailer_items(plain: bytes, what: str) -> list[tuple[bytes, int, int, int]]:
    """The trailer's entries as (chunk id, offset, stored length, raw length) tuples, in
    pack order, unpacked without a Python object per field."""
    return trailer_items(decode_trailer_records(plain, what))


def trailer_items(records: bytes | bytearray | memoryview) -> list[tuple[bytes, int, int, int]]:
    """Packed trailer entries (TRAILER_RECORDs) as (chunk id, offset, stored length, raw
    length) tuples."""
    return list(_ENTRY.iter_unpack(records))


def decode_trailer_records(plain: bytes, what: str) -> bytes:
    """The trailer's entries still packed (TRAILER_RECORD after TRAILER_RECORD, in pack
    order), its count checked: verify compares them with the index's and opens the blobs
    they name without unpacking them."""
    if len(plain) < 4:
        raise IntegrityError(f"{what}: trailer is empty")
    (count,) = struct.unpack_from("<I", plain)
    if len(plain) != 4 + count * _ENTRY.size:
        raise IntegrityError(f"{what}: trailer length does not match its entry count")
    return plain[4:]


def encode_footer(trailer_length: int) -> bytes:
    return _FOOTER.pack(trailer_length, FOOTER_MAGIC)


def decode_footer(pack_length: int, footer: bytes | bytearray | memoryview, what: str) -> int:
    """-> the trailer's length."""
    if len(footer) != FOOTER_SIZE or pack_length < len(PACK_MAGIC) + FOOTER_SIZE:
        raise TruncatedObject(f"{what} is too short to be a pack ({pack_length} bytes)")
    trailer_length, magic = _FOOTER.unpack(footer)
    if magic != FOOTER_MAGIC:
        if bytes(magic[:7]) == b"DDPKEND" and bytes(magic[7:]).isdigit():
            raise UnsupportedFormat(f"{what} is a pack of another format version")
        raise TruncatedObject(f"{what} has no pack footer: it is truncated or damaged")
    if trailer_length > pack_length - FOOTER_SIZE - len(PACK_MAGIC):
        raise IntegrityError(f"{what}: footer names a trailer longer than the pack")
    return int(trailer_length)
