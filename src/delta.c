/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "bundle_chunker.h"
#include "bundle_manifest.h"
#include "clock.h"
#include "delta.h"
#include "macro.h"
#include "payload_decoder.h"

#define DIGEST 32
#define NONE UINT32_MAX

struct entry {
        uint8_t md[DIGEST];       /* of the uncompressed bytes */
        uint64_t image_offset;
        uint64_t payload_offset;
        uint64_t source_offset;
        uint32_t image_size;
        uint32_t payload_size;
        uint32_t next_same;       /* the next chunk with the same checksum, NONE */
        uint8_t action;           /* enum delta_action */
        uint8_t reason;           /* enum delta_reason */
        bool offset_lookup;       /* found by look-up 3 */
};

struct delta_plan {
        struct entry *entries;
        uint32_t n;
        /* Open addressing over the checksums: the first chunk with a given
         * checksum, chained through next_same (a zero-filled region is many
         * chunks with one checksum). */
        uint32_t *table;
        uint32_t table_mask;
        uint32_t chunk_size_max;
        struct bundle_chunking chunking;
        bool chunking_ok;
        struct delta_stats stats;
};

static inline void EVP_MD_CTXp(EVP_MD_CTX **p) { EVP_MD_CTX_free(*p); }
static inline void EVP_MDp(EVP_MD **p) { EVP_MD_free(*p); }

/* Nothing more will be found: what is still to fetch is fetched for this
 * reason. */
__attribute__((format(printf, 2, 3)))
static void set_fallback(struct delta_plan *p, const char *format, ...) {
        va_list ap;

        if (p->stats.fallback[0])
                return; /* the first reason is the one that counts */
        va_start(ap, format);
        vsnprintf(p->stats.fallback, sizeof(p->stats.fallback), format, ap);
        va_end(ap);
        for (uint32_t i = 0; i < p->n; i++)
                if (p->entries[i].reason == DELTA_REASON_NOT_FOUND)
                        p->entries[i].reason = DELTA_REASON_FALLBACK;
}

static uint64_t key_of(const uint8_t md[static DIGEST]) {
        uint64_t k;

        /* SHA-256 output is uniform: any 8 of its bytes are a hash. */
        memcpy(&k, md, sizeof(k));
        return k;
}

static bool all_zero(const uint8_t *p, size_t n) {
        for (size_t i = 0; i < n; i++)
                if (p[i])
                        return false;
        return true;
}

static void recount(struct delta_plan *p) {
        struct delta_stats *s = &p->stats;

        s->in_place_chunks = s->active_chunks = s->active_same_offset_chunks = s->fetch_chunks = 0;
        s->active_offset_lookup_chunks = 0;
        s->in_place_bytes = s->active_bytes = s->fetch_image_bytes = s->fetch_payload_bytes = 0;
        for (uint32_t i = 0; i < p->n; i++) {
                const struct entry *e = &p->entries[i];

                switch (e->action) {
                case DELTA_IN_PLACE:
                        s->in_place_chunks++;
                        s->in_place_bytes += e->image_size;
                        break;
                case DELTA_COPY:
                case DELTA_COPIED:
                        s->active_chunks++;
                        s->active_bytes += e->image_size;
                        if (e->source_offset == e->image_offset)
                                s->active_same_offset_chunks++;
                        if (e->offset_lookup)
                                s->active_offset_lookup_chunks++;
                        break;
                default:
                        s->fetch_chunks++;
                        s->fetch_image_bytes += e->image_size;
                        s->fetch_payload_bytes += e->payload_size;
                }
        }
}

