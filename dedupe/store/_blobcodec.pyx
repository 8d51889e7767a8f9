# cython: language_level=3
"""Thin wrapper over csrc/blobcodec.c: batches of chunks -> sealed blobs and back, one
call per batch without the GIL. Contracts are in csrc/blobcodec.h; the Python-visible API
is typed in _blobcodec.pyi; dedupe.store.blobs chooses between this and its pure-Python
twin.

zstd and libsodium are reached through function pointers handed to configure() (the
caller takes them from the cffi modules of zstandard and PyNaCl), so this module links
against neither library.

Compression dictionaries (docs/FORMAT.md section 16): a ZstdDict owns one dictionary's
zstd handles (a CDict per compression level, a DDict), made on first use and freed with
it; a DictTable is the set a codec opens blobs with, handed to each open call."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_GET_SIZE,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

from dedupe.chunking._fastcdc cimport _Block, _free_block
from dedupe.store._windowplan cimport ddp_plan_copy, ddp_plan_item

import mmap
import os


cdef extern from "blobcodec.h" nogil:
    ctypedef struct ddp_codec_frame_params:
        int content_size_flag
        int checksum_flag
        int no_dict_id_flag
    ctypedef struct ddp_codec_dict:
        uint8_t ref[8]
        const void *ddict
    ctypedef struct ddp_codec_api:
        size_t (*compress)(void *, void *, size_t, const void *, size_t, int)
        size_t (*decompress)(void *, void *, size_t, const void *, size_t)
        unsigned (*is_error)(size_t)
        size_t (*decompress_dict)(void *, void *, size_t, const void *, size_t, const void *)
        size_t (*compress_dict)(void *, void *, size_t, const void *, size_t, const void *,
                                ddp_codec_frame_params)
        int (*seal)(unsigned char *, unsigned long long *, const unsigned char *,
                    unsigned long long, const unsigned char *, unsigned long long,
                    const unsigned char *, const unsigned char *, const unsigned char *)
        int (*open)(unsigned char *, unsigned long long *, unsigned char *,
                    const unsigned char *, unsigned long long, const unsigned char *,
                    unsigned long long, const unsigned char *, const unsigned char *)
    size_t DDP_CODEC_ID_BYTES
    size_t DDP_CODEC_KEY_BYTES
    size_t DDP_CODEC_NONCE_BYTES
    size_t DDP_CODEC_OVERHEAD
    size_t DDP_CODEC_TRAILER_RECORD
    size_t DDP_CODEC_REF_BYTES
    size_t DDP_CODEC_HOW_BYTES
    int DDP_CODEC_OK
    int DDP_CODEC_EAUTH
    int DDP_CODEC_EFORMAT
    int DDP_CODEC_EDECOMPRESS
    int DDP_CODEC_ELENGTH
    int DDP_CODEC_ENOMEM
    int DDP_CODEC_ENODICT
    int DDP_CODEC_EDICT
    void ddp_codec_frame(const ddp_codec_api *api, void *cctx, int level, const void *cdict,
                         const uint8_t *ref, size_t n, const uint8_t *const *src,
                         const size_t *len, uint8_t *out, size_t *framed_len)
    long ddp_codec_seal(const ddp_codec_api *api, const uint8_t *key, size_t n,
                        const uint8_t *framed, const size_t *framed_len, const uint8_t *ids,
                        const uint32_t *raw_len, const uint8_t *nonces, uint8_t *dst,
                        size_t dst_cap, size_t *pos, size_t target, uint8_t *records)
    int DDP_CODEC_EID
    int ddp_codec_open(const ddp_codec_api *api, void *dctx, const ddp_codec_dict *dicts,
                       size_t n_dicts, const uint8_t *key, const uint8_t *id_key, size_t n,
                       const uint8_t *src, const size_t *offset, const uint32_t *stored_len,
                       const uint32_t *raw_len, const uint8_t *ids, uint8_t *out,
                       const uint64_t *out_pos, size_t *failed, uint8_t *ref_out,
                       uint8_t *how)


ctypedef void *(*create_fn)() noexcept nogil
ctypedef size_t (*free_fn)(void *) noexcept nogil
ctypedef void *(*create_cdict_fn)(const void *, size_t, int) noexcept nogil
ctypedef void *(*create_ddict_fn)(const void *, size_t) noexcept nogil

cdef ddp_codec_api _api
cdef create_fn _create_cctx = NULL
cdef create_fn _create_dctx = NULL
cdef free_fn _free_cctx = NULL
cdef free_fn _free_dctx = NULL
cdef create_cdict_fn _create_cdict = NULL
cdef free_fn _free_cdict = NULL
cdef create_ddict_fn _create_ddict = NULL
cdef free_fn _free_ddict = NULL
cdef bint _configured = False

OVERHEAD = DDP_CODEC_OVERHEAD
TRAILER_RECORD = DDP_CODEC_TRAILER_RECORD
REF_BYTES = DDP_CODEC_REF_BYTES
HOW_BYTES = DDP_CODEC_HOW_BYTES
# Codes of OpenError for a blob whose dictionary is missing (ENODICT: the codec was not
# given it) or unusable (EDICT: two different dictionaries have its ref); .ref names it.
ENODICT = DDP_CODEC_ENODICT
EDICT = DDP_CODEC_EDICT

# Why open_into failed, by code: (what is wrong with the blob).
OPEN_ERRORS = {
    DDP_CODEC_EAUTH: "does not authenticate: it was damaged or does not belong here",
    DDP_CODEC_EFORMAT: "is malformed (too short, or an unknown compression byte)",
    DDP_CODEC_EDECOMPRESS: "does not decompress",
    DDP_CODEC_ELENGTH: "does not have its recorded length",
    DDP_CODEC_EID: "does not match its id: its content is wrong",
    DDP_CODEC_ENODICT: "needs a compression dictionary that is not loaded",
    DDP_CODEC_EDICT: "names a compression dictionary that cannot be used",
}


class OpenError(Exception):
    """A blob of a batch failed to open: .index is its position, .code the reason, .ref
    the dictionary ref it names when the reason is ENODICT or EDICT (else None)."""

    def __init__(self, int code, Py_ssize_t index, ref=None):
        if code == DDP_CODEC_ENODICT:
            what = f"needs compression dictionary {ref.hex()}, which is not loaded"
        elif code == DDP_CODEC_EDICT:
            what = (f"names compression dictionary {ref.hex()}, which cannot be used:"
                    f" two dictionaries have ref {ref.hex()}")
        else:
            what = OPEN_ERRORS.get(code, f"failed (code {code})")
        super().__init__(what)
        self.code = code
        self.index = index
        self.ref = ref


cdef void *_address(object value) except NULL:
    cdef uintptr_t a = <uintptr_t>value  # the integer's value, not the object's address
    if a == 0:
        raise ValueError("configure: a function address is 0")
    return <void *>a


def configure(dict functions):
    """Install the library functions, as addresses: compress, decompress, is_error,
    create_cctx, free_cctx, create_dctx, free_dctx, and for dictionaries compress_dict,
    decompress_dict, create_cdict, free_cdict, create_ddict, free_ddict (zstd) and seal,
    open (libsodium's XChaCha20-Poly1305-IETF encrypt / decrypt). Called once, before any
    other use."""
    global _create_cctx, _create_dctx, _free_cctx, _free_dctx, _configured
    global _create_cdict, _free_cdict, _create_ddict, _free_ddict
    cdef dict f = {k: int(v) for k, v in functions.items()}
    for name in ("compress", "decompress", "is_error", "seal", "open", "create_cctx",
                 "free_cctx", "create_dctx", "free_dctx", "compress_dict",
                 "decompress_dict", "create_cdict", "free_cdict", "create_ddict",
                 "free_ddict"):
        if not f.get(name):
            raise ValueError(f"configure: no address for {name}")
    _api.compress = <size_t (*)(void *, void *, size_t, const void *, size_t, int) noexcept nogil>_address(f["compress"])
    _api.decompress = <size_t (*)(void *, void *, size_t, const void *, size_t) noexcept nogil>_address(f["decompress"])
    _api.is_error = <unsigned (*)(size_t) noexcept nogil>_address(f["is_error"])
    _api.seal = <int (*)(unsigned char *, unsigned long long *, const unsigned char *, unsigned long long, const unsigned char *, unsigned long long, const unsigned char *, const unsigned char *, const unsigned char *) noexcept nogil>_address(f["seal"])
    _api.open = <int (*)(unsigned char *, unsigned long long *, unsigned char *, const unsigned char *, unsigned long long, const unsigned char *, unsigned long long, const unsigned char *, const unsigned char *) noexcept nogil>_address(f["open"])
    _create_cctx = <create_fn>_address(f["create_cctx"])
    _free_cctx = <free_fn>_address(f["free_cctx"])
    _create_dctx = <create_fn>_address(f["create_dctx"])
    _free_dctx = <free_fn>_address(f["free_dctx"])
    _api.compress_dict = <size_t (*)(void *, void *, size_t, const void *, size_t, const void *, ddp_codec_frame_params) noexcept nogil>_address(f["compress_dict"])
    _api.decompress_dict = <size_t (*)(void *, void *, size_t, const void *, size_t, const void *) noexcept nogil>_address(f["decompress_dict"])
    _create_cdict = <create_cdict_fn>_address(f["create_cdict"])
    _free_cdict = <free_fn>_address(f["free_cdict"])
    _create_ddict = <create_ddict_fn>_address(f["create_ddict"])
    _free_ddict = <free_fn>_address(f["free_ddict"])
    _configured = True


cdef inline uint32_t _le32(const uint8_t *p) noexcept nogil:
    return <uint32_t>p[0] | <uint32_t>p[1] << 8 | <uint32_t>p[2] << 16 | <uint32_t>p[3] << 24


cdef const uint8_t *_key_ptr(bytes key) except NULL:
    if PyBytes_GET_SIZE(key) != <Py_ssize_t>DDP_CODEC_KEY_BYTES:
        raise ValueError("a key is 32 bytes")
    return <const uint8_t *>PyBytes_AS_STRING(key)


cdef struct _LevelCDict:
    int level
    void *cdict


cdef class ZstdDict:
    """One compression dictionary's zstd handles: a CDict per compression level asked
    for and a DDict, each made on first use (under the GIL, which this class never lets
    go of while it makes one: two threads cannot both make it) and freed with the object.
    ValueError when zstd refuses the dictionary's bytes."""

    cdef readonly bytes ref
    cdef bytes _data
    cdef void *_ddict
    cdef _LevelCDict *_cdicts
    cdef Py_ssize_t _n_cdicts

    def __cinit__(self, bytes ref not None, bytes data not None):
        if not _configured:
            raise RuntimeError("dedupe.store._blobcodec.configure() was not called")
        if PyBytes_GET_SIZE(ref) != <Py_ssize_t>DDP_CODEC_REF_BYTES:
            raise ValueError("a dictionary ref is 8 bytes")
        self.ref = ref
        self._data = data

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self._n_cdicts):
            _free_cdict(self._cdicts[i].cdict)
        free(self._cdicts)
        if self._ddict != NULL:
            _free_ddict(self._ddict)

    cdef void *_cdict(self, int level) except NULL:
        cdef Py_ssize_t i
        for i in range(self._n_cdicts):
            if self._cdicts[i].level == level:
                return self._cdicts[i].cdict
        cdef _LevelCDict *grown = <_LevelCDict *>realloc(
            self._cdicts, (self._n_cdicts + 1) * sizeof(_LevelCDict))
        if grown == NULL:
            raise MemoryError()
        self._cdicts = grown
        cdef void *c = _create_cdict(PyBytes_AS_STRING(self._data),
                                     <size_t>PyBytes_GET_SIZE(self._data), level)
        if c == NULL:
            raise ValueError(
                f"zstd refuses compression dictionary {self.ref.hex()} (level {level})")
        self._cdicts[self._n_cdicts].level = level
        self._cdicts[self._n_cdicts].cdict = c
        self._n_cdicts += 1
        return c

    cdef const void *_get_ddict(self) except NULL:
        if self._ddict == NULL:
            self._ddict = _create_ddict(PyBytes_AS_STRING(self._data),
                                        <size_t>PyBytes_GET_SIZE(self._data))
            if self._ddict == NULL:
                raise ValueError(f"zstd refuses compression dictionary {self.ref.hex()}")
        return self._ddict

    def prepare_compress(self, int level):
        """Make the CDict for `level` now (frame() makes it otherwise)."""
        self._cdict(level)

    def prepare_decompress(self):
        """Make the DDict now (a DictTable makes it otherwise)."""
        self._get_ddict()


