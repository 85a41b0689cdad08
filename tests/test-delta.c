/* SPDX-License-Identifier: MIT */
/* Unit tests of the adaptive update's device side: bundles made by
 * `otad bundle create` ($OTAD_BIN) of images that differ from an "active
 * slot" image by inserted, modified and moved data; the plan, the copy, the
 * fetch of the rest through the payload decoder, and the slot compared byte
 * for byte with the new image at the end. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "bundle_chunker.h"
#include "bundle_manifest.h"
#include "delta.h"
#include "fileio.h"
#include "macro.h"
#include "payload_decoder.h"
#include "tap.h"

#define MIB (1024u * 1024u)

static char dir[] = "/tmp/test-delta.XXXXXX";

#define sh(...) tap_sh(dir, __VA_ARGS__)

struct buf {
        uint8_t *data;
        size_t len;
};

static struct buf slurp(const char *name) {
        _cleanup_free_ char *p = NULL;
        struct buf b = { 0 };
        char *data = NULL;

        if (asprintf(&p, "%s/%s", dir, name) < 0)
                abort();
        if (read_file_full(p, 256u << 20, &data, &b.len) < 0)
                return b;
        b.data = (uint8_t *) data;
        return b;
}

static void spit(const char *name, const struct buf *b) {
        _cleanup_free_ char *p = NULL;

        if (asprintf(&p, "%s/%s", dir, name) < 0 || write_file_atomic(p, b->data, b->len, 0644) < 0)
                abort();
}

static struct buf copy_of(const struct buf *b) {
        struct buf c = { malloc(b->len), b->len };

        memcpy(c.data, b->data, b->len);
        return c;
}

/* Runs of text, zeros and noise from a seed (compresses like a file
 * system), with a 2 MiB hole of zeros: many chunks with one checksum. */
static struct buf make_image(size_t len, unsigned seed) {
        struct buf b = { malloc(len), len };
        uint32_t x = seed * 2654435761u + 1;

        for (size_t i = 0; i < len;) {
                size_t run = 1000 + (x % 30000);
                unsigned kind = (x >> 8) % 3;

                for (size_t j = 0; j < run && i < len; j++, i++) {
                        x = x * 1103515245u + 12345u;
                        b.data[i] = kind == 0 ? 0 : kind == 1 ? (uint8_t) ("otad delta test "[j % 16]) : (uint8_t) (x >> 16);
                }
        }
        memset(b.data + len / 2, 0, 2 * MIB);
        return b;
}

static void noise(uint8_t *p, size_t len, unsigned seed) {
        uint32_t x = seed;

        for (size_t i = 0; i < len; i++) {
                x = x * 1664525u + 1013904223u;
                p[i] = (uint8_t) (x >> 24);
        }
}

/* ---- a bundle and a slot in memory ---------------------------------------- */

struct bundle {
        struct bundle_manifest *m;
        struct buf payload;
        struct payload_decoder *d;
};

static int bundle_of(const char *image_name, const char *out, struct bundle *ret) {
        const char *otad = getenv("OTAD_BIN");
        _cleanup_free_ char *manifest = NULL;
        struct buf text;
        char err[256];

        if (!otad || sh("'%s' bundle create --key signer.key --cert signer.crt --version 2.0 --compatible test "
                        "--name b --level 3 --part-size 1000000 %s %s",
                        otad, image_name, out) != 0)
                return -1;
        if (asprintf(&manifest, "%s/b.manifest", out) < 0)
                abort();
        text = slurp(manifest);
        *ret = (struct bundle) { 0 };
        if (bundle_manifest_parse(text.data, text.len, &ret->m, err, sizeof(err)) < 0)
                abort();
        free(text.data);
        ret->payload = (struct buf) { malloc(ret->m->payload_size), ret->m->payload_size };
        for (size_t i = 0; i < ret->m->n_parts; i++) {
                _cleanup_free_ char *name = NULL;
                struct buf part;

                if (asprintf(&name, "%s/%s", out, ret->m->parts[i].file) < 0)
                        abort();
                part = slurp(name);
                memcpy(ret->payload.data + ret->m->parts[i].offset, part.data, part.len);
                free(part.data);
        }
        return 0;
}

/* A slot: reads from a buffer, failing where told. */
struct slot {
        struct buf b;
        uint64_t fail_from, fail_to;  /* reads touching [from, to) fail */
        int fail_error;
        unsigned reads;
};

