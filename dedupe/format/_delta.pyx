# cython: language_level=3
"""Thin wrapper over csrc/delta.c: a delta fed in pieces, each piece one kernel call
without the GIL. The contract is in csrc/delta.h; the spec is
dedupe.format.delta.make_delta_py, which this must match op for op. Typed in _delta.pyi."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.errno cimport errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t

import os


cdef extern from "delta.h" nogil:
    ctypedef struct ddp_delta_op:
        uint64_t a
        uint32_t b
        uint32_t kind
    ctypedef struct ddp_delta:
        pass
    int DDP_DELTA_RECORD
    int DDP_DELTA_COPY
    unsigned long long DDP_DELTA_MAX_PARENT
    ddp_delta *ddp_delta_open(const uint8_t *parent, int fd, uint64_t n_parent)
    int ddp_delta_feed(ddp_delta *d, const uint8_t *table, size_t n, uint8_t *literal,
                       size_t *n_literal)
    const ddp_delta_op *ddp_delta_ops(const ddp_delta *d, size_t *n_ops)
    size_t ddp_delta_memory(const ddp_delta *d)
    size_t ddp_delta_ops_json(const ddp_delta *d, char *out, size_t cap)
    void ddp_delta_close(ddp_delta *d)


MAX_PARENT_RECORDS = DDP_DELTA_MAX_PARENT
# Records fed to the kernel per call (each call's literal room is this many records).
cdef size_t FEED_PIECE = 8192


cdef _raise(int err):
    if err == 12:  # ENOMEM
        raise MemoryError()
    raise OSError(err, os.strerror(err))


cdef class DeltaBuilder:
    """The delta of a chunk table fed in order against a parent's complete table, held
    in `parent` (a buffer) or read from descriptor `fd` (`n_parent` records from offset
    0; the caller keeps it open). Indexing the parent happens here, without the GIL."""

    cdef ddp_delta *_d
    cdef Py_buffer _pv
    cdef bint _has_pv

    def __cinit__(self, parent=None, int fd=-1, n_parent=None):
        cdef uint64_t n
        cdef const uint8_t *mem = NULL
        cdef int err
        if parent is not None:
            PyObject_GetBuffer(parent, &self._pv, PyBUF_SIMPLE)
            self._has_pv = True
            n = <uint64_t>self._pv.len // DDP_DELTA_RECORD
            mem = <const uint8_t *>self._pv.buf
        elif fd >= 0 and n_parent is not None:
            n = n_parent
        else:
            raise ValueError("a parent buffer, or a descriptor and its record count")
        if n > DDP_DELTA_MAX_PARENT:
            raise ValueError("a parent table of 2**32 records or more")
        with nogil:
            self._d = ddp_delta_open(mem, fd, n)
            err = errno
        if self._d == NULL:
            _raise(err)

    def __dealloc__(self):
        ddp_delta_close(self._d)
        self._d = NULL
        if self._has_pv:
            PyBuffer_Release(&self._pv)
            self._has_pv = False

    def feed(self, table):
        """Feed the next CHUNK_RECORDs of the table; returns those the parent lacks (the
        literal records this piece adds), in order."""
        cdef Py_buffer tv
        cdef const uint8_t *src
        cdef uint8_t *dest
        cdef size_t n, done = 0, step, n_literal = 0
        cdef int rc = 0, err = 0
        if self._d == NULL:
            raise ValueError("the delta failed earlier and cannot go on")
        PyObject_GetBuffer(table, &tv, PyBUF_SIMPLE)
        try:
            if tv.len % DDP_DELTA_RECORD:
                raise ValueError("a chunk table holds whole CHUNK_RECORDs")
            n = <size_t>tv.len // DDP_DELTA_RECORD
            src = <const uint8_t *>tv.buf
            # The kernel writes a piece's literals to room for the whole piece. Pieces of
            # FEED_PIECE records keep that room small: an incremental feeds pieces of up
            # to ~170,000 records of which few are literal, and room for all of them was
            # a 6 MiB buffer at the backup's peak (stop 36).
            literal = bytearray()
            scratch = PyBytes_FromStringAndSize(NULL, min(n, FEED_PIECE) * DDP_DELTA_RECORD)
            dest = <uint8_t *>PyBytes_AS_STRING(scratch)
            while done < n and rc == 0:
                step = min(n - done, FEED_PIECE)
                with nogil:
                    rc = ddp_delta_feed(
                        self._d, src + done * DDP_DELTA_RECORD, step, dest, &n_literal
                    )
                    err = errno
                if rc == 0 and n_literal:
                    literal += scratch[: n_literal * DDP_DELTA_RECORD]
                done += step
        finally:
            PyBuffer_Release(&tv)
        if rc != 0:
            ddp_delta_close(self._d)
            self._d = NULL
            _raise(err)
        return bytes(literal)

    def ops(self):
        """The delta's ops so far: [0, start, count] and [1, count] (FORMAT.md 8.1)."""
        cdef size_t i, n_ops
        cdef const ddp_delta_op *ops
        if self._d == NULL:
            raise ValueError("the delta failed earlier and cannot go on")
        ops = ddp_delta_ops(self._d, &n_ops)
        out = []
        for i in range(n_ops):
            if ops[i].kind == DDP_DELTA_COPY:
                out.append([0, ops[i].a, ops[i].b])
            else:
                out.append([1, ops[i].a])
        return out

    def ops_json(self):
        """The ops so far as JSON text (bytes): json.dumps(self.ops()), encoded, without
        the Python lists, which take ~110 bytes an op."""
        cdef size_t size
        if self._d == NULL:
            raise ValueError("the delta failed earlier and cannot go on")
        size = ddp_delta_ops_json(self._d, NULL, 0)
        out = PyBytes_FromStringAndSize(NULL, size)
        ddp_delta_ops_json(self._d, PyBytes_AS_STRING(out), size)
        return out

    def memory_bytes(self):
        """What the kernel holds: 6-byte slots (a position and a 16-bit tag), at most
        3/4 full, for the distinct parent records; the read window; the ops."""
        return 0 if self._d == NULL else ddp_delta_memory(self._d)
