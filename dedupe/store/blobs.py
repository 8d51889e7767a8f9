"""Chunks <-> blobs: compress (or not), seal under the pack key with the chunk id as
associated data; and the reverse, which checks both the AEAD tag and the chunk id."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import zstandard

from dedupe.crypto import open_sealed
from dedupe.errors import IntegrityError
from dedupe.format.pack import COMPRESSION_NONE, COMPRESSION_ZSTD
from dedupe.hashing import ChunkHasher

_RAW = bytes([COMPRESSION_NONE])
_ZSTD = bytes([COMPRESSION_ZSTD])


class BlobCodec:
    """Thread-safe: each worker thread gets its own zstd contexts."""

    def __init__(self, level: int, hasher: ChunkHasher) -> None:
        self.level = level
        self.hasher = hasher
        self._local = threading.local()

    def _cctx(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self.level)
        return c

    def _dctx(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    def frame(self, chunks: Sequence[bytes | memoryview]) -> list[bytes]:
        """Blob plaintexts for a batch of chunks: zstd when it is smaller, raw otherwise."""
        compress = self._cctx().compress
        out = []
        for c in chunks:
            z = compress(c)
            out.append(_ZSTD + z if len(z) < len(c) else _RAW + bytes(c))
        return out

    def open(
        self, key: bytes, chunk_id: bytes, sealed: bytes | memoryview, raw_length: int
    ) -> bytes:
        """The chunk's bytes, checked twice: AEAD under its id, then its keyed BLAKE3."""
        what = f"chunk {chunk_id.hex()[:16]}"
        plain = open_sealed(key, sealed, chunk_id, what)
        if not plain:
            raise IntegrityError(f"{what} is empty: it lacks its compression byte")
        payload = memoryview(plain)[1:]
        if plain[0] == COMPRESSION_ZSTD:
            try:
                data = self._dctx().decompress(payload, max_output_size=raw_length)
            except zstandard.ZstdError as e:
                raise IntegrityError(f"{what} does not decompress: {e}") from None
        elif plain[0] == COMPRESSION_NONE:
            data = bytes(payload)
        else:
            raise IntegrityError(f"{what} has an unknown compression byte {plain[0]}")
        if len(data) != raw_length or self.hasher.chunk_id(data) != chunk_id:
            raise IntegrityError(f"{what} does not match its id: its content is wrong")
        return data