int delta_plan_new(const struct bundle_manifest *m, const struct payload_decoder *d, struct delta_plan **ret) {
        struct bundle_chunker probe;
        struct delta_plan *p;
        uint32_t n = payload_decoder_chunk_count(d), with_checksum = 0, size;

        if (!payload_decoder_header_done(d))
                return -EAGAIN;
        p = calloc(1, sizeof(*p));
        if (!p)
                return -ENOMEM;
        p->n = n;
        p->chunk_size_max = m->chunk_size_max;
        p->chunking = m->chunking;
        p->chunking.algorithm = NULL; /* not ours; checked below */
        /* The table at most half full; n is bounded by the header size. */
        for (size = 16; size < 2 * (uint64_t) n; size <<= 1)
                ;
        p->entries = calloc(n ? n : 1, sizeof(*p->entries));
        p->table = malloc(size * sizeof(*p->table));
        if (!p->entries || !p->table) {
                delta_plan_free(p);
                return -ENOMEM;
        }
        p->table_mask = size - 1;
        memset(p->table, 0xff, size * sizeof(*p->table));
        p->stats.chunks = n;
        p->stats.image_bytes = m->image_size;

        for (uint32_t i = 0; i < n; i++) {
                struct entry *e = &p->entries[i];
                struct payload_chunk c;
                uint32_t slot;

                if (payload_decoder_chunk(d, i, &c) < 0) {
                        delta_plan_free(p);
                        return -EINVAL;
                }
                memcpy(e->md, c.sha256_uncompressed, DIGEST);
                e->image_offset = c.image_offset;
                e->image_size = c.image_size;
                e->payload_offset = c.payload_offset;
                e->payload_size = c.payload_size;
                e->next_same = NONE;
                e->action = DELTA_FETCH;
                p->stats.payload_bytes += c.payload_size;
                /* zchunk leaves a checksum it was not given all zero. */
                if (all_zero(e->md, DIGEST)) {
                        e->reason = DELTA_REASON_NO_CHECKSUM;
                        continue;
                }
                e->reason = DELTA_REASON_NOT_FOUND;
                with_checksum++;
                for (slot = (uint32_t) key_of(e->md) & p->table_mask; p->table[slot] != NONE;
                     slot = (slot + 1) & p->table_mask) {
                        struct entry *first = &p->entries[p->table[slot]];

                        if (memcmp(first->md, e->md, DIGEST) == 0)
                                break;
                }
                if (p->table[slot] == NONE)
                        p->table[slot] = i;
                else {
                        /* Appended, so that chains stay in image order. */
                        struct entry *last = &p->entries[p->table[slot]];

                        while (last->next_same != NONE)
                                last = &p->entries[last->next_same];
                        last->next_same = i;
                }
        }

        if (n > 0 && with_checksum == 0)
                set_fallback(p, "the payload has no uncompressed checksums: full download");
        else if (!m->chunking.algorithm || strcmp(m->chunking.algorithm, BUNDLE_CHUNKING_NAME) != 0)
                set_fallback(p, "chunking \"%s\" is not one this otad reproduces: full download",
                             m->chunking.algorithm ? m->chunking.algorithm : "");
        else if (bundle_chunker_init(&probe, &m->chunking) < 0)
                set_fallback(p, "chunking parameters out of range: full download");
        else
                p->chunking_ok = true;
        recount(p);
        *ret = p;
        return 0;
}

void delta_plan_free(struct delta_plan *p) {
        if (!p)
                return;
        free(p->entries);
        free(p->table);
        free(p);
}

static uint32_t lookup(const struct delta_plan *p, const uint8_t md[static DIGEST]) {
        for (uint32_t slot = (uint32_t) key_of(md) & p->table_mask; p->table[slot] != NONE;
             slot = (slot + 1) & p->table_mask)
                if (memcmp(p->entries[p->table[slot]].md, md, DIGEST) == 0)
                        return p->table[slot];
        return NONE;
}

uint32_t delta_plan_match(struct delta_plan *p, const uint8_t md[static DIGEST], uint32_t len,
                          uint64_t source_offset) {
        uint32_t resolved = 0;

        for (uint32_t i = lookup(p, md); i != NONE; i = p->entries[i].next_same) {
                struct entry *e = &p->entries[i];

                /* Same checksum, same length: a different length would be a
                 * SHA-256 collision, but costs nothing to rule out. */
                if (e->action != DELTA_FETCH || e->image_size != len)
                        continue;
                e->action = DELTA_COPY;
                e->reason = DELTA_REASON_NONE;
                e->source_offset = source_offset;
                resolved++;
                /* Kept current here: the tool calls this once per chunk. */
                p->stats.fetch_chunks--;
                p->stats.fetch_image_bytes -= e->image_size;
                p->stats.fetch_payload_bytes -= e->payload_size;
                p->stats.active_chunks++;
                p->stats.active_bytes += e->image_size;
                if (source_offset == e->image_offset)
                        p->stats.active_same_offset_chunks++;
        }
        return resolved;
}

