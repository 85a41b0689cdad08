/* SPDX-License-Identifier: MIT */
#include <stdlib.h>
#include <sys/random.h>

#include "backoff.h"

static uint32_t random_u32(void) {
        uint32_t v;

        /* Jitter needs no cryptographic quality, only that devices differ. */
        if (getrandom(&v, sizeof(v), GRND_NONBLOCK) != sizeof(v))
                v = (uint32_t) random();
        return v;
}

uint64_t backoff_next(struct backoff *b) {
        uint64_t lo = b->min_usec, hi = b->max_usec > b->min_usec ? b->max_usec : b->min_usec;
        uint64_t ceiling = lo;

        for (unsigned i = 0; i < b->attempts && ceiling < hi; i++)
                ceiling = ceiling ? ceiling * 2 : 1;
        if (ceiling > hi)
                ceiling = hi;
        if (b->attempts < 64)
                b->attempts++;
        if (ceiling <= lo)
                return lo;
        return lo + (uint64_t) random_u32() * (ceiling - lo) / UINT32_MAX;
}

void backoff_reset(struct backoff *b) {
        b->attempts = 0;
}
