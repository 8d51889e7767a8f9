/*
 * blobcodec.h - batch kernels that turn chunks into sealed blobs and back (the hot path
 * of backup and restore), one call per batch of chunks, without the GIL.
 *
 * Plain C99, no Python.h, no zstd or libsodium headers: the kernels call those libraries
 * through function pointers (ddp_codec_api) that the caller fills in from libraries
 * already loaded in the process. In dedupe they come from the compiled cffi modules of
 * the zstandard and PyNaCl packages, so building dedupe needs neither library's headers
 * and runs the very zstd and libsodium builds that the pure-Python path uses.
 *
 * Blob format (docs/FORMAT.md section 6): a blob's plaintext is one compression byte
 * (0 = stored as is, 1 = a zstd frame, 2 = an 8-byte dictionary ref and a zstd frame made
 * with that dictionary, section 16) followed by the payload; it is sealed with
 * XChaCha20-Poly1305-IETF as nonce(24) || ciphertext || tag(16), the chunk id (32 bytes)
 * as associated data.
 *
 * Thread safety: the api struct is read only; a zstd context belongs to one thread at a
 * time; a CDict or DDict is read only once made and may serve every thread at once.
 * Nothing here allocates except ddp_codec_open (scratch buffers per call).
 */
#ifndef DEDUPE_BLOBCODEC_H
#define DEDUPE_BLOBCODEC_H

#include <stddef.h>
#include <stdint.h>

#define DDP_CODEC_ID_BYTES 32
#define DDP_CODEC_KEY_BYTES 32
#define DDP_CODEC_NONCE_BYTES 24
#define DDP_CODEC_TAG_BYTES 16
#define DDP_CODEC_OVERHEAD (DDP_CODEC_NONCE_BYTES + DDP_CODEC_TAG_BYTES)
/* A pack trailer entry: chunk_id, offset, stored_length, raw_length (<32sIII). */
#define DDP_CODEC_TRAILER_RECORD 44

#define DDP_CODEC_NONE 0
#define DDP_CODEC_ZSTD 1
#define DDP_CODEC_ZSTD_DICT 2
/* A dictionary's ref: the first 8 bytes of its chunk id (FORMAT.md section 16). */
#define DDP_CODEC_REF_BYTES 8
/* ddp_codec_open's record of how a blob was stored: compression byte, then ref. */
#define DDP_CODEC_HOW_BYTES (1 + DDP_CODEC_REF_BYTES)

/* Errors of ddp_codec_open, for the chunk at *failed. */
#define DDP_CODEC_OK 0
#define DDP_CODEC_EAUTH 1       /* the AEAD tag does not verify */
#define DDP_CODEC_EFORMAT 2     /* too short, or an unknown compression byte */
#define DDP_CODEC_EDECOMPRESS 3 /* the zstd frame is invalid */
#define DDP_CODEC_ELENGTH 4     /* the payload is not raw_length bytes long */
#define DDP_CODEC_ENOMEM 5
#define DDP_CODEC_ESEAL 6 /* libsodium refused to seal (absurd lengths only) */
#define DDP_CODEC_EID 7   /* the content does not hash to its chunk id */
#define DDP_CODEC_ENODICT 8 /* the blob names a dictionary the table lacks (ref_out) */
#define DDP_CODEC_EDICT 9   /* the blob names a ref the table marks unusable (ref_out) */

/* zstd's ZSTD_frameParameters (zstd.h), passed by value. */
typedef struct {
    int content_size_flag;
    int checksum_flag;
    int no_dict_id_flag;
} ddp_codec_frame_params;

/* One dictionary a blob may name: its ref and its ZSTD_DDict. ddict NULL marks the ref
 * unusable (two different dictionaries have it): a blob naming it fails with
 * DDP_CODEC_EDICT. */
typedef struct {
    uint8_t ref[DDP_CODEC_REF_BYTES];
    const void *ddict;
} ddp_codec_dict;

