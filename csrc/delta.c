/*
 * delta.c - see delta.h for the contract and the spec it follows.
 */
#define _POSIX_C_SOURCE 200809L
#include "delta.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define R DDP_DELTA_RECORD
#define EMPTY UINT32_MAX
/* 1,820 records: the largest whole number of records in 64 KiB. */
#define WINDOW_RECORDS (65536 / R)
/* Slots: at most 3/4 used (linear probing stays short), grown by half when more are
 * needed, so 4/3 to 2 slots (10.7 to 16 bytes) per distinct parent record, and never the
 * power-of-two step that doubled the table of a parent just past 2^k records. The slot
 * index is the multiply-shift reduction of the 32-bit tag, so any count up to 2^32 works
 * and a growth rehashes from the tags alone. */
#define MIN_SLOTS 1024u
#define MAX_SLOTS (UINT64_C(1) << 32)

typedef struct {
    uint32_t tag; /* high half of the record's hash; the slot index is derived from it */
    uint32_t pos; /* first occurrence in the parent, or EMPTY */
} slot_t;

/* Once the parent is indexed nothing grows, so the 32-bit tags, which place a slot, are
 * needed no more: the slots become positions alone, beside a second, 16-bit tag kept from
 * the start in an array of its own (6 bytes a slot, not 8). The second tag comes from
 * other id bytes than the first: the first's high bits are what put neighbouring records
 * in neighbouring slots, so they would tell such records apart almost never (measured:
 * taking them tripled a 4 GiB incremental's system time in parent reads). A probe walks
 * the same slots as before; a second tag matches a record it is not about once in 65,536
 * probes, and the record comparison then says no. */

struct ddp_delta {
    const uint8_t *mem; /* the parent in memory, or NULL */
    int fd;             /* else read from here */
    uint64_t n_parent;
    slot_t *slots;   /* while the parent is indexed, then NULL */
    uint32_t *pos;   /* after: each slot's position, or EMPTY */
    uint16_t *tag16; /* each slot's second tag (record_tag16), all along */
    size_t cap; /* MIN_SLOTS .. MAX_SLOTS */
    size_t count;
    uint8_t *window; /* parent records win_start .. win_start + win_n (file mode) */
    uint64_t win_start, win_n;
    int64_t expect; /* parent record the current copy op would continue with, or -1 */
    ddp_delta_op *ops;
    size_t n_ops, ops_cap;
};

static uint32_t record_tag(const uint8_t *rec)
{
    uint64_t h;
    memcpy(&h, rec, sizeof h); /* the chunk id's first bytes: already uniformly random */
    h *= 0x9E3779B97F4A7C15ull; /* mixes them for ids that are not (tests) */
    return (uint32_t)(h >> 32);
}

/* The second tag: from the id's next 8 bytes, independent of the slot. */
static uint16_t record_tag16(const uint8_t *rec)
{
    uint64_t h;
    memcpy(&h, rec + 8, sizeof h);
    h *= 0xC2B2AE3D27D4EB4Full;
    return (uint16_t)(h >> 48);
}

/* Read n records from the parent file at record `pos` into `out`. */
static int read_records(const ddp_delta *d, uint64_t pos, uint64_t n, uint8_t *out)
{
    size_t want = (size_t)(n * R), got = 0;
    while (got < want) {
        ssize_t k = pread(d->fd, out + got, want - got, (off_t)(pos * R + got));
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (k == 0) {
            errno = EIO; /* the file is shorter than n_parent records */
            return -1;
        }
        got += (size_t)k;
    }
    return 0;
}

/* Parent record `pos` (< n_parent): in memory, or through the window, which then starts
 * there, so that a copy run found at `pos` continues inside it. NULL on a read error. */
static const uint8_t *parent_at(ddp_delta *d, uint64_t pos)
{
    if (d->mem != NULL)
        return d->mem + pos * R;
    if (pos < d->win_start || pos >= d->win_start + d->win_n) {
        uint64_t n = d->n_parent - pos < WINDOW_RECORDS ? d->n_parent - pos : WINDOW_RECORDS;
        d->win_n = 0;
        if (read_records(d, pos, n, d->window) != 0)
            return NULL;
        d->win_start = pos;
        d->win_n = n;
    }
    return d->window + (pos - d->win_start) * R;
}

/* Where a probe for `tag` starts in a table of `cap` slots. */
static size_t home_slot(uint32_t tag, size_t cap)
{
    return (size_t)(((uint64_t)tag * (uint64_t)cap) >> 32); /* < cap, as cap <= 2^32 */
}

/* The slot holding `rec`'s first occurrence, or the empty slot where it would go.
 * `scan`/`scan_start`/`scan_n`: records being indexed, to compare with in place. Returns
 * -1 on a read error. */
