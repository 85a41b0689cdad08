/* SPDX-License-Identifier: MIT */
/*
 * Wanted ranges (ranges.c): the rules a set must keep, its identity, the
 * blocks that cover it and the block size chosen for it, and the coalesced
 * HTTP Range requests; and the multipart/byteranges reader (byteranges.c)
 * on the bodies servers send, whole and split at every byte, and on the
 * ways they go wrong.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "byteranges.h"
#include "macro.h"
#include "ranges.h"
#include "tap.h"

#define R(o, l) { .offset = (o), .length = (l) }

static void test_normalize(void) {
        static const struct download_range touching[] = { R(0, 10), R(10, 5), R(20, 1), R(21, 4), R(99, 1) };
        static const struct download_range unsorted[] = { R(20, 1), R(0, 10) };
        static const struct download_range overlapping[] = { R(0, 10), R(9, 5) };
        static const struct download_range empty_one[] = { R(0, 10), R(12, 0) };
        static const struct download_range past_end[] = { R(95, 6) };
        static const struct download_range at_end[] = { R(100, 1) };
        struct download_range *out = NULL;
        size_t n = 99;

        tap_is_int(ranges_normalize(touching, ELEMENTSOF(touching), 100, &out, &n), 0, "touching ranges are valid");
        tap_ok(n == 3 && out[0].offset == 0 && out[0].length == 15 && out[1].offset == 20 && out[1].length == 5 &&
                       out[2].offset == 99 && out[2].length == 1,
               "touching ranges merged: [0,15) [20,25) [99,100)");
        tap_is_int((long long) ranges_total(out, n), 21, "21 bytes wanted");
        free(out);

        out = (struct download_range *) 0x1;
        tap_is_int(ranges_normalize(unsorted, 2, 100, &out, &n), -EINVAL, "unsorted refused");
        tap_is_int(ranges_normalize(overlapping, 2, 100, &out, &n), -EINVAL, "overlapping refused");
        tap_is_int(ranges_normalize(empty_one, 2, 100, &out, &n), -EINVAL, "an empty range refused");
        tap_is_int(ranges_normalize(past_end, 1, 100, &out, &n), -EINVAL, "a range past filesize refused");
        tap_is_int(ranges_normalize(at_end, 1, 100, &out, &n), -EINVAL, "a range at filesize refused");
        tap_is_int(ranges_normalize(NULL, 1, 100, &out, &n), -EINVAL, "n without ranges refused");
        tap_ok(out == (struct download_range *) 0x1, "ret untouched on failure");

        tap_is_int(ranges_normalize(NULL, 0, 100, &out, &n), 0, "the empty set is valid");
        tap_ok(out != NULL && n == 0, "the empty set is not NULL (NULL is the whole file)");
        free(out);
}

static void test_lookup(void) {
        static const struct download_range r[] = { R(10, 10), R(40, 20), R(100, 1) };

        tap_is_int((long long) ranges_find(r, 3, 0), 0, "find before the first range");
        tap_is_int((long long) ranges_find(r, 3, 19), 0, "find in the first range");
        tap_is_int((long long) ranges_find(r, 3, 20), 1, "find at the end of the first range: the next");
        tap_is_int((long long) ranges_find(r, 3, 100), 2, "find in the last");
        tap_is_int((long long) ranges_find(r, 3, 101), 3, "find past the last: n");
        tap_is_int((long long) ranges_bytes_in(r, 3, 0, 1000), 31, "bytes in everything");
        tap_is_int((long long) ranges_bytes_in(r, 3, 15, 45), 10, "bytes in [15,45): 5 + 5");
        tap_is_int((long long) ranges_bytes_in(r, 3, 20, 40), 0, "bytes in a gap");
        tap_is_int((long long) ranges_bytes_in(r, 3, 59, 101), 2, "bytes at the edges");
}

static void test_hash(void) {
        static const struct download_range a[] = { R(0, 10), R(10, 5), R(20, 5) };
        static const struct download_range b[] = { R(0, 15), R(20, 5) };
        static const struct download_range c[] = { R(0, 15), R(20, 6) };
        uint8_t ha[RANGES_HASH_SIZE], hb[RANGES_HASH_SIZE], hc[RANGES_HASH_SIZE], h0[RANGES_HASH_SIZE],
                h1[RANGES_HASH_SIZE];

        tap_is_int(ranges_hash(a, 3, ha), 0, "hash");
        ranges_hash(b, 2, hb);
        ranges_hash(c, 2, hc);
        ranges_hash(NULL, 0, h0);
        ranges_hash(b, 1, h1);
        tap_ok(memcmp(ha, hb, RANGES_HASH_SIZE) == 0, "a set hashes the same in touching and merged form");
        tap_ok(memcmp(hb, hc, RANGES_HASH_SIZE) != 0, "one byte more is another set");
        tap_ok(memcmp(hb, h1, RANGES_HASH_SIZE) != 0 && memcmp(h0, h1, RANGES_HASH_SIZE) != 0,
               "fewer ranges, another set; the empty set has its own hash");
}

static void test_cover(void) {
        /* 10000-byte file, 4096-byte blocks: 0 [0,4096) 1 [4096,8192) 2 [8192,10000). */
        static const struct download_range r[] = { R(100, 100), R(4000, 200), R(9000, 1000) };
        static const struct download_range edge[] = { R(4095, 2) };
        uint64_t blocks, bytes;

        ranges_cover(r, 3, 10000, 4096, &blocks, &bytes);
        tap_ok(blocks == 3 && bytes == 10000,
               "block 0 holds two ranges and is fetched once; the short last block counts its 1808 bytes (%" PRIu64
               " blocks, %" PRIu64 " bytes)", blocks, bytes);
        ranges_cover(edge, 1, 10000, 4096, &blocks, &bytes);
        tap_ok(blocks == 2 && bytes == 8192, "two bytes across a block edge cost two blocks");
        ranges_cover(r, 3, 10000, 256, &blocks, &bytes);
        tap_ok(blocks == 1 + 2 + 5 && bytes == 256 + 512 + 4 * 256 + (10000 - 39 * 256),
               "256-byte blocks: 8 blocks (%" PRIu64 "), %" PRIu64 " bytes", blocks, bytes);
        ranges_cover(NULL, 0, 10000, 4096, &blocks, &bytes);
        tap_ok(blocks == 0 && bytes == 0, "nothing wanted, nothing covered");
}

