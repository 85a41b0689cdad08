/* SPDX-License-Identifier: MIT */
/*
 * The zchunk format (zchunk_format.txt of the zchunk project) read from a
 * stream. libzck's own reader wants the whole file behind a seekable fd and
 * keeps a few hundred bytes of hash-table entries per chunk; a device gets
 * the payload as a stream and must not keep a copy, so the header is parsed
 * here, after its SHA-256 matched the signed manifest, and each chunk is
 * decompressed with libzstd exactly as libzck does (one zstd frame per chunk).
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <zstd.h>

#include "bundle_manifest.h"
#include "payload_decoder.h"

#define ZCK_MAGIC "\0ZCK1"
#define ZCK_MAGIC_LEN 5
#define ZCK_HASH_SHA256 1
#define ZCK_FLAG_STREAMS 0x1
#define ZCK_FLAG_OPTIONAL 0x2
#define ZCK_FLAG_UNCOMPRESSED 0x4
#define ZCK_COMP_ZSTD 2
#define DIGEST 32

struct entry {
        uint64_t payload_offset;
        uint64_t image_offset;
        uint32_t payload_size;
        uint32_t image_size;
        uint32_t digest_offset; /* in the header: compressed digest, then uncompressed */
};

struct payload_decoder {
        const struct bundle_manifest *m;
        payload_write_fn write;
        void *userdata;

        uint8_t *header;
        uint32_t header_fill;
        bool header_done;

        struct entry *entries;
        uint32_t n_entries;
        uint32_t max_payload_size, max_image_size;

        /* feed()'s position: the chunk being gathered and how much of it. */
        uint32_t next;
        uint32_t fill;
        uint8_t *in, *out;
        ZSTD_DCtx *dctx;
        /* Both checksums and the size of the chunk whose verified output
         * out holds. A chunk with the same pair whose compressed bytes
         * match decodes to those bytes again: a file system's empty space
         * is one such chunk thousands of times. */
        uint8_t out_digests[2 * DIGEST];
        uint32_t out_size; /* 0: out holds no verified chunk */

        bool failed;
        char error[256];
};

__attribute__((format(printf, 3, 4)))
static int fail(struct payload_decoder *d, int error, const char *format, ...) {
        va_list ap;

        va_start(ap, format);
        vsnprintf(d->error, sizeof(d->error), format, ap);
        va_end(ap);
        d->failed = true;
        return error;
}

int payload_decoder_new(const struct bundle_manifest *m, payload_write_fn write, void *userdata,
                        struct payload_decoder **ret) {
        struct payload_decoder *d;

        d = calloc(1, sizeof(*d));
        if (!d)
                return -ENOMEM;
        d->m = m;
        d->write = write;
        d->userdata = userdata;
        /* Bounded by the manifest parser (BUNDLE_HEADER_SIZE_MAX). */
        d->header = malloc(m->header_size);
        if (!d->header) {
                free(d);
                return -ENOMEM;
        }
        *ret = d;
        return 0;
}

void payload_decoder_free(struct payload_decoder *d) {
        if (!d)
                return;
        free(d->header);
        free(d->entries);
        free(d->in);
        free(d->out);
        ZSTD_freeDCtx(d->dctx);
        free(d);
}

/* A zchunk compressed integer: 7 bits a byte, least significant first, the
 * last byte marked by its top bit. At most 9 bytes (63 bits). */
static int read_ci(const uint8_t *buf, size_t size, size_t *pos, uint64_t *ret) {
        uint64_t v = 0;

        for (unsigned i = 0; i < 9; i++) {
                uint8_t b;

                if (*pos >= size)
                        return -EPROTO;
                b = buf[(*pos)++];
                v |= (uint64_t) (b & 0x7f) << (7 * i);
                if (b & 0x80) {
                        *ret = v;
                        return 0;
                }
        }
        return -EPROTO;
}

static bool all_zero(const uint8_t *p, size_t n) {
        for (size_t i = 0; i < n; i++)
                if (p[i])
                        return false;
        return true;
}