static int64_t find_slot(ddp_delta *d, const uint8_t *rec, uint32_t tag, const uint8_t *scan,
                         uint64_t scan_start, uint64_t scan_n)
{
    size_t i = home_slot(tag, d->cap);
    while (d->slots[i].pos != EMPTY) {
        if (d->slots[i].tag == tag) {
            uint64_t p = d->slots[i].pos;
            const uint8_t *other = (scan != NULL && p >= scan_start && p < scan_start + scan_n)
                                       ? scan + (p - scan_start) * R
                                       : parent_at(d, p);
            if (other == NULL)
                return -1;
            if (memcmp(other, rec, R) == 0)
                return (int64_t)i;
        }
        i = i + 1 == d->cap ? 0 : i + 1;
    }
    return (int64_t)i;
}

/* Called when count exceeds 3/4 of cap. At MAX_SLOTS nothing grows: count <= n_parent <
 * 2^32 - 1 leaves an empty slot, so probes still end. */
static int grow_slots(ddp_delta *d)
{
    if ((uint64_t)d->cap >= MAX_SLOTS)
        return 0;
    uint64_t want = (uint64_t)d->cap + d->cap / 2;
    if (want > MAX_SLOTS)
        want = MAX_SLOTS;
    if (want > SIZE_MAX / sizeof(slot_t)) {
        errno = ENOMEM;
        return -1;
    }
    size_t cap = (size_t)want;
    slot_t *slots = malloc(cap * sizeof *slots);
    uint16_t *tags = malloc(cap * sizeof *tags);
    if (slots == NULL || tags == NULL) {
        free(slots);
        free(tags);
        return -1;
    }
    for (size_t i = 0; i < cap; i++)
        slots[i].pos = EMPTY;
    for (size_t j = 0; j < d->cap; j++) {
        if (d->slots[j].pos == EMPTY)
            continue;
        size_t i = home_slot(d->slots[j].tag, cap); /* distinct records: no compare */
        while (slots[i].pos != EMPTY)
            i = i + 1 == cap ? 0 : i + 1;
        slots[i] = d->slots[j];
        tags[i] = d->tag16[j];
    }
    free(d->slots);
    free(d->tag16);
    d->slots = slots;
    d->tag16 = tags;
    d->cap = cap;
    return 0;
}

static int push_op(ddp_delta *d, ddp_delta_op op)
{
    if (d->n_ops == d->ops_cap) {
        /* Grown by half, as the slots are: an incremental of a 4 GiB page file has
         * ~180,000 ops, and doubling left up to twice their size allocated. */
        size_t cap = d->ops_cap ? d->ops_cap + d->ops_cap / 2 : 64;
        ddp_delta_op *ops = realloc(d->ops, cap * sizeof *ops);
        if (ops == NULL)
            return -1;
        d->ops = ops;
        d->ops_cap = cap;
    }
    d->ops[d->n_ops++] = op;
    return 0;
}

/* The indexed slots as positions alone, beside their second tags. */
static int compact_slots(ddp_delta *d)
{
    d->pos = malloc(d->cap * sizeof *d->pos);
    if (d->pos == NULL)
        return -1;
    for (size_t i = 0; i < d->cap; i++)
        d->pos[i] = d->slots[i].pos;
    free(d->slots);
    d->slots = NULL;
    return 0;
}

/* The first occurrence of `rec` in the parent: its position, -1 if the parent lacks it,
 * or -2 on a read error. */
static int64_t first_occurrence(ddp_delta *d, const uint8_t *rec)
{
    const uint16_t tag16 = record_tag16(rec);
    size_t i = home_slot(record_tag(rec), d->cap);
    while (d->pos[i] != EMPTY) {
        if (d->tag16[i] == tag16) {
            const uint8_t *other = parent_at(d, d->pos[i]);
            if (other == NULL)
                return -2;
            if (memcmp(other, rec, R) == 0)
                return (int64_t)d->pos[i];
        }
        i = i + 1 == d->cap ? 0 : i + 1;
    }
    return -1;
}