static void test_stream_block_size(void) {
        struct download_range big = R(0, 8u << 20), *scattered;
        const size_t n = 256;

        tap_is_int(ranges_stream_block_size(&big, 1, 8u << 20, 131072), 131072,
                   "one long range: the largest block size");
        tap_is_int(ranges_stream_block_size(&big, 1, 8u << 20, 2048), 2048,
                   "a configured size below the floor is kept");
        tap_is_int(ranges_stream_block_size(&big, 1, 8u << 20, 100000), 65536,
                   "a configured size that is no power of two: the power of two below it");
        /* 1 KiB ranges 64 KiB apart: every block size wastes most of a block. */
        scattered = calloc(n, sizeof *scattered);
        for (size_t i = 0; i < n; i++)
                scattered[i] = (struct download_range) R(i * 65536 + 1000, 1024);
        tap_is_int(ranges_stream_block_size(scattered, n, n * 65536, 131072), RANGES_BLOCK_SIZE_FLOOR,
                   "small scattered ranges: the floor");
        /* 60 KiB ranges from 63 KiB on, across a 64 KiB boundary: blocks of
         * 8 KiB cost 72 KiB a range (1/5 more), of 4 KiB 64 KiB (1/15). */
        for (size_t i = 0; i < n; i++)
                scattered[i] = (struct download_range) R(i * 131072 + 63 * 1024, 61440);
        tap_is_int(ranges_stream_block_size(scattered, n, n * 131072, 131072), 4096,
                   "60 KiB ranges across a 64 KiB boundary: 4 KiB blocks");
        /* 124 KiB ranges from 8 KiB on: 16 KiB blocks cost 144 KiB (1/6
         * more), 8 KiB ones 128 KiB (1/31). */
        for (size_t i = 0; i < n; i++)
                scattered[i] = (struct download_range) R(i * 262144 + 8192, 131072 - 4096);
        tap_is_int(ranges_stream_block_size(scattered, n, n * 262144, 131072), 8192,
                   "124 KiB ranges on 8 KiB boundaries: 8 KiB blocks");
        for (size_t i = 0; i < n; i++)
                scattered[i] = (struct download_range) R(i * 262144, 131072 - 4096);
        tap_is_int(ranges_stream_block_size(scattered, n, n * 262144, 131072), 131072,
                   "124 KiB ranges on 128 KiB boundaries: 128 KiB blocks, within 1/8");
        free(scattered);
}

