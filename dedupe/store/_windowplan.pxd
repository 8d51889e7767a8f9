# The restore window plan's records (csrc/windowplan.h), for the modules that make them
# (_chunkindex) and use them (_blobcodec). Declarations only: nothing is built from this.
from libc.stdint cimport uint32_t, uint64_t


cdef extern from "windowplan.h" nogil:
    ctypedef struct ddp_plan_item:
        uint32_t pack_no
        uint32_t offset
        uint32_t stored_length
        uint32_t raw_length
        uint64_t out_pos
    ctypedef struct ddp_plan_copy:
        uint64_t dst
        uint64_t src
        uint64_t len
