# cython: language_level=3
"""Thin wrapper over csrc/chunkindex.c: the compact chunk table (chunk id -> pack_no,
offset, stored_length, raw_length; it keys on an id's first 24 bytes). Layout, memory
bound and contracts are in csrc/chunkindex.h; the Python-visible API is typed in
_chunkindex.pyi.

Bulk calls (add_records, contains_many, get_many) run without the GIL. A table is not
locked: while one of them runs in some thread, a call that would change the table (or,
during add_records, any call) raises RuntimeError instead of racing it. Ids are any
buffer of exactly 32 bytes; other lengths are a ValueError (a bug, never "absent")."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy

from dedupe.store._windowplan cimport ddp_plan_copy, ddp_plan_item


cdef extern from "chunkindex.h" nogil:
    ctypedef struct ddp_idx:
        pass
    ctypedef struct ddp_idx_value:
        uint32_t pack_no
        uint32_t offset
        uint32_t stored_length
        uint32_t raw_length
    size_t DDP_IDX_ID_BYTES
    size_t DDP_IDX_RECORD_BYTES
    size_t DDP_IDX_MAX_ENTRIES
    uint32_t DDP_IDX_NO_PACK
    int DDP_IDX_OK
    int DDP_IDX_EXISTS
    int DDP_IDX_ENOMEM
    int DDP_IDX_EFULL
    int DDP_IDX_EINVAL
    ddp_idx *ddp_idx_create(size_t expected)
    void ddp_idx_destroy(ddp_idx *t)
    int ddp_idx_reserve(ddp_idx *t, size_t n)
    int ddp_idx_get(const ddp_idx *t, const uint8_t *id, ddp_idx_value *out)
    int ddp_idx_put(ddp_idx *t, const uint8_t *id, const ddp_idx_value *v, int overwrite,
                    ddp_idx_value *old)
    int ddp_idx_put_records(ddp_idx *t, const uint8_t *records, size_t n,
                            const uint32_t *pack_map, size_t map_len, size_t *dups,
                            size_t dup_cap, size_t *done, size_t *ndups)
    size_t ddp_idx_contains_many(const ddp_idx *t, const uint8_t *ids, size_t n,
                                 uint8_t *flags)
    size_t ddp_idx_get_many(const ddp_idx *t, const uint8_t *ids, size_t n,
                            ddp_idx_value *out)
    size_t ddp_idx_contains_strided(const ddp_idx *t, const uint8_t *keys, size_t stride,
                                    size_t n, uint8_t *flags)
    size_t ddp_idx_count(const ddp_idx *t)
    size_t ddp_idx_slots(const ddp_idx *t)
    size_t ddp_idx_memory(const ddp_idx *t)

cdef extern from "windowplan.h" nogil:
    size_t DDP_PLAN_RECORD_BYTES
    int DDP_PLAN_OK
    int DDP_PLAN_EMISSING
    int DDP_PLAN_ELENGTH
    int DDP_PLAN_ENOMEM
    int ddp_plan_window(const ddp_idx *t, const uint8_t *records, size_t n, uint8_t *ids,
                        ddp_plan_item *items, size_t *n_items, ddp_plan_copy *copies,
                        size_t *n_copies, uint64_t lead, uint64_t *total, size_t *bad)


ID_BYTES = DDP_IDX_ID_BYTES
RECORD_BYTES = DDP_IDX_RECORD_BYTES
PLAN_ITEM_BYTES = sizeof(ddp_plan_item)
PLAN_COPY_BYTES = sizeof(ddp_plan_copy)
PLAN_MISSING = DDP_PLAN_EMISSING
PLAN_LENGTH = DDP_PLAN_ELENGTH
NO_PACK = DDP_IDX_NO_PACK

cdef size_t _DUP_CAP = 4096  # duplicate indices collected per kernel call


cdef int _raise(int rc) except -1:
    if rc == DDP_IDX_ENOMEM:
        raise MemoryError()
    if rc == DDP_IDX_EFULL:
        raise OverflowError(f"a chunk table holds at most {DDP_IDX_MAX_ENTRIES} entries")
    raise ValueError(f"chunk table: invalid argument (code {rc})")


cdef int _open_key(object chunk_id, Py_buffer *view, const uint8_t **p) except -1:
    """Point *p at the 32 bytes of chunk_id. Returns 1 when *view was filled and must be
    released, 0 for bytes (no buffer request)."""
    cdef Py_ssize_t n
    if PyBytes_CheckExact(chunk_id):
        n = PyBytes_GET_SIZE(chunk_id)
        if n == <Py_ssize_t>DDP_IDX_ID_BYTES:
            p[0] = <const uint8_t *>PyBytes_AS_STRING(chunk_id)
            return 0
    else:
        PyObject_GetBuffer(chunk_id, view, PyBUF_SIMPLE)
        n = view.len
        if n == <Py_ssize_t>DDP_IDX_ID_BYTES:
            p[0] = <const uint8_t *>view.buf
            return 1
        PyBuffer_Release(view)
    raise ValueError(f"a chunk id has {DDP_IDX_ID_BYTES} bytes, not {n}")


cdef uint32_t _u32(object x, str what) except? 0xFFFFFFFF:
    cdef long long v = x
    if v < 0 or v > 0xFFFFFFFF:
        raise ValueError(f"{what} {v} is not a uint32")
    return <uint32_t>v


cdef class ChunkTable:
    """Compact chunk id -> (pack_no, offset, stored_length, raw_length) table (native)."""

    cdef ddp_idx *_t
    cdef Py_ssize_t _readers   # bulk reads running without the GIL
    cdef bint _writing         # a bulk write running without the GIL

    def __cinit__(self, expected=0):
        cdef long long n = expected
        if n < 0 or <unsigned long long>n > DDP_IDX_MAX_ENTRIES:
            raise ValueError(f"expected must be in [0, {DDP_IDX_MAX_ENTRIES}], not {n}")
        self._t = ddp_idx_create(<size_t>n)
        if self._t == NULL:
            raise MemoryError()

    def __dealloc__(self):
        ddp_idx_destroy(self._t)

    cdef int _check_read(self) except -1:
        if self._writing:
            raise RuntimeError("ChunkTable: add_records is running in another thread")
        return 0

    cdef int _check_write(self) except -1:
        if self._writing or self._readers:
            raise RuntimeError("ChunkTable: a bulk call is running in another thread")
        return 0

    def __len__(self):
        self._check_read()
        return ddp_idx_count(self._t)

    def capacity(self):
        """Entries that fit before the next growth of the slot array."""
        self._check_read()
        return ddp_idx_slots(self._t) * 3 // 4

    def memory_bytes(self):
        """Bytes of memory the table holds (slot array, entries, directory)."""
        self._check_read()
        return ddp_idx_memory(self._t)

    def reserve(self, n):
        """Make room for n entries in all (one slot array rebuild instead of several)."""
        cdef long long want = n
        self._check_write()
        if want < 0:
            raise ValueError(f"cannot reserve {want} entries")
        if <unsigned long long>want > DDP_IDX_MAX_ENTRIES:
            _raise(DDP_IDX_EFULL)
        rc = ddp_idx_reserve(self._t, <size_t>want)
        if rc != DDP_IDX_OK:
            _raise(rc)

    def get(self, chunk_id):
        """(pack_no, offset, stored_length, raw_length), or None if absent."""
        cdef Py_buffer view
        cdef const uint8_t *p
        cdef ddp_idx_value v
        cdef int found
        self._check_read()
        if _open_key(chunk_id, &view, &p):
            found = ddp_idx_get(self._t, p, &v)
            PyBuffer_Release(&view)
        else:
            found = ddp_idx_get(self._t, p, &v)
        if not found:
            return None
        return (v.pack_no, v.offset, v.stored_length, v.raw_length)

    def __contains__(self, chunk_id):
        cdef Py_buffer view
        cdef const uint8_t *p
        cdef int found
        self._check_read()
        if _open_key(chunk_id, &view, &p):
            found = ddp_idx_get(self._t, p, NULL)
            PyBuffer_Release(&view)
        else:
            found = ddp_idx_get(self._t, p, NULL)
        return found != 0

    def put(self, chunk_id, pack_no, offset, stored_length, raw_length, overwrite=False):
        """Store the location of chunk_id. Absent: added, returns True. Present: the old
        location stays unless overwrite, returns False. pack_no < NO_PACK."""
        cdef Py_buffer view
        cdef const uint8_t *p
        cdef ddp_idx_value v
        cdef int rc, ow = 1 if overwrite else 0
        self._check_write()
        v.pack_no = _u32(pack_no, "pack_no")
        v.offset = _u32(offset, "offset")
        v.stored_length = _u32(stored_length, "stored_length")
        v.raw_length = _u32(raw_length, "raw_length")
        if v.pack_no == DDP_IDX_NO_PACK:
            raise ValueError(f"pack_no {v.pack_no} is reserved (NO_PACK)")
        if _open_key(chunk_id, &view, &p):
            rc = ddp_idx_put(self._t, p, &v, ow, NULL)
            PyBuffer_Release(&view)
        else:
            rc = ddp_idx_put(self._t, p, &v, ow, NULL)
        if rc < 0:
            _raise(rc)
        return rc == DDP_IDX_OK

    def add_records(self, records, pack_map):
        """Bulk insert of index object entries: records is a buffer of 48-byte <32sIIII
        records (chunk id, local pack_no, offset, stored_length, raw_length), the local
        pack_no translated through pack_map (local -> global pack number). A record whose
        id is already present (or earlier in records) is not stored: the first copy
        wins. Returns the indices of those records, in order, for the caller's rule.
        A local pack_no outside pack_map is a ValueError raised before anything is
        stored."""
        cdef Py_buffer rv
        cdef size_t n, map_len, k, done = 0, nd = 0, base = 0
        cdef uint32_t *pmap = NULL
        cdef size_t *dups = NULL
        cdef const uint8_t *rec
        cdef int rc = DDP_IDX_OK
        cdef list out = []
        self._check_write()
        map_len = len(pack_map)
        pmap = <uint32_t *>malloc((map_len if map_len else 1) * sizeof(uint32_t))
        dups = <size_t *>malloc(_DUP_CAP * sizeof(size_t))
        try:
            if pmap == NULL or dups == NULL:
                raise MemoryError()
            for k in range(map_len):
                pmap[k] = _u32(pack_map[k], "pack number")
                if pmap[k] == DDP_IDX_NO_PACK:
                    raise ValueError(f"pack number {pmap[k]} is reserved (NO_PACK)")
            PyObject_GetBuffer(records, &rv, PyBUF_SIMPLE)
            try:
                if <size_t>rv.len % DDP_IDX_RECORD_BYTES:
                    raise ValueError(
                        f"index records are {DDP_IDX_RECORD_BYTES} bytes each; "
                        f"{rv.len} bytes is not a whole number of them")
                n = <size_t>rv.len // DDP_IDX_RECORD_BYTES
                rec = <const uint8_t *>rv.buf
                self._writing = True
                try:
                    while True:
                        with nogil:
                            rc = ddp_idx_put_records(
                                self._t, rec + base * DDP_IDX_RECORD_BYTES, n - base,
                                pmap, map_len, dups, _DUP_CAP, &done, &nd)
                        for k in range(nd):
                            out.append(base + dups[k])
                        if rc != DDP_IDX_OK:
                            break
                        base += done
                        if base == n:
                            break
                finally:
                    self._writing = False
                if rc == DDP_IDX_EINVAL:
                    k = base + done
                    local = int.from_bytes(
                        (<const char *>rec)[k * DDP_IDX_RECORD_BYTES + 32:
                                            k * DDP_IDX_RECORD_BYTES + 36], "little")
                    raise ValueError(f"record {k} names pack {local} of {map_len}")
                if rc != DDP_IDX_OK:
                    _raise(rc)
            finally:
                PyBuffer_Release(&rv)
        finally:
            free(pmap)
            free(dups)
        return out

    def contains_many(self, ids):
        """ids: 32-byte chunk ids back to back (one buffer). Returns a bytearray with one
        byte per id: 1 if present, else 0."""
        cdef Py_buffer iv
        cdef size_t n
        cdef bytearray flags
        cdef uint8_t *fp
        self._check_read()
        PyObject_GetBuffer(ids, &iv, PyBUF_SIMPLE)
        try:
            n = _id_count(iv.len)
            flags = PyByteArray_FromStringAndSize(NULL, <Py_ssize_t>n)
            fp = <uint8_t *>PyByteArray_AS_STRING(flags)
            self._readers += 1
            try:
                with nogil:
                    ddp_idx_contains_many(self._t, <const uint8_t *>iv.buf, n, fp)
            finally:
                self._readers -= 1
        finally:
            PyBuffer_Release(&iv)
        return flags

    def contains_records(self, records, Py_ssize_t stride):
        """records: whole records of `stride` bytes back to back, each starting with a
        32-byte chunk id (a chunk table: 36). Returns a bytearray with one byte per
        record: 1 if its id is present, else 0."""
        cdef Py_buffer rv
        cdef size_t n
        cdef bytearray flags
        cdef uint8_t *fp
        if stride < <Py_ssize_t>DDP_IDX_ID_BYTES:
            raise ValueError(f"a record of {stride} bytes cannot hold a chunk id")
        self._check_read()
        PyObject_GetBuffer(records, &rv, PyBUF_SIMPLE)
        try:
            if rv.len % stride:
                raise ValueError(
                    f"{rv.len} bytes is not a whole number of {stride}-byte records")
            n = <size_t>(rv.len // stride)
            flags = PyByteArray_FromStringAndSize(NULL, <Py_ssize_t>n)
            fp = <uint8_t *>PyByteArray_AS_STRING(flags)
            self._readers += 1
            try:
                with nogil:
                    ddp_idx_contains_strided(self._t, <const uint8_t *>rv.buf, <size_t>stride,
                                             n, fp)
            finally:
                self._readers -= 1
        finally:
            PyBuffer_Release(&rv)
        return flags

    def get_many(self, ids):
        """ids: 32-byte chunk ids back to back (one buffer). Returns a bytearray of 16
        bytes per id, four native-order uint32 (pack_no, offset, stored_length,
        raw_length; memoryview(result).cast("I") reads them); an absent id has pack_no
        NO_PACK and zeros."""
        cdef Py_buffer iv
        cdef size_t n
        cdef bytearray out
        cdef ddp_idx_value *op
        self._check_read()
        PyObject_GetBuffer(ids, &iv, PyBUF_SIMPLE)
        try:
            n = _id_count(iv.len)
            out = PyByteArray_FromStringAndSize(NULL, <Py_ssize_t>(n * sizeof(ddp_idx_value)))
            op = <ddp_idx_value *>PyByteArray_AS_STRING(out)
            self._readers += 1
            try:
                with nogil:
                    ddp_idx_get_many(self._t, <const uint8_t *>iv.buf, n, op)
            finally:
                self._readers -= 1
        finally:
            PyBuffer_Release(&iv)
        return out

    def plan_window(self, records, Py_ssize_t gap, Py_ssize_t max_range,
                    Py_ssize_t batch, Py_ssize_t lead=0):
        """Plan the restore of one window: `records` are chunk-table records (36-byte
        <32sI: id, length) back to back. Returns (0, 0, plan) or, for the first record
        whose chunk is absent (PLAN_MISSING) or whose length is not the index's
        (PLAN_LENGTH), (code, record number, None). plan is (total, ids, items, copies,
        ranges), csrc/windowplan.h: the window's output size; the distinct chunks' ids
        (32 bytes each) and items (ddp_plan_item), sorted by pack and offset; the repeats
        (ddp_plan_copy); and ranges, a list of (pack_no, start, end, jobs): blobs of one
        pack read together (neighbours closer than `gap`, at most `max_range` bytes),
        `jobs` cutting the range's items [lo, hi) into runs of about `batch` stored
        bytes each. With `lead`, the window's output starts `lead` bytes into its buffer:
        total, the items' places and the repeats' count from the buffer's start."""
        cdef Py_buffer rv
        cdef size_t n, n_items = 0, n_copies = 0, bad = 0, i, lo = 0
        cdef uint64_t total = 0, start = 0, end = 0, size = 0, it_end
        cdef int rc
        cdef bytes ids, items, copies
        cdef const ddp_plan_item *it
        cdef uint8_t *ids_p
        cdef ddp_plan_item *items_p
        cdef ddp_plan_copy *copies_p
        cdef list ranges = [], jobs = None
        cdef uint32_t pack = 0
        if gap < 0 or max_range < 0 or batch < 0 or lead < 0:
            raise ValueError("plan_window: gap, max_range, batch and lead are not negative")
        self._check_read()
        PyObject_GetBuffer(records, &rv, PyBUF_SIMPLE)
        try:
            if <size_t>rv.len % DDP_PLAN_RECORD_BYTES:
                raise ValueError(
                    f"chunk records are {DDP_PLAN_RECORD_BYTES} bytes each; {rv.len} bytes "
                    "is not a whole number of them")
            n = <size_t>rv.len // DDP_PLAN_RECORD_BYTES
            ids = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(n * DDP_IDX_ID_BYTES))
            items = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(n * sizeof(ddp_plan_item)))
            copies = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(n * sizeof(ddp_plan_copy)))
            ids_p = <uint8_t *>PyBytes_AS_STRING(ids)
            items_p = <ddp_plan_item *>PyBytes_AS_STRING(items)
            copies_p = <ddp_plan_copy *>PyBytes_AS_STRING(copies)
            self._readers += 1
            try:
                with nogil:
                    rc = ddp_plan_window(self._t, <const uint8_t *>rv.buf, n, ids_p, items_p,
                                         &n_items, copies_p, &n_copies, <uint64_t>lead, &total,
                                         &bad)
            finally:
                self._readers -= 1
        finally:
            PyBuffer_Release(&rv)
        if rc == DDP_PLAN_ENOMEM:
            raise MemoryError()
        if rc != DDP_PLAN_OK:
            return rc, bad, None
        it = <const ddp_plan_item *>PyBytes_AS_STRING(items)
        for i in range(n_items):
            it_end = <uint64_t>it[i].offset + it[i].stored_length
            if (jobs is None or it[i].pack_no != pack or it[i].offset > end + <uint64_t>gap
                    or it_end - start > <uint64_t>max_range):
                if jobs is not None:
                    if lo < i:
                        jobs.append((lo, i))
                    ranges.append((pack, start, end, jobs))
                jobs = []
                pack, start, end, lo, size = it[i].pack_no, it[i].offset, it_end, i, 0
            if it_end > end:
                end = it_end
            size += it[i].stored_length
            if size >= <uint64_t>batch:
                jobs.append((lo, i + 1))
                lo, size = i + 1, 0
        if jobs is not None:
            if lo < n_items:
                jobs.append((lo, n_items))
            ranges.append((pack, start, end, jobs))
        return 0, 0, (
            total,
            ids[:n_items * DDP_IDX_ID_BYTES],
            items[:n_items * sizeof(ddp_plan_item)],
            copies[:n_copies * sizeof(ddp_plan_copy)],
            ranges,
        )