static int slot_read(uint64_t offset, void *buf, size_t len, void *userdata) {
        struct slot *s = userdata;

        s->reads++;
        if (s->fail_error && offset < s->fail_to && offset + len > s->fail_from)
                return s->fail_error;
        if (offset > s->b.len || len > s->b.len - offset)
                return -EIO;
        memcpy(buf, s->b.data + offset, len);
        return 0;
}

static int slot_write(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct slot *s = userdata;

        if (offset > s->b.len || len > s->b.len - offset)
                return -ENOSPC;
        memcpy(s->b.data + offset, buf, len);
        return 0;
}

static struct delta_source source(struct slot *s) {
        return (struct delta_source) { slot_read, s, s->b.len };
}

/* A fresh decoder of b's header, writing into target; the plan from it. */
static struct delta_plan *plan_for(struct bundle *b, struct slot *target) {
        struct delta_plan *p = NULL;

        payload_decoder_free(b->d);
        b->d = NULL;
        if (payload_decoder_new(b->m, slot_write, target, &b->d) < 0 ||
            payload_decoder_feed(b->d, b->payload.data, b->m->header_size) < 0 ||
            delta_plan_new(b->m, b->d, &p) < 0)
                abort();
        return p;
}

/* What the lifecycle does after the copy: fetch the rest (here: from the
 * payload in memory, through the fetch ranges) and hand each whole chunk to
 * the decoder. Returns the payload bytes "fetched". */
static int64_t fetch_rest(struct bundle *b, struct delta_plan *p) {
        _cleanup_free_ struct delta_range *ranges = NULL;
        size_t n = 0;
        int64_t fetched = 0;

        if (delta_plan_fetch_ranges(p, 0, b->m->payload_size, &ranges, &n) < 0)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                uint64_t off = ranges[i].offset, end = off + ranges[i].length;

                fetched += (int64_t) ranges[i].length;
                while (off < end) {
                        struct delta_chunk c;
                        uint32_t index;

                        if (delta_plan_chunk_at_payload(p, off, &index) < 0 || delta_plan_chunk(p, index, &c) < 0 ||
                            c.action != DELTA_FETCH ||
                            payload_decoder_put_chunk(b->d, index, b->payload.data + off, c.payload_size) < 0)
                                return -EBADMSG;
                        off += c.payload_size;
                }
        }
        return fetched;
}

static bool same(const struct buf *a, const struct buf *b) {
        return a->len == b->len && memcmp(a->data, b->data, a->len) == 0;
}

static void print_stats(const struct delta_plan *p) {
        char line[512];

        delta_stats_format(delta_plan_stats(p), line, sizeof(line));
        tap_diag("%s", line);
}

/* Chunks of the plan with the given action. */
static uint32_t count(const struct delta_plan *p, enum delta_action a) {
        uint32_t n = 0;
        struct delta_chunk c;

        for (uint32_t i = 0; i < delta_plan_chunk_count(p); i++)
                if (delta_plan_chunk(p, i, &c) == 0 && c.action == a)
                        n++;
        return n;
}

/* ---- the tests --------------------------------------------------------------- */

static struct buf old_image, new_image;
static struct bundle bundle;
#define EDIT_INSERT (1 * MIB + 12345)
#define EDIT_MODIFY (3 * MIB + 777)
#define MOVE_FROM (2 * MIB)
#define MOVE_TO (8 * MIB)
#define MOVE_LEN (600 * 1024)

/* new = old with 4 KiB inserted, 10 KB modified, and 600 KiB of old's
 * bytes at a place where old had others (a file that moved). */
static void make_images(void) {
        size_t len = 10 * MIB;

        old_image = make_image(len, 7);
        new_image = (struct buf) { malloc(len + 4096), len + 4096 };
        memcpy(new_image.data, old_image.data, EDIT_INSERT);
        noise(new_image.data + EDIT_INSERT, 4096, 1);
        memcpy(new_image.data + EDIT_INSERT + 4096, old_image.data + EDIT_INSERT, len - EDIT_INSERT);
        noise(new_image.data + EDIT_MODIFY, 10000, 2);
        memcpy(new_image.data + MOVE_TO, old_image.data + MOVE_FROM, MOVE_LEN);
}

/* Is [a, a+len) clear of every edit of new? Such a chunk's bytes are in
 * old, cut the same way once the cut has realigned after an edit: at the
 * first content-defined boundary, which in the runs of zeros and repeated
 * text here (as in a file system) may come only after a few chunks cut at
 * max_size. */
