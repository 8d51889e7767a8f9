"""Small records sealed whole under a data key of their own (quarantine and drill records,
docs/FORMAT.md 13 and 15): magic || seal(key, JSON, aad), stored under the BLAKE3 of
those bytes, the key in a key map entry."""

from __future__ import annotations

from dedupe.crypto import open_sealed, seal
from dedupe.errors import IntegrityError, UnsupportedFormat
from dedupe.hashing import object_id


def seal_record(magic: bytes, aad: bytes, data_key: bytes, plain: bytes) -> bytes:
    return magic + seal(data_key, plain, aad)


def open_record(
    magic: bytes, aad: bytes, data_key: bytes, name: str, data: bytes, what: str
) -> bytes | bytearray:
    """The plaintext of record `name`; IntegrityError when its bytes do not hash to its
    name or do not open, UnsupportedFormat for another magic."""
    if object_id(data) != name.rsplit("/", 1)[-1]:
        raise IntegrityError(f"{what} does not match its name: it is damaged")
    if data[: len(magic)] != magic:
        raise UnsupportedFormat(f"{what} has an unknown magic")
    return open_sealed(data_key, memoryview(data)[len(magic) :], aad, what)