# --- record packing for the backup's hot path ----------------------------------------------
# Per chunk, a backup writes one chunk-table record (its generation's list) and, per pack,
# one index entry for each blob. Packing them with struct in a Python loop cost about a
# fifth of the GIL time of a page-cut backup (4 KiB chunks); these do it in one call.

cdef enum:
    _TRAILER_BYTES = 44   # a pack trailer record, <32sIII (docs/FORMAT.md section 6)
    _CHUNK_RECORD_BYTES = 36  # a chunk table record, <32sI (docs/FORMAT.md section 8)


cdef inline uint32_t _le32(const uint8_t *p) noexcept nogil:
    return <uint32_t>p[0] | <uint32_t>p[1] << 8 | <uint32_t>p[2] << 16 | <uint32_t>p[3] << 24


cdef inline void _put_le32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


def entry_records(trailer, pack_no):
    """Index object entries (48-byte <32sIIII) for the blobs of one pack: its trailer
    records (44-byte <32sIII: chunk id, offset, stored_length, raw_length) with
    `pack_no` put after the id."""
    cdef Py_buffer tv
    cdef size_t n, k
    cdef uint32_t pn = _u32(pack_no, "pack number")
    cdef bytes out
    cdef uint8_t *op
    cdef const uint8_t *tp
    PyObject_GetBuffer(trailer, &tv, PyBUF_SIMPLE)
    try:
        if <size_t>tv.len % _TRAILER_BYTES:
            raise ValueError(
                f"trailer records are {_TRAILER_BYTES} bytes each; {tv.len} bytes is not "
                "a whole number of them")
        n = <size_t>tv.len // _TRAILER_BYTES
        out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(n * DDP_IDX_RECORD_BYTES))
        op = <uint8_t *>PyBytes_AS_STRING(out)
        tp = <const uint8_t *>tv.buf
        with nogil:
            for k in range(n):
                memcpy(op, tp, 32)
                _put_le32(op + 32, pn)
                memcpy(op + 36, tp + 32, 12)
                op += DDP_IDX_RECORD_BYTES
                tp += _TRAILER_BYTES
    finally:
        PyBuffer_Release(&tv)
    return out