static bool cancelled(delta_cancelled_fn fn, void *userdata) {
        return fn && fn(userdata);
}

/* Does the source hold entry e at offset? Hashes it in place. */
static int chunk_matches(const struct delta_source *src, EVP_MD_CTX *ctx, const EVP_MD *sha256, uint8_t *buf,
                         const struct entry *e, uint64_t offset, bool *ret) {
        uint8_t md[DIGEST];
        int r;

        r = src->read(offset, buf, e->image_size, src->userdata);
        if (r < 0)
                return r;
        if (EVP_DigestInit_ex(ctx, sha256, NULL) != 1 || EVP_DigestUpdate(ctx, buf, e->image_size) != 1 ||
            EVP_DigestFinal_ex(ctx, md, NULL) != 1)
                return -ENOMEM;
        *ret = memcmp(md, e->md, DIGEST) == 0;
        return 0;
}

/* Look-up 1: each chunk still to fetch, at its own offset in the target.
 * Reads in blocks of whole chunks, so that the storage sees large
 * sequential reads rather than one per chunk. */
static int scan_target(struct delta_plan *p, const struct delta_scan_options *o, EVP_MD_CTX *ctx,
                       const EVP_MD *sha256, uint8_t *buf) {
        const struct delta_source *t = &o->target;
        uint64_t start = clock_now_usec();
        uint32_t i = 0;
        int r = 0;

        while (i < p->n) {
                uint64_t from, len = 0;
                uint32_t j;

                if (cancelled(o->cancelled, o->cancel_userdata)) {
                        r = -ECANCELED;
                        break;
                }
                /* The run of chunks from i that fits one block and the target. */
                from = p->entries[i].image_offset;
                for (j = i; j < p->n && len + p->entries[j].image_size <= DELTA_BLOCK_SIZE &&
                            from + len + p->entries[j].image_size <= t->size;
                     j++)
                        len += p->entries[j].image_size;
                if (j == i)
                        break; /* the target ends here */
                if (t->read(from, buf, len, t->userdata) < 0) {
                        p->stats.read_errors++;
                        i = j;
                        continue;
                }
                p->stats.target_read_bytes += len;
                for (; i < j; i++) {
                        struct entry *e = &p->entries[i];
                        uint8_t md[DIGEST];

                        if (e->action != DELTA_FETCH || e->reason == DELTA_REASON_NO_CHECKSUM)
                                continue;
                        if (EVP_DigestInit_ex(ctx, sha256, NULL) != 1 ||
                            EVP_DigestUpdate(ctx, buf + (e->image_offset - from), e->image_size) != 1 ||
                            EVP_DigestFinal_ex(ctx, md, NULL) != 1) {
                                r = -ENOMEM;
                                goto done;
                        }
                        if (memcmp(md, e->md, DIGEST) == 0) {
                                e->action = DELTA_IN_PLACE;
                                e->reason = DELTA_REASON_NONE;
                        }
                }
        }
done:
        p->stats.target_usec += clock_now_usec() - start;
        return r;
}