static int sha256(const void *data, size_t len, uint8_t md[static DIGEST]) {
        return EVP_Digest(data, len, md, NULL, EVP_sha256(), NULL) == 1 ? 0 : -ENOMEM;
}

#define NEED(cond, ...) do { if (!(cond)) return fail(d, -EPROTO, __VA_ARGS__); } while (0)
#define CI(var, what) do { if (read_ci(h, size, &pos, &(var)) < 0) return fail(d, -EPROTO, "zchunk header: %s is truncated", what); } while (0)

/* The header bytes are authentic (their SHA-256 is the signed manifest's);
 * still every size is checked against the manifest, so that a bundle tool
 * bug cannot make the decoder allocate or write beyond what was declared. */
static int parse_header(struct payload_decoder *d) {
        const struct bundle_manifest *m = d->m;
        const uint8_t *h = d->header;
        size_t size = m->header_size, pos = ZCK_MAGIC_LEN, lead_end, index_end;
        uint64_t hash_type, hdr_size, flags, comp, index_size, chunk_hash, count, v, len, ulen;
        uint64_t payload_offset, image_offset = 0;
        uint8_t md[DIGEST];
        EVP_MD_CTX *ctx;
        bool ok;

        NEED(size > ZCK_MAGIC_LEN && memcmp(h, ZCK_MAGIC, ZCK_MAGIC_LEN) == 0,
             "payload is not a zchunk file (no \\0ZCK1 lead)");
        CI(hash_type, "the checksum type");
        NEED(hash_type == ZCK_HASH_SHA256, "zchunk header checksum type %llu, otad needs SHA-256 (1)",
             (unsigned long long) hash_type);
        CI(hdr_size, "the header size");
        NEED(pos + DIGEST <= size, "zchunk lead is truncated");
        lead_end = pos + DIGEST;
        NEED(hdr_size == size - lead_end, "zchunk header is %llu bytes after the lead, the manifest says %zu",
             (unsigned long long) hdr_size, size - lead_end);

        /* zchunk's own header checksum: everything but the checksum itself.
         * Redundant with the manifest's hash, but a mismatch here means the
         * tool that made the bundle is broken, worth saying so. */
        ctx = EVP_MD_CTX_new();
        if (!ctx)
                return -ENOMEM;
        ok = EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1 && EVP_DigestUpdate(ctx, h, pos) == 1 &&
             EVP_DigestUpdate(ctx, h + lead_end, size - lead_end) == 1 && EVP_DigestFinal_ex(ctx, md, NULL) == 1;
        EVP_MD_CTX_free(ctx);
        if (!ok)
                return -ENOMEM;
        NEED(memcmp(md, h + pos, DIGEST) == 0, "zchunk header checksum does not match its lead");
        pos = lead_end;

        /* Preface: data checksum (unused with uncompressed checksums), flags,
         * compression, optional elements. */
        NEED(pos + DIGEST <= size, "zchunk preface is truncated");
        pos += DIGEST;
        CI(flags, "the flags");
        NEED(!(flags & ~(uint64_t) (ZCK_FLAG_STREAMS | ZCK_FLAG_OPTIONAL | ZCK_FLAG_UNCOMPRESSED)),
             "zchunk flags 0x%llx include unknown ones", (unsigned long long) flags);
        NEED(!(flags & ZCK_FLAG_STREAMS), "zchunk data streams are not supported");
        NEED(flags & ZCK_FLAG_UNCOMPRESSED,
             "zchunk file lacks uncompressed checksums (make it with `otad bundle create` or `zck -u`)");
        CI(comp, "the compression type");
        NEED(comp == ZCK_COMP_ZSTD, "zchunk compression type %llu, otad reads zstd (2)", (unsigned long long) comp);
        if (flags & ZCK_FLAG_OPTIONAL) {
                uint64_t n;

                CI(n, "the optional element count");
                for (uint64_t i = 0; i < n; i++) {
                        CI(v, "an optional element id");
                        CI(len, "an optional element size");
                        NEED(len <= size - pos, "zchunk optional element is truncated");
                        pos += len;
                }
        }

        /* Index. */
        CI(index_size, "the index size");
        NEED(index_size <= size - pos, "zchunk index runs past the header");
        index_end = pos + index_size;
        CI(chunk_hash, "the chunk checksum type");
        NEED(chunk_hash == ZCK_HASH_SHA256, "zchunk chunk checksum type %llu, otad needs SHA-256 (1)",
             (unsigned long long) chunk_hash);
        CI(count, "the chunk count");
        NEED(count == (uint64_t) m->chunk_count + 1, "zchunk file has %llu chunks, the manifest says %u",
             count ? (unsigned long long) count - 1 : 0ULL, m->chunk_count);

        /* The dictionary entry: otad's tool never makes one, and refusing it
         * keeps memory at two chunk buffers. */
        NEED(2 * DIGEST <= index_end - pos, "zchunk index is truncated");
        pos += 2 * DIGEST;
        CI(len, "the dictionary length");
        CI(ulen, "the dictionary length");
        NEED(len == 0 && ulen == 0, "zchunk dictionaries are not supported");

        d->entries = calloc(m->chunk_count, sizeof(*d->entries));
        if (!d->entries)
                return -ENOMEM;
        payload_offset = m->header_size;
        for (uint32_t i = 0; i < m->chunk_count; i++) {
                struct entry *e = &d->entries[i];

                NEED(2 * DIGEST <= index_end - pos, "zchunk index is truncated at chunk %u", i);
                e->digest_offset = (uint32_t) pos;
                pos += 2 * DIGEST;
                CI(len, "a chunk length");
                CI(ulen, "a chunk length");
                NEED(ulen >= 1 && ulen <= m->chunk_size_max,
                     "chunk %u is %llu bytes uncompressed, the manifest allows 1..%u", i, (unsigned long long) ulen,
                     m->chunk_size_max);
                NEED(len >= 1 && len <= ZSTD_compressBound(m->chunk_size_max),
                     "chunk %u is %llu bytes compressed, more than zstd makes of %u", i, (unsigned long long) len,
                     m->chunk_size_max);
                if (all_zero(h + e->digest_offset, DIGEST))
                        NEED(len == ulen, "chunk %u is stored uncompressed but its sizes differ", i);
                NEED(image_offset + ulen <= m->image_size, "chunks hold more than the %llu-byte image",
                     (unsigned long long) m->image_size);
                NEED(payload_offset + len <= m->payload_size, "chunks run past the %llu-byte payload",
                     (unsigned long long) m->payload_size);
                e->payload_offset = payload_offset;
                e->image_offset = image_offset;
                e->payload_size = (uint32_t) len;
                e->image_size = (uint32_t) ulen;
                payload_offset += len;
                image_offset += ulen;
                if (len > d->max_payload_size)
                        d->max_payload_size = (uint32_t) len;
                if (ulen > d->max_image_size)
                        d->max_image_size = (uint32_t) ulen;
        }
        NEED(pos == index_end, "zchunk index has %zu bytes beyond its last chunk", index_end - pos);
        NEED(image_offset == m->image_size, "chunks hold %llu bytes, the image is %llu",
             (unsigned long long) image_offset, (unsigned long long) m->image_size);
        NEED(payload_offset == m->payload_size, "payload ends at %llu, the chunks at %llu",
             (unsigned long long) m->payload_size, (unsigned long long) payload_offset);

        /* Signatures: zchunk defines no signature type yet; the manifest's
         * signature is what otad trusts. */
        CI(v, "the signature count");
        NEED(v == 0, "zchunk signatures are not supported");
        NEED(pos == size, "zchunk header has %zu bytes after its signatures", size - pos);

        d->in = malloc(d->max_payload_size);
        d->out = malloc(d->max_image_size);
        d->dctx = ZSTD_createDCtx();
        if (!d->in || !d->out || !d->dctx)
                return -ENOMEM;
        d->n_entries = m->chunk_count;
        d->header_done = true;
        d->next = 0;
        d->fill = 0;
        return 0;
}