static void test_plan_request(void) {
        static const struct download_range r[] = { R(0, 100), R(150, 50), R(1000, 10), R(1020, 10), R(5000, 1) };
        struct ranges_request_limits limits = { .gap_max = 100, .spans_max = 10, .header_max = 4000 };
        struct download_range spans[10];
        char text[256];
        size_t n;

        n = ranges_plan_request(r, 5, 0, &limits, spans);
        ranges_format(spans, n, text, sizeof text);
        tap_is_str(text, "0-199,1000-1029,5000-5000", "gaps below 100 bytes fetched along, longer ones split off");

        limits.gap_max = 50;
        n = ranges_plan_request(r, 5, 0, &limits, spans);
        ranges_format(spans, n, text, sizeof text);
        tap_is_str(text, "0-99,150-199,1000-1029,5000-5000", "a gap of exactly gap_max is split off");

        n = ranges_plan_request(r, 5, 50, &limits, spans);
        ranges_format(spans, n, text, sizeof text);
        tap_is_str(text, "50-99,150-199,1000-1029,5000-5000", "from the middle of a range");
        n = ranges_plan_request(r, 5, 120, &limits, spans);
        ranges_format(spans, n, text, sizeof text);
        tap_is_str(text, "150-199,1000-1029,5000-5000", "from a gap: the next range");
        tap_is_int((long long) ranges_plan_request(r, 5, 5001, &limits, spans), 0, "from past the last: nothing");

        limits.spans_max = 1;
        limits.gap_max = 1000;
        n = ranges_plan_request(r, 5, 0, &limits, spans);
        ranges_format(spans, n, text, sizeof text);
        tap_is_str(text, "0-1029", "one range per request: coalesced over short gaps up to the first long one");

        limits.spans_max = 2;
        limits.gap_max = 1;
        n = ranges_plan_request(r, 5, 0, &limits, spans);
        tap_is_int((long long) n, 2, "at most spans_max ranges");

        /* Offsets with 20 digits: the header budget bounds the count. */
        struct download_range far[40];
        for (size_t i = 0; i < ELEMENTSOF(far); i++)
                far[i] = (struct download_range) R(UINT64_C(10000000000000000000) + i * 1000, 1);
        limits = (struct ranges_request_limits){ .gap_max = 1, .spans_max = 40, .header_max = 200 };
        n = ranges_plan_request(far, ELEMENTSOF(far), 0, &limits, spans);
        char big[4096];
        int len = ranges_format(spans, n, big, sizeof big);
        tap_ok(n >= 4 && len > 0 && (size_t) len <= 200, "long offsets: %zu ranges in %d of 200 characters", n, len);
        tap_is_int(ranges_format(spans, n, big, 10), -ENOBUFS, "format refuses a short buffer");
}

/* ---- byteranges -------------------------------------------------------------- */

static void test_boundary(void) {
        static const struct {
                const char *value;
                int r;
                const char *boundary;
        } cases[] = {
                { "multipart/byteranges; boundary=00000000000000000001", 0, "00000000000000000001" },
                { " Multipart/ByteRanges;boundary=\"a b:c\"\r\n", 0, "a b:c" },
                { "multipart/byteranges; charset=x; BOUNDARY=THIS_STRING_SEPARATES", 0, "THIS_STRING_SEPARATES" },
                { "multipart/byteranges; flag; boundary=x", 0, "x" },
                { "application/octet-stream", -ENOMSG, NULL },
                { "multipart/byterangesx; boundary=x", -ENOMSG, NULL },
                { "multipart/byteranges", -EBADMSG, NULL },
                { "multipart/byteranges; boundary=", -EBADMSG, NULL },
                { "multipart/byteranges; boundary=\"unterminated", -EBADMSG, NULL },
                { "multipart/byteranges; boundary="
                  "12345678901234567890123456789012345678901234567890123456789012345678901",
                  -EBADMSG, NULL },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                char b[BYTERANGES_BOUNDARY_MAX + 1] = "";
                int r = byteranges_boundary(cases[i].value, strlen(cases[i].value), b);

                tap_ok(r == cases[i].r && (!cases[i].boundary || strcmp(b, cases[i].boundary) == 0),
                       "boundary of case %zu (%.*s): %d \"%s\"", i, (int) strcspn(cases[i].value, "\r\n"),
                       cases[i].value, r, b);
        }
}

