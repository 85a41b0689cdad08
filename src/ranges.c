/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdbool.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ranges.h"

static uint64_t range_end(const struct download_range *r) {
        return r->offset + r->length;
}

int ranges_normalize(const struct download_range *in, size_t n, uint64_t file_size, struct download_range **ret,
                     size_t *ret_n) {
        struct download_range *out;
        size_t k = 0;

        if (n > 0 && !in)
                return -EINVAL;
        for (size_t i = 0; i < n; i++) {
                if (in[i].length == 0 || in[i].offset >= file_size || in[i].length > file_size - in[i].offset)
                        return -EINVAL;
                if (i > 0 && in[i].offset < range_end(&in[i - 1]))
                        return -EINVAL; /* unsorted or overlapping */
        }
        out = calloc(n > 0 ? n : 1, sizeof *out);
        if (!out)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                if (k > 0 && range_end(&out[k - 1]) == in[i].offset)
                        out[k - 1].length += in[i].length;
                else
                        out[k++] = in[i];
        }
        *ret = out;
        *ret_n = k;
        return 0;
}

uint64_t ranges_total(const struct download_range *r, size_t n) {
        uint64_t total = 0;

        for (size_t i = 0; i < n; i++)
                total += r[i].length;
        return total;
}

static bool hash_range(EVP_MD_CTX *ctx, const struct download_range *r) {
        uint8_t le[16];

        for (unsigned b = 0; b < 8; b++) {
                le[b] = (uint8_t) (r->offset >> (8 * b));
                le[8 + b] = (uint8_t) (r->length >> (8 * b));
        }
        return EVP_DigestUpdate(ctx, le, sizeof le) == 1;
}

int ranges_hash(const struct download_range *r, size_t n, uint8_t ret[RANGES_HASH_SIZE]) {
        EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        struct download_range cur = {};
        unsigned len = 0;
        bool ok;

        ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1;
        /* Touching ranges merged on the way: the canonical set's hash for
         * any valid input. */
        for (size_t i = 0; ok && i < n; i++) {
                if (cur.length > 0 && range_end(&cur) == r[i].offset) {
                        cur.length += r[i].length;
                        continue;
                }
                if (cur.length > 0)
                        ok = hash_range(ctx, &cur);
                cur = r[i];
        }
        if (ok && cur.length > 0)
                ok = hash_range(ctx, &cur);
        ok = ok && EVP_DigestFinal_ex(ctx, ret, &len) == 1 && len == RANGES_HASH_SIZE;
        EVP_MD_CTX_free(ctx);
        return ok ? 0 : -ENOMEM;
}

size_t ranges_find(const struct download_range *r, size_t n, uint64_t offset) {
        size_t lo = 0, hi = n;

        /* Ends ascend in a canonical set: the first end > offset. */
        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;

                if (range_end(&r[mid]) <= offset)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        return lo;
}

uint64_t ranges_bytes_in(const struct download_range *r, size_t n, uint64_t start, uint64_t end) {
        uint64_t bytes = 0;

        for (size_t i = ranges_find(r, n, start); i < n && r[i].offset < end; i++) {
                uint64_t a = r[i].offset > start ? r[i].offset : start;
                uint64_t b = range_end(&r[i]) < end ? range_end(&r[i]) : end;

                bytes += b - a;
        }
        return bytes;
}

void ranges_cover(const struct download_range *r, size_t n, uint64_t file_size, uint32_t block_size,
                  uint64_t *ret_blocks, uint64_t *ret_bytes) {
        uint64_t blocks = 0, bytes = 0, next = 0; /* the first block not counted yet */

        for (size_t i = 0; i < n; i++) {
                uint64_t first = r[i].offset / block_size, last = (range_end(&r[i]) - 1) / block_size;

                /* A block holding the end of one range and the start of the
                 * next is fetched once. */
                if (first < next)
                        first = next;
                if (first > last)
                        continue;
                blocks += last - first + 1;
                bytes += (last - first + 1) * block_size;
                if ((last + 1) * block_size > file_size)
                        bytes -= (last + 1) * block_size - file_size;
                next = last + 1;
        }
        *ret_blocks = blocks;
        *ret_bytes = bytes;
}

uint32_t ranges_stream_block_size(const struct download_range *r, size_t n, uint64_t file_size,
                                  uint32_t max_block_size) {
        uint64_t wanted = ranges_total(r, n);
        uint32_t size = 1;

        if (max_block_size <= RANGES_BLOCK_SIZE_FLOOR)
                return max_block_size;
        while (size <= max_block_size / 2)
                size *= 2;
        for (; size > RANGES_BLOCK_SIZE_FLOOR; size /= 2) {
                uint64_t blocks, bytes;

                ranges_cover(r, n, file_size, size, &blocks, &bytes);
                if (bytes + blocks * RANGES_BLOCK_FRAMING <= wanted + wanted / 8)
                        return size;
        }
        return RANGES_BLOCK_SIZE_FLOOR;
}

/* Characters of "a-b": the longest is two 20-digit numbers and a dash. */
#define SPAN_TEXT_MAX 41

static size_t span_text_length(const struct download_range *s) {
        char buf[SPAN_TEXT_MAX + 1];

        return (size_t) snprintf(buf, sizeof buf, "%" PRIu64 "-%" PRIu64, s->offset, range_end(s) - 1);
}

size_t ranges_plan_request(const struct download_range *r, size_t n, uint64_t from,
                           const struct ranges_request_limits *limits, struct download_range *spans) {
        size_t i = ranges_find(r, n, from), k = 0, text = 0;

        if (i >= n || limits->spans_max == 0)
                return 0;
        spans[0].offset = r[i].offset > from ? r[i].offset : from;
        spans[0].length = range_end(&r[i]) - spans[0].offset;
        k = 1;
        for (i++; i < n; i++) {
                struct download_range *last = &spans[k - 1];

                if (r[i].offset - range_end(last) < limits->gap_max) {
                        last->length = range_end(&r[i]) - last->offset;
                        continue;
                }
                /* The last span is final now; a new one must fit even at
                 * its longest. */
                text += span_text_length(last) + 1;
                if (k == limits->spans_max || text + SPAN_TEXT_MAX > limits->header_max)
                        break;
                spans[k++] = r[i];
        }
        return k;
}

int ranges_format(const struct download_range *spans, size_t n, char *buf, size_t size) {
        size_t len = 0;

        if (size == 0)
                return -ENOBUFS;
        buf[0] = '\0';
        for (size_t i = 0; i < n; i++) {
                int w = snprintf(buf + len, size - len, "%s%" PRIu64 "-%" PRIu64, i > 0 ? "," : "", spans[i].offset,
                                 range_end(&spans[i]) - 1);

                if (w < 0 || (size_t) w >= size - len)
                        return -ENOBUFS;
                len += (size_t) w;
        }
        return (int) len;
}
