# cython: language_level=3
"""Thin wrapper over csrc/prunetable.c: every index entry prune reads, in one sorted
array of 56 bytes an entry, and the decisions prune takes over them. Contracts are in
csrc/prunetable.h; the rules are prune's (dedupe/engine/prune.py); the Python-visible
API is typed in _prunetable.pyi.

Calls hold the GIL: a table belongs to one prune, which calls it from one thread."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport SIZE_MAX, UINT32_MAX, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc


cdef extern from "prunetable.h" nogil:
    ctypedef struct ddp_pt:
        pass
    size_t DDP_PT_ID_BYTES
    size_t DDP_PT_ENTRY_BYTES
    size_t DDP_PT_CHUNK_BYTES
    size_t DDP_PT_MOVE_BYTES
    int DDP_PT_OK
    int DDP_PT_ENOMEM
    int DDP_PT_EINVAL
    int DDP_PT_EORDER
    ddp_pt *ddp_pt_create(uint32_t packs)
    void ddp_pt_destroy(ddp_pt *t)
    int ddp_pt_add(ddp_pt *t, const uint8_t *records, size_t n, const uint32_t *map,
                   size_t map_len, size_t *bad)
    int ddp_pt_sort(ddp_pt *t)
    size_t ddp_pt_count(const ddp_pt *t)
    size_t ddp_pt_ids(const ddp_pt *t)
    size_t ddp_pt_live_ids(const ddp_pt *t)
    size_t ddp_pt_memory(const ddp_pt *t)
    size_t ddp_pt_unusable_packs(ddp_pt *t, const uint8_t *pack_gone)
    size_t ddp_pt_set_unusable(ddp_pt *t, const uint8_t *id, uint32_t pack)
    size_t ddp_pt_mark_live(ddp_pt *t, const uint8_t *records, size_t n, uint8_t *missing,
                            size_t cap)
    int ddp_pt_live_bytes(ddp_pt *t, uint64_t *live)
    size_t ddp_pt_set_unusable_entry(ddp_pt *t, const uint8_t *id, uint32_t pack,
                                     uint32_t offset, uint32_t stored, uint32_t raw)
    size_t ddp_pt_choose(ddp_pt *t, const uint32_t *rank, uint8_t *lost)
    int ddp_pt_usage(ddp_pt *t, uint64_t *used, uint64_t *blobs)
    size_t ddp_pt_emit_unchecked(ddp_pt *t, uint8_t *out, size_t cap)
    size_t ddp_pt_emit_moving(const ddp_pt *t, const uint8_t *moving, uint8_t *out,
                              size_t cap, uint64_t *stored_sum)
    size_t ddp_pt_emit_kept(const ddp_pt *t, const uint32_t *number, uint8_t *out,
                            size_t cap)


RECORD_BYTES = DDP_PT_MOVE_BYTES  # what the emit calls return: <32sIIII>
NO_NUMBER = UINT32_MAX  # kept(): a pack that is not kept


cdef inline size_t _room(size_t n):
    """n, or 1 for 0: malloc(0) may return NULL, which is not running out of memory."""
    return n if n else 1


cdef int _check(int rc) except -1:
    if rc == DDP_PT_OK:
        return 0
    if rc == DDP_PT_ENOMEM:
        raise MemoryError()
    if rc == DDP_PT_EORDER:
        raise RuntimeError("PruneTable: called out of order (add, sort, then the rest)")
    raise ValueError(f"PruneTable: invalid argument (code {rc})")


cdef class _Array:
    """A C copy of a sequence of ints, one per pack, checked against the type's range."""

    cdef void *p
    cdef size_t n

    def __dealloc__(self):
        free(self.p)


cdef _Array _ints(object values, size_t n, int width, str what):
    """values (one per pack) as a C array of uint64 (width 8) or uint32 (width 4)."""
    cdef _Array a = _Array()
    cdef size_t i
    cdef unsigned long long top = 0xFFFFFFFFFFFFFFFF if width == 8 else 0xFFFFFFFF
    if <size_t>len(values) != n:
        raise ValueError(f"{what}: {len(values)} values for {n} packs")
    a.p = malloc(_room(n) * width)
    if a.p == NULL:
        raise MemoryError()
    a.n = n
    for i in range(n):
        v = values[i]
        if v < 0 or v > top:
            raise ValueError(f"{what}: {v} is out of range")
        if width == 8:
            (<uint64_t *>a.p)[i] = v
        else:
            (<uint32_t *>a.p)[i] = v
    return a