/* Look-up 2: the active slot cut as the bundle's image was cut. */
static int scan_active(struct delta_plan *p, const struct delta_scan_options *o, EVP_MD_CTX *ctx,
                       const EVP_MD *sha256, uint8_t *buf) {
        const struct delta_source *a = &o->active;
        struct bundle_chunker chunker;
        uint64_t chunk_start = 0;
        uint8_t md[DIGEST];
        int r;

        r = bundle_chunker_init(&chunker, &p->chunking);
        if (r < 0)
                return r;
        if (EVP_DigestInit_ex(ctx, sha256, NULL) != 1)
                return -ENOMEM;
        for (uint64_t off = 0; off < a->size;) {
                size_t n = a->size - off < DELTA_BLOCK_SIZE ? (size_t) (a->size - off) : DELTA_BLOCK_SIZE;
                size_t pos = 0;

                if (cancelled(o->cancelled, o->cancel_userdata))
                        return -ECANCELED;
                r = a->read(off, buf, n, a->userdata);
                if (r < 0) {
                        if (off == 0) {
                                errno = -r;
                                set_fallback(p, "the active slot is not readable: %m");
                                return 0;
                        }
                        /* A bad region: its chunks are fetched; the cut
                         * starts again after it and realigns within a chunk
                         * or two (content-defined). */
                        p->stats.read_errors++;
                        off += n;
                        chunk_start = off;
                        r = bundle_chunker_init(&chunker, &p->chunking);
                        if (r < 0 || EVP_DigestInit_ex(ctx, sha256, NULL) != 1)
                                return r < 0 ? r : -ENOMEM;
                        continue;
                }
                p->stats.active_read_bytes += n;
                while (pos < n) {
                        size_t len = bundle_chunker_scan(&chunker, buf + pos, n - pos);

                        if (EVP_DigestUpdate(ctx, buf + pos, len) != 1)
                                return -ENOMEM;
                        pos += len;
                        if (chunker.len > 0)
                                continue; /* the chunk goes on in the next block */
                        if (EVP_DigestFinal_ex(ctx, md, NULL) != 1 || EVP_DigestInit_ex(ctx, sha256, NULL) != 1)
                                return -ENOMEM;
                        (void) delta_plan_match(p, md, (uint32_t) (off + pos - chunk_start), chunk_start);
                        chunk_start = off + pos;
                }
                off += n;
        }
        if (chunk_start < a->size) {
                if (EVP_DigestFinal_ex(ctx, md, NULL) != 1)
                        return -ENOMEM;
                (void) delta_plan_match(p, md, (uint32_t) (a->size - chunk_start), chunk_start);
        }
        return 0;
}

/* Look-up 3: what is still missing, at its own offset in the active slot. */
static int scan_active_offsets(struct delta_plan *p, const struct delta_scan_options *o, EVP_MD_CTX *ctx,
                               const EVP_MD *sha256, uint8_t *buf) {
        const struct delta_source *a = &o->active;

        for (uint32_t i = 0; i < p->n; i++) {
                struct entry *e = &p->entries[i];
                bool match = false;

                if (e->action != DELTA_FETCH || e->reason == DELTA_REASON_NO_CHECKSUM ||
                    e->image_offset + e->image_size > a->size)
                        continue;
                if (cancelled(o->cancelled, o->cancel_userdata))
                        return -ECANCELED;
                if (chunk_matches(a, ctx, sha256, buf, e, e->image_offset, &match) < 0) {
                        p->stats.read_errors++;
                        continue;
                }
                p->stats.active_read_bytes += e->image_size;
                if (match) {
                        /* Its twins (same checksum) are resolved with it. */
                        (void) delta_plan_match(p, e->md, e->image_size, e->image_offset);
                        e->offset_lookup = true;
                }
        }
        return 0;
}

static bool anything_to_find(const struct delta_plan *p) {
        for (uint32_t i = 0; i < p->n; i++)
                if (p->entries[i].action == DELTA_FETCH && p->entries[i].reason != DELTA_REASON_NO_CHECKSUM)
                        return true;
        return false;
}