cdef class DictTable:
    """The dictionaries a codec opens blobs with, as the kernel takes them: built from
    (ref, ZstdDict or None) pairs, None marking a ref that cannot be used (two
    dictionaries have it). Immutable: a codec given another dictionary builds a new one."""

    cdef ddp_codec_dict *_entries
    cdef size_t _n
    cdef tuple _keep  # the ZstdDicts whose DDicts _entries point to

    def __cinit__(self, list entries not None):
        cdef Py_ssize_t n = len(entries), i
        cdef ZstdDict d
        self._entries = <ddp_codec_dict *>malloc((n or 1) * sizeof(ddp_codec_dict))
        if self._entries == NULL:
            raise MemoryError()
        cdef bytes ref
        keep = []
        for i in range(n):
            ref, handle = entries[i]
            if PyBytes_GET_SIZE(ref) != <Py_ssize_t>DDP_CODEC_REF_BYTES:
                raise ValueError("a dictionary ref is 8 bytes")
            memcpy(self._entries[i].ref, PyBytes_AS_STRING(ref), DDP_CODEC_REF_BYTES)
            if handle is None:
                self._entries[i].ddict = NULL
            else:
                d = <ZstdDict?>handle
                if d.ref != ref:
                    raise ValueError("DictTable: a dictionary listed under another ref")
                self._entries[i].ddict = d._get_ddict()
                keep.append(d)
        self._n = <size_t>n
        self._keep = tuple(keep)

    def __dealloc__(self):
        free(self._entries)

    def __len__(self):
        return self._n


