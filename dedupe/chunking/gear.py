"""The keyed gear table of the chunker."""

from __future__ import annotations

import blake3

#: BLAKE3 derive_key context; part of the on-disk format.
GEAR_CONTEXT = "dedupe 2026-11 fastcdc-2020 gear table v1"
GEAR_TABLE_BYTES = 2048
CHUNKER_KEY_BYTES = 32


def gear_table(chunker_key: bytes | bytearray | memoryview) -> bytes:
    """256 uint64 (little-endian, 2048 bytes) derived from the repository's chunker key.

    Keyed gear tables hamper chunk-size fingerprinting: without the key, the chunk
    boundaries of known content cannot be predicted.
    """
    if not isinstance(chunker_key, bytes | bytearray | memoryview):
        raise TypeError("chunker_key must be bytes")
    key = bytes(chunker_key)
    if len(key) != CHUNKER_KEY_BYTES:
        raise ValueError(f"chunker key must be {CHUNKER_KEY_BYTES} bytes, not {len(key)}")
    table: bytes = blake3.blake3(key, derive_key_context=GEAR_CONTEXT).digest(
        length=GEAR_TABLE_BYTES
    )
    return table


def gear_values(gear: bytes) -> list[int]:
    """The 256 uint64 entries of a gear table."""
    if len(gear) != GEAR_TABLE_BYTES:
        raise ValueError(f"a gear table has {GEAR_TABLE_BYTES} bytes, not {len(gear)}")
    return [int.from_bytes(gear[8 * i : 8 * i + 8], "little") for i in range(256)]