typedef struct {
    /* zstd (stable API, zstd.h) */
    size_t (*compress)(void *cctx, void *dst, size_t cap, const void *src, size_t n,
                       int level);                      /* ZSTD_compressCCtx */
    size_t (*decompress)(void *dctx, void *dst, size_t cap, const void *src,
                         size_t n);                     /* ZSTD_decompressDCtx */
    unsigned (*is_error)(size_t code);                  /* ZSTD_isError */
    size_t (*decompress_dict)(void *dctx, void *dst, size_t cap, const void *src, size_t n,
                              const void *ddict); /* ZSTD_decompress_usingDDict */
    /* zstd, static-linking-only API (deprecated in 1.5 but kept, and exported by the
     * zstandard package's cffi module): the one call that compresses with a CDict and
     * sets the frame parameters without touching the context's sticky parameters. */
    size_t (*compress_dict)(void *cctx, void *dst, size_t cap, const void *src, size_t n,
                            const void *cdict,
                            ddp_codec_frame_params fp); /* ZSTD_compress_usingCDict_advanced */
    /* libsodium (crypto_aead_xchacha20poly1305.h) */
    int (*seal)(unsigned char *c, unsigned long long *clen, const unsigned char *m,
                unsigned long long mlen, const unsigned char *ad, unsigned long long adlen,
                const unsigned char *nsec, const unsigned char *npub,
                const unsigned char *k); /* crypto_aead_xchacha20poly1305_ietf_encrypt */
    int (*open)(unsigned char *m, unsigned long long *mlen, unsigned char *nsec,
                const unsigned char *c, unsigned long long clen, const unsigned char *ad,
                unsigned long long adlen, const unsigned char *npub,
                const unsigned char *k); /* crypto_aead_xchacha20poly1305_ietf_decrypt */
} ddp_codec_api;

/*
 * Frame n chunks: framed blob i is written to out, back to back, and its length to
 * framed_len[i]. A chunk is stored as a zstd frame (compressed at `level`) only when
 * that is smaller than the chunk itself, else as is: zstd is given exactly len - 1 bytes
 * of room, so an incompressible chunk costs one failed attempt and never more than its
 * own size plus the compression byte. out must hold sum(len[i] + 1) bytes.
 *
 * With cdict (a ZSTD_CDict, made at the level wanted; `level` is then unused) and ref
 * (its 8 bytes), a chunk is framed as 2 || ref || a zstd frame made with the dictionary
 * that records its content size and no dictionary id, when that is smaller than
 * 1 || chunk (zstd gets len - 9 bytes of room), else as is. Same bound on out.
 * zstd wants a few bytes of slack in the room it is given (measured: up to 9), so with
 * or without a dictionary a chunk whose frame would come that close to the limit is
 * stored as is; the pure-Python twin, which compresses first and compares after, keeps
 * such a frame. Both are valid blobs.
 */
void ddp_codec_frame(const ddp_codec_api *api, void *cctx, int level, const void *cdict,
                     const uint8_t *ref, size_t n, const uint8_t *const *src,
                     const size_t *len, uint8_t *out, size_t *framed_len);

/*
 * Seal framed blobs (as ddp_codec_frame wrote them) into a pack being built, from
 * dst[*pos]: blob i is sealed under key with ids[32 i..] as associated data and
 * nonces[24 i..] as nonce, and a trailer record (id, offset, stored length, raw_len[i],
 * little endian) goes to records[44 i..]. Sealing stops after the blob that takes *pos
 * to `target` or beyond, or before a blob that would not fit in dst_cap. Returns the
 * number of blobs sealed (*pos advanced past them), or -1 if libsodium failed.
 */
long ddp_codec_seal(const ddp_codec_api *api, const uint8_t *key, size_t n,
                    const uint8_t *framed, const size_t *framed_len, const uint8_t *ids,
                    const uint32_t *raw_len, const uint8_t *nonces, uint8_t *dst,
                    size_t dst_cap, size_t *pos, size_t target, uint8_t *records);

/*
 * Open n sealed blobs of one pack: blob i is src[offset[i] .. + stored_len[i]], its id
 * ids[32 i..]; its raw bytes (exactly raw_len[i] of them) go to out + out_pos[i], or,
 * with out_pos NULL, to out back to back. With id_key (the repository's chunk id key),
 * each chunk's keyed BLAKE3 is then checked against its id; with NULL the caller checks.
 * A blob of compression byte 2 is decompressed with the DDict of its ref from
 * dicts[0 .. n_dicts - 1] (dicts may be NULL when n_dicts is 0); a ref not there fails
 * with DDP_CODEC_ENODICT, one there with a NULL ddict with DDP_CODEC_EDICT, and either
 * copies the ref to ref_out (8 bytes, may be NULL).
 * With how (may be NULL), DDP_CODEC_HOW_BYTES per blob record how it was stored: how[9 i]
 * its compression byte, how[9 i + 1 .. + 8] the ref it named when that byte is 2 (zero
 * bytes otherwise); prune's repack compresses a chunk again as it found it.
 * On failure returns a DDP_CODEC_E* code and the blob's number in *failed; what was
 * written to out is then garbage. The caller makes sure every blob lies in src and
 * every chunk's place in out.
 */
int ddp_codec_open(const ddp_codec_api *api, void *dctx, const ddp_codec_dict *dicts,
                   size_t n_dicts, const uint8_t *key, const uint8_t *id_key, size_t n,
                   const uint8_t *src, const size_t *offset, const uint32_t *stored_len,
                   const uint32_t *raw_len, const uint8_t *ids, uint8_t *out,
                   const uint64_t *out_pos, size_t *failed, uint8_t *ref_out, uint8_t *how);

#endif