static void test_content_range(void) {
        static const struct {
                const char *value;
                int r;
                uint64_t first, last, complete;
        } cases[] = {
                { " bytes 0-99/1000\r\n", 0, 0, 99, 1000 },
                { "bytes 5-5/*", 0, 5, 5, UINT64_MAX },
                { "BYTES 10-19/20", 0, 10, 19, 20 },
                { "bytes */1000", -EBADMSG, 0, 0, 0 },
                { "bytes 10-9/100", -EBADMSG, 0, 0, 0 },
                { "bytes 0-99/99", -EBADMSG, 0, 0, 0 },
                { "bytes 0-99", -EBADMSG, 0, 0, 0 },
                { "bytes=0-99/100", -EBADMSG, 0, 0, 0 },
                { "bytes 0-99/100x", -EBADMSG, 0, 0, 0 },
                { "bytes 0-18446744073709551616/18446744073709551617", -EBADMSG, 0, 0, 0 },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                uint64_t a = 0, b = 0, c = 0;
                int r = byteranges_content_range(cases[i].value, strlen(cases[i].value), &a, &b, &c);

                tap_ok(r == cases[i].r && (r < 0 || (a == cases[i].first && b == cases[i].last &&
                                                     c == cases[i].complete)),
                       "Content-Range %.*s: %d", (int) strcspn(cases[i].value, "\r\n"), cases[i].value, r);
        }
}

struct collected {
        uint8_t file[256];
        uint8_t seen[256];
        unsigned calls;
        int fail_at; /* call number that fails, 0: none */
};

static int collect(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct collected *c = userdata;

        if (++c->calls == (unsigned) c->fail_at)
                return -EIO;
        if (offset + len > sizeof c->file)
                return -ERANGE;
        memcpy(c->file + offset, buf, len);
        memset(c->seen + offset, 1, len);
        return 0;
}

/* Feeds body in pieces of step bytes (0: whole). */
static int feed(struct byteranges *p, const char *body, size_t len, size_t step, struct collected *c) {
        int r = 0;

        if (step == 0)
                return byteranges_feed(p, body, len, collect, c);
        for (size_t i = 0; i < len && r == 0; i += step)
                r = byteranges_feed(p, body + i, len - i < step ? len - i : step, collect, c);
        return r;
}

/* As nginx 1.22 answers "Range: bytes=2-5,10-12" for a 20-byte file. */
static const char NGINX_BODY[] = "\r\n--00000000000000000001\r\n"
                                 "Content-Type: application/octet-stream\r\n"
                                 "Content-Range: bytes 2-5/20\r\n"
                                 "\r\n"
                                 "CDEF"
                                 "\r\n--00000000000000000001\r\n"
                                 "Content-Type: application/octet-stream\r\n"
                                 "Content-Range: bytes 10-12/20\r\n"
                                 "\r\n"
                                 "KLM"
                                 "\r\n--00000000000000000001--\r\n";

