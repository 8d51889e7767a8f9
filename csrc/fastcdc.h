/*
 * fastcdc.h - FastCDC 2020 content-defined chunking kernel of dedupe.
 *
 * Plain C99, no Python.h. Every symbol is prefixed ddp_ / DDP_. The algorithm, and
 * therefore every cut point, is part of dedupe's on-disk format ("fastcdc-2020" in the
 * repository config): changing anything observable here breaks dedupe against every
 * existing repository. The pure-Python twin (dedupe/chunking/_pure.py) is the
 * executable spec; docs/CHUNKING.md and docs/FORMAT.md describe it in prose.
 *
 * Definition (byte at a time; the kernel computes exactly this, eight bytes per step).
 * For a chunk starting at byte 0 of the remaining stream, with i the 0-based index of a
 * byte inside the chunk:
 *   - bytes with i < min_size are not hashed (cut-point skipping); fp = 0 before the
 *     byte i = min_size is hashed;
 *   - for i = min_size, min_size + 1, ...:  fp = (fp << 1) + gear[byte]   (mod 2^64)
 *     mask = (i < avg_size) ? mask_s : mask_l
 *     if ((fp & mask) == 0) the chunk ends after byte i (its length is i + 1);
 *   - a chunk that reaches max_size bytes ends there;
 *   - at the end of the stream, the remaining bytes (if any) form the final chunk,
 *     which is the only chunk that may be shorter than min_size + 1.
 * So every chunk but the last has a length in [min_size + 1, max_size].
 *
 * Masks: with bits = log2(avg_size) and n = normalization, mask_s has bits + n one-bits,
 * mask_l has bits - n one-bits; a mask with k one-bits is the contiguous run of bits
 * 63-k .. 62:  ((1 << k) - 1) << (63 - k). Bit 63 is always clear, which makes the
 * two-bytes-per-step evaluation below exact; the high bits of a gear hash depend on the
 * most bytes (bit j of fp depends on the last j + 1 bytes), so the effective window is
 * 63 - k >= 38 bytes (k <= 22 + 3).
 *
 * Two bytes per step (Xia et al. 2020; fastcdc.c extends it to eight): with
 * gear_ls[b] = gear[b] << 1 and
 * mask_ls = mask << 1,  (fp << 2) + gear_ls[a] == ((fp << 1) + gear[a]) << 1, and since
 * bit 63 of mask is clear, testing it against mask_ls is the same as testing the
 * one-byte-later fp against mask.
 */
#ifndef DDP_FASTCDC_H
#define DDP_FASTCDC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Parameter bounds (also enforced by dedupe.chunking.params.ChunkerParams). */
#define DDP_CDC_MIN_SIZE_LOWER  64u
#define DDP_CDC_AVG_SIZE_LOWER  256u
#define DDP_CDC_AVG_SIZE_UPPER  (4u << 20)   /* 4 MiB */
#define DDP_CDC_MAX_SIZE_UPPER  (16u << 20)  /* 16 MiB */
#define DDP_CDC_NORM_UPPER      3u
#define DDP_CDC_GEAR_BYTES      2048u        /* 256 little-endian uint64 */

/* Return codes of ddp_cdc_init. */
#define DDP_CDC_OK      0
#define DDP_CDC_EINVAL  (-1)

/* Immutable chunker configuration: filled by ddp_cdc_init, then only read (it can be
 * shared by threads). */
typedef struct ddp_cdc_config {
    size_t min_size;
    size_t avg_size;
    size_t max_size;
    uint64_t mask_s, mask_l;        /* see the header comment */
    uint64_t mask_s_ls, mask_l_ls;  /* mask << 1 */
    uint64_t gear[256];
    uint64_t gear_ls[256];          /* gear[b] << 1 */
} ddp_cdc_config;

/* Progress inside the chunk that starts at the beginning of the buffer handed to the next
 * ddp_cdc_scan call, so that bytes already hashed are not hashed again when more data
 * arrives. A zeroed state (ddp_cdc_state_reset) means "nothing hashed yet". */
typedef struct ddp_cdc_state {
    size_t pos;    /* index (within that chunk) of the next byte to hash; < min_size: none yet */
    uint64_t fp;   /* gear hash after hashing bytes min_size .. pos - 1 */
} ddp_cdc_state;

/* Mask with k one-bits (bits 63-k .. 62). Contract: 1 <= k <= 62, else returns 0. */
uint64_t ddp_cdc_mask(unsigned k);

/* Fill *cfg. gear_le: DDP_CDC_GEAR_BYTES bytes, 256 uint64 in little-endian order
 * (read portably, whatever the host byte order).
 * Returns DDP_CDC_OK, or DDP_CDC_EINVAL (cfg left unspecified) unless all of:
 *   DDP_CDC_MIN_SIZE_LOWER <= min_size < avg_size < max_size <= DDP_CDC_MAX_SIZE_UPPER,
 *   avg_size a power of two in [DDP_CDC_AVG_SIZE_LOWER, DDP_CDC_AVG_SIZE_UPPER],
 *   normalization <= DDP_CDC_NORM_UPPER and log2(avg_size) - normalization >= 1. */
int ddp_cdc_init(ddp_cdc_config *cfg, const uint8_t *gear_le, size_t min_size,
                 size_t avg_size, size_t max_size, unsigned normalization);

/* Set *st to "nothing of the current chunk hashed yet". */
void ddp_cdc_state_reset(ddp_cdc_state *st);

/* Find the cut points in buf[0 .. len), where a chunk starts at buf[0] and *st tells how
 * much of that first chunk earlier calls already hashed (the caller must hand the same
 * leading bytes again, followed by new ones).
 *
 * Writes to ends[0 .. n) the end offsets (exclusive, relative to buf, strictly
 * increasing) of the chunks that end inside the buffer, at most cap of them, and returns
 * n. Every offset written is a final cut point, independent of any data after buf.
 *   - n < cap: every cut in the buffer was found. If eof is nonzero, the rest of the
 *     buffer (if not empty) is the final chunk and its end (len) is included, and *st is
 *     reset. If eof is zero, the bytes after the last end (or all of buf if n == 0) are
 *     the pending start of the next chunk; *st records how far it was hashed, to be
 *     passed with those bytes (followed by more) to the next call.
 *   - n == cap: the output array is full; *st is reset for the chunk starting at
 *     ends[cap - 1]; call again with buf + ends[cap - 1] (same eof) to go on.
 * cap == 0 returns 0 and changes nothing. buf may be NULL when len == 0.
 * Never allocates; touches no global state; thread-safe for distinct st/ends. */
size_t ddp_cdc_scan(const ddp_cdc_config *cfg, ddp_cdc_state *st, const uint8_t *buf,
                    size_t len, int eof, size_t *ends, size_t cap);

/* An upper bound on the number of ends ddp_cdc_scan can write for a buffer of len
 * bytes (every chunk but the last has more than min_size bytes). */
size_t ddp_cdc_max_chunks(const ddp_cdc_config *cfg, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* DDP_FASTCDC_H */