def chunk_records(list ids, chunks):
    """Chunk table records (36-byte <32sI: chunk id, length) of a batch: ids[i] (32-byte
    bytes) with len(chunks[i])."""
    cdef Py_ssize_t n = len(ids), i, length
    cdef object cid
    cdef bytes out
    cdef uint8_t *op
    if len(chunks) != n:
        raise ValueError(f"{n} ids for {len(chunks)} chunks")
    out = PyBytes_FromStringAndSize(NULL, n * _CHUNK_RECORD_BYTES)
    op = <uint8_t *>PyBytes_AS_STRING(out)
    for i in range(n):
        cid = ids[i]
        if not PyBytes_CheckExact(cid) or PyBytes_GET_SIZE(cid) != <Py_ssize_t>DDP_IDX_ID_BYTES:
            raise ValueError(f"chunk id {i} is not {DDP_IDX_ID_BYTES} bytes")
        length = len(chunks[i])
        if length > 0xFFFFFFFF:
            raise ValueError(f"chunk {i} is {length} bytes: more than a uint32")
        memcpy(op, PyBytes_AS_STRING(cid), 32)
        _put_le32(op + 32, <uint32_t>length)
        op += _CHUNK_RECORD_BYTES
    return out


def entries_by_pack(records, list bounds):
    """Index object entries (48-byte <32sIIII: id, pack_no, offset, stored, raw) sorted
    out by pack, as trailer records (44-byte <32sIII, pack_no dropped): returns
    (parts, outside), parts a dict pack_no -> bytes of that pack's entries in their
    order, outside a list of (pack_no, chunk id) whose blob is not within the pack's
    bounds[pack_no] = (first, end) (blob offset >= first, offset + stored <= end).
    ValueError for a pack_no with no bounds."""
    cdef Py_buffer rv
    cdef Py_ssize_t n, k, np = len(bounds), p
    cdef const uint8_t *r
    cdef uint32_t pack, off, st
    cdef uint64_t *lo = NULL
    cdef uint64_t *hi = NULL
    cdef Py_ssize_t *count = NULL
    cdef Py_ssize_t *fill = NULL
    cdef uint8_t **dst = NULL
    cdef dict parts = {}
    cdef list outside = []
    cdef bytes part
    PyObject_GetBuffer(records, &rv, PyBUF_SIMPLE)
    try:
        if rv.len % DDP_IDX_RECORD_BYTES:
            raise ValueError(
                f"index entries are {DDP_IDX_RECORD_BYTES} bytes each; {rv.len} bytes is not "
                "a whole number of them")
        n = rv.len // DDP_IDX_RECORD_BYTES
        lo = <uint64_t *>malloc((np or 1) * sizeof(uint64_t))
        hi = <uint64_t *>malloc((np or 1) * sizeof(uint64_t))
        count = <Py_ssize_t *>calloc(np or 1, sizeof(Py_ssize_t))
        fill = <Py_ssize_t *>calloc(np or 1, sizeof(Py_ssize_t))
        dst = <uint8_t **>calloc(np or 1, sizeof(uint8_t *))
        if not (lo and hi and count and fill and dst):
            raise MemoryError()
        for p in range(np):
            first, end = bounds[p]
            if first < 0 or end < 0:
                raise ValueError(f"entries_by_pack: negative bounds {first, end} of pack {p}")
            lo[p], hi[p] = first, end
        r = <const uint8_t *>rv.buf
        for k in range(n):
            pack = _le32(r + k * DDP_IDX_RECORD_BYTES + 32)
            if pack >= <uint32_t>np:
                raise ValueError(f"entry {k} names pack number {pack} of {np}")
            count[pack] += 1
        for p in range(np):
            if count[p]:
                part = PyBytes_FromStringAndSize(NULL, count[p] * _TRAILER_BYTES)
                parts[p] = part
                dst[p] = <uint8_t *>PyBytes_AS_STRING(part)
        for k in range(n):
            pack = _le32(r + 32)
            off = _le32(r + 36)
            st = _le32(r + 40)
            if off < lo[pack] or <uint64_t>off + st > hi[pack]:
                outside.append((pack, PyBytes_FromStringAndSize(<const char *>r, 32)))
            else:
                memcpy(dst[pack] + fill[pack] * _TRAILER_BYTES, r, 32)
                memcpy(dst[pack] + fill[pack] * _TRAILER_BYTES + 32, r + 36, 12)
                fill[pack] += 1
            r += DDP_IDX_RECORD_BYTES
        for p in range(np):
            if fill[p] < count[p]:  # some were outside: keep only those inside
                if fill[p]:
                    parts[p] = parts[p][:fill[p] * _TRAILER_BYTES]
                else:
                    del parts[p]
    finally:
        PyBuffer_Release(&rv)
        free(lo)
        free(hi)
        free(count)
        free(fill)
        free(dst)
    return parts, outside


