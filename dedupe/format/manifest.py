"""Generation manifests (docs/FORMAT.md section 8): a sealed JSON header readable with the
meta key, and a body (chunk table, then the meta JSON) sealed frame by frame under a
wrapped data key. Version 1 manifests (one sealed body) are still read."""

from __future__ import annotations

import json
import struct
from typing import Any

from dedupe.errors import IntegrityError, TruncatedObject

GEN_MAGIC = b"DDPGEN02"
GEN_MAGIC_V1 = b"DDPGEN01"
HEADER_AAD = b"dedupe-generation-header v1"
BODY_AAD_PREFIX = b"dedupe-generation-body v1"  # version 1 only
FRAME_AAD_PREFIX = b"dedupe-generation-frame v2"
WRAPPED_KEY_SIZE = 80
# Enough to hold the magic, the header length and any realistic header in one read.
HEADER_PROBE = 64 * 1024

# One record of a manifest's chunk table: chunk id, raw length.
CHUNK_RECORD = struct.Struct("<32sI")
# Records per table frame, as writers make them (readers take any whole number).
FRAME_RECORDS = 16384
FRAME_LENGTH = struct.Struct("<I")
_EPOCH = struct.Struct("<I")
BODY_PREFIX_SIZE = _EPOCH.size + WRAPPED_KEY_SIZE


def frame_aad(frame_no: int) -> bytes:
    return FRAME_AAD_PREFIX + struct.pack("<I", frame_no)


def encode_prefix(header_sealed: bytes) -> bytes:
    """What comes before a version 2 body: magic, header length, sealed header."""
    return GEN_MAGIC + struct.pack("<I", len(header_sealed)) + header_sealed


def encode_body_prefix(epoch: int, wrapped_key: bytes) -> bytes:
    """The first bytes of a version 2 body: the epoch and the wrapped data key."""
    assert len(wrapped_key) == WRAPPED_KEY_SIZE
    return _EPOCH.pack(epoch) + wrapped_key


def decode_body_prefix(body: bytes | bytearray | memoryview, what: str) -> tuple[int, bytes]:
    """(epoch, wrapped data key) from the first bytes of a version 2 body."""
    if len(body) < BODY_PREFIX_SIZE:
        raise TruncatedObject(f"{what} is truncated")
    (epoch,) = _EPOCH.unpack_from(body)
    return epoch, bytes(body[_EPOCH.size : BODY_PREFIX_SIZE])


def split_frames(body: memoryview, what: str) -> tuple[int, bytes, list[memoryview]]:
    """A version 2 body -> (epoch, wrapped key, sealed frames in order); the last one is
    the meta frame. Checks only the lengths: each frame is authenticated when opened."""
    epoch, wrapped = decode_body_prefix(body, what)
    frames: list[memoryview] = []
    pos = BODY_PREFIX_SIZE
    while pos < len(body):
        if pos + FRAME_LENGTH.size > len(body):
            raise TruncatedObject(f"{what} is truncated inside a frame length")
        (n,) = FRAME_LENGTH.unpack_from(body, pos)
        pos += FRAME_LENGTH.size
        if pos + n > len(body):
            raise TruncatedObject(f"{what} is truncated: frame {len(frames)} runs past its end")
        frames.append(body[pos : pos + n])
        pos += n
    if not frames:
        raise TruncatedObject(f"{what} has no meta frame")
    return epoch, wrapped, frames


def decode_meta(plain: bytes, what: str) -> dict[str, Any]:
    try:
        meta = json.loads(plain)
        if not isinstance(meta, dict):
            raise ValueError("not an object")
        int(meta["chunk_count"])
        return meta
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{what}: manifest meta is malformed: {e}") from None


def encode_manifest_v1(
    header_sealed: bytes, epoch: int, wrapped_key: bytes, body_sealed: bytes
) -> bytes:
    """A version 1 manifest (tests write them to check that they are still read)."""
    return b"".join(
        [
            GEN_MAGIC_V1,
            struct.pack("<I", len(header_sealed)),
            header_sealed,
            struct.pack("<I", epoch),
            wrapped_key,
            body_sealed,
        ]
    )


def manifest_version(prefix: bytes, what: str) -> int:
    magic = bytes(prefix[:8])
    if magic == GEN_MAGIC:
        return 2
    if magic == GEN_MAGIC_V1:
        return 1
    raise IntegrityError(f"{what} is not a generation manifest (bad magic)")


def header_span(prefix: bytes, what: str) -> tuple[int, int]:
    """(start, end) of the sealed header, from the first bytes of a manifest (either
    version: they agree up to the end of the header)."""
    manifest_version(prefix, what)
    if len(prefix) < 12:
        raise TruncatedObject(f"{what} is truncated")
    (n,) = struct.unpack_from("<I", prefix, 8)
    return 12, 12 + n


def split_manifest_v1(data: bytes, what: str) -> tuple[bytes, int, bytes, bytes]:
    """A version 1 manifest -> (header_sealed, epoch, wrapped_key, body_sealed)."""
    start, end = header_span(data, what)
    if len(data) < end + 4 + WRAPPED_KEY_SIZE:
        raise TruncatedObject(f"{what} is truncated")
    (epoch,) = struct.unpack_from("<I", data, end)
    wrapped = data[end + 4 : end + 4 + WRAPPED_KEY_SIZE]
    return data[start:end], epoch, wrapped, data[end + 4 + WRAPPED_KEY_SIZE :]


def encode_body_v1(meta: dict[str, Any], chunk_table: bytes | bytearray) -> bytes:
    """A version 1 body plaintext: meta must hold "chunk_count"; chunk_table is that many
    CHUNK_RECORDs back to back."""
    meta_json = json.dumps(meta, sort_keys=True).encode()
    return struct.pack("<I", len(meta_json)) + meta_json + chunk_table


def decode_body_v1(plain: bytes, what: str) -> tuple[dict[str, Any], bytes]:
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