int delta_scan(struct delta_plan *p, const struct delta_scan_options *o) {
        _cleanup_(EVP_MD_CTXp) EVP_MD_CTX *ctx = NULL;
        _cleanup_(EVP_MDp) EVP_MD *sha256 = NULL;
        _cleanup_free_ uint8_t *buf = NULL;
        uint64_t start;
        int r = 0;

        if (!p->chunking_ok || p->stats.fallback[0])
                return 0;
        /* Fetched once: implicit fetches by name cost a lock per call. */
        sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
        ctx = EVP_MD_CTX_new();
        buf = malloc(DELTA_BLOCK_SIZE);
        if (!sha256 || !ctx || !buf)
                return -ENOMEM;

        if (o->target.read && anything_to_find(p)) {
                r = scan_target(p, o, ctx, sha256, buf);
                if (r < 0)
                        goto finish;
        }
        if (!anything_to_find(p))
                goto finish; /* a resume that had it all */
        if (!o->active.read || o->active.size == 0) {
                set_fallback(p, "no readable active slot");
                goto finish;
        }
        start = clock_now_usec();
        r = scan_active(p, o, ctx, sha256, buf);
        if (r >= 0 && o->offset_lookup && !p->stats.fallback[0] && anything_to_find(p))
                r = scan_active_offsets(p, o, ctx, sha256, buf);
        p->stats.active_usec += clock_now_usec() - start;
finish:
        recount(p);
        return r;
}

int delta_copy(struct delta_plan *p, const struct delta_copy_options *o) {
        _cleanup_(EVP_MD_CTXp) EVP_MD_CTX *ctx = NULL;
        _cleanup_(EVP_MDp) EVP_MD *sha256 = NULL;
        _cleanup_free_ uint8_t *buf = NULL;
        uint64_t start = clock_now_usec();
        const struct entry *held = NULL;
        int r = 0;

        sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
        ctx = EVP_MD_CTX_new();
        buf = malloc(p->chunk_size_max ? p->chunk_size_max : 1);
        if (!sha256 || !ctx || !buf)
                return -ENOMEM;

        for (uint32_t i = 0; i < p->n; i++) {
                struct entry *e = &p->entries[i];
                bool match = false;

                if (e->action != DELTA_COPY)
                        continue;
                if (cancelled(o->cancelled, o->cancel_userdata)) {
                        r = -ECANCELED;
                        break;
                }
                /* A run of identical chunks (zeros) is read and hashed once:
                 * buf still holds those verified bytes. */
                if (!held || held->source_offset != e->source_offset || held->image_size != e->image_size ||
                    memcmp(held->md, e->md, DIGEST) != 0) {
                        held = NULL;
                        if (!o->active.read || e->source_offset + e->image_size > o->active.size) {
                                r = -EIO;
                        } else
                                r = chunk_matches(&o->active, ctx, sha256, buf, e, e->source_offset, &match);
                        if (r == -ENOMEM)
                                break;
                        if (r < 0) {
                                e->action = DELTA_FETCH;
                                e->reason = DELTA_REASON_COPY_READ_ERROR;
                                p->stats.copy_read_errors++;
                                r = 0;
                                continue;
                        }
                        if (!match) {
                                e->action = DELTA_FETCH;
                                e->reason = DELTA_REASON_COPY_MISMATCH;
                                p->stats.copy_mismatches++;
                                continue;
                        }
                        held = e;
                }
                r = o->write(e->image_offset, buf, e->image_size, o->write_userdata);
                if (r < 0)
                        break;
                e->action = DELTA_COPIED;
                p->stats.copied_bytes += e->image_size;
        }
        p->stats.copy_usec += clock_now_usec() - start;
        recount(p);
        return r;
}

int delta_plan_set_in_place(struct delta_plan *p, uint32_t index) {
        struct entry *e;

        if (!p || index >= p->n)
                return -ERANGE;
        e = &p->entries[index];
        if (e->action == DELTA_IN_PLACE)
                return 0;
        /* What recount() would do for this one entry: marking a whole
         * record's worth of chunks stays linear. */
        if (e->action == DELTA_COPY || e->action == DELTA_COPIED) {
                p->stats.active_chunks--;
                p->stats.active_bytes -= e->image_size;
                if (e->source_offset == e->image_offset)
                        p->stats.active_same_offset_chunks--;
                if (e->offset_lookup)
                        p->stats.active_offset_lookup_chunks--;
        } else {
                p->stats.fetch_chunks--;
                p->stats.fetch_image_bytes -= e->image_size;
                p->stats.fetch_payload_bytes -= e->payload_size;
        }
        p->stats.in_place_chunks++;
        p->stats.in_place_bytes += e->image_size;
        e->action = DELTA_IN_PLACE;
        e->reason = DELTA_REASON_NONE;
        e->offset_lookup = false;
        return 0;
}

