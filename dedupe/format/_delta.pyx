# cython: language_level=3
"""Thin wrapper over csrc/delta.c: one kernel call, without the GIL, per delta. The
contract is in csrc/delta.h; the spec is dedupe.format.delta.make_delta_py, which this
must match op for op. Typed in _delta.pyi."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef extern from "delta.h" nogil:
    ctypedef struct ddp_delta_op:
        uint32_t kind
        uint64_t a
        uint64_t b
    ctypedef struct ddp_delta_result:
        uint8_t *literal
        size_t n_literal
        ddp_delta_op *ops
        size_t n_ops
    int DDP_DELTA_RECORD
    int DDP_DELTA_COPY
    int ddp_delta_make(const uint8_t *parent, size_t n_parent, const uint8_t *table,
                       size_t n_table, ddp_delta_result *out)
    void ddp_delta_free(ddp_delta_result *out)


MAX_PARENT_RECORDS = 0xFFFFFFFE  # record numbers are uint32, one value is the empty mark


def make_delta(parent, table):
    """(literal table, ops) of `table` against `parent`, both CHUNK_RECORD buffers."""
    cdef Py_buffer pv, tv
    cdef ddp_delta_result res
    cdef int rc
    cdef size_t i, n_parent, n_table
    PyObject_GetBuffer(parent, &pv, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(table, &tv, PyBUF_SIMPLE)
        try:
            n_parent = <size_t>pv.len // DDP_DELTA_RECORD
            n_table = <size_t>tv.len // DDP_DELTA_RECORD
            if n_parent > MAX_PARENT_RECORDS:
                raise ValueError("a parent table of 2**32 records or more")
            with nogil:
                rc = ddp_delta_make(<const uint8_t *>pv.buf, n_parent,
                                    <const uint8_t *>tv.buf, n_table, &res)
            try:
                if rc != 0:
                    raise MemoryError()
                literal = PyBytes_FromStringAndSize(
                    <const char *>res.literal, res.n_literal * DDP_DELTA_RECORD
                )
                ops = []
                for i in range(res.n_ops):
                    if res.ops[i].kind == DDP_DELTA_COPY:
                        ops.append([0, res.ops[i].a, res.ops[i].b])
                    else:
                        ops.append([1, res.ops[i].a])
                return literal, ops
            finally:
                ddp_delta_free(&res)
        finally:
            PyBuffer_Release(&tv)
    finally:
        PyBuffer_Release(&pv)