static bool away_from_edits(uint64_t a, uint64_t len) {
        const uint64_t margin = 3 * BUNDLE_CHUNK_MAX_DEFAULT;
        const uint64_t edits[][2] = {
                { EDIT_INSERT, 4096 }, { EDIT_MODIFY, 10000 }, { MOVE_TO, MOVE_LEN },
        };

        for (size_t i = 0; i < ELEMENTSOF(edits); i++)
                if (a < edits[i][0] + edits[i][1] + margin && a + len + margin > edits[i][0])
                        return false;
        return true;
}

static void test_reuse(void) {
        struct slot active = { .b = copy_of(&old_image) };
        struct slot target = { .b = { calloc(1, new_image.len), new_image.len } };
        struct delta_plan *p = plan_for(&bundle, &target);
        const struct delta_stats *s = delta_plan_stats(p);
        struct delta_scan_options so = { .active = source(&active) };
        struct delta_copy_options co = { .active = source(&active), .write = slot_write, .write_userdata = &target };
        uint32_t missed = 0, moved = 0, moved_total = 0;
        int64_t fetched;

        tap_ok(s->fallback[0] == '\0' && s->fetch_chunks == s->chunks && s->chunks == bundle.m->chunk_count,
               "a new plan fetches all %u chunks", s->chunks);
        tap_is_int(delta_scan(p, &so), 0, "scan of the active slot");
        print_stats(p);
        for (uint32_t i = 0; i < delta_plan_chunk_count(p); i++) {
                struct delta_chunk c;

                delta_plan_chunk(p, i, &c);
                if (c.action != DELTA_COPY && away_from_edits(c.image_offset, c.image_size)) {
                        tap_diag("missed chunk %u at %llu+%u", c.index, (unsigned long long) c.image_offset,
                                 c.image_size);
                        missed++;
                }
                /* Wholly inside the moved bytes: found where old had them. */
                if (c.image_offset >= MOVE_TO + BUNDLE_CHUNK_MAX_DEFAULT &&
                    c.image_offset + c.image_size <= MOVE_TO + MOVE_LEN) {
                        moved_total++;
                        if (c.action == DELTA_COPY && c.source_offset == c.image_offset - MOVE_TO + MOVE_FROM)
                                moved++;
                }
        }
        tap_is_int(missed, 0, "every chunk away from the edits is found in the active slot");
        tap_ok(moved_total > 0 && moved == moved_total, "the moved data is copied from where it was (%u of %u chunks)",
               moved, moved_total);
        tap_ok(s->fetch_chunks > 0 && s->fetch_chunks <= 12 && s->fetch_payload_bytes < s->payload_bytes / 5,
               "%u chunks to fetch, %llu of %llu payload bytes", s->fetch_chunks,
               (unsigned long long) s->fetch_payload_bytes, (unsigned long long) s->payload_bytes);
        tap_ok(s->active_read_bytes == old_image.len, "the active slot read once, whole");
        tap_ok(s->active_same_offset_chunks > 0 && s->active_same_offset_chunks < s->active_chunks,
               "%u reused chunks at their own offset (before the insertion), the rest shifted",
               s->active_same_offset_chunks);

        tap_is_int(delta_copy(p, &co), 0, "copy");
        tap_ok(count(p, DELTA_COPY) == 0 && count(p, DELTA_COPIED) == s->active_chunks && s->copy_mismatches == 0,
               "every found chunk copied");
        fetched = fetch_rest(&bundle, p);
        tap_ok(fetched == (int64_t) s->fetch_payload_bytes, "the fetch ranges cover exactly the chunks to fetch");
        tap_ok(same(&target.b, &new_image), "the slot holds the new image");

        /* The same plan per part: the slices add up to the whole. */
        {
                uint64_t total = 0;

                for (size_t i = 0; i < bundle.m->n_parts; i++) {
                        _cleanup_free_ struct delta_range *r = NULL;
                        size_t n = 0;

                        delta_plan_fetch_ranges(p, bundle.m->parts[i].offset, bundle.m->parts[i].size, &r, &n);
                        for (size_t j = 0; j < n; j++) {
                                if (r[j].offset + r[j].length > bundle.m->parts[i].size)
                                        total += 1ULL << 40; /* out of the part: fail below */
                                total += r[j].length;
                        }
                }
                tap_ok(bundle.m->n_parts > 1 && total == s->fetch_payload_bytes,
                       "ranges of %zu parts add up to the plan's fetch bytes", bundle.m->n_parts);
        }
        delta_plan_free(p);
        free(active.b.data);
        free(target.b.data);
}