static int decode_chunk(struct payload_decoder *d, uint32_t index, const uint8_t *data, size_t len) {
        const struct entry *e = &d->entries[index];
        const uint8_t *digest = d->header + e->digest_offset;
        const uint8_t *image;
        uint8_t md[DIGEST];
        int r;

        if (len != e->payload_size)
                return fail(d, -EBADMSG, "chunk %u is %zu bytes, its index entry says %u", index, len,
                            e->payload_size);
        if (all_zero(digest, DIGEST))
                image = data; /* stored: only the uncompressed checksum applies */
        else {
                size_t n;

                r = sha256(data, len, md);
                if (r < 0)
                        return r;
                if (memcmp(md, digest, DIGEST) != 0)
                        return fail(d, -EBADMSG, "chunk %u (payload offset %llu) does not match its checksum",
                                    index, (unsigned long long) e->payload_offset);
                if (d->out_size == e->image_size && memcmp(d->out_digests, digest, 2 * DIGEST) == 0) {
                        image = d->out; /* zstd is deterministic: out's bytes, verified */
                        goto write;
                }
                d->out_size = 0;
                /* The output buffer is exactly the declared size: a frame that
                 * would decompress to more fails here instead of growing. */
                n = ZSTD_decompressDCtx(d->dctx, d->out, e->image_size, data, len);
                if (ZSTD_isError(n))
                        return fail(d, -EBADMSG, "chunk %u does not decompress: %s", index, ZSTD_getErrorName(n));
                if (n != e->image_size)
                        return fail(d, -EBADMSG, "chunk %u decompresses to %zu bytes, not %u", index, n,
                                    e->image_size);
                image = d->out;
        }
        r = sha256(image, e->image_size, md);
        if (r < 0)
                return r;
        if (memcmp(md, digest + DIGEST, DIGEST) != 0)
                return fail(d, -EBADMSG, "chunk %u (image offset %llu) does not match its uncompressed checksum",
                            index, (unsigned long long) e->image_offset);
        if (image == d->out) {
                memcpy(d->out_digests, digest, 2 * DIGEST);
                d->out_size = e->image_size;
        }
write:
        r = d->write(e->image_offset, image, e->image_size, d->userdata);
        if (r < 0) {
                fail(d, r, "writing chunk %u at image offset %llu failed", index,
                     (unsigned long long) e->image_offset);
                return r;
        }
        return 0;
}

