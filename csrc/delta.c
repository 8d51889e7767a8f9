/*
 * delta.c - see delta.h for the contract and the spec it follows.
 */
#include "delta.h"

#include <stdlib.h>
#include <string.h>

#define EMPTY UINT32_MAX

static uint64_t record_hash(const uint8_t *rec)
{
    uint64_t h;
    memcpy(&h, rec, sizeof h); /* the chunk id's first bytes: already uniformly random */
    return h * 0x9E3779B97F4A7C15ull; /* mixes them for ids that are not (tests) */
}

/* Grow a malloc'd array to hold at least `need` items of `size` bytes. */
static int reserve(void **items, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap)
        return 0;
    size_t grown = *cap ? *cap : 64;
    while (grown < need)
        grown += grown / 2 + 1;
    void *p = realloc(*items, grown * size);
    if (p == NULL)
        return -1;
    *items = p;
    *cap = grown;
    return 0;
}

int ddp_delta_make(const uint8_t *parent, size_t n_parent, const uint8_t *table,
                   size_t n_table, ddp_delta_result *out)
{
    const size_t R = DDP_DELTA_RECORD;
    size_t lit_cap = 0, ops_cap = 0;
    out->literal = NULL;
    out->ops = NULL;
    out->n_literal = out->n_ops = 0;

    /* First occurrences: slot -> parent record number. Inserting in parent order and
     * never replacing keeps the first. Capacity: a power of two, at least 2 n_parent. */
    size_t cap = 16;
    while (cap < 2 * n_parent)
        cap <<= 1;
    uint32_t *first = malloc(cap * sizeof *first);
    if (first == NULL)
        return -1;
    for (size_t i = 0; i < cap; i++)
        first[i] = EMPTY;
    const size_t mask = cap - 1;
    for (size_t i = 0; i < n_parent; i++) {
        const uint8_t *rec = parent + i * R;
        size_t slot = (size_t)(record_hash(rec) & mask);
        while (first[slot] != EMPTY && memcmp(parent + (size_t)first[slot] * R, rec, R) != 0)
            slot = (slot + 1) & mask;
        if (first[slot] == EMPTY)
            first[slot] = (uint32_t)i;
    }

    int64_t expect = -1; /* parent record the current copy op would continue with */
    for (size_t i = 0; i < n_table; i++) {
        const uint8_t *rec = table + i * R;
        ddp_delta_op *last = out->n_ops ? &out->ops[out->n_ops - 1] : NULL;
        if (expect >= 0 && (size_t)expect < n_parent &&
            memcmp(parent + (size_t)expect * R, rec, R) == 0) {
            last->b += 1; /* a copy op is current whenever expect >= 0 */
            expect += 1;
            continue;
        }
        size_t slot = (size_t)(record_hash(rec) & mask);
        while (first[slot] != EMPTY && memcmp(parent + (size_t)first[slot] * R, rec, R) != 0)
            slot = (slot + 1) & mask;
        if (first[slot] != EMPTY) {
            if (reserve((void **)&out->ops, &ops_cap, out->n_ops + 1, sizeof *out->ops))
                goto oom;
            out->ops[out->n_ops++] = (ddp_delta_op){DDP_DELTA_COPY, first[slot], 1};
            expect = (int64_t)first[slot] + 1;
            continue;
        }
        if (reserve((void **)&out->literal, &lit_cap, out->n_literal + 1, R))
            goto oom;
        memcpy(out->literal + out->n_literal * R, rec, R);
        out->n_literal += 1;
        expect = -1;
        if (last != NULL && last->kind == DDP_DELTA_LITERAL) {
            last->a += 1;
        } else {
            if (reserve((void **)&out->ops, &ops_cap, out->n_ops + 1, sizeof *out->ops))
                goto oom;
            out->ops[out->n_ops++] = (ddp_delta_op){DDP_DELTA_LITERAL, 1, 0};
        }
    }
    free(first);
    return 0;
oom:
    free(first);
    return -1;
}

void ddp_delta_free(ddp_delta_result *out)
{
    free(out->literal);
    free(out->ops);
    out->literal = NULL;
    out->ops = NULL;
    out->n_literal = out->n_ops = 0;
}
