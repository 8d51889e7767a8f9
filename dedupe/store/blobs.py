"""Chunks <-> blobs: compress (or not), seal under the pack key with the chunk id as
associated data; and the reverse, which checks both the AEAD tag and the chunk id.

Batches go through the native kernels of `_blobcodec` (csrc/blobcodec.c): one call per
batch, without the GIL, so per-chunk work costs no interpreter time and both cores run.
The kernels reach zstd and libsodium through the cffi modules that the zstandard and
PyNaCl packages ship. Should either be missing, the pure-Python twin below does the same
work with the same bytes on disk (it is also what the tests compare the kernels with).

Compression dictionaries (docs/FORMAT.md section 16): frame() compresses with the
Dictionary it is given (compression byte 2, the dictionary's ref in the blob); the open
paths open such blobs with the dictionaries given to add_dictionary, and raise
DictionaryNeeded for a blob whose dictionary the codec was not given.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from itertools import accumulate
from typing import Any, TypeVar

import zstandard

from dedupe.crypto import OVERHEAD, open_sealed
from dedupe.crypto.aead import Buffer, seal_into
from dedupe.errors import DictionaryNeeded, DictionaryUnusable, IntegrityError
from dedupe.format.pack import (
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    COMPRESSION_ZSTD_DICT,
    DICT_REF,
    TRAILER_RECORD,
)
from dedupe.hashing import ChunkHasher

try:
    from dedupe.store import _blobcodec
except ImportError:  # pragma: no cover - an install without the compiled kernels
    _blobcodec = None  # type: ignore[assignment]

# Distinct dictionaries the blobs of one open call may name (a backup's pack names one).
MAX_REFS_PER_CALL = 4
# Bytes of dictionaries a codec keeps (each also costs about as much again in its DDict):
# past it the least recently added go, except those an open call in progress loaded, and
# a blob that names one again has it loaded again (a few ms). A repository has one per
# name and writer key; a verify of many of them, or a writer's oversized ones, must not
# hold them all.
DICT_BUDGET = 4 << 20
# What each dictionary held costs beyond its bytes, charged against DICT_BUDGET: its
# DDict's entropy tables (~27 KB whatever the content: zstd accepts a 1-byte dictionary),
# its handle and its DictTable entry. So the budget holds at most 128 of them.
DICT_OVERHEAD = 32 << 10
_RAW = bytes([COMPRESSION_NONE])
_ZSTD = bytes([COMPRESSION_ZSTD])
_ZSTD_DICT = bytes([COMPRESSION_ZSTD_DICT])
_DICT_HEADER = 1 + DICT_REF  # compression byte and ref before a dictionary's frame


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
                ("compress_dict", "ZSTD_compress_usingCDict_advanced"),
                ("decompress_dict", "ZSTD_decompress_usingDDict"),
                ("create_cdict", "ZSTD_createCDict"),
                ("free_cdict", "ZSTD_freeCDict"),
                ("create_ddict", "ZSTD_createDDict"),
                ("free_ddict", "ZSTD_freeDDict"),
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


class Dictionary:
    """One zstd compression dictionary (docs/FORMAT.md section 16): `data`, its bytes
    (zstd's dictionary format, as zstandard.train_dictionary makes, or raw content), and
    `ref`, the 8 bytes blobs name it by. Immutable; share one between codecs and threads.

    What each path needs is made from it on first use, once, under its lock: the native
    CDict of each compression level and the native DDict (freed with the object), and the
    zstandard dictionaries of the pure-Python twin. IntegrityError, naming the ref, when
    zstd refuses its bytes."""

    __slots__ = ("_ref", "_data", "_lock", "_native", "_pure_open", "_pure_frame")

    def __init__(self, ref: bytes, data: bytes) -> None:
        if len(ref) != DICT_REF:
            raise ValueError(f"a dictionary ref is {DICT_REF} bytes, not {len(ref)}")
        self._ref = bytes(ref)
        self._data = bytes(data)
        self._lock = threading.Lock()
        self._native: Any = None  # _blobcodec.ZstdDict
        self._pure_open: zstandard.ZstdCompressionDict | None = None
        self._pure_frame: dict[int, zstandard.ZstdCompressionDict] = {}  # by level

    @property
    def ref(self) -> bytes:
        return self._ref

    @property
    def data(self) -> bytes:
        return self._data

    def __repr__(self) -> str:
        return f"Dictionary({self._ref.hex()}, {len(self._data)} bytes)"

    def _refused(self, why: object) -> IntegrityError:
        return DictionaryUnusable(
            f"compression dictionary {self._ref.hex()} is refused by zstd: {why}"
        )

    def check(self) -> None:
        """IntegrityError, naming the ref, unless zstd makes a decompression dictionary of
        its bytes (what every reader needs; verify's check of a dictionary object)."""
        if NATIVE_AVAILABLE:
            self.native_open()
        else:
            self.pure_open()

    def _handle(self) -> Any:
        if self._native is None:
            self._native = _blobcodec.ZstdDict(self._ref, self._data)
        return self._native

    def native_frame(self, level: int) -> Any:
        """The native handle, its CDict for `level` made."""
        with self._lock:
            handle = self._handle()
            try:
                handle.prepare_compress(level)
            except ValueError as e:
                raise self._refused(e) from None
            return handle

    def native_open(self) -> Any:
        """The native handle, its DDict made."""
        with self._lock:
            handle = self._handle()
            try:
                handle.prepare_decompress()
            except ValueError as e:
                raise self._refused(e) from None
            return handle

    def pure_frame(self, level: int) -> zstandard.ZstdCompressionDict:
        """The pure twin's dictionary for compressing at `level` (its CDict made: a
        zstandard dictionary holds one, whose level the compressor takes)."""
        with self._lock:
            d = self._pure_frame.get(level)
            if d is None:
                d = zstandard.ZstdCompressionDict(self._data)
                try:
                    d.precompute_compress(level=level)
                except zstandard.ZstdError as e:
                    raise self._refused(e) from None
                self._pure_frame[level] = d
            return d

    def pure_open(self) -> zstandard.ZstdCompressionDict:
        """The pure twin's dictionary for decompressing (its DDict made here, once: a
        decompressor given it makes it otherwise, unlocked)."""
        with self._lock:
            if self._pure_open is None:
                d = zstandard.ZstdCompressionDict(self._data)
                try:
                    zstandard.ZstdDecompressor(dict_data=d)
                except zstandard.ZstdError as e:
                    raise self._refused(e) from None
                self._pure_open = d
            return self._pure_open


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
_T = TypeVar("_T")
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


class _Session:
    """What the open calls of one pack loaded: the refs (at most MAX_REFS_PER_CALL), and
    those still pinned."""

    __slots__ = ("tried", "pinned")

    def __init__(self) -> None:
        self.tried: set[bytes] = set()
        self.pinned: list[bytes] = []


class BlobCodec:
    """Thread-safe: each worker thread gets its own zstd contexts (and native codec).
    `native=None` uses the kernels when they are available; False forces the twin.

    Blobs compressed with a dictionary open once it is given to add_dictionary (every
    thread sees it from then on); before, opening one raises DictionaryNeeded, unless
    `loader` is set: it is then called, in the thread that opens, with the ref of the
    missing dictionary, what it returns is added and the opening tried again (once per
    ref); what it raises goes to the caller. The codec keeps at most about DICT_BUDGET
    bytes of dictionaries: one dropped to make room is loaded again when needed."""

    loader: Callable[[bytes], Dictionary] | None = None

    def __init__(self, level: int, hasher: ChunkHasher, native: bool | None = None) -> None:
        if native and not NATIVE_AVAILABLE:
            raise RuntimeError("the native blob codec is not available in this install")
        self.level = level
        self.hasher = hasher
        self.native = NATIVE_AVAILABLE if native is None else native
        self._local = threading.local()
        # The dictionaries to open with: (by ref, refs made unusable, the native kernel's
        # DictTable or None), replaced whole under _dict_lock, read without it.
        self._dict_lock = threading.Lock()
        self._dicts: tuple[dict[bytes, Dictionary], frozenset[bytes], Any] = (
            {},
            frozenset(),
            None,
        )
        # Refs that open calls in progress loaded (how many calls each): never dropped,
        # or a call that needs several could lose the first while loading the next.
        self._pinned: dict[bytes, int] = {}
        # The content digest of every ref ever added, dropped or not: a second dictionary
        # under a ref makes it unusable even once the first has been dropped.
        self._seen: dict[bytes, bytes] = {}

    def add_dictionary(self, d: Dictionary) -> None:
        """Open blobs that name d.ref with d, in every thread from now on. Adding it
        again, or another Dictionary with the same bytes, changes nothing. Adding one with
        the same ref and different bytes makes that ref unusable for good: a blob naming
        it then raises IntegrityError ("two dictionaries have ref ..."), never opens with
        either (FORMAT.md section 16; the caller checks this too). IntegrityError when
        zstd refuses d's bytes (the codec is then unchanged). Past DICT_BUDGET, the least
        recently added dictionaries that no open call pins are dropped."""
        with self._dict_lock:
            self._add(d)

    def _add(self, d: Dictionary) -> None:
        """add_dictionary, under _dict_lock."""
        by_ref, unusable, _table = self._dicts
        have = by_ref.get(d.ref)
        if d.ref in unusable or have is d or (have is not None and have.data == d.data):
            return
        digest = hashlib.blake2b(d.data, digest_size=16).digest()
        seen = self._seen.get(d.ref)
        by_ref = dict(by_ref)
        if have is None and seen in (None, digest):
            if self.native:
                d.native_open()
            else:
                d.pure_open()
            self._seen[d.ref] = digest  # only once zstd took it: a refusal changes nothing
            by_ref[d.ref] = d
            self._drop_past_budget(by_ref)
        else:  # another dictionary has this ref (held now, or dropped since)
            by_ref.pop(d.ref, None)
            unusable = unusable | {d.ref}
        self._publish(by_ref, unusable)

    def _drop_past_budget(self, by_ref: dict[bytes, Dictionary]) -> bool:
        """Drop the oldest of `by_ref`, but the newest and pinned refs, until it holds no
        more than DICT_BUDGET bytes, or only those. Whether any was dropped."""
        held = sum(len(x.data) + DICT_OVERHEAD for x in by_ref.values())
        dropped = False
        for ref in list(by_ref)[:-1]:  # oldest first
            if held <= DICT_BUDGET:
                break
            if ref not in self._pinned:
                held -= len(by_ref.pop(ref).data) + DICT_OVERHEAD
                dropped = True
        return dropped

    def _publish(self, by_ref: dict[bytes, Dictionary], unusable: frozenset[bytes]) -> None:
        """Make these the dictionaries every thread opens with (under _dict_lock)."""
        table = None
        if self.native and (by_ref or unusable):
            table = _blobcodec.DictTable(
                [(ref, x.native_open()) for ref, x in by_ref.items()]
                + [(ref, None) for ref in sorted(unusable)]
            )
        self._dicts = (by_ref, unusable, table)

    def dictionary(self, ref: bytes) -> Dictionary | None:
        """The dictionary blobs naming `ref` open with; None when none was added, or the
        ref is unusable (two were)."""
        return self._dicts[0].get(ref)

    def _unusable(self, chunk_id: bytes, ref: bytes) -> IntegrityError:
        return DictionaryUnusable(
            f"chunk {chunk_id.hex()[:16]} names compression dictionary {ref.hex()}, which"
            f" cannot be used: two dictionaries have ref {ref.hex()}"
        )

    def _opener(self, chunk_id: bytes, ref: bytes) -> zstandard.ZstdDecompressor:
        """This thread's decompressor for the dictionary of `ref`."""
        by_ref, unusable, _table = self._dicts
        d = by_ref.get(ref)
        if d is None:
            if ref in unusable:
                raise self._unusable(chunk_id, ref)
            raise DictionaryNeeded(chunk_id, ref)
        cache = getattr(self._local, "dict_dctx", None)
        if cache is None:
            cache = self._local.dict_dctx = {}
        held = cache.get(ref)
        if held is None or held[0] is not d:
            for gone in [r for r in cache if r not in by_ref]:  # dropped from the codec
                del cache[gone]
            held = cache[ref] = (d, zstandard.ZstdDecompressor(dict_data=d.pure_open()))
        return held[1]

    def _framer(self, d: Dictionary) -> zstandard.ZstdCompressor:
        """This thread's compressor for `d`: content size recorded, no dictionary id."""
        held = getattr(self._local, "dict_cctx", None)
        if held is None or held[0] is not d:
            c = zstandard.ZstdCompressor(
                level=self.level,
                dict_data=d.pure_frame(self.level),
                write_content_size=True,
                write_checksum=False,
                write_dict_id=False,
            )
            held = self._local.dict_cctx = (d, c)
        return held[1]

    @contextmanager
    def one_pack(self) -> Iterator[None]:
        """Blobs of one pack opened in several calls on this thread (a check blob by blob,
        the pure twin's loops) count as one call: the dictionaries they load stay pinned
        until the block ends, and together they may name at most MAX_REFS_PER_CALL
        (otherwise a pack cycling through more dictionaries than the budget holds would
        cost a load per blob)."""
        if getattr(self._local, "session", None) is not None:
            yield  # already inside one
            return
        session = self._local.session = _Session()
        try:
            yield
        finally:
            self._local.session = None
            self._unpin(session)

    def _loading(self, go: Callable[[], _T]) -> _T:
        """go(), with each dictionary it lacks loaded by `loader` and go() tried again.
        One call (or one_pack block) opens the blobs of one pack, which a backup
        compressed with one dictionary: blobs naming more than MAX_REFS_PER_CALL are
        refused, rather than paying a load and a rerun of the batch each (a writer could
        make every blob of a pack name another dictionary)."""
        session = getattr(self._local, "session", None)
        mine = session is None
        if session is None:
            session = _Session()
        try:
            while True:
                try:
                    return go()
                except DictionaryNeeded as e:
                    loader = self.loader
                    if loader is None or e.ref in session.tried:
                        raise
                    if len(session.tried) >= MAX_REFS_PER_CALL:
                        raise DictionaryUnusable(
                            f"chunk {e.chunk_id.hex()[:16]} names a compression dictionary"
                            f" after {len(session.tried)} others in blobs opened together:"
                            " no backup makes a pack so; its blobs are refused"
                        ) from None
                    session.tried.add(e.ref)
                    d = loader(e.ref)
                    with self._dict_lock:
                        self._pinned[e.ref] = self._pinned.get(e.ref, 0) + 1
                        session.pinned.append(e.ref)
                        self._add(d)
        finally:
            if mine:
                self._unpin(session)

    def _unpin(self, session: _Session) -> None:
        """Let go of what `session` pinned, and drop what the pins held over the budget."""
        if not session.pinned:
            return
        with self._dict_lock:
            for ref in session.pinned:
                left = self._pinned.pop(ref) - 1
                if left:
                    self._pinned[ref] = left
            by_ref, unusable, _table = self._dicts
            by_ref = dict(by_ref)
            if self._drop_past_budget(by_ref):
                self._publish(by_ref, unusable)

    def _failed(self, e: Exception, chunk_id: bytes) -> IntegrityError:
        """What a native OpenError for chunk_id means."""
        if getattr(e, "code", None) == _blobcodec.ENODICT:
            return DictionaryNeeded(chunk_id, e.ref)  # type: ignore[attr-defined]
        return IntegrityError(f"chunk {chunk_id.hex()[:16]} {e}")

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

    def frame(
        self,
        chunks: Sequence[Buffer],
        ids: Sequence[bytes],
        dictionary: Dictionary | None = None,
    ) -> FramedBatch:
        """Blob plaintexts for a batch of chunks (zstd when it is smaller, raw otherwise),
        ready for seal_batch. `ids` are the chunks' ids, in the same order. With a
        dictionary, zstd with it: 2 || ref || frame (content size recorded, no dictionary
        id) when that is smaller than 0 || chunk. Opening them takes add_dictionary."""
        if self.native:
            if dictionary is None:
                return self._kernel().frame(list(chunks), list(ids))
            handle = dictionary.native_frame(self.level)
            return self._kernel().frame(list(chunks), list(ids), handle)
        blobs = []
        if dictionary is None:
            compress = self._cctx().compress
            for c in chunks:
                z = compress(c)
                blobs.append(_ZSTD + z if len(z) < len(c) else _RAW + bytes(c))
        else:
            compress = self._framer(dictionary).compress
            head = _ZSTD_DICT + dictionary.ref
            for c in chunks:
                z = compress(c)
                fits = _DICT_HEADER + len(z) < 1 + len(c)
                blobs.append(head + z if fits else _RAW + bytes(c))
        return PyFramedBatch(list(ids), blobs, [len(c) for c in chunks])

    def open(self, key: bytes, chunk_id: bytes, sealed: Buffer, raw_length: int) -> bytes:
        """The chunk's bytes, checked twice: AEAD under its id, then its keyed BLAKE3."""
        return self._loading(lambda: self._open(key, chunk_id, sealed, raw_length))

    def _open(self, key: bytes, chunk_id: bytes, sealed: Buffer, raw_length: int) -> bytes:
        return self._open_as_stored(key, chunk_id, sealed, raw_length)[0]

    def _open_as_stored(
        self, key: bytes, chunk_id: bytes, sealed: Buffer, raw_length: int
    ) -> tuple[bytes, bytes | None]:
        """The chunk's bytes (checked as open() does) and the ref of the dictionary its
        blob was compressed with (None: none)."""
        what = f"chunk {chunk_id.hex()[:16]}"
        ref = None
        plain = open_sealed(key, sealed, chunk_id, what)
        if not plain:
            raise IntegrityError(f"{what} is empty: it lacks its compression byte")
        payload = memoryview(plain)[1:]
        if plain[0] == COMPRESSION_ZSTD:
            data = self._decompress(what, self._dctx(), payload, raw_length)
        elif plain[0] == COMPRESSION_NONE:
            data = bytes(payload)
        elif plain[0] == COMPRESSION_ZSTD_DICT:
            if len(payload) < DICT_REF:
                raise IntegrityError(f"{what} is too short to name its dictionary")
            ref = bytes(payload[:DICT_REF])
            opener = self._opener(chunk_id, ref)
            data = self._decompress(what, opener, payload[DICT_REF:], raw_length)
        else:
            raise IntegrityError(f"{what} has an unknown compression byte {plain[0]}")
        if len(data) != raw_length or self.hasher.chunk_id(data) != chunk_id:
            raise IntegrityError(f"{what} does not match its id: its content is wrong")
        return data, ref

    @staticmethod
    def _decompress(
        what: str, dctx: zstandard.ZstdDecompressor, frame: memoryview, raw_length: int
    ) -> bytes:
        # zstd trusts the size a frame records, and max_output_size does not bound a
        # frame that records one: check it first, or a small authenticated blob (a
        # writer can make one) asks for gigabytes before it is refused.
        try:
            recorded = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"{what} is not a zstd frame: {e}") from None
        if recorded >= 0 and recorded != raw_length:
            raise IntegrityError(
                f"{what} would decompress to {recorded} bytes, not its {raw_length}"
            )
        try:
            data: bytes = dctx.decompress(frame, max_output_size=raw_length)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"{what} does not decompress: {e}") from None
        return data

    def open_many(
        self, key: bytes, data: Buffer, base: int, items: Sequence[tuple[bytes, int, int, int]]
    ) -> list[Buffer]:
        """The raw bytes of several blobs of one pack, each checked like open(). `items`
        are (chunk id, offset in the pack, stored length, raw length); `data` holds the
        pack's bytes from offset `base` on and covers every item."""
        if not self.native:
            view = memoryview(data)
            with self.one_pack():
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

    def open_as_stored(
        self, key: bytes, data: Buffer, base: int, items: Sequence[tuple[bytes, int, int, int]]
    ) -> tuple[list[Buffer], list[bytes | None]]:
        """open_many's chunks, and for each the ref of the dictionary its blob was
        compressed with (None: none): prune's repack compresses a chunk again as it was."""
        if not self.native:
            view = memoryview(data)
            chunks: list[Buffer] = []
            refs: list[bytes | None] = []

            def one(cid: bytes, blob: memoryview, raw: int) -> None:
                chunk, ref = self._open_as_stored(key, cid, blob, raw)
                chunks.append(chunk)
                refs.append(ref)

            with self.one_pack():
                for cid, off, stored, raw in items:
                    blob = view[off - base : off - base + stored]
                    self._loading(partial(one, cid, blob, raw))
            return chunks, refs
        how = bytearray(len(items) * _blobcodec.HOW_BYTES)
        view, ends = self._open_native(key, data, base, items, how)
        step = _blobcodec.HOW_BYTES
        refs = [
            bytes(how[i + 1 : i + step]) if how[i] == COMPRESSION_ZSTD_DICT else None
            for i in range(0, len(how), step)
        ]
        return [view[s:e] for s, e in zip([0, *ends], ends, strict=False)], refs

    def _open_native(
        self,
        key: bytes,
        data: Buffer,
        base: int,
        items: Sequence[tuple[bytes, int, int, int]],
        how: bytearray | None = None,
    ) -> tuple[memoryview, list[int]]:
        """One kernel call (AEAD, decompression, lengths, ids): the joined buffer and
        where each chunk ends in it (with `how`: each blob's compression byte and ref)."""

        def go() -> Any:
            try:
                return self._kernel().open_into(
                    key, self.hasher.id_key, data, list(items), base, self._dicts[2], how
                )
            except _blobcodec.OpenError as e:
                raise self._failed(e, items[e.index][0]) from None

        out = self._loading(go)
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

        def go() -> None:
            try:
                self._kernel().open_records(
                    key, self.hasher.id_key, data, records, lo, hi, self._dicts[2]
                )
            except _blobcodec.OpenError as e:
                at = (lo + e.index) * _TRAILER_RECORD.size
                raise self._failed(e, bytes(memoryview(records)[at : at + 32])) from None

        self._loading(go)

    # --- a restore window (csrc/windowplan.h): chunks opened straight into their places

    def window_buffer(self, size: int) -> Any:
        """Memory for one restore window's output, filled by open_planned and
        copy_repeats, then only read. It starts at a multiple of window_align."""
        if self.native:
            return _blobcodec.window_block(size)
        return bytearray(size)

    @property
    def window_align(self) -> int:
        """What window_buffer's memory is aligned to: the page size with the native
        kernels, 0 (unknown) otherwise."""
        return _blobcodec.WINDOW_ALIGN if self.native else 0

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

            def go() -> None:
                try:
                    self._kernel().open_planned(
                        key, self.hasher.id_key, data, base, ids, items, lo, hi, out, self._dicts[2]
                    )
                except _blobcodec.OpenError as e:
                    raise self._failed(e, ids[e.index * 32 : e.index * 32 + 32]) from None

            self._loading(go)
            return
        view, window = memoryview(data), memoryview(out)
        with self.one_pack():
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