static void test_multipart_body(void) {
        const size_t len = sizeof NGINX_BODY - 1;

        for (size_t step = 0; step <= 7; step++) {
                struct byteranges p;
                struct collected c = {};
                int r;

                byteranges_init(&p, "00000000000000000001", 20);
                r = feed(&p, NGINX_BODY, len, step, &c);
                tap_ok(r == 0 && byteranges_complete(&p) && p.parts == 2 && memcmp(c.file + 2, "CDEF", 4) == 0 &&
                               memcmp(c.file + 10, "KLM", 3) == 0 && c.seen[1] == 0 && c.seen[6] == 0 &&
                               c.seen[9] == 0 && c.seen[13] == 0 && p.data_bytes == 7 &&
                               p.data_bytes + p.other_bytes == len,
                       "nginx's two parts in pieces of %zu bytes: r=%d, parts at 2 and 10, all other bytes framing",
                       step, r);
        }

        /* Preamble, LF line ends, padding after the boundary, another part
         * header, an epilogue; a part covering what two ranges asked for. */
        static const char liberal[] = "This is a preamble\n"
                                      "--sep \t\n"
                                      "content-range: bytes 0-9/*\n"
                                      "X-Other: 1\n"
                                      "\n"
                                      "0123456789\n"
                                      "--sep--\n"
                                      "epilogue, ignored";
        struct byteranges p;
        struct collected c = {};

        byteranges_init(&p, "sep", 20);
        tap_ok(feed(&p, liberal, sizeof liberal - 1, 1, &c) == 0 && byteranges_complete(&p) &&
                       memcmp(c.file, "0123456789", 10) == 0,
               "preamble, LF line ends, transport padding, unknown complete length, epilogue");

        byteranges_init(&p, "sep", 20);
        c = (struct collected){};
        tap_ok(feed(&p, "--sep--\r\n", 9, 0, &c) == 0 && byteranges_complete(&p) && p.parts == 0,
               "a body of no parts is complete and empty");

        byteranges_init(&p, "sep", 20);
        tap_ok(feed(&p, "--sep\r\nContent-Range: bytes 0-3/20\r\n\r\nAB", 41, 0, &c) == 0 &&
                       !byteranges_complete(&p),
               "a body cut in a part is not complete");
}

static void test_multipart_errors(void) {
        static const struct {
                const char *name, *body;
                int r;
        } cases[] = {
                { "part without Content-Range", "--b\r\nContent-Type: x\r\n\r\nAB\r\n--b--\r\n", -EBADMSG },
                { "two Content-Ranges", "--b\r\nContent-Range: bytes 0-1/20\r\nContent-Range: bytes 0-1/20\r\n\r\n",
                  -EBADMSG },
                { "data longer than its Content-Range", "--b\r\nContent-Range: bytes 0-1/20\r\n\r\nABC\r\n--b--\r\n",
                  -EBADMSG },
                { "another boundary", "--b\r\nContent-Range: bytes 0-1/20\r\n\r\nAB\r\n--c--\r\n", -EBADMSG },
                { "part past the file", "--b\r\nContent-Range: bytes 19-20/21\r\n\r\n", -EMSGSIZE },
                { "part of a 21-byte object", "--b\r\nContent-Range: bytes 0-1/21\r\n\r\n", -EMSGSIZE },
                { "part past filesize, size unknown", "--b\r\nContent-Range: bytes 19-20/*\r\n\r\n", -EBADMSG },
                { "malformed Content-Range", "--b\r\nContent-Range: bytes 5-1/20\r\n\r\n", -EBADMSG },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                struct byteranges p;
                struct collected c = {};
                int r;

                byteranges_init(&p, "b", 20);
                r = feed(&p, cases[i].body, strlen(cases[i].body), 0, &c);
                tap_ok(r == cases[i].r, "%s: %d", cases[i].name, r);
                tap_is_int(byteranges_feed(&p, "x", 1, collect, &c), r, "the error sticks");
        }

        struct byteranges p;
        struct collected c = {};
        char long_line[BYTERANGES_LINE_MAX + 10];

        memset(long_line, 'x', sizeof long_line);
        byteranges_init(&p, "b", 20);
        tap_is_int(byteranges_feed(&p, long_line, sizeof long_line, collect, &c), -EBADMSG, "an endless line");

        char preamble[5000];
        memset(preamble, '\n', sizeof preamble);
        byteranges_init(&p, "b", 20);
        tap_is_int(byteranges_feed(&p, preamble, sizeof preamble, collect, &c), -EBADMSG, "an endless preamble");

        byteranges_init(&p, "00000000000000000001", 20);
        c = (struct collected){ .fail_at = 2 };
        tap_is_int(byteranges_feed(&p, NGINX_BODY, sizeof NGINX_BODY - 1, collect, &c), -EIO,
                   "the callback's error comes back");
        tap_ok(c.seen[2] == 1 && c.seen[10] == 0, "and nothing after it is handed out");
}

int main(void) {
        test_normalize();
        test_lookup();
        test_hash();
        test_cover();
        test_stream_block_size();
        test_plan_request();
        test_boundary();
        test_content_range();
        test_multipart_body();
        test_multipart_errors();
        return tap_done();
}
