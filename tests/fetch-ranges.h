/* SPDX-License-Identifier: MIT */
/*
 * fetch-ranges: what stream-fetch and http-fetch share for wanted ranges:
 * reading them from a file ("OFFSET LENGTH" per line, as the tests and the
 * benchmark write them) and checking download.h's write contract as the
 * bytes arrive: every write inside the wanted ranges, no byte written twice
 * in one run. Header-only: the two programs are single files.
 */
#pragma once

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "download.h"

struct write_check {
        const struct download_range *wanted; /* NULL: the whole file */
        size_t n_wanted;
        uint64_t size;
        uint8_t *seen;            /* a bit per byte of the file */
        uint64_t writes;
        uint64_t bytes_outside;   /* bytes written outside the wanted ranges */
        uint64_t bytes_twice;     /* bytes written again in this run */
};

/* -errno, with the file's ranges in *ret (freed by the caller). */
static inline int ranges_file_read(const char *path, struct download_range **ret, size_t *ret_n) {
        FILE *f = fopen(path, "re");
        struct download_range *r = NULL;
        size_t n = 0, allocated = 0;
        uint64_t offset, length;

        if (!f)
                return -errno;
        while (fscanf(f, "%" SCNu64 " %" SCNu64, &offset, &length) == 2) {
                if (n == allocated) {
                        struct download_range *bigger;

                        allocated = allocated ? 2 * allocated : 64;
                        bigger = realloc(r, allocated * sizeof *r);
                        if (!bigger) {
                                free(r);
                                fclose(f);
                                return -ENOMEM;
                        }
                        r = bigger;
                }
                r[n++] = (struct download_range){ .offset = offset, .length = length };
        }
        fclose(f);
        if (!r)
                r = calloc(1, sizeof *r); /* an empty set, not "the whole file" */
        if (!r)
                return -ENOMEM;
        *ret = r;
        *ret_n = n;
        return 0;
}

static inline int write_check_init(struct write_check *c, const struct download_range *wanted, size_t n,
                                   uint64_t size) {
        *c = (struct write_check){ .wanted = wanted, .n_wanted = n, .size = size };
        c->seen = calloc(1, (size_t) ((size + 7) / 8));
        return c->seen ? 0 : -ENOMEM;
}

static inline bool write_check_wanted(const struct write_check *c, uint64_t pos) {
        if (!c->wanted)
                return true;
        for (size_t lo = 0, hi = c->n_wanted; lo < hi;) {
                size_t mid = lo + (hi - lo) / 2;

                if (c->wanted[mid].offset + c->wanted[mid].length <= pos)
                        lo = mid + 1;
                else if (c->wanted[mid].offset > pos)
                        hi = mid;
                else
                        return true;
        }
        return false;
}

/* Accounts one write; bytes past the end of the file count as outside. */
static inline void write_check_add(struct write_check *c, uint64_t offset, size_t len) {
        c->writes++;
        for (uint64_t p = offset; p < offset + len; p++) {
                if (p >= c->size || !write_check_wanted(c, p)) {
                        c->bytes_outside++;
                        continue;
                }
                if (c->seen[p >> 3] & (1u << (p & 7)))
                        c->bytes_twice++;
                c->seen[p >> 3] |= (uint8_t) (1u << (p & 7));
        }
}
