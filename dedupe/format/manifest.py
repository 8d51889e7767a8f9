"""Generation manifests (docs/FORMAT.md section 8): a sealed JSON header readable with the
meta key, and a body (stream digest and chunk list) sealed under a wrapped data key."""

from __future__ import annotations

import json
import struct
from typing import Any

from dedupe.errors import IntegrityError, TruncatedObject

GEN_MAGIC = b"DDPGEN01"
HEADER_AAD = b"dedupe-generation-header v1"
BODY_AAD_PREFIX = b"dedupe-generation-body v1"
WRAPPED_KEY_SIZE = 80
# Enough to hold the magic, the header length and any realistic header in one read.
HEADER_PROBE = 64 * 1024

# One record of a manifest's chunk table: chunk id, raw length.
CHUNK_RECORD = struct.Struct("<32sI")


def encode_manifest(
    header_sealed: bytes, epoch: int, wrapped_key: bytes, body_sealed: bytes
) -> bytes:
    return b"".join(
        [
            GEN_MAGIC,
            struct.pack("<I", len(header_sealed)),
            header_sealed,
            struct.pack("<I", epoch),
            wrapped_key,
            body_sealed,
        ]
    )


def header_span(prefix: bytes, what: str) -> tuple[int, int]:
    """(start, end) of the sealed header, from the first bytes of a manifest."""
    if len(prefix) < 12 or prefix[:8] != GEN_MAGIC:
        raise IntegrityError(f"{what} is not a generation manifest (bad magic)")
    (n,) = struct.unpack_from("<I", prefix, 8)
    return 12, 12 + n


def split_manifest(data: bytes, what: str) -> tuple[bytes, int, bytes, bytes]:
    """-> (header_sealed, epoch, wrapped_key, body_sealed)."""
    start, end = header_span(data, what)
    if len(data) < end + 4 + WRAPPED_KEY_SIZE:
        raise TruncatedObject(f"{what} is truncated")
    (epoch,) = struct.unpack_from("<I", data, end)
    wrapped = data[end + 4 : end + 4 + WRAPPED_KEY_SIZE]
    return data[start:end], epoch, wrapped, data[end + 4 + WRAPPED_KEY_SIZE :]


def encode_body(meta: dict[str, Any], chunk_table: bytes | bytearray) -> bytes:
    """meta must hold "chunk_count"; chunk_table is that many CHUNK_RECORDs back to back."""
    return b"".join(encode_body_parts(meta, chunk_table))


def encode_body_parts(
    meta: dict[str, Any], chunk_table: bytes | bytearray
) -> list[bytes | bytearray]:
    """The body as consecutive parts (the table is not copied): encode_body, joined."""
    meta_json = json.dumps(meta, sort_keys=True).encode()
    return [struct.pack("<I", len(meta_json)) + meta_json, chunk_table]


def decode_body(plain: bytes, what: str) -> tuple[dict[str, Any], bytes]:
    """-> (meta, chunk table bytes); iterate the table with CHUNK_RECORD.iter_unpack."""
    try:
        (n,) = struct.unpack_from("<I", plain)
        meta: dict[str, Any] = json.loads(plain[4 : 4 + n])
        table = plain[4 + n :]
        if len(table) != int(meta["chunk_count"]) * CHUNK_RECORD.size:
            raise IntegrityError(f"{what}: chunk table does not match its count")
        return meta, table
    except (struct.error, ValueError, KeyError) as e:
        raise IntegrityError(f"{what}: manifest body is malformed: {e}") from None
