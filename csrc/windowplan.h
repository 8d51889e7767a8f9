/*
 * windowplan.h - what a restore needs to fetch one window of a generation, in one call.
 *
 * A window is a run of the generation's chunk-table records (id, raw length) worth about
 * 16 MiB of output. Restoring it means: find every chunk in the index, read each distinct
 * chunk once (a page-cut database repeats pages, zero pages above all), grouped by pack
 * and in pack order so that neighbouring blobs are one ranged read, open each blob
 * straight into its place in the window's output, and fill the repeats by copying.
 * Doing that per chunk in Python cost ~2 us a chunk (a quarter of a 4 KiB page's whole
 * restore); here it is one pass over the records.
 *
 * Plain C99, no Python.h. Reads the index only (any number of threads at once, as
 * chunkindex.h allows for a const table).
 */
#ifndef DDP_WINDOWPLAN_H
#define DDP_WINDOWPLAN_H

#include <stddef.h>
#include <stdint.h>

#include "chunkindex.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A chunk-table record (docs/FORMAT.md, the manifest's table): id, raw length (u32 LE). */
#define DDP_PLAN_RECORD_BYTES 36u

/* One distinct chunk of the window: where its blob is, and where its bytes go. */
typedef struct ddp_plan_item {
    uint32_t pack_no;
    uint32_t offset;        /* of the sealed blob in its pack */
    uint32_t stored_length; /* of the sealed blob */
    uint32_t raw_length;
    uint64_t out_pos;       /* of the chunk's first occurrence in the window's output */
} ddp_plan_item;

/* A repeat: out[dst .. dst + len) = out[src .. src + len), src < dst, once the items
 * are open. */
typedef struct ddp_plan_copy {
    uint64_t dst;
    uint64_t src;
    uint64_t len;
} ddp_plan_copy;

#define DDP_PLAN_OK 0
#define DDP_PLAN_EMISSING 1 /* record *bad's chunk is not in the index */
#define DDP_PLAN_ELENGTH 2  /* record *bad's length is not the index's raw length for it */
#define DDP_PLAN_ENOMEM 3

/*
 * Plan the window of n records (records[36 k ..]). On success:
 *   items[0 .. *n_items) are the distinct chunks, sorted by (pack_no, offset), and
 *   ids[32 i ..] is items[i]'s id;
 *   copies[0 .. *n_copies) are the records whose chunk occurred earlier in the window;
 *   *total is lead + the window's output size (the sum of the records' lengths).
 * The window's output starts at `lead` in its buffer: every out_pos, dst and src counts
 * from the buffer's start, and the first `lead` bytes are left alone (a restore to a
 * file puts each window where its first byte has the alignment of its file offset, so
 * that the bytes go to the file with O_DIRECT from where they were opened).
 * ids, items and copies must each have room for n entries. Returns DDP_PLAN_OK, or an
 * error with the first offending record's number in *bad (outputs are then garbage).
 */
int ddp_plan_window(const ddp_idx *t, const uint8_t *records, size_t n, uint8_t *ids,
                    ddp_plan_item *items, size_t *n_items, ddp_plan_copy *copies,
                    size_t *n_copies, uint64_t lead, uint64_t *total, size_t *bad);

#ifdef __cplusplus
}
#endif

#endif
