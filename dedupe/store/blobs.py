"""Chunks <-> blobs: compress (or not), seal under the pack key with the chunk id as
associated data; and the reverse, which checks both the AEAD tag and the chunk id.

Batches go through the native kernels of `_blobcodec` (csrc/blobcodec.c): one call per
batch, without the GIL, so per-chunk work costs no interpreter time and both cores run.
The kernels reach zstd and libsodium through the cffi modules that the zstandard and
PyNaCl packages ship. Should either be missing, the pure-Python twin below does the same
work with the same bytes on disk (it is also what the tests compare the kernels with).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import zstandard

from dedupe.crypto import OVERHEAD, open_sealed
from dedupe.crypto.aead import Buffer, seal_into
from dedupe.errors import IntegrityError
from dedupe.format.pack import COMPRESSION_NONE, COMPRESSION_ZSTD, TRAILER_RECORD
from dedupe.hashing import ChunkHasher

try:
    from dedupe.store import _blobcodec
except ImportError:  # pragma: no cover - an install without the compiled kernels
    _blobcodec = None  # type: ignore[assignment]

_RAW = bytes([COMPRESSION_NONE])
_ZSTD = bytes([COMPRESSION_ZSTD])


def _library_functions() -> dict[str, int] | None:
    """Addresses of the zstd and libsodium functions the kernels call, taken from the
    compiled cffi modules of zstandard and PyNaCl; None when either is unavailable."""
    try:
        from nacl._sodium import ffi as nacl_ffi
        from nacl._sodium import lib as nacl_lib
        from zstandard import _cffi as zstd_cffi  # type: ignore[attr-defined]
    except ImportError:
        return None

    def address(ffi: Any, lib: Any, name: str) -> int:
        return int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))

    try:
        zstd = {
            key: address(zstd_cffi.ffi, zstd_cffi.lib, name)
            for key, name in (
                ("compress", "ZSTD_compressCCtx"),
                ("decompress", "ZSTD_decompressDCtx"),
                ("is_error", "ZSTD_isError"),
                ("create_cctx", "ZSTD_createCCtx"),
                ("free_cctx", "ZSTD_freeCCtx"),
                ("create_dctx", "ZSTD_createDCtx"),
                ("free_dctx", "ZSTD_freeDCtx"),
            )
        }
        sodium = {
            "seal": address(nacl_ffi, nacl_lib, "crypto_aead_xchacha20poly1305_ietf_encrypt"),
            "open": address(nacl_ffi, nacl_lib, "crypto_aead_xchacha20poly1305_ietf_decrypt"),
        }
    except (AttributeError, TypeError):  # a renamed or missing symbol
        return None
    return zstd | sodium


def _configure_native() -> bool:
    if _blobcodec is None:
        return False
    functions = _library_functions()
    if functions is None:
        return False
    _blobcodec.configure(functions)
    return True


NATIVE_AVAILABLE = _configure_native()


def release_buffers() -> None:
    """Let go of the buffers the native codec keeps for reuse between batches (framing,
    opened chunks: up to ~40 MiB); an operation that framed or opened blobs calls this
    when it ends, so that an embedding process does not hold them while idle."""
    if NATIVE_AVAILABLE:
        _blobcodec.release_pools()


class PyFramedBatch:
    """Framed blobs of a batch, waiting to be sealed (pure-Python twin of the native
    FramedBatch: the same contract)."""

    __slots__ = ("ids", "blobs", "raw_lengths", "next")

    def __init__(self, ids: list[bytes], blobs: list[bytes], raw_lengths: list[int]) -> None:
        self.ids, self.blobs, self.raw_lengths = ids, blobs, raw_lengths
        self.next = 0

    @property
    def pending(self) -> int:
        return len(self.blobs) - self.next

    def next_sealed_size(self) -> int:
        return len(self.blobs[self.next]) + OVERHEAD if self.pending else 0

    @property
    def framed_bytes(self) -> int:
        return sum(map(len, self.blobs))


FramedBatch = Any  # PyFramedBatch, or the native _blobcodec.FramedBatch
_TRAILER_RECORD = struct.Struct(TRAILER_RECORD)
# A restore window's plan (csrc/windowplan.h, native byte order): ddp_plan_item is pack
# number, offset, stored length, raw length, place in the window's output; ddp_plan_copy
# is destination, source, length.
PLAN_ITEM = struct.Struct("=IIIIQ")
PLAN_COPY = struct.Struct("=QQQ")


def seal_batch(
    key: bytes,
    batch: FramedBatch,
    dst: bytearray,
    pos: int,
    target: int,
    records: bytearray,
) -> int:
    """Seal the batch's pending blobs into `dst` (a pack being built) from `pos`, until
    `pos` reaches `target` or the next blob does not fit in `dst`; append a trailer record
    per blob to `records`. Returns the new position (batch.pending tells what is left)."""
    if not isinstance(batch, PyFramedBatch):
        return int(_blobcodec.seal(key, batch, dst, pos, target, records))
    while batch.pending and pos < target:
        blob = batch.blobs[batch.next]
        if pos + len(blob) + OVERHEAD > len(dst):
            break
        end = seal_into(key, blob, batch.ids[batch.next], dst, pos)
        records += _TRAILER_RECORD.pack(
            batch.ids[batch.next], pos, end - pos, batch.raw_lengths[batch.next]
        )
        pos = end
        batch.next += 1
    return pos


class BlobCodec:
    """Thread-safe: each worker thread gets its own zstd contexts (and native codec).
    `native=None` uses the kernels when they are available; False forces the twin."""

    def __init__(self, level: int, hasher: ChunkHasher, native: bool | None = None) -> None:
        if native and not NATIVE_AVAILABLE:
            raise RuntimeError("the native blob codec is not available in this install")
        self.level = level
        self.hasher = hasher
        self.native = NATIVE_AVAILABLE if native is None else native
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

    def _kernel(self) -> Any:
        k = getattr(self._local, "kernel", None)
        if k is None:
            k = self._local.kernel = _blobcodec.BatchCodec(self.level)
        return k

    def frame(self, chunks: Sequence[Buffer], ids: Sequence[bytes]) -> FramedBatch:
        """Blob plaintexts for a batch of chunks (zstd when it is smaller, raw otherwise),
        ready for seal_batch. `ids` are the chunks' ids, in the same order."""
        if self.native:
            return self._kernel().frame(list(chunks), list(ids))
        compress = self._cctx().compress
        blobs = []
        for c in chunks:
            z = compress(c)
            blobs.append(_ZSTD + z if len(z) < len(c) else _RAW + bytes(c))
        return PyFramedBatch(list(ids), blobs, [len(c) for c in chunks])

    def open(self, key: bytes, chunk_id: bytes, sealed: Buffer, raw_length: int) -> bytes:
        """The chunk's bytes, checked twice: AEAD under its id, then its keyed BLAKE3."""
        what = f"chunk {chunk_id.hex()[:16]}"
        plain = open_sealed(key, sealed, chunk_id, what)
        if not plain:
            raise IntegrityError(f"{what} is empty: it lacks its compression byte")
        payload = memoryview(plain)[1:]
        if plain[0] == COMPRESSION_ZSTD:
            # zstd trusts the size a frame records, and max_output_size does not bound a
            # frame that records one: check it first, or a small authenticated blob (a
            # writer can make one) asks for gigabytes before it is refused.
            try:
                recorded = zstandard.frame_content_size(payload)
            except zstandard.ZstdError as e:
                raise IntegrityError(f"{what} is not a zstd frame: {e}") from None
            if recorded >= 0 and recorded != raw_length:
                raise IntegrityError(
                    f"{what} would decompress to {recorded} bytes, not its {raw_length}"
                )
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

    def open_many(
        self, key: bytes, data: Buffer, base: int, items: Sequence[tuple[bytes, int, int, int]]
    ) -> list[Buffer]:
        """The raw bytes of several blobs of one pack, each checked like open(). `items`
        are (chunk id, offset in the pack, stored length, raw length); `data` holds the
        pack's bytes from offset `base` on and covers every item."""
        if not self.native:
            view = memoryview(data)
            return [
                self.open(key, cid, view[off - base : off - base + stored], raw)
                for cid, off, stored, raw in items
            ]
        view, ends = self._open_native(key, data, base, items)
        return [view[s:e] for s, e in zip([0, *ends], ends, strict=False)]

    def open_joined(
        self, key: bytes, data: Buffer, base: int, items: Sequence[tuple[bytes, int, int, int]]
    ) -> tuple[memoryview, list[int]]:
        """open_many's chunks back to back in one read-only buffer, and where each ends in
        it."""
        if not self.native:
            chunks = self.open_many(key, data, base, items)
            return memoryview(b"".join(chunks)).toreadonly(), list(accumulate(map(len, chunks)))
        return self._open_native(key, data, base, items)

    def _open_native(
        self, key: bytes, data: Buffer, base: int, items: Sequence[tuple[bytes, int, int, int]]
    ) -> tuple[memoryview, list[int]]:
        """One kernel call (AEAD, decompression, lengths, ids): the joined buffer and
        where each chunk ends in it."""
        try:
            out = self._kernel().open_into(key, self.hasher.id_key, data, list(items), base)
        except _blobcodec.OpenError as e:
            cid = items[e.index][0]
            raise IntegrityError(f"chunk {cid.hex()[:16]} {e}") from None
        return memoryview(out).toreadonly(), list(accumulate(item[3] for item in items))

    def check_records(self, key: bytes, data: Buffer, records: Buffer, lo: int, hi: int) -> None:
        """Open and check (like open()) the blobs of a pack that its packed trailer
        records lo..hi-1 name (`data`: the whole pack), keeping nothing. Raises
        IntegrityError for the first that fails, ValueError if one lies outside data."""
        if not self.native:
            count, ragged = divmod(len(memoryview(records)), _TRAILER_RECORD.size)
            if ragged or not 0 <= lo <= hi <= count:
                raise ValueError("check_records: records and [lo, hi) do not agree")
            view = memoryview(records)[lo * _TRAILER_RECORD.size : hi * _TRAILER_RECORD.size]
            items = list(_TRAILER_RECORD.iter_unpack(view))
            if any(off + stored > len(data) for _cid, off, stored, _raw in items):
                raise ValueError("check_records: a blob ends after the data")
            self.open_many(key, data, 0, items)
            return
        try:
            self._kernel().open_records(key, self.hasher.id_key, data, records, lo, hi)
        except _blobcodec.OpenError as e:
            at = (lo + e.index) * _TRAILER_RECORD.size
            cid = bytes(memoryview(records)[at : at + 32])
            raise IntegrityError(f"chunk {cid.hex()[:16]} {e}") from None

    # --- a restore window (csrc/windowplan.h): chunks opened straight into their places

    def window_buffer(self, size: int) -> Any:
        """Memory for one restore window's output, filled by open_planned and
        copy_repeats, then only read."""
        if self.native:
            return _blobcodec.window_block(size)
        return bytearray(size)

    def open_planned(
        self,
        key: bytes,
        data: Buffer,
        base: int,
        ids: bytes,
        items: bytes,
        lo: int,
        hi: int,
        out: Any,
    ) -> None:
        """Open the planned chunks items[lo:hi] (PLAN_ITEM records; `ids` their ids) of
        one pack into their places in `out` (from window_buffer), each checked like
        open(). `data` holds the pack's bytes from offset `base` on."""
        if self.native:
            try:
                self._kernel().open_planned(
                    key, self.hasher.id_key, data, base, ids, items, lo, hi, out
                )
            except _blobcodec.OpenError as e:
                cid = ids[e.index * 32 : e.index * 32 + 32]
                raise IntegrityError(f"chunk {cid.hex()[:16]} {e}") from None
            return
        view, window = memoryview(data), memoryview(out)
        for i in range(lo, hi):
            _pack, offset, stored, raw, pos = PLAN_ITEM.unpack_from(items, i * PLAN_ITEM.size)
            if offset < base or offset - base + stored > len(view) or pos + raw > len(window):
                raise ValueError("open_planned: a blob or chunk lies outside its buffer")
            cid = ids[i * 32 : i * 32 + 32]
            window[pos : pos + raw] = self.open(
                key, cid, view[offset - base : offset - base + stored], raw
            )

    def copy_repeats(self, out: Any, copies: bytes) -> None:
        """Fill the window's repeated chunks (PLAN_COPY records) from their first
        occurrence, once open_planned has opened every chunk of the window."""
        if self.native:
            _blobcodec.copy_repeats(out, copies)
            return
        window = memoryview(out)
        for dst, src, length in PLAN_COPY.iter_unpack(copies):
            if max(src, dst) + length > len(window) or abs(dst - src) < length:
                raise ValueError("copy_repeats: a copy lies outside the window or overlaps")
            window[dst : dst + length] = window[src : src + length]
