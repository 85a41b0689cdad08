/* SPDX-License-Identifier: MIT */
/* libFuzzer: multipart/byteranges bodies and their header values as a
 * server (or whoever is between) sends them. The first byte splits the body
 * into pieces of that many bytes, as the network splits it; every part byte
 * handed out must lie inside the file and inside the part it was declared
 * for, and no part byte may be handed out twice for one part. */
#include <stdint.h>
#include <string.h>

#include "byteranges.h"

#define FILE_SIZE 4096

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct state {
        struct byteranges *p;
        uint64_t next; /* the next offset the current part must hand out */
        unsigned part;
};

static int on_data(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct state *s = userdata;
        volatile uint8_t sum = 0;

        if (s->part != s->p->parts) {
                s->part = s->p->parts;
                s->next = s->p->part_start;
        }
        if (len == 0 || offset != s->next || offset + len > FILE_SIZE || offset + len > s->p->part_end)
                __builtin_trap();
        for (size_t i = 0; i < len; i++)
                sum ^= ((const uint8_t *) buf)[i];
        (void) sum;
        s->next = offset + len;
        return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        char boundary[BYTERANGES_BOUNDARY_MAX + 1];
        uint64_t a, b, c;
        struct byteranges p;
        struct state s = { .p = &p };
        size_t step;

        /* Header values: never more than the boundary buffer. */
        if (byteranges_boundary((const char *) data, size, boundary) == 0 && strlen(boundary) > BYTERANGES_BOUNDARY_MAX)
                __builtin_trap();
        if (byteranges_content_range((const char *) data, size, &a, &b, &c) == 0 && (b < a || (c != UINT64_MAX && c <= b)))
                __builtin_trap();

        if (size < 1)
                return 0;
        step = data[0] ? data[0] : 1;
        byteranges_init(&p, "b", FILE_SIZE);
        for (size_t i = 1; i < size; i += step)
                if (byteranges_feed(&p, data + i, size - i < step ? size - i : step, on_data, &s) < 0)
                        break;
        if (p.data_bytes + p.other_bytes > size)
                __builtin_trap();
        return 0;
}