/* Between scan and copy the active slot changes (one byte in a chunk to
 * copy) and another chunk's region becomes unreadable: both are fetched
 * instead, and the slot still ends up right. */
static void test_copy_fallbacks(void) {
        struct slot active = { .b = copy_of(&old_image) };
        struct slot target = { .b = { calloc(1, new_image.len), new_image.len } };
        struct delta_plan *p = plan_for(&bundle, &target);
        const struct delta_stats *s = delta_plan_stats(p);
        struct delta_scan_options so = { .active = source(&active) };
        struct delta_copy_options co = { .active = source(&active), .write = slot_write, .write_userdata = &target };
        struct delta_chunk changed = { 0 }, unreadable = { 0 }, c;
        uint32_t before;

        delta_scan(p, &so);
        before = s->fetch_chunks;
        /* Two copy chunks whose bytes occur once, after the modification
         * and before the zeros: neither the moved data nor the hole. */
        for (uint32_t i = 0; i < delta_plan_chunk_count(p); i++) {
                delta_plan_chunk(p, i, &c);
                if (c.action != DELTA_COPY || c.image_offset < EDIT_MODIFY + MIB / 2)
                        continue;
                if (!changed.image_size)
                        changed = c;
                else if (c.image_offset > changed.image_offset + MIB / 2 && c.image_offset + c.image_size < 5 * MIB) {
                        unreadable = c;
                        break;
                }
        }
        if (!tap_ok(changed.image_size && unreadable.image_size, "two chunks to copy picked"))
                return;
        active.b.data[changed.source_offset + changed.image_size / 2] ^= 0x40;
        active.fail_from = unreadable.source_offset + 10;
        active.fail_to = unreadable.source_offset + 11;
        active.fail_error = -EIO;

        tap_is_int(delta_copy(p, &co), 0, "copy goes on past a changed and an unreadable chunk");
        delta_plan_chunk(p, changed.index, &c);
        tap_ok(c.action == DELTA_FETCH && c.reason == DELTA_REASON_COPY_MISMATCH, "the changed chunk is fetched (mismatch)");
        delta_plan_chunk(p, unreadable.index, &c);
        tap_ok(c.action == DELTA_FETCH && c.reason == DELTA_REASON_COPY_READ_ERROR,
               "the unreadable chunk is fetched (read error)");
        tap_ok(s->copy_mismatches == 1 && s->copy_read_errors == 1 && s->fetch_chunks == before + 2,
               "stats: 1 mismatch, 1 read error, 2 more to fetch");
        print_stats(p);
        tap_ok(fetch_rest(&bundle, p) > 0 && same(&target.b, &new_image), "the slot still holds the new image");
        delta_plan_free(p);

        /* A read error while scanning: the region's chunks are fetched. */
        memset(target.b.data, 0, target.b.len);
        active.b.data[changed.source_offset + changed.image_size / 2] ^= 0x40;
        active.fail_from = 4 * MIB + 1;
        active.fail_to = 4 * MIB + 2;
        p = plan_for(&bundle, &target);
        s = delta_plan_stats(p);
        tap_is_int(delta_scan(p, &so), 0, "scan goes on past an unreadable block");
        tap_ok(s->read_errors == 1 && s->fetch_chunks > before && s->active_read_bytes == old_image.len - DELTA_BLOCK_SIZE,
               "one block skipped, its chunks fetched (%u instead of %u)", s->fetch_chunks, before);
        active.fail_error = 0;
        delta_copy(p, &co);
        tap_ok(fetch_rest(&bundle, p) > 0 && same(&target.b, &new_image), "the slot holds the new image");
        delta_plan_free(p);
        free(active.b.data);
        free(target.b.data);
}