cdef const uint8_t *_flags(bytes flags, size_t n, str what) except NULL:
    if <size_t>len(flags) != n:
        raise ValueError(f"{what}: {len(flags)} flags for {n} packs")
    return <const uint8_t *>PyBytes_AS_STRING(flags) if n else <const uint8_t *>b"\0"


cdef class PruneTable:
    """Every index entry prune read, with its global pack number (0 .. packs - 1)."""

    cdef ddp_pt *_t
    cdef size_t _packs
    cdef bint _sorted

    cdef int _need_sorted(self) except -1:
        if not self._sorted:
            _check(DDP_PT_EORDER)
        return 0

    def __cinit__(self, packs):
        if packs < 0 or packs > 0xFFFFFFFF:
            raise ValueError(f"packs must be a uint32, not {packs}")
        self._packs = packs
        self._t = ddp_pt_create(<uint32_t>packs)
        if self._t == NULL:
            raise MemoryError()

    def __dealloc__(self):
        ddp_pt_destroy(self._t)

    def __len__(self):
        return ddp_pt_count(self._t)

    def ids(self):
        """Distinct chunk ids (after sort)."""
        return ddp_pt_ids(self._t)

    def live_ids(self):
        """Distinct chunk ids flagged live."""
        return ddp_pt_live_ids(self._t)

    def memory_bytes(self):
        return ddp_pt_memory(self._t)

    def add(self, records, pack_map):
        """Append index object entries (<32sIIII>, pack numbers local to the object);
        pack_map[local] is the global number of a local pack."""
        cdef Py_buffer view
        cdef size_t bad = 0, n
        cdef int rc
        cdef _Array m = _ints(pack_map, len(pack_map), 4, "pack_map")
        PyObject_GetBuffer(records, &view, PyBUF_SIMPLE)
        try:
            if view.len % DDP_PT_ENTRY_BYTES:
                raise ValueError(f"{view.len} bytes are not whole {DDP_PT_ENTRY_BYTES}-byte entries")
            n = view.len // DDP_PT_ENTRY_BYTES
            rc = ddp_pt_add(self._t, <const uint8_t *>view.buf, n, <const uint32_t *>m.p,
                            m.n, &bad)
        finally:
            PyBuffer_Release(&view)
        if rc == DDP_PT_EINVAL:
            raise ValueError(f"entry {bad} names a pack outside its index object's pack table")
        _check(rc)

    def sort(self):
        _check(ddp_pt_sort(self._t))
        self._sorted = True

    def unusable_packs(self, bytes gone):
        """Flag every entry of each pack p with gone[p] nonzero as unusable."""
        self._need_sorted()
        return ddp_pt_unusable_packs(self._t, _flags(gone, self._packs, "gone"))

    def set_unusable(self, chunk_id, pack, offset=None, stored=0, raw=0):
        """Flag every entry of (chunk id, pack) as unusable, or with offset given only
        those that name exactly (pack, offset, stored, raw); returns how many."""
        self._need_sorted()
        cdef bytes cid = bytes(chunk_id)
        if len(cid) != DDP_PT_ID_BYTES or pack < 0 or pack >= self._packs:
            raise ValueError("set_unusable: not a chunk id and a pack of this table")
        if offset is None:
            return ddp_pt_set_unusable(self._t, <const uint8_t *>PyBytes_AS_STRING(cid), pack)
        return ddp_pt_set_unusable_entry(
            self._t, <const uint8_t *>PyBytes_AS_STRING(cid), pack, offset, stored, raw)

    def mark_live(self, records):
        """Flag the ids of chunk table records (<32sI>) live. Returns the ids among them
        that no entry has, back to back (32 bytes each; normally none)."""
        self._need_sorted()
        cdef Py_buffer view
        cdef size_t absent, n
        cdef bytes missing = b""
        PyObject_GetBuffer(records, &view, PyBUF_SIMPLE)
        try:
            if view.len % DDP_PT_CHUNK_BYTES:
                raise ValueError(f"{view.len} bytes are not whole chunk table records")
            n = view.len // DDP_PT_CHUNK_BYTES
            absent = ddp_pt_mark_live(self._t, <const uint8_t *>view.buf, n, NULL, 0)
            if absent:  # again, to collect them (marking twice changes nothing)
                missing = PyBytes_FromStringAndSize(NULL, absent * DDP_PT_ID_BYTES)
                ddp_pt_mark_live(self._t, <const uint8_t *>view.buf, n,
                                 <uint8_t *>PyBytes_AS_STRING(missing), absent)
        finally:
            PyBuffer_Release(&view)
        return missing

    def live_bytes(self):
        """Per pack: stored bytes of the live chunk ids it has a usable copy of."""
        self._need_sorted()
        cdef uint64_t *live = <uint64_t *>malloc(_room(self._packs) * sizeof(uint64_t))
        if live == NULL:
            raise MemoryError()
        try:
            _check(ddp_pt_live_bytes(self._t, live))
            return [live[i] for i in range(self._packs)]
        finally:
            free(live)

    def choose(self, rank):
        """Choose one usable copy of each live id, in the pack of the greatest rank (one
        distinct rank per pack): (how many have none, the first of those or None)."""
        self._need_sorted()
        cdef _Array rk = _ints(rank, self._packs, 4, "rank")
        cdef uint8_t lost[32]
        cdef size_t none = ddp_pt_choose(self._t, <const uint32_t *>rk.p, lost)
        return none, (PyBytes_FromStringAndSize(<char *>lost, 32) if none else None)

    def usage(self):
        """Per pack: (stored bytes of the chosen copies, distinct chunk ids listed)."""
        self._need_sorted()
        cdef size_t n = _room(self._packs)
        cdef uint64_t *used = <uint64_t *>malloc(n * sizeof(uint64_t))
        cdef uint64_t *blobs = <uint64_t *>malloc(n * sizeof(uint64_t))
        try:
            if used == NULL or blobs == NULL:
                raise MemoryError()
            _check(ddp_pt_usage(self._t, used, blobs))
            return ([used[i] for i in range(self._packs)],
                    [blobs[i] for i in range(self._packs)])
        finally:
            free(used)
            free(blobs)

    def unchecked(self, size_t cap):
        """Up to cap chosen copies of ids with usable copies in several packs, not handed
        out before, as <32sIIII> records (global pack numbers)."""
        self._need_sorted()
        cdef bytes out = PyBytes_FromStringAndSize(NULL, _room(cap) * DDP_PT_MOVE_BYTES)
        cdef size_t n = ddp_pt_emit_unchecked(self._t, <uint8_t *>PyBytes_AS_STRING(out), cap)
        return out[: n * DDP_PT_MOVE_BYTES]

    def moving(self, bytes packs):
        """The chosen copies in packs p with packs[p] nonzero, as <32sIIII> records
        (global pack numbers) in (pack, offset) order, and their stored bytes."""
        self._need_sorted()
        cdef const uint8_t *flags = _flags(packs, self._packs, "moving")
        cdef uint64_t total = 0
        cdef size_t n = ddp_pt_emit_moving(self._t, flags, NULL, 0, &total)
        if n == 0:
            return b"", 0
        cdef bytes out = PyBytes_FromStringAndSize(NULL, n * DDP_PT_MOVE_BYTES)
        cdef size_t got = ddp_pt_emit_moving(
            self._t, flags, <uint8_t *>PyBytes_AS_STRING(out), n, &total)
        if got == SIZE_MAX:
            raise MemoryError()
        return out, total

    def kept_count(self, numbers):
        """How many records kept(numbers) returns."""
        self._need_sorted()
        cdef _Array num = _ints(numbers, self._packs, 4, "numbers")
        return ddp_pt_emit_kept(self._t, <const uint32_t *>num.p, NULL, 0)

    def kept(self, numbers):
        """The entries that stay indexed in kept packs (numbers[p] != NO_NUMBER is pack
        p's number in the new index object), as <32sIIII> records with those numbers."""
        self._need_sorted()
        cdef _Array num = _ints(numbers, self._packs, 4, "numbers")
        cdef size_t n = ddp_pt_emit_kept(self._t, <const uint32_t *>num.p, NULL, 0)
        if n == 0:
            return b""
        cdef bytes out = PyBytes_FromStringAndSize(NULL, n * DDP_PT_MOVE_BYTES)
        ddp_pt_emit_kept(self._t, <const uint32_t *>num.p, <uint8_t *>PyBytes_AS_STRING(out), n)
        return out