uint32_t delta_plan_chunk_count(const struct delta_plan *p) {
        return p->n;
}

int delta_plan_chunk(const struct delta_plan *p, uint32_t index, struct delta_chunk *ret) {
        const struct entry *e;

        if (index >= p->n)
                return -ERANGE;
        e = &p->entries[index];
        *ret = (struct delta_chunk) {
                .index = index,
                .action = e->action,
                .reason = e->reason,
                .source_offset = e->source_offset,
                .image_offset = e->image_offset,
                .image_size = e->image_size,
                .payload_offset = e->payload_offset,
                .payload_size = e->payload_size,
        };
        return 0;
}

int delta_plan_chunk_at_payload(const struct delta_plan *p, uint64_t payload_offset, uint32_t *ret_index) {
        uint32_t lo = 0, hi = p->n;

        /* Chunks are consecutive in the payload. */
        while (lo < hi) {
                uint32_t mid = lo + (hi - lo) / 2;

                if (p->entries[mid].payload_offset < payload_offset)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        if (lo == p->n || p->entries[lo].payload_offset != payload_offset)
                return -ENOENT;
        *ret_index = lo;
        return 0;
}

const struct delta_stats *delta_plan_stats(const struct delta_plan *p) {
        return &p->stats;
}

int delta_plan_fetch_ranges(const struct delta_plan *p, uint64_t from, uint64_t size, struct delta_range **ret,
                            size_t *ret_n) {
        struct delta_range *r = NULL;
        size_t n = 0, cap = 0;
        uint64_t to = from + size;

        for (uint32_t i = 0; i < p->n; i++) {
                const struct entry *e = &p->entries[i];
                uint64_t a = e->payload_offset, b = e->payload_offset + e->payload_size;

                if (e->action != DELTA_FETCH || b <= from || a >= to)
                        continue;
                /* A chunk may straddle two parts: each gets its slice. */
                a = a < from ? 0 : a - from;
                b = (b > to ? to : b) - from;
                if (n > 0 && r[n - 1].offset + r[n - 1].length == a) {
                        r[n - 1].length += b - a;
                        continue;
                }
                if (n == cap) {
                        struct delta_range *grown;

                        cap = cap ? 2 * cap : 16;
                        grown = realloc(r, cap * sizeof(*r));
                        if (!grown) {
                                free(r);
                                return -ENOMEM;
                        }
                        r = grown;
                }
                r[n++] = (struct delta_range) { a, b - a };
        }
        *ret = r;
        *ret_n = n;
        return 0;
}

void delta_stats_format(const struct delta_stats *s, char *buf, size_t size) {
        uint64_t usec = s->target_usec + s->active_usec, bytes = s->target_read_bytes + s->active_read_bytes;
        uint32_t errors = s->read_errors + s->copy_read_errors + s->copy_mismatches;
        size_t len;

        snprintf(buf, size,
                 "%u of %u chunks reused (%u in place, %.1f MB; %u from the active slot, %.1f MB), "
                 "%u to fetch (%.1f MB of the %.1f MB payload); read %.1f MB in %.1f s (%.0f MB/s)",
                 s->in_place_chunks + s->active_chunks, s->chunks, s->in_place_chunks, (double) s->in_place_bytes / 1e6,
                 s->active_chunks, (double) s->active_bytes / 1e6, s->fetch_chunks,
                 (double) s->fetch_payload_bytes / 1e6, (double) s->payload_bytes / 1e6, (double) bytes / 1e6,
                 (double) usec / 1e6, usec ? (double) bytes / (double) usec : 0.0);
        len = strlen(buf);
        if (errors && len < size)
                len += (size_t) snprintf(buf + len, size - len,
                                         "; %u read errors, %u changed chunks: fetched instead",
                                         s->read_errors + s->copy_read_errors, s->copy_mismatches);
        if (s->fallback[0] && len < size)
                snprintf(buf + len, size - len, "; %s", s->fallback);
}
