"""Generation manifests (docs/FORMAT.md section 8): a prefix (magic, length, the header
sealed under its own key) whose BLAKE3 is the generation id, then a body (chunk table,
then the meta JSON) sealed frame by frame under another key. No key is in the bytes."""

from __future__ import annotations

import json
import secrets
import struct
from typing import Any

from dedupe.errors import IntegrityError, TruncatedObject, UnsupportedFormat

GEN_MAGIC = b"DDPGEN03"
HEADER_AAD = b"dedupe-generation-header v3"
FRAME_AAD_PREFIX = b"dedupe-generation-frame v3"
HEADER_VERSION = 3
# Enough to hold the magic, the header length and any realistic header in one read.
HEADER_PROBE = 64 * 1024
MAX_HEADER = 1 << 20

# One record of a manifest's chunk table: chunk id, raw length.
CHUNK_RECORD = struct.Struct("<32sI")
# Records per table frame, as writers make them, and the most a reader accepts.
FRAME_RECORDS = 16384
MAX_TABLE_FRAME = FRAME_RECORDS * CHUNK_RECORD.size
MAX_META_FRAME = 256 << 20
FRAME_LENGTH = struct.Struct("<I")
_PREFIX = struct.Struct("<8sI")


class RawJSON:
    """A value of a manifest's meta given as finished JSON text, spliced in as it is by
    encode_meta. The delta's ops come so from the native kernel: as Python lists they
    take ~110 bytes an op (46 MiB for 441,109 ops; ~180,000 for a 4 GiB page file's
    day of changes), where the text takes ~12. The text must be one JSON value."""

    __slots__ = ("text",)

    def __init__(self, text: bytes) -> None:
        self.text = text


def encode_meta(meta: dict[str, Any]) -> bytes:
    """The meta frame's plaintext: json.dumps(meta, sort_keys=True), with each RawJSON
    value's text in its place. Each RawJSON is first written as a string made of a random
    128-bit token and its number, which nothing else in the meta can contain, and that
    string (quotes included) is then replaced by the text."""
    token = secrets.token_hex(16)
    raws: list[bytes] = []

    def placeholder(value: object) -> str:
        if not isinstance(value, RawJSON):
            raise TypeError(f"a manifest's meta cannot hold {type(value).__name__}")
        raws.append(value.text)
        return f"{token}.{len(raws) - 1}"

    text = json.dumps(meta, sort_keys=True, default=placeholder).encode()
    for number, raw in enumerate(raws):
        text = text.replace(f'"{token}.{number}"'.encode(), raw, 1)
    return text


def frame_aad(frame_no: int) -> bytes:
    return FRAME_AAD_PREFIX + struct.pack("<I", frame_no)


def encode_prefix(header_sealed: bytes) -> bytes:
    """What comes before the body: magic, header length, sealed header. Its BLAKE3 is the
    generation id."""
    return _PREFIX.pack(GEN_MAGIC, len(header_sealed)) + header_sealed


def header_span(prefix: bytes | bytearray | memoryview, what: str) -> tuple[int, int]:
    """(start, end) of the sealed header, from the first bytes of a manifest; `end` is
    where the prefix (and the id's input) ends."""
    if len(prefix) < _PREFIX.size:
        raise TruncatedObject(f"{what} is truncated")
    magic, n = _PREFIX.unpack_from(prefix)
    if magic != GEN_MAGIC:
        if bytes(magic[:6]) == b"DDPGEN" and bytes(magic[6:]).isdigit():
            raise UnsupportedFormat(
                f"{what} is a manifest of another format version ({bytes(magic)!r}); this "
                f"dedupe reads {GEN_MAGIC!r} only"
            )
        raise IntegrityError(f"{what} is not a generation manifest (bad magic)")
    if n > MAX_HEADER:
        raise IntegrityError(f"{what} claims a header of {n} bytes (at most {MAX_HEADER})")
    return _PREFIX.size, _PREFIX.size + n


def split_frames(body: memoryview, what: str) -> list[memoryview]:
    """A body -> its sealed frames in order; the last one is the meta frame. Checks only
    the lengths: each frame is authenticated when opened."""
    frames: list[memoryview] = []
    pos = 0
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
    return frames


def decode_meta(plain: bytes, what: str) -> dict[str, Any]:
    try:
        meta = json.loads(plain)
        if not isinstance(meta, dict):
            raise ValueError("not an object")
        int(meta["chunk_count"])
        return meta
    # OverflowError: a count of Infinity (json.loads takes it); RecursionError: arrays
    # nested deeper than the parser's stack. A writer's key can make either.
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
        raise IntegrityError(f"{what}: manifest meta is malformed: {e}") from None


def decode_header(plain: bytes, what: str) -> dict[str, Any]:
    """The header JSON, checked for the fields every reader relies on."""
    try:
        header = json.loads(plain)
        if not isinstance(header, dict):
            raise ValueError("not an object")
        if header.get("version") != HEADER_VERSION:
            raise ValueError(f"header version {header.get('version')}")
        for field in ("name", "created", "body"):
            if not isinstance(header[field], str):
                raise ValueError(f"{field} is not a string")
        if header["kind"] not in ("full", "incremental", "differential"):
            raise ValueError(f"unknown kind {header['kind']!r}")
        if header["parent"] is not None and not isinstance(header["parent"], str):
            raise ValueError("parent is neither null nor an id")
        for field in ("size", "chunks", "new_chunks", "new_bytes", "stored_bytes"):
            if not isinstance(header[field], int) or header[field] < 0:
                raise ValueError(f"{field} is not a count")
        float(header["seconds"])
        if not isinstance(header.get("source", {}), dict):
            raise ValueError("source is not an object")
        return header
    # OverflowError: `seconds` too large for a float; RecursionError: arrays nested
    # deeper than the parser's stack (decode_meta says why these two).
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
        raise IntegrityError(f"{what}: manifest header is malformed: {e}") from None