# Framing buffers and blocks of opened chunks are recycled through _free_block (the
# chunker's pool rule: reused only once nothing refers to them): a fresh allocation per
# batch costs a page fault per 4 KiB page, more than the work done in it. The pools are
# shared by every thread (the GIL guards them) and emptied when an operation ends.
cdef enum:
    _FRAMING_KEEP = 4  # framing buffers kept for reuse (~2 MiB each)
    _OPENED_KEEP = 16  # blocks of opened chunks kept for reuse (~1-2 MiB each)
    _WINDOW_KEEP = 4  # restore windows kept for reuse (~8 MiB each: two ahead, one
                      # being filled, one being written)
# Where window blocks start: a multiple of the page size, what O_DIRECT asks of memory.
WINDOW_ALIGN = mmap.PAGESIZE
cdef size_t _WINDOW_ALIGN = WINDOW_ALIGN
cdef list _framing_pool = []
cdef list _opened_pool = []
cdef list _window_pool = []


def release_pools():
    """Let go of the buffers kept for reuse (an operation calls this when it is done);
    those still in use are freed once unreferenced."""
    del _framing_pool[:]
    del _opened_pool[:]
    del _window_pool[:]


cdef class FramedBatch:
    """Framed blobs of a batch of chunks, waiting to be sealed; sealing may take several
    calls (a pack fills up), `pending` counts the blobs not sealed yet."""

    cdef _Block _framed  # the framed blobs back to back (.size of them)
    cdef bytes _ids
    cdef size_t *_len
    cdef uint32_t *_raw
    cdef size_t _n
    cdef size_t _next
    cdef size_t _offset  # of blob _next in _framed

    def __dealloc__(self):
        free(self._len)
        free(self._raw)

    @property
    def pending(self):
        return self._n - self._next

    @property
    def framed_bytes(self):
        """Bytes of all its framed blobs (before sealing)."""
        return self._framed.size if self._framed is not None else 0

    def next_sealed_size(self):
        """Bytes the next blob takes once sealed (0 when none is left)."""
        if self._next >= self._n:
            return 0
        return self._len[self._next] + DDP_CODEC_OVERHEAD