ddp_delta *ddp_delta_open(const uint8_t *parent, int fd, uint64_t n_parent)
{
    if (n_parent > DDP_DELTA_MAX_PARENT) {
        errno = EINVAL;
        return NULL;
    }
    ddp_delta *d = calloc(1, sizeof *d);
    uint8_t *scan = NULL;
    if (d == NULL)
        return NULL;
    d->mem = parent;
    d->fd = fd;
    d->n_parent = n_parent;
    d->expect = -1;
    d->cap = MIN_SLOTS;
    d->slots = malloc(d->cap * sizeof *d->slots);
    d->tag16 = malloc(d->cap * sizeof *d->tag16);
    if (parent == NULL) {
        d->window = malloc(WINDOW_RECORDS * R);
        scan = malloc(WINDOW_RECORDS * R);
        if (d->window == NULL || scan == NULL)
            goto fail;
    }
    if (d->slots == NULL || d->tag16 == NULL)
        goto fail;
    for (size_t i = 0; i < d->cap; i++)
        d->slots[i].pos = EMPTY;

    /* Index first occurrences, in parent order, never replacing one. */
    for (uint64_t start = 0; start < n_parent; start += WINDOW_RECORDS) {
        uint64_t n = n_parent - start < WINDOW_RECORDS ? n_parent - start : WINDOW_RECORDS;
        const uint8_t *block = parent != NULL ? parent + start * R : scan;
        if (parent == NULL && read_records(d, start, n, scan) != 0)
            goto fail;
        for (uint64_t j = 0; j < n; j++) {
            const uint8_t *rec = block + j * R;
            uint32_t tag = record_tag(rec);
            int64_t i = find_slot(d, rec, tag, block, start, j);
            if (i < 0)
                goto fail;
            if (d->slots[i].pos != EMPTY)
                continue; /* a repeat: the first occurrence stays */
            d->slots[i].tag = tag;
            d->slots[i].pos = (uint32_t)(start + j);
            d->tag16[i] = record_tag16(rec);
            if (++d->count * 4 > d->cap * 3 && grow_slots(d) != 0)
                goto fail;
        }
    }
    free(scan);
    scan = NULL;
    if (compact_slots(d) != 0)
        goto fail;
    return d;
fail: {
    int saved = errno;
    free(scan);
    ddp_delta_close(d);
    errno = saved;
    return NULL;
}
}

int ddp_delta_feed(ddp_delta *d, const uint8_t *table, size_t n, uint8_t *literal,
                   size_t *n_literal)
{
    *n_literal = 0;
    for (size_t k = 0; k < n; k++) {
        const uint8_t *rec = table + k * R;
        if (d->expect >= 0 && (uint64_t)d->expect < d->n_parent) {
            const uint8_t *p = parent_at(d, (uint64_t)d->expect);
            if (p == NULL)
                return -1;
            if (memcmp(p, rec, R) == 0) {
                d->ops[d->n_ops - 1].b += 1; /* a copy op is current whenever expect >= 0 */
                d->expect += 1;
                continue;
            }
        }
        int64_t first = first_occurrence(d, rec);
        if (first == -2)
            return -1;
        if (first >= 0) {
            uint64_t pos = (uint64_t)first;
            if (push_op(d, (ddp_delta_op){.a = pos, .b = 1, .kind = DDP_DELTA_COPY}) != 0)
                return -1;
            d->expect = (int64_t)pos + 1;
            continue;
        }
        memcpy(literal + *n_literal * R, rec, R);
        *n_literal += 1;
        d->expect = -1;
        if (d->n_ops && d->ops[d->n_ops - 1].kind == DDP_DELTA_LITERAL) {
            d->ops[d->n_ops - 1].a += 1;
        } else if (push_op(d, (ddp_delta_op){.a = 1, .b = 0, .kind = DDP_DELTA_LITERAL}) != 0) {
            return -1;
        }
    }
    return 0;
}

const ddp_delta_op *ddp_delta_ops(const ddp_delta *d, size_t *n_ops)
{
    *n_ops = d->n_ops;
    return d->ops;
}

/* Decimal digits of v, written at out + pos when they fit below cap; returns the new pos. */
static size_t put_uint(char *out, size_t cap, size_t pos, uint64_t v)
{
    char digits[20];
    size_t n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n) {
        n--;
        if (pos < cap)
            out[pos] = digits[n];
        pos++;
    }
    return pos;
}

static size_t put_text(char *out, size_t cap, size_t pos, const char *s)
{
    for (; *s; s++, pos++)
        if (pos < cap)
            out[pos] = *s;
    return pos;
}

size_t ddp_delta_ops_json(const ddp_delta *d, char *out, size_t cap)
{
    size_t pos = put_text(out, cap, 0, "[");
    for (size_t i = 0; i < d->n_ops; i++) {
        const ddp_delta_op *op = &d->ops[i];
        if (i)
            pos = put_text(out, cap, pos, ", ");
        if (op->kind == DDP_DELTA_COPY) {
            pos = put_text(out, cap, pos, "[0, ");
            pos = put_uint(out, cap, pos, op->a);
            pos = put_text(out, cap, pos, ", ");
            pos = put_uint(out, cap, pos, op->b);
        } else {
            pos = put_text(out, cap, pos, "[1, ");
            pos = put_uint(out, cap, pos, op->a);
        }
        pos = put_text(out, cap, pos, "]");
    }
    return put_text(out, cap, pos, "]");
}

size_t ddp_delta_memory(const ddp_delta *d)
{
    size_t per_slot = (d->slots != NULL ? sizeof *d->slots : sizeof *d->pos) + sizeof *d->tag16;
    return d->cap * per_slot + (d->window ? WINDOW_RECORDS * R : 0) +
           d->ops_cap * sizeof *d->ops;
}

void ddp_delta_close(ddp_delta *d)
{
    if (d == NULL)
        return;
    free(d->slots);
    free(d->pos);
    free(d->tag16);
    free(d->window);
    free(d->ops);
    free(d);
}
