/* SPDX-License-Identifier: MIT */
/* Unit tests of the bundle manifest, the gear64 chunker and the payload
 * decoder. Payloads are real zchunk files: made by the zck CLI (zchunk
 * package), by `otad bundle create` ($OTAD_BIN), and, for the refusals the
 * tools never produce (bombs, dictionaries, other hash types), written here
 * field by field after zchunk_format.txt. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <zck.h>
#include <zstd.h>

#include "bundle_chunker.h"
#include "bundle_manifest.h"
#include "fileio.h"
#include "macro.h"
#include "payload_decoder.h"
#include "tap.h"

static char dir[] = "/tmp/test-bundle.XXXXXX";

#define sh(...) tap_sh(dir, __VA_ARGS__)

static char *path_of(const char *name) {
        char *p;
        if (asprintf(&p, "%s/%s", dir, name) < 0)
                abort();
        return p;
}

struct buf {
        uint8_t *data;
        size_t len;
};

static struct buf slurp(const char *name) {
        _cleanup_free_ char *p = path_of(name);
        struct buf b = { 0 };
        char *data = NULL;

        if (read_file_full(p, 256u << 20, &data, &b.len) < 0)
                return b;
        b.data = (uint8_t *) data;
        return b;
}

static void spit(const char *name, const void *data, size_t len) {
        _cleanup_free_ char *p = path_of(name);
        if (write_file_atomic(p, data, len, 0644) < 0)
                abort();
}

static void sha256(const void *data, size_t len, uint8_t md[static 32]) {
        EVP_Digest(data, len, md, NULL, EVP_sha256(), NULL);
}

/* An image that compresses like a file system: runs of text, zeros and
 * noise, from a seed. */
static struct buf make_image(size_t len, unsigned seed) {
        struct buf b = { malloc(len), len };
        uint32_t x = seed * 2654435761u + 1;

        for (size_t i = 0; i < len;) {
                size_t run = 1000 + (x % 30000);
                unsigned kind = (x >> 8) % 3;

                for (size_t j = 0; j < run && i < len; j++, i++) {
                        x = x * 1103515245u + 12345u;
                        b.data[i] = kind == 0 ? 0 : kind == 1 ? (uint8_t) ("otad bundle test "[j % 17]) : (uint8_t) (x >> 16);
                }
        }
        return b;
}

/* The manifest a bundle of this zchunk payload would carry: one part. */
static struct bundle_manifest *manifest_for(const struct buf *payload, const struct buf *image, uint32_t chunk_max) {
        _cleanup_close_ int fd = -1;
        struct bundle_manifest *m = calloc(1, sizeof(*m));
        zckCtx *zck = zck_create();
        char tmp[] = "/tmp/test-bundle-zck.XXXXXX";

        fd = mkstemp(tmp);
        if (fd < 0 || write_all(fd, payload->data, payload->len) < 0 || lseek(fd, 0, SEEK_SET) < 0 ||
            !zck_init_read(zck, fd))
                abort();
        unlink(tmp);
        m->format_version = 1;
        m->compatible = strdup("test-board");
        m->version = strdup("2.0.0");
        m->payload_format = strdup("zchunk");
        m->image_size = image->len;
        sha256(image->data, image->len, m->image_sha256);
        m->payload_size = payload->len;
        m->header_size = (uint32_t) zck_get_header_length(zck);
        sha256(payload->data, m->header_size, m->header_sha256);
        m->chunk_count = (uint32_t) zck_get_chunk_count(zck) - 1;
        m->chunk_size_max = chunk_max;
        m->chunking = (struct bundle_chunking) { strdup("gear64"), 16384, 16, chunk_max };
        m->n_parts = 1;
        m->parts = calloc(1, sizeof(*m->parts));
        m->parts[0] = (struct bundle_part) { strdup("p.payload.00"), 0, payload->len, { 0 } };
        sha256(payload->data, payload->len, m->parts[0].sha256);
        zck_free(&zck);
        return m;
}

/* The slot, in memory: what the write callback received. */
struct sink {
        uint8_t *data;
        size_t size;
        unsigned writes;
        uint64_t highest;  /* end of the furthest write */
        int fail_at;       /* fail the nth write (1-based); 0: never */
};

static int sink_write(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct sink *s = userdata;

        s->writes++;
        if (s->fail_at && (int) s->writes == s->fail_at)
                return -ENOSPC;
        if (offset > s->size || len > s->size - offset)
                return -EFBIG; /* never: the decoder bounds it */
        memcpy(s->data + offset, buf, len);
        if (offset + len > s->highest)
                s->highest = offset + len;
        return 0;
}