static int feed_header(struct payload_decoder *d, const uint8_t **buf, size_t *len) {
        const struct bundle_manifest *m = d->m;
        size_t n = m->header_size - d->header_fill;
        uint8_t md[DIGEST];
        int r;

        if (n > *len)
                n = *len;
        memcpy(d->header + d->header_fill, *buf, n);
        d->header_fill += (uint32_t) n;
        *buf += n;
        *len -= n;
        if (d->header_fill < m->header_size)
                return 0;

        r = sha256(d->header, m->header_size, md);
        if (r < 0)
                return r;
        if (memcmp(md, m->header_sha256, DIGEST) != 0) {
                d->header_fill = 0;
                return fail(d, -EBADMSG, "payload header does not match the manifest's header_sha256");
        }
        r = parse_header(d);
        if (r < 0) {
                free(d->entries);
                d->entries = NULL;
                d->header_fill = 0;
        }
        return r;
}

int payload_decoder_feed(struct payload_decoder *d, const void *data, size_t len) {
        const uint8_t *buf = data;
        int r;

        if (d->failed)
                return -ESTALE;
        if (!d->header_done) {
                r = feed_header(d, &buf, &len);
                if (r < 0)
                        return r;
        }
        while (len > 0) {
                const struct entry *e;
                size_t n;

                if (d->next >= d->n_entries)
                        return fail(d, -EFBIG, "%zu bytes beyond the %llu-byte payload", len,
                                    (unsigned long long) d->m->payload_size);
                e = &d->entries[d->next];
                /* A whole chunk in the caller's buffer is decoded in place. */
                if (d->fill == 0 && len >= e->payload_size) {
                        r = decode_chunk(d, d->next, buf, e->payload_size);
                        if (r < 0)
                                return r;
                        buf += e->payload_size;
                        len -= e->payload_size;
                        d->next++;
                        continue;
                }
                n = e->payload_size - d->fill;
                if (n > len)
                        n = len;
                memcpy(d->in + d->fill, buf, n);
                d->fill += (uint32_t) n;
                buf += n;
                len -= n;
                if (d->fill == e->payload_size) {
                        r = decode_chunk(d, d->next, d->in, d->fill);
                        if (r < 0) {
                                d->fill = 0;
                                return r;
                        }
                        d->fill = 0;
                        d->next++;
                }
        }
        return 0;
}

