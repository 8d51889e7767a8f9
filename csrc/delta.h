/*
 * delta.h - the delta of a chunk table against its parent's (docs/FORMAT.md section 8.1),
 * computed natively. Plain C99, no Python.h. Every symbol is prefixed ddp_delta_.
 *
 * The pure-Python dedupe.format.delta.make_delta is the spec; this kernel must produce
 * exactly its output (tests/format/test_delta.py compares them):
 *
 *   for each record of `table`, in order:
 *     - if it equals parent[expect] (0 <= expect < n_parent), the current copy op grows by
 *       one and expect advances;
 *     - else if it occurs in the parent, a new copy op starts at its FIRST occurrence;
 *     - else it is appended to the literal table, expect becomes -1, and the current
 *       literal op grows by one (or a new one starts).
 *
 * Records are 36 bytes (chunk id, raw length). The lookup of first occurrences is an
 * open-addressing table of 32-bit record numbers, 8 bytes per parent record at most,
 * hashed on the chunk id's first 8 bytes (keyed BLAKE3 output: uniformly random).
 */
#ifndef DDP_DELTA_H
#define DDP_DELTA_H

#include <stddef.h>
#include <stdint.h>

#define DDP_DELTA_RECORD 36
#define DDP_DELTA_COPY 0
#define DDP_DELTA_LITERAL 1

/* One op: kind COPY (start, count) or LITERAL (count, unused). */
typedef struct {
    uint32_t kind;
    uint64_t a;
    uint64_t b;
} ddp_delta_op;

typedef struct {
    uint8_t *literal;   /* n_literal records (malloc'd) */
    size_t n_literal;
    ddp_delta_op *ops;  /* n_ops ops (malloc'd) */
    size_t n_ops;
} ddp_delta_result;

/* Compute the delta of `table` (n_table records) against `parent` (n_parent records,
 * fewer than 2^32) into *out, whose buffers the caller releases with ddp_delta_free
 * (also after a failure). Returns 0, or -1 when memory ran out. */
int ddp_delta_make(const uint8_t *parent, size_t n_parent, const uint8_t *table,
                   size_t n_table, ddp_delta_result *out);

void ddp_delta_free(ddp_delta_result *out);

#endif
