"""Keyed BLAKE3 naming: chunk ids, whole-stream digests and object ids.

Chunk ids are BLAKE3 keyed with the repository's `id_key`, so that an attacker who knows a
file cannot confirm it is stored by computing its chunk ids. Object ids (packs, index
objects, manifests) are plain BLAKE3 over the stored bytes, so integrity can be checked
without any key. See docs/FORMAT.md sections 2 and 4.1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import blake3

try:  # keyed BLAKE3 of a whole batch in one call without the GIL (csrc/blake3many.c)
    from dedupe.hashing import _blake3many
except ImportError:  # a build without the native core: the blake3 package, chunk by chunk
    _blake3many = None  # type: ignore[assignment]

ID_SIZE = 32
STREAM_DIGEST_CONTEXT = "dedupe 2026-11 stream digest v1"


class ChunkHasher:
    """Computes chunk ids and stream digests for one repository."""

    __slots__ = ("_id_key", "_digest_key")

    def __init__(self, id_key: bytes) -> None:
        if len(id_key) != 32:
            raise ValueError("id_key must be 32 bytes")
        self._id_key = bytes(id_key)
        self._digest_key = blake3.blake3(
            self._id_key, derive_key_context=STREAM_DIGEST_CONTEXT
        ).digest()

    @property
    def id_key(self) -> bytes:
        """The chunk id key, for native kernels that check ids as they open chunks
        (dedupe.store._blobcodec): the same keyed BLAKE3 as chunk_ids."""
        return self._id_key

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=self._id_key).digest()

    def chunk_ids(self, chunks: Iterable[bytes | bytearray | memoryview]) -> list[bytes]:
        """Ids of a batch of chunks; called from a worker thread, one call per batch.

        Natively, the batch is hashed without the GIL (so two workers hash on two cores)
        and with vector lanes across chunks: a 4 KiB page fills 4 lanes of the blake3
        package's SIMD, but 16 chunks fill 16 (docs/CHUNKING.md has the figures)."""
        if _blake3many is not None:
            return _blake3many.keyed_many(self._id_key, list(chunks))
        key = self._id_key
        new = blake3.blake3
        return [new(c, key=key).digest() for c in chunks]

    def stream_digest(self) -> StreamDigest:
        return StreamDigest(self._digest_key)


class StreamDigest:
    """Incremental keyed digest of a whole logical stream (backup records, restore checks)."""

    __slots__ = ("_h",)

    def __init__(self, key: bytes) -> None:
        self._h = blake3.blake3(key=key)

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def update_many(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        for p in parts:
            self._h.update(p)

    def hexdigest(self) -> str:
        return str(self._h.hexdigest())


def object_id(data: bytes | bytearray | memoryview) -> str:
    """Hex name of a stored object: unkeyed BLAKE3 of its bytes."""
    return str(blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest())