static void test_no_active(void) {
        struct slot active = { .b = copy_of(&old_image), .fail_from = 0, .fail_to = 1, .fail_error = -EACCES };
        struct slot target = { .b = { calloc(1, new_image.len), new_image.len } };
        struct delta_plan *p = plan_for(&bundle, &target);
        const struct delta_stats *s = delta_plan_stats(p);
        struct delta_scan_options so = { .active = source(&active) };
        struct delta_chunk c;

        tap_is_int(delta_scan(p, &so), 0, "an unreadable active slot is not an error");
        tap_ok(s->fetch_chunks == s->chunks && strstr(s->fallback, "not readable: Permission denied"),
               "everything fetched: %s", s->fallback);
        delta_plan_chunk(p, 0, &c);
        tap_ok(c.reason == DELTA_REASON_FALLBACK, "chunk reason: fallback");
        delta_plan_free(p);

        p = plan_for(&bundle, &target);
        s = delta_plan_stats(p);
        so.active = (struct delta_source) { 0 };
        tap_is_int(delta_scan(p, &so), 0, "no active slot at all");
        tap_ok(s->fetch_chunks == s->chunks && strcmp(s->fallback, "no readable active slot") == 0, "%s", s->fallback);
        tap_ok(fetch_rest(&bundle, p) == (int64_t) s->payload_bytes && same(&target.b, &new_image),
               "full download through the fetch ranges");
        delta_plan_free(p);
        free(active.b.data);
        free(target.b.data);
}

/* An install interrupted after 40 % of the image: the target holds that
 * much of the new image, then whatever it held before. */
static void test_resume(void) {
        struct slot active = { .b = copy_of(&old_image) };
        struct slot target = { .b = copy_of(&old_image) };
        struct delta_plan *p;
        const struct delta_stats *s;
        struct delta_scan_options so = { .target = source(&target) };
        struct delta_copy_options co = { .active = source(&active), .write = slot_write, .write_userdata = &target };
        size_t written = new_image.len * 2 / 5;
        uint32_t expected = 0;
        struct delta_chunk c;

        free(target.b.data);
        target.b = (struct buf) { malloc(new_image.len), new_image.len };
        memcpy(target.b.data, new_image.data, written);
        noise(target.b.data + written, new_image.len - written, 3);
        so.target = source(&target);

        p = plan_for(&bundle, &target);
        s = delta_plan_stats(p);
        for (uint32_t i = 0; i < delta_plan_chunk_count(p); i++)
                if (delta_plan_chunk(p, i, &c) == 0 && c.image_offset + c.image_size <= written)
                        expected++;
        tap_is_int(delta_scan(p, &so), 0, "resume without an active slot");
        tap_ok(s->in_place_chunks == expected && expected > 0, "the %u chunks written before are in place",
               s->in_place_chunks);
        tap_ok(s->in_place_chunks + s->fetch_chunks == s->chunks && strcmp(s->fallback, "no readable active slot") == 0,
               "the rest is fetched (%s)", s->fallback);
        tap_ok(fetch_rest(&bundle, p) > 0 && same(&target.b, &new_image), "the slot holds the new image");
        delta_plan_free(p);

        /* The same with the active slot: in place first, the rest copied. */
        memcpy(target.b.data, new_image.data, written);
        noise(target.b.data + written, new_image.len - written, 3);
        p = plan_for(&bundle, &target);
        s = delta_plan_stats(p);
        so.active = source(&active);
        tap_is_int(delta_scan(p, &so), 0, "resume with the active slot");
        print_stats(p);
        tap_ok(s->in_place_chunks == expected && s->active_chunks > 0 && s->fetch_chunks <= 12,
               "%u in place, %u from the active slot, %u to fetch", s->in_place_chunks, s->active_chunks,
               s->fetch_chunks);
        tap_ok(s->target_read_bytes > 0 && s->target_read_bytes <= new_image.len, "the target read once");
        tap_is_int(delta_copy(p, &co), 0, "copy");
        tap_ok(s->copied_bytes == s->active_bytes, "only what was not in place is written");
        tap_ok(fetch_rest(&bundle, p) >= 0 && same(&target.b, &new_image), "the slot holds the new image");
        delta_plan_free(p);

        /* Interrupted after the last write: everything is in place, and
         * that is no fallback, active slot or not. */
        p = plan_for(&bundle, &target);
        s = delta_plan_stats(p);
        so.active = (struct delta_source) { 0 };
        tap_is_int(delta_scan(p, &so), 0, "resume of a complete slot");
        tap_ok(s->in_place_chunks == s->chunks && s->fetch_chunks == 0 && s->fallback[0] == '\0',
               "all %u chunks in place, nothing to fetch, no fallback (\"%s\")", s->in_place_chunks, s->fallback);
        delta_plan_free(p);
        free(active.b.data);
        free(target.b.data);
}

