/* blobcodec.c - see blobcodec.h for the contracts. */
#include "blobcodec.h"

#include "blake3many.h"

#include <stdlib.h>
#include <string.h>

static void put_u32le(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* The framing of blobs of compression byte 2: 2 || ref || frame. */
#define DICT_HEADER (1 + DDP_CODEC_REF_BYTES)

static void frame_with_dict(const ddp_codec_api *api, void *cctx, const void *cdict,
                            const uint8_t *ref, size_t n, const uint8_t *const *src,
                            const size_t *len, uint8_t *out, size_t *framed_len) {
    /* Content size recorded (a reader checks it against the index), no checksum (the
     * keyed id checks the content), no dictionary id (the ref names the dictionary). */
    const ddp_codec_frame_params fp = {1, 0, 1};
    for (size_t i = 0; i < n; i++) {
        size_t z = 0;
        int compressed = 0;
        if (len[i] > DICT_HEADER) {
            /* Room for len - 9 bytes: a frame that fits makes 9 + z < 1 + len. Failure
             * of any kind stores the chunk as is, as without a dictionary. */
            z = api->compress_dict(cctx, out + DICT_HEADER, len[i] - DICT_HEADER, src[i],
                                   len[i], cdict, fp);
            compressed = !api->is_error(z) && z <= len[i] - DICT_HEADER;
        }
        if (compressed) {
            out[0] = DDP_CODEC_ZSTD_DICT;
            memcpy(out + 1, ref, DDP_CODEC_REF_BYTES);
            framed_len[i] = z + DICT_HEADER;
        } else {
            out[0] = DDP_CODEC_NONE;
            memcpy(out + 1, src[i], len[i]);
            framed_len[i] = len[i] + 1;
        }
        out += framed_len[i];
    }
}

void ddp_codec_frame(const ddp_codec_api *api, void *cctx, int level, const void *cdict,
                     const uint8_t *ref, size_t n, const uint8_t *const *src,
                     const size_t *len, uint8_t *out, size_t *framed_len) {
    if (cdict) {
        frame_with_dict(api, cctx, cdict, ref, n, src, len, out, framed_len);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        size_t z = 0;
        int compressed = 0;
        if (len[i] > 1) {
            z = api->compress(cctx, out + 1, len[i] - 1, src[i], len[i], level);
            /* An error here is almost always "does not fit": the chunk does not
             * compress. Any other failure is treated the same way: storing the
             * chunk as is is always correct. */
            compressed = !api->is_error(z) && z < len[i];
        }
        if (compressed) {
            out[0] = DDP_CODEC_ZSTD;
            framed_len[i] = z + 1;
        } else {
            out[0] = DDP_CODEC_NONE;
            memcpy(out + 1, src[i], len[i]);
            framed_len[i] = len[i] + 1;
        }
        out += framed_len[i];
    }
}

long ddp_codec_seal(const ddp_codec_api *api, const uint8_t *key, size_t n,
                    const uint8_t *framed, const size_t *framed_len, const uint8_t *ids,
                    const uint32_t *raw_len, const uint8_t *nonces, uint8_t *dst,
                    size_t dst_cap, size_t *pos, size_t target, uint8_t *records) {
    size_t p = *pos;
    size_t i = 0;
    while (i < n && p < target) {
        size_t sealed = framed_len[i] + DDP_CODEC_OVERHEAD;
        if (sealed > dst_cap - p || sealed > UINT32_MAX || p > UINT32_MAX) break;
        const uint8_t *nonce = nonces + i * DDP_CODEC_NONCE_BYTES;
        const uint8_t *id = ids + i * DDP_CODEC_ID_BYTES;
        memcpy(dst + p, nonce, DDP_CODEC_NONCE_BYTES);
        if (api->seal(dst + p + DDP_CODEC_NONCE_BYTES, NULL, framed, framed_len[i], id,
                      DDP_CODEC_ID_BYTES, NULL, nonce, key) != 0)
            return -1;
        uint8_t *r = records + i * DDP_CODEC_TRAILER_RECORD;
        memcpy(r, id, DDP_CODEC_ID_BYTES);
        put_u32le(r + 32, (uint32_t)p);
        put_u32le(r + 36, (uint32_t)sealed);
        put_u32le(r + 40, raw_len[i]);
        p += sealed;
        framed += framed_len[i];
        i++;
    }
    *pos = p;
    return (long)i;
}

/* The entry of dicts for ref, or NULL: a handful of entries, searched in order. */
static const ddp_codec_dict *find_dict(const ddp_codec_dict *dicts, size_t n_dicts,
                                       const uint8_t *ref) {
    for (size_t j = 0; j < n_dicts; j++)
        if (memcmp(dicts[j].ref, ref, DDP_CODEC_REF_BYTES) == 0) return &dicts[j];
    return NULL;
}

int ddp_codec_open(const ddp_codec_api *api, void *dctx, const ddp_codec_dict *dicts,
                   size_t n_dicts, const uint8_t *key, const uint8_t *id_key, size_t n,
                   const uint8_t *src, const size_t *offset, const uint32_t *stored_len,
                   const uint32_t *raw_len, const uint8_t *ids, uint8_t *out,
                   const uint64_t *out_pos, size_t *failed, uint8_t *ref_out, uint8_t *how) {
    size_t scratch_size = 0;
    for (size_t i = 0; i < n; i++)
        if (stored_len[i] > scratch_size) scratch_size = stored_len[i];
    uint8_t *plain = malloc(scratch_size ? scratch_size : 1);
    /* Where each chunk went, for the id check. */
    const uint8_t **at = malloc((n ? n : 1) * sizeof *at);
    size_t *len = malloc((n ? n : 1) * sizeof *len);
    uint8_t *digests = id_key ? malloc(n ? n * DDP_CODEC_ID_BYTES : 1) : NULL;
    if (!plain || !at || !len || (id_key && !digests)) {
        free(plain);
        free(at);
        free(len);
        free(digests);
        *failed = 0;
        return DDP_CODEC_ENOMEM;
    }
    int rc = DDP_CODEC_OK;
    uint8_t *next = out;
    size_t i;
    for (i = 0; i < n; i++) {
        uint8_t *dst = out_pos ? out + out_pos[i] : next;
        /* The smallest blob is a tag, a nonce and the compression byte. */
        if (stored_len[i] < DDP_CODEC_OVERHEAD + 1) {
            rc = DDP_CODEC_EFORMAT;
            break;
        }
        const uint8_t *sealed = src + offset[i];
        size_t plain_len = stored_len[i] - DDP_CODEC_OVERHEAD;
        if (api->open(plain, NULL, NULL, sealed + DDP_CODEC_NONCE_BYTES,
                      stored_len[i] - DDP_CODEC_NONCE_BYTES, ids + i * DDP_CODEC_ID_BYTES,
                      DDP_CODEC_ID_BYTES, sealed, key) != 0) {
            rc = DDP_CODEC_EAUTH;
            break;
        }
        if (how) {
            uint8_t *h = how + i * DDP_CODEC_HOW_BYTES;
            h[0] = plain[0];
            if (plain[0] == DDP_CODEC_ZSTD_DICT && plain_len >= DICT_HEADER)
                memcpy(h + 1, plain + 1, DDP_CODEC_REF_BYTES);
            else
                memset(h + 1, 0, DDP_CODEC_REF_BYTES);
        }
        if (plain[0] == DDP_CODEC_NONE) {
            if (plain_len - 1 != raw_len[i]) {
                rc = DDP_CODEC_ELENGTH;
                break;
            }
            memcpy(dst, plain + 1, raw_len[i]);
        } else {
            /* Either frame: at most raw_len bytes are written, then the length and
             * (below) the id are checked, so a wrong dictionary cannot give a chunk that
             * passes. */
            size_t got;
            if (plain[0] == DDP_CODEC_ZSTD) {
                got = api->decompress(dctx, dst, raw_len[i], plain + 1, plain_len - 1);
            } else if (plain[0] == DDP_CODEC_ZSTD_DICT && plain_len >= DICT_HEADER) {
                const ddp_codec_dict *d = find_dict(dicts, n_dicts, plain + 1);
                if (!d || !d->ddict) {
                    if (ref_out) memcpy(ref_out, plain + 1, DDP_CODEC_REF_BYTES);
                    rc = d ? DDP_CODEC_EDICT : DDP_CODEC_ENODICT;
                    break;
                }
                got = api->decompress_dict(dctx, dst, raw_len[i], plain + DICT_HEADER,
                                           plain_len - DICT_HEADER, d->ddict);
            } else { /* an unknown byte, or a byte 2 too short to name its dictionary */
                rc = DDP_CODEC_EFORMAT;
                break;
            }
            if (api->is_error(got)) {
                rc = DDP_CODEC_EDECOMPRESS;
                break;
            }
            if (got != raw_len[i]) {
                rc = DDP_CODEC_ELENGTH;
                break;
            }
        }
        at[i] = dst;
        len[i] = raw_len[i];
        next = dst + raw_len[i];
    }
    if (rc == DDP_CODEC_OK && id_key) {
        /* Every chunk authenticated and has its length; now its content against its id
         * (keyed BLAKE3, all of the batch in one vectorised call). */
        if (ddp_b3_keyed_many(DDP_B3_BEST, id_key, n, at, len, digests) != 0) {
            rc = DDP_CODEC_ENOMEM;
            i = 0;
        } else {
            for (i = 0; i < n; i++)
                if (memcmp(digests + i * DDP_CODEC_ID_BYTES, ids + i * DDP_CODEC_ID_BYTES,
                           DDP_CODEC_ID_BYTES) != 0) {
                    rc = DDP_CODEC_EID;
                    break;
                }
        }
    }
    free(plain);
    free(at);
    free(len);
    free(digests);
    *failed = i;
    return rc;
}