int payload_decoder_seek(struct payload_decoder *d, uint32_t index, uint64_t *ret_payload_offset) {
        if (!d->header_done) {
                /* Back to the start: the header is fed again. */
                if (index != 0)
                        return -EAGAIN;
                d->header_fill = 0;
                d->failed = false;
                d->error[0] = '\0';
                if (ret_payload_offset)
                        *ret_payload_offset = 0;
                return 0;
        }
        if (index > d->n_entries)
                return -ERANGE;
        d->next = index;
        d->fill = 0;
        d->failed = false;
        d->error[0] = '\0';
        if (ret_payload_offset)
                *ret_payload_offset = index < d->n_entries ? d->entries[index].payload_offset : d->m->payload_size;
        return 0;
}

int payload_decoder_put_chunk(struct payload_decoder *d, uint32_t index, const void *buf, size_t len) {
        bool failed = d->failed;
        int r;

        if (!d->header_done)
                return -EAGAIN;
        if (index >= d->n_entries)
                return -ERANGE;
        r = decode_chunk(d, index, buf, len);
        /* A bad out-of-order chunk does not stop the in-order stream. */
        d->failed = failed;
        return r;
}

bool payload_decoder_header_done(const struct payload_decoder *d) {
        return d->header_done;
}

bool payload_decoder_finished(const struct payload_decoder *d) {
        return d->header_done && d->next == d->n_entries;
}

void payload_decoder_progress(const struct payload_decoder *d, struct payload_progress *ret) {
        if (!d->header_done) {
                *ret = (struct payload_progress) { 0 };
                return;
        }
        ret->next_chunk = d->next;
        if (d->next < d->n_entries) {
                ret->payload_offset = d->entries[d->next].payload_offset;
                ret->image_offset = d->entries[d->next].image_offset;
        } else {
                ret->payload_offset = d->m->payload_size;
                ret->image_offset = d->m->image_size;
        }
}

uint32_t payload_decoder_chunk_count(const struct payload_decoder *d) {
        return d->header_done ? d->n_entries : 0;
}

int payload_decoder_chunk(const struct payload_decoder *d, uint32_t index, struct payload_chunk *ret) {
        const struct entry *e;

        if (!d->header_done)
                return -EAGAIN;
        if (index >= d->n_entries)
                return -ERANGE;
        e = &d->entries[index];
        ret->index = index;
        ret->payload_offset = e->payload_offset;
        ret->payload_size = e->payload_size;
        ret->image_offset = e->image_offset;
        ret->image_size = e->image_size;
        memcpy(ret->sha256, d->header + e->digest_offset, DIGEST);
        memcpy(ret->sha256_uncompressed, d->header + e->digest_offset + DIGEST, DIGEST);
        ret->stored = all_zero(ret->sha256, DIGEST);
        return 0;
}

const void *payload_decoder_header(const struct payload_decoder *d, size_t *ret_size) {
        if (!d->header_done)
                return NULL;
        if (ret_size)
                *ret_size = d->m->header_size;
        return d->header;
}

const char *payload_decoder_error(const struct payload_decoder *d) {
        return d->error;
}