struct countdown {
        int calls;
};

static bool cancel_after(void *userdata) {
        struct countdown *c = userdata;
        return --c->calls < 0;
}

static void test_cancel(void) {
        struct slot active = { .b = copy_of(&old_image) };
        struct slot target = { .b = { calloc(1, new_image.len), new_image.len } };
        struct delta_plan *p = plan_for(&bundle, &target);
        const struct delta_stats *s = delta_plan_stats(p);
        struct countdown cd = { .calls = 1 };
        struct delta_scan_options so = { .active = source(&active), .cancelled = cancel_after, .cancel_userdata = &cd };
        struct delta_copy_options co = { .active = source(&active), .write = slot_write, .write_userdata = &target,
                                         .cancelled = cancel_after, .cancel_userdata = &cd };
        uint32_t copied;

        tap_is_int(delta_scan(p, &so), -ECANCELED, "scan cancelled between reads");
        tap_ok(active.reads == 1 && s->active_read_bytes == DELTA_BLOCK_SIZE, "after one block (%u reads)",
               active.reads);
        delta_plan_free(p);

        p = plan_for(&bundle, &target);
        s = delta_plan_stats(p);
        cd.calls = 1000;
        delta_scan(p, &so);
        cd.calls = 10;
        tap_is_int(delta_copy(p, &co), -ECANCELED, "copy cancelled between chunks");
        copied = count(p, DELTA_COPIED);
        tap_ok(copied == 10 && count(p, DELTA_COPY) == s->active_chunks - 10, "10 chunks copied, the rest still to copy");
        cd.calls = 1000;
        tap_is_int(delta_copy(p, &co), 0, "copy again goes on");
        tap_ok(count(p, DELTA_COPIED) == s->active_chunks, "all copied");
        tap_ok(fetch_rest(&bundle, p) > 0 && same(&target.b, &new_image), "the slot holds the new image");
        delta_plan_free(p);
        free(active.b.data);
        free(target.b.data);
}

/* 64 bytes after which the gear64 hash has its top mask_bits zero: a
 * boundary wherever they end, min_size permitting (the top bits depend on
 * the last 64 bytes only). The end of the first chunk of noise that is cut
 * before max_size. */
static void boundary_trigger(uint8_t w[64]) {
        struct bundle_chunking params = { (char *) "gear64", BUNDLE_CHUNK_MIN_DEFAULT, BUNDLE_CHUNK_MASK_BITS_DEFAULT,
                                          BUNDLE_CHUNK_MAX_DEFAULT };
        struct buf r = { malloc(8 * MIB), 8 * MIB };
        struct bundle_chunker c;
        size_t pos = 0;

        noise(r.data, r.len, 99);
        bundle_chunker_init(&c, &params);
        while (pos < r.len) {
                size_t len = bundle_chunker_scan(&c, r.data + pos, r.len - pos);

                pos += len;
                if (c.len == 0 && len < BUNDLE_CHUNK_MAX_DEFAULT) {
                        memcpy(w, r.data + pos - 64, 64);
                        break;
                }
        }
        free(r.data);
}

/* Look-up 3: the active slot holds a chunk at its own offset, but its
 * content-defined cut does not reproduce the chunk (an extra boundary
 * shortly before it, from a change, swallows the bundle's boundary). */