cdef int _open_failed(int rc, Py_ssize_t index, const uint8_t *ref_out) except -1:
    """Raise what a failed ddp_codec_open call means."""
    if rc == DDP_CODEC_ENOMEM:
        raise MemoryError()
    if rc == DDP_CODEC_ENODICT or rc == DDP_CODEC_EDICT:
        raise OpenError(rc, index, PyBytes_FromStringAndSize(<const char *>ref_out,
                                                             DDP_CODEC_REF_BYTES))
    raise OpenError(rc, index)


cdef class BatchCodec:
    """One thread's codec: a zstd compression and decompression context. Use one per
    thread (contexts are not shared); the kernels run without the GIL."""

    cdef void *_cctx
    cdef void *_dctx
    cdef int _level

    def __cinit__(self, int level):
        if not _configured:
            raise RuntimeError("dedupe.store._blobcodec.configure() was not called")
        self._level = level
        self._cctx = _create_cctx()
        self._dctx = _create_dctx()
        if self._cctx == NULL or self._dctx == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self._cctx != NULL:
            _free_cctx(self._cctx)
        if self._dctx != NULL:
            _free_dctx(self._dctx)

    def frame(self, list chunks, list ids, ZstdDict dictionary=None):
        """Frame chunks (buffers; ids: their 32-byte ids, same order) for sealing; with a
        dictionary, compressed with it (compression byte 2) when that is smaller."""
        cdef Py_ssize_t n = len(chunks), i, got = 0
        cdef size_t total = 0
        cdef uint8_t *out_p
        cdef const void *cdict = NULL
        cdef const uint8_t *ref = NULL
        if len(ids) != n:
            raise ValueError("frame: as many ids as chunks are needed")
        if dictionary is not None:
            cdict = dictionary._cdict(self._level)
            ref = <const uint8_t *>PyBytes_AS_STRING(dictionary.ref)
        cdef FramedBatch b = FramedBatch.__new__(FramedBatch)
        b._ids = b"".join(ids)
        if PyBytes_GET_SIZE(b._ids) != n * <Py_ssize_t>DDP_CODEC_ID_BYTES:
            raise ValueError("frame: every id is 32 bytes")
        b._n = n
        b._len = <size_t *>malloc((n or 1) * sizeof(size_t))
        b._raw = <uint32_t *>malloc((n or 1) * sizeof(uint32_t))
        cdef Py_buffer *views = <Py_buffer *>malloc((n or 1) * sizeof(Py_buffer))
        cdef const uint8_t **src = <const uint8_t **>malloc((n or 1) * sizeof(uint8_t *))
        cdef size_t *lens = <size_t *>malloc((n or 1) * sizeof(size_t))
        try:
            if not (b._len and b._raw and views and src and lens):
                raise MemoryError()
            for i in range(n):
                PyObject_GetBuffer(chunks[i], &views[i], PyBUF_SIMPLE)
                got += 1
                if <size_t>views[i].len > 0xFFFFFFFF:
                    raise ValueError("frame: a chunk is larger than 4 GiB")
                src[i] = <const uint8_t *>views[i].buf
                lens[i] = <size_t>views[i].len
                b._raw[i] = <uint32_t>views[i].len
                total += lens[i] + 1
            b._framed = _free_block(_framing_pool, total, _FRAMING_KEEP)
            out_p = <uint8_t *>b._framed.data
            with nogil:
                ddp_codec_frame(&_api, self._cctx, self._level, cdict, ref, n, src, lens,
                                out_p, b._len)
            b._framed.size = 0
            for i in range(n):
                b._framed.size += b._len[i]
        finally:
            for i in range(got):
                PyBuffer_Release(&views[i])
            free(views)
            free(<void *>src)
            free(lens)
        return b

    def open_into(self, bytes key, bytes id_key, data, list items, Py_ssize_t base,
                  DictTable dicts=None, bytearray how=None):
        """Open blobs of one pack: items are (chunk id, offset in pack, stored length, raw
        length); `data` holds the pack's bytes from offset `base`. Returns their raw bytes
        back to back in a read-only block (dedupe.chunking.Block; checked: AEAD, length
        and the keyed id under `id_key`), whose memory is reused only once nothing refers
        to it. Blobs of compression byte 2 are opened with `dicts`. Raises OpenError
        naming the first blob that fails. With `how` (HOW_BYTES per item), each blob's
        compression byte and the ref it named (zeros for none) are written there."""
        cdef Py_ssize_t n = len(items), i
        cdef const uint8_t *k = _key_ptr(key)
        cdef const uint8_t *ik = _key_ptr(id_key)
        cdef size_t total = 0, failed = 0, end
        cdef int rc
        cdef Py_buffer view
        cdef bytes ids
        cdef const uint8_t *ids_p
        cdef uint8_t *out_p
        cdef _Block out
        cdef uint8_t ref_out[8]
        cdef const ddp_codec_dict *dp = NULL
        cdef size_t nd = 0
        cdef uint8_t *how_p = NULL
        if dicts is not None:
            dp, nd = dicts._entries, dicts._n
        if how is not None:
            if len(how) != n * DDP_CODEC_HOW_BYTES:
                raise ValueError(f"open_into: how holds {DDP_CODEC_HOW_BYTES} bytes an item")
            if n:
                how_p = <uint8_t *>PyByteArray_AS_STRING(how)
        cdef size_t *offset = <size_t *>malloc((n or 1) * sizeof(size_t))
        cdef uint32_t *stored = <uint32_t *>malloc((n or 1) * sizeof(uint32_t))
        cdef uint32_t *raw = <uint32_t *>malloc((n or 1) * sizeof(uint32_t))
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if not (offset and stored and raw):
                raise MemoryError()
            id_list = []
            for i in range(n):
                cid, off, st, rl = items[i]
                if len(cid) != 32:
                    raise ValueError("open_into: a chunk id is 32 bytes")
                id_list.append(cid)
                if off < base:
                    raise ValueError("open_into: a blob starts before the data")
                offset[i] = <size_t>(off - base)
                stored[i] = <uint32_t>st
                raw[i] = <uint32_t>rl
                end = offset[i] + stored[i]
                if end > <size_t>view.len:
                    raise ValueError("open_into: a blob ends after the data")
                total += raw[i]
            ids = b"".join(id_list)
            ids_p = <const uint8_t *>PyBytes_AS_STRING(ids)
            out = _free_block(_opened_pool, total, _OPENED_KEEP)
            out.size = total  # every byte is written below
            out_p = <uint8_t *>out.data
            with nogil:
                rc = ddp_codec_open(&_api, self._dctx, dp, nd, k, ik, n,
                                    <const uint8_t *>view.buf, offset, stored, raw, ids_p,
                                    out_p, NULL, &failed, ref_out, how_p)
            if rc != DDP_CODEC_OK:
                _open_failed(rc, <Py_ssize_t>failed, ref_out)
            return out
        finally:
            PyBuffer_Release(&view)
            free(offset)
            free(stored)
            free(raw)

    def open_records(self, bytes key, bytes id_key, data, records, Py_ssize_t lo,
                     Py_ssize_t hi, DictTable dicts=None):
        """Open and check the blobs that pack trailer records lo..hi-1 name (`records`:
        44-byte <32sIII entries back to back; `data`: the whole pack), as open_into does,
        and keep nothing: verify's check of a pack whose index entries are its trailer's.
        ValueError if a blob lies outside the data (the caller then looks at each);
        OpenError, numbered from 0, for the first that fails."""
        cdef const uint8_t *k = _key_ptr(key)
        cdef const uint8_t *ik = _key_ptr(id_key)
        cdef Py_buffer view, rv
        cdef Py_ssize_t n, i
        cdef size_t total = 0, failed = 0
        cdef int rc
        cdef const uint8_t *r
        cdef uint8_t *ids = NULL
        cdef size_t *offset = NULL
        cdef uint32_t *stored = NULL
        cdef uint32_t *raw = NULL
        cdef _Block out
        cdef uint8_t ref_out[8]
        cdef const ddp_codec_dict *dp = NULL
        cdef size_t nd = 0
        if dicts is not None:
            dp, nd = dicts._entries, dicts._n
        PyObject_GetBuffer(records, &rv, PyBUF_SIMPLE)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if rv.len % DDP_CODEC_TRAILER_RECORD or not (
                    0 <= lo <= hi <= rv.len // <Py_ssize_t>DDP_CODEC_TRAILER_RECORD):
                raise ValueError("open_records: records and [lo, hi) do not agree")
            n = hi - lo
            ids = <uint8_t *>malloc((n or 1) * DDP_CODEC_ID_BYTES)
            offset = <size_t *>malloc((n or 1) * sizeof(size_t))
            stored = <uint32_t *>malloc((n or 1) * sizeof(uint32_t))
            raw = <uint32_t *>malloc((n or 1) * sizeof(uint32_t))
            if not (ids and offset and stored and raw):
                raise MemoryError()
            r = <const uint8_t *>rv.buf + lo * DDP_CODEC_TRAILER_RECORD
            for i in range(n):
                memcpy(ids + i * DDP_CODEC_ID_BYTES, r, DDP_CODEC_ID_BYTES)
                offset[i] = _le32(r + 32)
                stored[i] = _le32(r + 36)
                raw[i] = _le32(r + 40)
                if offset[i] + stored[i] > <size_t>view.len:
                    raise ValueError("open_records: a blob ends after the data")
                total += raw[i]
                r += DDP_CODEC_TRAILER_RECORD
            out = _free_block(_opened_pool, total, _OPENED_KEEP)
            out.size = total  # written below, then dropped
            with nogil:
                rc = ddp_codec_open(&_api, self._dctx, dp, nd, k, ik, <size_t>n,
                                    <const uint8_t *>view.buf, offset, stored, raw, ids,
                                    <uint8_t *>out.data, NULL, &failed, ref_out, NULL)
            if rc != DDP_CODEC_OK:
                _open_failed(rc, <Py_ssize_t>failed, ref_out)
        finally:
            PyBuffer_Release(&view)
            PyBuffer_Release(&rv)
            free(ids)
            free(offset)
            free(stored)
            free(raw)

    def open_planned(self, bytes key, bytes id_key, data, Py_ssize_t base, bytes ids,
                     bytes items, Py_ssize_t lo, Py_ssize_t hi, _Block out not None,
                     DictTable dicts=None):
        """Open the planned chunks items[lo:hi] (ddp_plan_item records, csrc/windowplan.h;
        ids: their 32-byte ids) of one pack, each straight into its place in `out` (a
        window from window_block): `data` holds the pack's bytes from offset `base`.
        Checks AEAD, length and the keyed id under `id_key`; raises OpenError with a
        failing item's number (counted from 0, not from lo: the first that fails to open,
        else the first whose id does not match). Jobs of one window may run
        at once in several threads: their items' places in `out` do not overlap."""
        cdef const uint8_t *k = _key_ptr(key)
        cdef const uint8_t *ik = _key_ptr(id_key)
        cdef Py_ssize_t n_items = PyBytes_GET_SIZE(items) // <Py_ssize_t>sizeof(ddp_plan_item)
        cdef Py_ssize_t n, i
        cdef const ddp_plan_item *it
        cdef size_t failed = 0
        cdef int rc
        cdef Py_buffer view
        cdef size_t *offset = NULL
        cdef uint32_t *stored = NULL
        cdef uint32_t *raw = NULL
        cdef uint64_t *pos = NULL
        cdef const uint8_t *ids_p
        cdef uint8_t ref_out[8]
        cdef const ddp_codec_dict *dp = NULL
        cdef size_t nd = 0
        if dicts is not None:
            dp, nd = dicts._entries, dicts._n
        if (PyBytes_GET_SIZE(items) % <Py_ssize_t>sizeof(ddp_plan_item)
                or not (0 <= lo <= hi <= n_items) or PyBytes_GET_SIZE(ids) != n_items * 32):
            raise ValueError("open_planned: items, ids and [lo, hi) do not agree")
        n = hi - lo
        it = <const ddp_plan_item *>PyBytes_AS_STRING(items) + lo
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            offset = <size_t *>malloc((n or 1) * sizeof(size_t))
            stored = <uint32_t *>malloc((n or 1) * sizeof(uint32_t))
            raw = <uint32_t *>malloc((n or 1) * sizeof(uint32_t))
            pos = <uint64_t *>malloc((n or 1) * sizeof(uint64_t))
            if not (offset and stored and raw and pos):
                raise MemoryError()
            for i in range(n):
                # The plan comes from the index: check that it fits what was read and
                # the window it writes into before the kernel trusts it.
                if it[i].offset < base:
                    raise ValueError("open_planned: a blob starts before the data")
                offset[i] = it[i].offset - <size_t>base
                if offset[i] + it[i].stored_length > <size_t>view.len:
                    raise ValueError("open_planned: a blob ends after the data")
                if (it[i].raw_length > <uint64_t>out.size
                        or it[i].out_pos > <uint64_t>out.size - it[i].raw_length):
                    raise ValueError("open_planned: a chunk ends after the window")
                stored[i] = it[i].stored_length
                raw[i] = it[i].raw_length
                pos[i] = it[i].out_pos
            ids_p = <const uint8_t *>PyBytes_AS_STRING(ids) + lo * 32
            with nogil:
                rc = ddp_codec_open(&_api, self._dctx, dp, nd, k, ik, <size_t>n,
                                    <const uint8_t *>view.buf, offset, stored, raw, ids_p,
                                    <uint8_t *>out.data, pos, &failed, ref_out, NULL)
            if rc != DDP_CODEC_OK:
                _open_failed(rc, lo + <Py_ssize_t>failed, ref_out)
        finally:
            PyBuffer_Release(&view)
            free(offset)
            free(stored)
            free(raw)
            free(pos)


def window_block(Py_ssize_t size):
    """A block of `size` bytes for one restore window's output (open_planned and
    copy_repeats write it; then it is read only), from a pool: a window's worth of fresh
    pages costs a page fault per 4 KiB, more than opening the chunks into them. It starts
    on a page boundary (WINDOW_ALIGN), so that a restore can write it with O_DIRECT."""
    if size < 0:
        raise ValueError("window_block: a negative size")
    cdef _Block b = _free_block(_window_pool, size, _WINDOW_KEEP, _WINDOW_ALIGN)
    b.size = size
    return b


def copy_repeats(_Block out not None, bytes copies):
    """Fill a window's repeated chunks (ddp_plan_copy records, csrc/windowplan.h) from
    their first occurrence, once every item of the window is open."""
    cdef const ddp_plan_copy *c = <const ddp_plan_copy *>PyBytes_AS_STRING(copies)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(copies) // <Py_ssize_t>sizeof(ddp_plan_copy), i
    cdef uint64_t size = <uint64_t>out.size
    for i in range(n):
        if not (c[i].len <= size and c[i].src <= size - c[i].len
                and c[i].dst <= size - c[i].len
                and (c[i].src + c[i].len <= c[i].dst or c[i].dst + c[i].len <= c[i].src)):
            raise ValueError("copy_repeats: a copy lies outside the window or overlaps")
    with nogil:
        for i in range(n):
            memcpy(out.data + c[i].dst, out.data + c[i].src, c[i].len)


def seal(bytes key, FramedBatch batch, bytearray dst, size_t pos, size_t target,
         bytearray records):
    """Seal the batch's pending blobs into dst from `pos` until `pos` reaches `target` or
    the next blob does not fit in dst; their trailer records are appended to `records`.
    Returns the new position. dst and records must not be resized meanwhile by others."""
    cdef const uint8_t *k = _key_ptr(key)
    cdef size_t todo = batch._n - batch._next
    if todo == 0:
        return pos
    cdef size_t cap = <size_t>PyByteArray_GET_SIZE(dst)
    if pos > cap:
        raise ValueError("seal: position beyond the buffer")
    cdef bytes nonces = os.urandom(todo * DDP_CODEC_NONCE_BYTES)
    cdef size_t first = batch._next
    cdef Py_ssize_t rec_start = PyByteArray_GET_SIZE(records)
    records.extend(bytes(todo * DDP_CODEC_TRAILER_RECORD))  # room; cut back below
    cdef uint8_t *rec = <uint8_t *>PyByteArray_AS_STRING(records) + rec_start
    cdef uint8_t *d = <uint8_t *>PyByteArray_AS_STRING(dst)
    cdef const uint8_t *framed = <const uint8_t *>batch._framed.data + batch._offset
    cdef const uint8_t *ids = <const uint8_t *>PyBytes_AS_STRING(batch._ids) + first * DDP_CODEC_ID_BYTES
    cdef const uint8_t *nonce_p = <const uint8_t *>PyBytes_AS_STRING(nonces)
    cdef long done
    with nogil:
        done = ddp_codec_seal(&_api, k, todo, framed, batch._len + first, ids,
                              batch._raw + first, nonce_p, d, cap, &pos, target, rec)
    if done < 0:
        del records[rec_start:]
        raise ValueError("sealing failed")
    del records[rec_start + done * DDP_CODEC_TRAILER_RECORD:]
    cdef size_t i
    for i in range(first, first + <size_t>done):
        batch._offset += batch._len[i]
    batch._next += <size_t>done
    return pos
