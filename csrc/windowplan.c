/* windowplan.c - see windowplan.h. */
#include "windowplan.h"

#include <stdlib.h>
#include <string.h>

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Slot of an id in a table of 2^bits slots (bits: 4 to ~18 for a window). Ids are keyed
 * hashes, but a writer knows the id key and can pick chunks whose ids land in one slot
 * (about 2^bits tries each). That only slows windows of that writer's own generations
 * (probes compare whole ids and stop at the first difference, so it costs time, never
 * correctness); mixing the first 8 bytes just keeps ordinary ids spread. */
static size_t home(const uint8_t *id, unsigned bits)
{
    uint64_t h;
    memcpy(&h, id, sizeof h);
    return (size_t)((h * UINT64_C(0x9E3779B97F4A7C15)) >> (64 - bits));
}

typedef struct {
    uint64_t key; /* pack_no << 32 | offset: the order blobs are read in */
    size_t item;
} sort_key;

static int by_key(const void *a, const void *b)
{
    uint64_t x = ((const sort_key *)a)->key, y = ((const sort_key *)b)->key;
    return (x > y) - (x < y);
}

int ddp_plan_window(const ddp_idx *t, const uint8_t *records, size_t n, uint8_t *ids,
                    ddp_plan_item *items, size_t *n_items, ddp_plan_copy *copies,
                    size_t *n_copies, uint64_t lead, uint64_t *total, size_t *bad)
{
    unsigned bits = 4;
    while (((size_t)1 << bits) < 2 * n) bits++;
    size_t mask = ((size_t)1 << bits) - 1;
    uint8_t *flat = malloc(n ? n * DDP_IDX_ID_BYTES : 1);
    ddp_idx_value *found = malloc((n ? n : 1) * sizeof *found);
    uint32_t *seen = calloc(mask + 1, sizeof *seen); /* distinct chunk number + 1, or 0 */
    ddp_plan_item *unsorted = malloc((n ? n : 1) * sizeof *unsorted);
    const uint8_t **unsorted_id = malloc((n ? n : 1) * sizeof *unsorted_id);
    sort_key *order = NULL;
    int rc = DDP_PLAN_OK;
    *bad = 0;
    if (!flat || !found || !seen || !unsorted || !unsorted_id) {
        rc = DDP_PLAN_ENOMEM;
        goto out;
    }
    for (size_t k = 0; k < n; k++)
        memcpy(flat + k * DDP_IDX_ID_BYTES, records + k * DDP_PLAN_RECORD_BYTES,
               DDP_IDX_ID_BYTES);
    ddp_idx_get_many(t, flat, n, found); /* batched: it prefetches ahead */

    size_t distinct = 0, repeats = 0;
    uint64_t pos = lead;
    int sorted = 1;
    for (size_t k = 0; k < n; k++) {
        const uint8_t *id = flat + k * DDP_IDX_ID_BYTES;
        uint32_t length = le32(records + k * DDP_PLAN_RECORD_BYTES + DDP_IDX_ID_BYTES);
        if (found[k].pack_no == DDP_IDX_NO_PACK) {
            rc = DDP_PLAN_EMISSING;
            *bad = k;
            goto out;
        }
        /* Same id, same bytes: a length that differs from the index's means one of the
         * two is damaged, and the output positions would be wrong. */
        if (found[k].raw_length != length) {
            rc = DDP_PLAN_ELENGTH;
            *bad = k;
            goto out;
        }
        size_t s = home(id, bits);
        while (seen[s] && memcmp(unsorted_id[seen[s] - 1], id, DDP_IDX_ID_BYTES) != 0)
            s = (s + 1) & mask;
        if (seen[s]) {
            ddp_plan_copy *c = &copies[repeats++];
            c->dst = pos;
            c->src = unsorted[seen[s] - 1].out_pos;
            c->len = length;
        } else {
            ddp_plan_item *it = &unsorted[distinct];
            it->pack_no = found[k].pack_no;
            it->offset = found[k].offset;
            it->stored_length = found[k].stored_length;
            it->raw_length = length;
            it->out_pos = pos;
            if (distinct && (it[-1].pack_no > it->pack_no ||
                             (it[-1].pack_no == it->pack_no && it[-1].offset > it->offset)))
                sorted = 0;
            unsorted_id[distinct] = id;
            seen[s] = (uint32_t)++distinct;
        }
        pos += length;
    }

    if (sorted) { /* the usual case: a stream backed up in one go lies in pack order */
        memcpy(items, unsorted, distinct * sizeof *items);
        for (size_t i = 0; i < distinct; i++)
            memcpy(ids + i * DDP_IDX_ID_BYTES, unsorted_id[i], DDP_IDX_ID_BYTES);
    } else {
        order = malloc(distinct * sizeof *order);
        if (!order) {
            rc = DDP_PLAN_ENOMEM;
            goto out;
        }
        for (size_t i = 0; i < distinct; i++) {
            order[i].key = (uint64_t)unsorted[i].pack_no << 32 | unsorted[i].offset;
            order[i].item = i;
        }
        qsort(order, distinct, sizeof *order, by_key);
        for (size_t i = 0; i < distinct; i++) {
            items[i] = unsorted[order[i].item];
            memcpy(ids + i * DDP_IDX_ID_BYTES, unsorted_id[order[i].item], DDP_IDX_ID_BYTES);
        }
    }
    *n_items = distinct;
    *n_copies = repeats;
    *total = pos;
out:
    free(flat);
    free(found);
    free(seen);
    free(unsorted);
    free(unsorted_id);
    free(order);
    return rc;
}