static void test_offset_lookup(void) {
        struct slot active = { .b = copy_of(&new_image) };
        struct slot target = { .b = { calloc(1, new_image.len), new_image.len } };
        struct delta_plan *p = plan_for(&bundle, &target);
        const struct delta_stats *s;
        struct delta_scan_options so = { .active = source(&active) };
        struct delta_copy_options co = { .active = source(&active), .write = slot_write, .write_userdata = &target };
        struct delta_chunk c, next;
        uint8_t w[64];
        bool placed = false;

        boundary_trigger(w);
        /* A chunk k with min+164 <= len < 2*min - 200, whose successor is
         * then not cut in the active slot: the trigger ends 100 bytes after
         * k's min_size. */
        for (uint32_t i = 0; i + 2 < delta_plan_chunk_count(p) && !placed; i++) {
                delta_plan_chunk(p, i, &c);
                delta_plan_chunk(p, i + 1, &next);
                if (c.image_size < BUNDLE_CHUNK_MIN_DEFAULT + 164 || c.image_size >= 2 * BUNDLE_CHUNK_MIN_DEFAULT - 200 ||
                    next.image_size < BUNDLE_CHUNK_MIN_DEFAULT)
                        continue;
                memcpy(active.b.data + c.image_offset + BUNDLE_CHUNK_MIN_DEFAULT + 100 - 64, w, 64);
                placed = true;
        }
        if (!tap_ok(placed, "a chunk to disturb"))
                return;
        delta_scan(p, &so);
        s = delta_plan_stats(p);
        {
                struct delta_chunk after;
                delta_plan_chunk(p, next.index, &after);
                tap_ok(after.action == DELTA_FETCH, "without look-up 3 the chunk after the disturbed one is missed");
        }
        delta_plan_free(p);

        p = plan_for(&bundle, &target);
        s = delta_plan_stats(p);
        so.offset_lookup = true;
        delta_scan(p, &so);
        print_stats(p);
        {
                struct delta_chunk after;
                delta_plan_chunk(p, next.index, &after);
                tap_ok(after.action == DELTA_COPY && after.source_offset == after.image_offset &&
                               s->active_offset_lookup_chunks >= 1,
                       "look-up 3 finds it at its own offset (%u by offset)", s->active_offset_lookup_chunks);
        }
        tap_ok(s->fetch_chunks == 1, "only the disturbed chunk is fetched (%u)", s->fetch_chunks);
        delta_copy(p, &co);
        tap_ok(fetch_rest(&bundle, p) > 0 && same(&target.b, &new_image), "the slot holds the new image");
        delta_plan_free(p);
        free(active.b.data);
        free(target.b.data);
}

/* What `otad bundle create --previous` does: an older bundle's checksums
 * matched against the new plan, no image needed. */
static void test_match(void) {
        struct slot target = { .b = { calloc(1, new_image.len), new_image.len } };
        struct slot active = { .b = copy_of(&old_image) };
        struct bundle old;
        struct delta_plan *p, *scanned;
        struct delta_scan_options so = { .active = source(&active) };
        struct payload_chunk pc;

        if (!tap_ok(bundle_of("old.img", "out-old", &old) == 0, "bundle of the old image"))
                return;
        p = plan_for(&bundle, &target);
        scanned = NULL;
        if (payload_decoder_new(old.m, slot_write, &target, &old.d) < 0 ||
            payload_decoder_feed(old.d, old.payload.data, old.m->header_size) < 0)
                abort();
        for (uint32_t i = 0; i < payload_decoder_chunk_count(old.d); i++) {
                payload_decoder_chunk(old.d, i, &pc);
                delta_plan_match(p, pc.sha256_uncompressed, pc.image_size, pc.image_offset);
        }
        {
                struct bundle b2 = bundle;
                b2.d = NULL;
                scanned = plan_for(&b2, &target);
                delta_scan(scanned, &so);
                payload_decoder_free(b2.d);
        }
        tap_ok(delta_plan_stats(p)->fetch_chunks == delta_plan_stats(scanned)->fetch_chunks &&
                       delta_plan_stats(p)->fetch_payload_bytes == delta_plan_stats(scanned)->fetch_payload_bytes,
               "the old bundle's index predicts the scan of the old image: %u chunks to fetch",
               delta_plan_stats(p)->fetch_chunks);
        delta_plan_free(p);
        delta_plan_free(scanned);
        payload_decoder_free(old.d);
        bundle_manifest_free(old.m);
        free(old.payload.data);
        free(active.b.data);
        free(target.b.data);
}

int main(void) {
        if (!mkdtemp(dir))
                return 1;
        make_images();
        spit("old.img", &old_image);
        spit("new.img", &new_image);
        if (sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout signer.key "
               "-out signer.crt -days 30 -subj /CN=signer") != 0 ||
            bundle_of("new.img", "out-new", &bundle) != 0) {
                tap_skip("otad bundle create failed or OTAD_BIN unset", "delta");
                sh("rm -rf '%s'", dir);
                return tap_done();
        }
        test_reuse();
        test_copy_fallbacks();
        test_no_active();
        test_resume();
        test_cancel();
        test_offset_lookup();
        test_match();
        payload_decoder_free(bundle.d);
        bundle_manifest_free(bundle.m);
        free(bundle.payload.data);
        free(old_image.data);
        free(new_image.data);
        sh("rm -rf '%s'", dir);
        return tap_done();
}