def cut_records(records, Py_ssize_t start, Py_ssize_t budget):
    """Chunk table records (36-byte <32sI) from number `start` on, up to and including
    the one that brings their lengths' sum to `budget` or beyond (or to the last):
    returns (number after the last taken, sum of their lengths)."""
    cdef Py_buffer rv
    cdef Py_ssize_t n, k
    cdef uint64_t size = 0
    cdef const uint8_t *p
    if budget < 0:
        raise ValueError("cut_records: a negative budget")
    PyObject_GetBuffer(records, &rv, PyBUF_SIMPLE)
    try:
        if rv.len % _CHUNK_RECORD_BYTES:
            raise ValueError(
                f"chunk records are {_CHUNK_RECORD_BYTES} bytes each; {rv.len} bytes is not "
                "a whole number of them")
        n = rv.len // _CHUNK_RECORD_BYTES
        if not 0 <= start <= n:
            raise ValueError(f"cut_records: record {start} of {n}")
        k = start
        p = <const uint8_t *>rv.buf + start * _CHUNK_RECORD_BYTES + 32
        while k < n and size < <uint64_t>budget:
            size += <uint64_t>p[0] | <uint64_t>p[1] << 8 | <uint64_t>p[2] << 16 | <uint64_t>p[3] << 24
            p += _CHUNK_RECORD_BYTES
            k += 1
    finally:
        PyBuffer_Release(&rv)
    return k, size


cdef size_t _id_count(Py_ssize_t length) except? 0:
    if <size_t>length % DDP_IDX_ID_BYTES:
        raise ValueError(
            f"chunk ids are {DDP_IDX_ID_BYTES} bytes each; {length} bytes is not a "
            "whole number of them")
    return <size_t>length // DDP_IDX_ID_BYTES