static int feed_blocks(struct payload_decoder *d, const uint8_t *data, size_t len, size_t block) {
        for (size_t off = 0; off < len; off += block) {
                int r = payload_decoder_feed(d, data + off, len - off < block ? len - off : block);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* ---- a zchunk writer for crafted files --------------------------------- */

struct craft_chunk {
        struct buf comp;      /* as stored */
        struct buf raw;       /* what the index claims it decompresses to */
        uint64_t declared;    /* uncompressed length in the index (0: raw.len) */
        bool stored;          /* zero compressed digest */
};

struct craft {
        uint64_t header_hash, chunk_hash, flags, comp;
        uint64_t dict_len, sig_count;
        bool no_uncompressed_digests;
};

static void put_ci(FILE *f, uint64_t v) {
        do {
                uint8_t b = v & 0x7f;
                v >>= 7;
                if (!v)
                        b |= 0x80;
                fputc(b, f);
        } while (v);
}

static struct buf craft_zck(const struct craft *c, const struct craft_chunk *chunks, size_t n) {
        char *index = NULL, *header = NULL, *lead = NULL;
        size_t index_len = 0, header_len = 0, lead_len = 0;
        FILE *f = open_memstream(&index, &index_len);
        uint8_t zero[32] = { 0 }, md[32];
        struct buf out;

        put_ci(f, c->chunk_hash);
        put_ci(f, n + 1);
        fwrite(zero, 1, 32, f);
        if (!c->no_uncompressed_digests)
                fwrite(zero, 1, 32, f);
        put_ci(f, c->dict_len);
        put_ci(f, c->dict_len);
        for (size_t i = 0; i < n; i++) {
                if (chunks[i].stored)
                        fwrite(zero, 1, 32, f);
                else {
                        sha256(chunks[i].comp.data, chunks[i].comp.len, md);
                        fwrite(md, 1, 32, f);
                }
                if (!c->no_uncompressed_digests) {
                        sha256(chunks[i].raw.data, chunks[i].raw.len, md);
                        fwrite(md, 1, 32, f);
                }
                put_ci(f, chunks[i].comp.len);
                put_ci(f, chunks[i].declared ? chunks[i].declared : chunks[i].raw.len);
        }
        fclose(f);

        f = open_memstream(&header, &header_len);
        fwrite(zero, 1, 32, f); /* data checksum */
        put_ci(f, c->flags);
        put_ci(f, c->comp);
        put_ci(f, index_len);
        fwrite(index, 1, index_len, f);
        put_ci(f, c->sig_count);
        for (uint64_t i = 0; i < c->sig_count; i++) {
                put_ci(f, 0);
                put_ci(f, 4);
                fwrite("sig!", 1, 4, f);
        }
        fclose(f);

        f = open_memstream(&lead, &lead_len);
        fwrite("\0ZCK1", 1, 5, f);
        put_ci(f, c->header_hash);
        put_ci(f, header_len);
        fclose(f);
        {
                EVP_MD_CTX *ctx = EVP_MD_CTX_new();
                EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
                EVP_DigestUpdate(ctx, lead, lead_len);
                EVP_DigestUpdate(ctx, header, header_len);
                EVP_DigestFinal_ex(ctx, md, NULL);
                EVP_MD_CTX_free(ctx);
        }
        out.len = lead_len + 32 + header_len;
        for (size_t i = 0; i < n; i++)
                out.len += chunks[i].comp.len;
        out.data = malloc(out.len);
        size_t pos = 0;
        memcpy(out.data, lead, lead_len), pos += lead_len;
        memcpy(out.data + pos, md, 32), pos += 32;
        memcpy(out.data + pos, header, header_len), pos += header_len;
        for (size_t i = 0; i < n; i++)
                memcpy(out.data + pos, chunks[i].comp.data, chunks[i].comp.len), pos += chunks[i].comp.len;
        free(index);
        free(header);
        free(lead);
        return out;
}

static struct buf zstd_of(const struct buf *raw) {
        struct buf b = { malloc(ZSTD_compressBound(raw->len)), 0 };
        b.len = ZSTD_compress(b.data, ZSTD_compressBound(raw->len), raw->data, raw->len, 3);
        return b;
}

/* What the last decode_crafted() wrote, image_size bytes. */
static struct buf crafted_slot;

/* A crafted payload with its manifest; decodes it, returns the decoder's
 * result, and the error text in err. */
static int decode_crafted(const struct craft *c, const struct craft_chunk *chunks, size_t n, uint64_t image_size,
                          uint32_t chunk_max, char *err, size_t err_size) {
        struct buf payload = craft_zck(c, chunks, n);
        struct buf image = { calloc(1, image_size ? image_size : 1), image_size };
        struct bundle_manifest *m;
        struct payload_decoder *d = NULL;
        struct sink s = { .data = calloc(1, image_size + 1), .size = image_size };
        int r;

        /* The manifest is computed by hand: libzck may refuse what we test. */
        m = calloc(1, sizeof(*m));
        m->compatible = strdup("x");
        m->version = strdup("1");
        m->payload_format = strdup("zchunk");
        m->chunking.algorithm = strdup("gear64");
        m->image_size = image_size;
        m->payload_size = payload.len;
        m->chunk_count = (uint32_t) n;
        m->chunk_size_max = chunk_max;
        /* header = everything before the first chunk */
        size_t data = 0;
        for (size_t i = 0; i < n; i++)
                data += chunks[i].comp.len;
        m->header_size = (uint32_t) (payload.len - data);
        sha256(payload.data, m->header_size, m->header_sha256);

        r = payload_decoder_new(m, sink_write, &s, &d);
        if (r >= 0)
                r = payload_decoder_feed(d, payload.data, payload.len);
        snprintf(err, err_size, "%s", d ? payload_decoder_error(d) : "");
        if (r >= 0 && !payload_decoder_finished(d))
                r = -EPIPE;
        payload_decoder_free(d);
        bundle_manifest_free(m);
        free(payload.data);
        free(image.data);
        free(crafted_slot.data);
        crafted_slot = (struct buf){ s.data, image_size };
        return r;
}

static const struct craft good_craft = { .header_hash = 1, .chunk_hash = 1, .flags = 4, .comp = 2 };

static void test_crafted(void) {
        struct buf raw = make_image(40000, 7), bomb_raw = { calloc(1, 4u << 20), 4u << 20 };
        struct craft_chunk ok = { .comp = zstd_of(&raw), .raw = raw };
        char err[256];
        int r;

        r = decode_crafted(&good_craft, &ok, 1, raw.len, 65536, err, sizeof(err));
        tap_is_int(r, 0, "crafted zchunk file (written after zchunk_format.txt) decodes");

        /* A frame that inflates 4 MiB of zeros from a few hundred bytes,
         * declared as 40000 bytes: the output buffer is the declared size. */
        struct craft_chunk bomb = { .comp = zstd_of(&bomb_raw), .raw = raw, .declared = raw.len };
        tap_diag("bomb: %zu compressed bytes inflate to %zu", bomb.comp.len, bomb_raw.len);
        r = decode_crafted(&good_craft, &bomb, 1, raw.len, 65536, err, sizeof(err));
        tap_ok(r == -EBADMSG && strstr(err, "decompress"), "decompression bomb refused within the declared size: %s", err);

        /* Declared larger than the manifest's chunk_size_max: refused while
         * parsing the index, before any buffer is sized from it. */
        struct craft_chunk big = { .comp = zstd_of(&bomb_raw), .raw = bomb_raw };
        r = decode_crafted(&good_craft, &big, 1, bomb_raw.len, 65536, err, sizeof(err));
        tap_ok(r == -EPROTO && strstr(err, "uncompressed"), "chunk above chunk_size_max refused: %s", err);

        struct craft c = good_craft;
        c.flags = 0;
        c.no_uncompressed_digests = true;
        r = decode_crafted(&c, &ok, 1, raw.len, 65536, err, sizeof(err));
        tap_ok(r == -EPROTO && strstr(err, "uncompressed checksums"), "file without -u checksums refused: %s", err);

        c = good_craft;
        c.flags = 4 | 1;
        r = decode_crafted(&c, &ok, 1, raw.len, 65536, err, sizeof(err));
        tap_ok(r == -EPROTO && strstr(err, "streams"), "data streams refused: %s", err);

        c = good_craft;
        c.flags = 4 | 8;
        r = decode_crafted(&c, &ok, 1, raw.len, 65536, err, sizeof(err));
        tap_ok(r == -EPROTO && strstr(err, "unknown"), "unknown flag refused: %s", err);

        c = good_craft;
        c.header_hash = 0;
        r = decode_crafted(&c, &ok, 1, raw.len, 65536, err, sizeof(err));
        tap_ok(r == -EPROTO && strstr(err, "SHA-256"), "SHA-1 header checksum refused: %s", err);

        c = good_craft;
        c.chunk_hash = 3;
        r = decode_crafted(&c, &ok, 1, raw.len, 65536, err, sizeof(err));
        tap_ok(r == -EPROTO && strstr(err, "chunk checksum type"), "SHA-512/128 chunk checksums refused: %s", err);

        c = good_craft;
        c.comp = 0;
        r = decode_crafted(&c, &ok, 1, raw.len, 65536, err, sizeof(err));
        tap_ok(r == -EPROTO && strstr(err, "compression"), "uncompressed zchunk type refused: %s", err);

        c = good_craft;
        c.dict_len = 100;
        r = decode_crafted(&c, &ok, 1, raw.len, 65536, err, sizeof(err));
        tap_ok(r == -EPROTO && strstr(err, "dictionar"), "dictionary refused: %s", err);

        c = good_craft;
        c.sig_count = 1;
        r = decode_crafted(&c, &ok, 1, raw.len, 65536, err, sizeof(err));
        tap_ok(r == -EPROTO && strstr(err, "signatures"), "zchunk signatures refused: %s", err);

        /* A stored (uncompressed) chunk, zchunk's zero-digest form. */
        struct craft_chunk stored = { .comp = raw, .raw = raw, .stored = true };
        r = decode_crafted(&good_craft, &stored, 1, raw.len, 65536, err, sizeof(err));
        tap_is_int(r, 0, "stored chunk (zero compressed digest) decodes by its uncompressed checksum");

        /* Chunks that repeat (a file system's empty space), between others:
         * each lands at its own offset with its own bytes. */
        {
                struct buf zeros = { calloc(1, 30000), 30000 }, ones = { malloc(30000), 30000 };
                memset(ones.data, 1, ones.len);
                struct craft_chunk z = { .comp = zstd_of(&zeros), .raw = zeros }, o = { .comp = zstd_of(&ones), .raw = ones };
                /* o is z's size: only the checksums tell them apart. */
                struct craft_chunk seq[] = { z, z, o, z, ok, ok, o, o, z };
                size_t n = sizeof(seq) / sizeof(seq[0]), pos = 0;
                bool same = true;

                r = decode_crafted(&good_craft, seq, n, 7 * zeros.len + 2 * raw.len, 65536, err, sizeof(err));
                for (size_t i = 0; i < n; i++) {
                        same = same && memcmp(crafted_slot.data + pos, seq[i].raw.data, seq[i].raw.len) == 0;
                        pos += seq[i].raw.len;
                }
                tap_ok(r == 0 && same, "repeated chunks decode to their own bytes at their own offsets (%d)", r);

                /* A repeat whose compressed bytes are not what the index
                 * says: refused, not taken for the chunk before it. */
                struct buf payload = craft_zck(&good_craft, (struct craft_chunk[]){ z, z }, 2);
                struct bundle_manifest *m = calloc(1, sizeof(*m));
                struct sink sk = { .data = calloc(1, 2 * zeros.len), .size = 2 * zeros.len };
                struct payload_decoder *d = NULL;

                m->compatible = strdup("x");
                m->version = strdup("1");
                m->payload_format = strdup("zchunk");
                m->chunking.algorithm = strdup("gear64");
                m->image_size = 2 * zeros.len;
                m->payload_size = payload.len;
                m->chunk_count = 2;
                m->chunk_size_max = 65536;
                m->header_size = (uint32_t) (payload.len - 2 * z.comp.len);
                sha256(payload.data, m->header_size, m->header_sha256);
                payload.data[payload.len - 1] ^= 1; /* the second chunk's last byte */
                r = payload_decoder_new(m, sink_write, &sk, &d);
                if (r >= 0)
                        r = payload_decoder_feed(d, payload.data, payload.len);
                tap_ok(r == -EBADMSG && strstr(payload_decoder_error(d), "chunk 1") && sk.writes == 1,
                       "a tampered repeat of the chunk before is refused: %s", d ? payload_decoder_error(d) : "");
                payload_decoder_free(d);
                bundle_manifest_free(m);
                free(payload.data);
                free(sk.data);
                free(z.comp.data);
                free(o.comp.data);
                free(zeros.data);
                free(ones.data);
        }

        /* The index claims a different image size than the manifest. */
        r = decode_crafted(&good_craft, &ok, 1, raw.len + 1, 65536, err, sizeof(err));
        tap_ok(r == -EPROTO && strstr(err, "image"), "chunks that do not add up to the image refused: %s", err);

        free(ok.comp.data);
        free(bomb.comp.data);
        free(big.comp.data);
        free(raw.data);
        free(bomb_raw.data);
        free(crafted_slot.data);
        crafted_slot = (struct buf){ NULL, 0 };
}

/* ---- zchunk files made by the zck CLI ----------------------------------- */

static void test_zck_cli(void) {
        struct buf image = make_image(3u << 20, 1), payload, other;
        struct bundle_manifest *m, *m_other;
        struct payload_decoder *d = NULL;
        struct sink s = { .data = calloc(1, image.len), .size = image.len };
        struct payload_progress pr;
        struct payload_chunk ch;
        uint8_t md[32];
        int r;

        spit("cli.img", image.data, image.len);
        if (sh("zck -u -o cli.zck cli.img") != 0) {
                tap_skip("zck CLI (zchunk package) missing", "zck CLI files");
                return;
        }
        payload = slurp("cli.zck");
        m = manifest_for(&payload, &image, 262144);

        r = payload_decoder_new(m, sink_write, &s, &d);
        tap_is_int(r, 0, "decoder for a zck -u file");
        tap_is_int(payload_decoder_chunk_count(d), 0, "no index before the header");
        r = feed_blocks(d, payload.data, payload.len, 4096);
        tap_is_int(r, 0, "zck -u file fed in 4 KiB stream blocks");
        tap_ok(payload_decoder_finished(d), "finished after the last byte");
        tap_ok(memcmp(s.data, image.data, image.len) == 0, "the slot holds the image");
        tap_is_int(s.writes, m->chunk_count, "one write per chunk");
        payload_decoder_progress(d, &pr);
        tap_ok(pr.next_chunk == m->chunk_count && pr.payload_offset == payload.len && pr.image_offset == image.len,
               "progress at the end: chunk %u, payload %llu, image %llu", pr.next_chunk,
               (unsigned long long) pr.payload_offset, (unsigned long long) pr.image_offset);
        r = payload_decoder_chunk(d, 3, &ch);
        sha256(image.data + ch.image_offset, ch.image_size, md);
        tap_ok(r == 0 && memcmp(md, ch.sha256_uncompressed, 32) == 0,
               "chunk 3's uncompressed checksum is SHA-256 of its image bytes");
        tap_ok(payload_decoder_feed(d, "x", 1) == -EFBIG, "a byte beyond the payload: -EFBIG");
        {
                size_t hs = 0;
                const void *h;
                payload_decoder_seek(d, 0, NULL);
                h = payload_decoder_header(d, &hs);
                tap_ok(h && hs == m->header_size && memcmp(h, payload.data, hs) == 0,
                       "payload_decoder_header() gives the header bytes for the caller to keep");
        }
        payload_decoder_free(d);
        d = NULL;

        /* A manifest of another payload: the header does not match. */
        struct buf image2 = make_image(3u << 20, 2);
        spit("cli2.img", image2.data, image2.len);
        sh("zck -u -o cli2.zck cli2.img");
        other = slurp("cli2.zck");
        m_other = manifest_for(&other, &image2, 262144);
        memset(s.data, 0, s.size);
        s.writes = 0;
        payload_decoder_new(m_other, sink_write, &s, &d);
        r = feed_blocks(d, payload.data, payload.len, 4096);
        tap_ok(r == -EBADMSG && strstr(payload_decoder_error(d), "header_sha256"),
               "another payload's header refused against the manifest: %s", payload_decoder_error(d));
        tap_is_int(s.writes, 0, "nothing written after a header mismatch");
        tap_is_int(payload_decoder_feed(d, other.data, 1), -ESTALE, "feed after an error: -ESTALE until seek");
        payload_decoder_seek(d, 0, NULL);
        r = feed_blocks(d, other.data, other.len, 65536);
        tap_is_int(r, 0, "after seek(0) the right payload decodes");
        tap_ok(memcmp(s.data, image2.data, image2.len) == 0, "and the slot holds its image");
        payload_decoder_free(d);
        d = NULL;

        /* zck without -u: no uncompressed checksums. */
        sh("zck -o plain.zck cli.img");
        struct buf plain = slurp("plain.zck");
        struct bundle_manifest *mp = manifest_for(&plain, &image, 262144);
        payload_decoder_new(mp, sink_write, &s, &d);
        r = feed_blocks(d, plain.data, plain.len, 4096);
        tap_ok(r == -EPROTO && strstr(payload_decoder_error(d), "zck -u"), "zck file without -u refused: %s",
               payload_decoder_error(d));
        payload_decoder_free(d);
        bundle_manifest_free(mp);
        free(plain.data);

        bundle_manifest_free(m);
        bundle_manifest_free(m_other);
        free(payload.data);
        free(other.data);
        free(image.data);
        free(image2.data);
        free(s.data);
}

/* ---- bundles made by otad bundle create --------------------------------- */

static int create_bundle(const char *img, const char *out, const char *version) {
        const char *otad = getenv("OTAD_BIN");

        if (!otad)
                return -1;
        return sh("'%s' bundle create --key signer.key --cert signer.crt --version %s --compatible test-board "
                  "--part-size 1000000 %s %s",
                  otad, version, img, out);
}

static struct buf read_parts(const struct bundle_manifest *m, const char *out) {
        struct buf p = { malloc(m->payload_size), m->payload_size };

        for (size_t i = 0; i < m->n_parts; i++) {
                _cleanup_free_ char *name = NULL;
                struct buf part;

                if (asprintf(&name, "%s/%s", out, m->parts[i].file) < 0)
                        abort();
                part = slurp(name);
                if (part.len != m->parts[i].size)
                        abort();
                memcpy(p.data + m->parts[i].offset, part.data, part.len);
                free(part.data);
        }
        return p;
}

static struct bundle_manifest *load(const char *out, const char *version) {
        _cleanup_free_ char *name = NULL;
        struct bundle_manifest *m = NULL;
        struct buf text;
        char err[256];

        if (asprintf(&name, "%s/bundle-%s.manifest", out, version) < 0)
                abort();
        text = slurp(name);
        if (bundle_manifest_parse(text.data, text.len, &m, err, sizeof(err)) < 0)
                tap_diag("manifest: %s", err);
        free(text.data);
        return m;
}

static void test_tool_bundles(void) {
        struct buf image = make_image(5u << 20, 3), image_b = make_image(5u << 20, 4);
        struct bundle_manifest *m, *mb;
        struct buf payload, payload_b;
        struct payload_decoder *d = NULL, *d2 = NULL;
        struct sink s = { .data = calloc(1, image.len), .size = image.len };
        struct payload_progress pr;
        uint64_t off = 0;
        int r;

        spit("a.img", image.data, image.len);
        spit("b.img", image_b.data, image_b.len);
        if (sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout signer.key "
               "-out signer.crt -days 30 -subj /CN=signer") != 0 ||
            create_bundle("a.img", "out-a", "2.0.0") != 0 || create_bundle("b.img", "out-b", "3.0.0") != 0) {
                tap_skip("otad bundle create failed or OTAD_BIN unset", "tool bundles");
                return;
        }
        m = load("out-a", "2.0.0");
        mb = load("out-b", "3.0.0");
        if (!tap_ok(m && mb && m->n_parts > 1, "bundles of several 1 MB parts parse")) {
                free(s.data);
                return;
        }
        tap_ok(m->chunking.min_size == BUNDLE_CHUNK_MIN_DEFAULT && m->chunk_size_max == BUNDLE_CHUNK_MAX_DEFAULT,
               "manifest carries the chunking parameters");
        payload = read_parts(m, "out-a");
        payload_b = read_parts(mb, "out-b");

        /* Part by part in 4 KiB blocks, killed halfway, resumed. */
        payload_decoder_new(m, sink_write, &s, &d);
        r = feed_blocks(d, payload.data, payload.len / 2, 4096);
        tap_is_int(r, 0, "first half fed");
        payload_decoder_progress(d, &pr);
        tap_ok(pr.next_chunk > 0 && pr.next_chunk < m->chunk_count, "progress mid-way: chunk %u of %u",
               pr.next_chunk, m->chunk_count);
        payload_decoder_free(d);
        d = NULL;
        memset(s.data + pr.image_offset, 0, image.len - pr.image_offset); /* nothing durable past it */

        payload_decoder_new(m, sink_write, &s, &d2);
        r = payload_decoder_feed(d2, payload.data, m->header_size);
        tap_is_int(r, 0, "restart: the header again");
        r = payload_decoder_seek(d2, pr.next_chunk, &off);
        tap_ok(r == 0 && off == pr.payload_offset, "seek to the persisted chunk gives its payload offset %llu",
               (unsigned long long) off);
        r = feed_blocks(d2, payload.data + off, payload.len - off, 4096);
        tap_is_int(r, 0, "the rest fed from there");
        tap_ok(payload_decoder_finished(d2) && memcmp(s.data, image.data, image.len) == 0,
               "resumed decode leaves the whole image in the slot");
        payload_decoder_free(d2);
        d2 = NULL;

        /* A part from another bundle: its first chunk fails its checksum,
         * nothing of it is written. */
        memset(s.data, 0, s.size);
        s.writes = 0;
        s.highest = 0;
        payload_decoder_new(m, sink_write, &s, &d);
        r = feed_blocks(d, payload.data, m->parts[1].offset, 4096);
        tap_is_int(r, 0, "part 0 of bundle A");
        payload_decoder_progress(d, &pr);
        uint64_t written = s.highest;
        r = feed_blocks(d, payload_b.data + mb->parts[1].offset, mb->parts[1].size, 4096);
        tap_ok(r == -EBADMSG && strstr(payload_decoder_error(d), "checksum"),
               "part 1 of bundle B refused: %s", payload_decoder_error(d));
        tap_ok(s.highest == written, "nothing of it reached the slot (%llu bytes before, %llu after)",
               (unsigned long long) written, (unsigned long long) s.highest);
        /* Requested again: seek back to the persisted chunk, the right bytes. */
        r = payload_decoder_seek(d, pr.next_chunk, &off);
        if (r == 0)
                r = feed_blocks(d, payload.data + off, payload.len - off, 4096);
        tap_ok(r == 0 && payload_decoder_finished(d) && memcmp(s.data, image.data, image.len) == 0,
               "re-fetched from the persisted chunk, the image completes");
        payload_decoder_free(d);
        d = NULL;

        /* A flipped bit in a chunk. */
        payload.data[payload.len - 100] ^= 0x40;
        payload_decoder_new(m, sink_write, &s, &d);
        r = feed_blocks(d, payload.data, payload.len, 65536);
        tap_ok(r == -EBADMSG && strstr(payload_decoder_error(d), "does not match its checksum"),
               "a corrupted chunk refused: %s", payload_decoder_error(d));
        payload.data[payload.len - 100] ^= 0x40;
        payload_decoder_free(d);
        d = NULL;

        /* The write callback fails: its error comes back. */
        s.writes = 0;
        s.fail_at = 3;
        payload_decoder_new(m, sink_write, &s, &d);
        r = feed_blocks(d, payload.data, payload.len, 65536);
        tap_is_int(r, -ENOSPC, "the write callback's error comes back as is");
        s.fail_at = 0;
        payload_decoder_free(d);
        d = NULL;

        /* Out of order, chunk by chunk (the adaptive update's way). */
        memset(s.data, 0, s.size);
        payload_decoder_new(m, sink_write, &s, &d);
        payload_decoder_feed(d, payload.data, m->header_size);
        r = 0;
        for (uint32_t i = payload_decoder_chunk_count(d); i-- > 0 && r == 0;) {
                struct payload_chunk ch;
                payload_decoder_chunk(d, i, &ch);
                r = payload_decoder_put_chunk(d, i, payload.data + ch.payload_offset, ch.payload_size);
        }
        tap_ok(r == 0 && memcmp(s.data, image.data, image.len) == 0, "chunks put in reverse order give the image");
        {
                struct payload_chunk c0, c1;
                payload_decoder_chunk(d, 0, &c0);
                payload_decoder_chunk(d, 1, &c1);
                r = payload_decoder_put_chunk(d, 0, payload.data + c1.payload_offset, c1.payload_size);
                tap_ok(r == -EBADMSG, "a chunk put under another index refused");
                r = payload_decoder_feed(d, payload.data + c0.payload_offset, c0.payload_size);
                tap_is_int(r, 0, "a refused put_chunk does not stop the in-order feed");
        }
        tap_is_int(payload_decoder_put_chunk(d, m->chunk_count, payload.data, 1), -ERANGE,
                   "put_chunk past the last index: -ERANGE");
        payload_decoder_free(d);

        bundle_manifest_free(m);
        bundle_manifest_free(mb);
        free(payload.data);
        free(payload_b.data);
        free(image.data);
        free(image_b.data);
        free(s.data);
}

/* ---- the manifest -------------------------------------------------------- */

static const char *good_manifest =
        "{\"format\":\"otad-bundle\",\"format_version\":1,\"compatible\":\"acme-gw\",\"version\":\"2.1.0\","
        "\"image\":{\"size\":1000000,\"sha256\":\"" "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff" "\"},"
        "\"payload\":{\"format\":\"zchunk\",\"size\":500000,\"header_size\":1000,"
        "\"header_sha256\":\"" "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100" "\","
        "\"chunk_count\":12,\"chunk_size_max\":262144,"
        "\"chunking\":{\"algorithm\":\"gear64\",\"min_size\":16384,\"mask_bits\":16,\"max_size\":262144}},"
        "\"parts\":[{\"file\":\"b.payload.00\",\"size\":300000,\"sha256\":\""
        "0000000000000000000000000000000000000000000000000000000000000001" "\"},"
        "{\"file\":\"b.payload.01\",\"size\":200000,\"sha256\":\""
        "0000000000000000000000000000000000000000000000000000000000000002" "\"}]}";

static char *replace(const char *s, const char *from, const char *to) {
        const char *p = strstr(s, from);
        char *out;

        if (!p)
                abort();
        if (asprintf(&out, "%.*s%s%s", (int) (p - s), s, to, p + strlen(from)) < 0)
                abort();
        return out;
}

static void expect_refused(const char *text, size_t len, int want, const char *needle, const char *name) {
        struct bundle_manifest *m = NULL;
        char err[256] = "";
        int r = bundle_manifest_parse(text, len, &m, err, sizeof(err));

        tap_ok(r == want && strstr(err, needle) && !m, "%s: %s", name, err);
        bundle_manifest_free(m);
}

static void mutate(const char *from, const char *to, const char *needle, const char *name) {
        _cleanup_free_ char *t = replace(good_manifest, from, to);
        expect_refused(t, strlen(t), -EBADMSG, needle, name);
}

static void test_manifest(void) {
        struct bundle_manifest *m = NULL, *m2 = NULL;
        _cleanup_free_ char *text = NULL, *big = NULL;
        char err[256] = "";
        size_t idx = 99;
        int r;

        r = bundle_manifest_parse(good_manifest, strlen(good_manifest), &m, err, sizeof(err));
        tap_ok(r == 0, "a valid manifest parses %s", err);
        if (!m)
                return;
        tap_is_str(m->compatible, "acme-gw", "compatible");
        tap_is_str(m->version, "2.1.0", "version");
        tap_ok(m->image_size == 1000000 && m->image_sha256[0] == 0x00 && m->image_sha256[31] == 0xff, "image");
        tap_ok(m->n_parts == 2 && m->parts[1].offset == 300000 && m->parts[1].sha256[31] == 2,
               "parts are consecutive slices");
        tap_ok(bundle_manifest_part_at(m, 299999, &idx) == 0 && idx == 0 && bundle_manifest_part_at(m, 300000, &idx) == 0 &&
               idx == 1 && bundle_manifest_part_at(m, 500000, &idx) == -ERANGE, "part_at");
        r = bundle_manifest_format(m, &text);
        tap_ok(r == 0 && bundle_manifest_parse(text, strlen(text), &m2, err, sizeof(err)) == 0 && m2 &&
               m2->payload_size == m->payload_size && memcmp(m2->header_sha256, m->header_sha256, 32) == 0 &&
               strcmp(m2->parts[1].file, "b.payload.01") == 0, "format() output parses back to the same manifest");
        bundle_manifest_free(m2);

        mutate("\"version\":\"2.1.0\",", "\"version\":\"2.1.0\",\"extra\":1,", "unknown key", "unknown key refused");
        mutate("\"version\":\"2.1.0\",", "", "lacks \"version\"", "missing key refused");
        mutate("\"version\":\"2.1.0\",", "\"version\":\"2.1.0\",\"version\":\"9\",", "twice", "duplicate key refused");
        mutate("\"version\":\"2.1.0\"", "\"version\":2", "not a string", "version as a number refused");
        mutate("\"version\":\"2.1.0\"", "\"version\":\"2.1 0\"", "characters", "version with a space refused");
        mutate("\"compatible\":\"acme-gw\"", "\"compatible\":\"\"", "characters", "empty compatible refused");
        mutate("\"size\":1000000", "\"size\":-1", "whole number", "negative size refused");
        mutate("\"size\":1000000", "\"size\":1000000.5", "whole number", "fractional size refused");
        mutate("\"size\":1000000", "\"size\":1e300", "whole number", "huge size refused");
        mutate("\"size\":1000000", "\"size\":2199023255553", "whole number", "image above 1 TiB refused");
        mutate("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
               "00112233445566778899AABBCCDDEEFF00112233445566778899aabbccddeeff", "lowercase hex",
               "uppercase digest refused");
        mutate("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff", "0011", "64 hex", "short digest refused");
        mutate("\"size\":200000", "\"size\":200001", "add up", "parts not adding up to the payload refused");
        mutate("\"size\":300000", "\"size\":25165825", "whole number", "part above 24 MiB refused");
        mutate("b.payload.01", "b.payload.00", "twice", "a part file listed twice refused");
        mutate("b.payload.01", "../etc/passwd", "characters", "a part file with a path refused");
        mutate("b.payload.01", ".hidden", "characters", "a part file starting with a dot refused");
        mutate("\"header_size\":1000", "\"header_size\":500000", "leaves no data", "header as big as the payload refused");
        mutate("\"header_size\":1000", "\"header_size\":8388609", "whole number", "header above 8 MiB refused");
        mutate("\"chunk_count\":12", "\"chunk_count\":3", "cannot hold", "too few chunks for the image refused");
        mutate("\"chunk_size_max\":262144", "\"chunk_size_max\":4194305", "whole number",
               "chunk_size_max above 4 MiB refused");
        mutate("\"max_size\":262144", "\"max_size\":8192", "exceeds max_size", "chunking min above max refused");
        mutate("\"chunk_size_max\":262144", "\"chunk_size_max\":131072", "exceeds chunk_size_max",
               "chunking max above chunk_size_max refused");
        mutate("\"algorithm\":\"gear64\"", "\"algorithm\":\"buzhash\"", "unknown chunking", "unknown chunking refused");
        mutate("\"format\":\"zchunk\"", "\"format\":\"casync\"", "unknown payload format", "other payload format refused");
        mutate("\"format\":\"otad-bundle\"", "\"format\":\"rauc\"", "not an otad bundle", "other format refused");
        mutate("\"parts\":[", "\"parts\":[]", "not JSON", "malformed JSON refused");
        mutate("\"image\":{", "\"image\":[{", "not JSON", "unbalanced JSON refused");
        {
                _cleanup_free_ char *t = replace(good_manifest, "\"format_version\":1", "\"format_version\":2");
                expect_refused(t, strlen(t), -EPROTONOSUPPORT, "version 2", "format_version 2: -EPROTONOSUPPORT");
        }
        expect_refused(good_manifest, strlen(good_manifest) + 1, -EBADMSG, "NUL", "a NUL byte refused");
        big = malloc(BUNDLE_MANIFEST_MAX + 2);
        memset(big, ' ', BUNDLE_MANIFEST_MAX + 1);
        big[BUNDLE_MANIFEST_MAX + 1] = '\0';
        expect_refused(big, BUNDLE_MANIFEST_MAX + 1, -EBADMSG, "at most", "a manifest above 64 KiB refused unparsed");
        {
                /* 50 parts: one more than a stream holds next to the manifest. */
                FILE *f;
                size_t size = 0;
                _cleanup_free_ char *t = NULL, *arr = NULL;
                f = open_memstream(&arr, &size);
                fputs("\"parts\":[", f);
                for (int i = 0; i < 50; i++)
                        fprintf(f, "%s{\"file\":\"p%02d\",\"size\":10000,\"sha256\":\"%064d\"}", i ? "," : "", i, 0);
                fputs("]}", f);
                fclose(f);
                t = malloc(strlen(good_manifest) + size + 1);
                strcpy(t, good_manifest);
                strcpy(strstr(t, "\"parts\":["), arr);
                _cleanup_free_ char *t2 = replace(t, "\"size\":500000", "\"size\":1000000");
                _cleanup_free_ char *t3 = replace(t2, "\"image\":{\"size\":1000000", "\"image\":{\"size\":900000");
                expect_refused(t3, strlen(t3), -EBADMSG, "50 parts", "50 parts refused");
        }
        bundle_manifest_free(m);
}

static void test_decide(void) {
        struct bundle_manifest *m = NULL;
        struct bundle_decision dec;
        char err[256];

        bundle_manifest_parse(good_manifest, strlen(good_manifest), &m, err, sizeof(err));
        if (!m)
                return;
        struct bundle_policy p = { .compatible = "acme-gw", .running_version = "2.0.9" };

        bundle_manifest_decide(m, &p, &dec);
        tap_ok(dec.verdict == BUNDLE_ACCEPT, "newer version, same compatible: accept (%s)", dec.detail);

        p.compatible = "other-board";
        bundle_manifest_decide(m, &p, &dec);
        tap_ok(dec.verdict == BUNDLE_INCOMPATIBLE && !dec.word && dec.code == 0x0c && dec.sub_code == 4 &&
               strstr(dec.detail, "\"acme-gw\"") && strstr(dec.detail, "\"other-board\""),
               "other compatible: incompatible, 0x0000000c: 0x00000004 (%s)", dec.detail);
        p.compatible = "";
        bundle_manifest_decide(m, &p, &dec);
        tap_ok(dec.verdict == BUNDLE_INCOMPATIBLE && strstr(dec.detail, "compatible="),
               "no compatible= configured: incompatible (%s)", dec.detail);
        p.compatible = "acme-gw";

        p.running_version = "2.1.0";
        bundle_manifest_decide(m, &p, &dec);
        tap_ok(dec.verdict == BUNDLE_SAME_VERSION && dec.word && strcmp(dec.word, "rejected") == 0 && dec.code == 0x10,
               "same version: rejected: 0x00000010 (%s)", dec.detail);
        p.allow_same_version = true;
        bundle_manifest_decide(m, &p, &dec);
        tap_ok(dec.verdict == BUNDLE_ACCEPT, "same version with allow_same_version: accept");

        p.running_version = "2.10.0";
        bundle_manifest_decide(m, &p, &dec);
        tap_ok(dec.verdict == BUNDLE_DOWNGRADE && dec.code == 0x0f && strstr(dec.detail, "2.10.0"),
               "2.1.0 on 2.10.0 (numeric compare): rejected: 0x0000000f (%s)", dec.detail);
        p.allow_downgrade = true;
        bundle_manifest_decide(m, &p, &dec);
        tap_ok(dec.verdict == BUNDLE_ACCEPT, "downgrade with allow_downgrade: accept");

        p.slot_size = 999999;
        bundle_manifest_decide(m, &p, &dec);
        tap_ok(dec.verdict == BUNDLE_TOO_LARGE && dec.code == 0xe5 && dec.sub_code == EFBIG,
               "image larger than the slot: 0x000000e5: 0x0000001b (%s)", dec.detail);
        bundle_manifest_free(m);
}

/* ---- the chunker --------------------------------------------------------- */

static size_t cut(const struct buf *b, uint64_t *ends, size_t max) {
        struct bundle_chunking params = { (char *) "gear64", BUNDLE_CHUNK_MIN_DEFAULT, BUNDLE_CHUNK_MASK_BITS_DEFAULT,
                                          BUNDLE_CHUNK_MAX_DEFAULT };
        struct bundle_chunker c;
        size_t n = 0, pos = 0;

        bundle_chunker_init(&c, &params);
        /* Fed in odd slices: boundaries must not depend on them. */
        while (pos < b->len && n < max) {
                size_t len = b->len - pos < 7777 ? b->len - pos : 7777;
                size_t used = bundle_chunker_scan(&c, b->data + pos, len);
                pos += used;
                if (c.len == 0)
                        ends[n++] = pos;
        }
        if (c.len > 0 && n < max)
                ends[n++] = pos;
        return n;
}

static void test_chunker(void) {
        struct buf a = make_image(8u << 20, 9), b;
        uint64_t ea[1024], eb[1024];
        size_t na, nb, shared = 0, bad = 0;
        struct bundle_chunking params = { (char *) "gear64", 100, 16, 1000 };
        struct bundle_chunker c;

        tap_is_int(bundle_chunker_init(&c, &params), -EINVAL, "min below 4 KiB refused");
        params = (struct bundle_chunking) { (char *) "gear64", 65536, 16, 32768 };
        tap_is_int(bundle_chunker_init(&c, &params), -EINVAL, "min above max refused");

        na = cut(&a, ea, 1024);
        for (size_t i = 0; i < na; i++) {
                uint64_t len = ea[i] - (i ? ea[i - 1] : 0);
                if ((len < BUNDLE_CHUNK_MIN_DEFAULT && i + 1 < na) || len > BUNDLE_CHUNK_MAX_DEFAULT)
                        bad++;
        }
        tap_ok(bad == 0 && na > 8u * 1024 * 1024 / (BUNDLE_CHUNK_MAX_DEFAULT) && ea[na - 1] == a.len,
               "%zu chunks of 8 MiB, all within min..max, covering it", na);
        tap_ok(cut(&a, eb, 1024) == na && memcmp(ea, eb, na * sizeof(*ea)) == 0, "the same bytes cut the same way");

        /* 4 KiB inserted at the front (a file system block): the chunks
         * after the first few boundaries are the same bytes. */
        b.len = a.len + 4096;
        b.data = malloc(b.len);
        memset(b.data, 0x5a, 4096);
        memcpy(b.data + 4096, a.data, a.len);
        nb = cut(&b, eb, 1024);
        for (size_t i = 0, j = 0; i < na && j < nb;) {
                if (ea[i] + 4096 == eb[j]) {
                        shared++;
                        i++;
                        j++;
                } else if (ea[i] + 4096 < eb[j])
                        i++;
                else
                        j++;
        }
        tap_ok(shared + 3 >= na, "after a 4 KiB insertion %zu of %zu boundaries realign", shared, na);
        free(a.data);
        free(b.data);
}

int main(void) {
        if (!mkdtemp(dir))
                return 1;
        test_manifest();
        test_decide();
        test_chunker();
        test_crafted();
        test_zck_cli();
        test_tool_bundles();
        sh("rm -rf '%s'", dir);
        return tap_done();
}
