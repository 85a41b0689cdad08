/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdbool.h>

#include "bundle_chunker.h"
#include "bundle_manifest.h"

/* gear[] for "gear64": SplitMix64 from seed 0, computed rather than spelled
 * out so that its definition is this one line of arithmetic. */
static uint64_t gear[256];
static bool gear_ready;

static void gear_init(void) {
        uint64_t x = 0;

        if (gear_ready)
                return;
        for (unsigned i = 0; i < 256; i++) {
                uint64_t z = (x += 0x9e3779b97f4a7c15ULL);

                z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
                z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
                gear[i] = z ^ (z >> 31);
        }
        gear_ready = true;
}

int bundle_chunker_init(struct bundle_chunker *c, const struct bundle_chunking *params) {
        if (params->min_size < BUNDLE_CHUNK_SIZE_MIN || params->max_size > BUNDLE_CHUNK_SIZE_MAX ||
            params->min_size > params->max_size || params->mask_bits < 8 || params->mask_bits > 30)
                return -EINVAL;
        gear_init();
        *c = (struct bundle_chunker) {
                .min_size = params->min_size,
                .max_size = params->max_size,
                /* The top bits: with h = (h << 1) + g, bit k of h depends on
                 * the last k+1 bytes only, so the high bits see a 64-byte
                 * window and the low ones almost none. */
                .mask = ~0ULL << (64 - params->mask_bits),
        };
        return 0;
}

size_t bundle_chunker_scan(struct bundle_chunker *c, const uint8_t *buf, size_t len) {
        uint64_t h = c->hash;
        uint32_t n = c->len;

        for (size_t i = 0; i < len; i++) {
                h = (h << 1) + gear[buf[i]];
                n++;
                if ((n >= c->min_size && (h & c->mask) == 0) || n >= c->max_size) {
                        c->hash = 0;
                        c->len = 0;
                        return i + 1;
                }
        }
        c->hash = h;
        c->len = n;
        return len;
}
