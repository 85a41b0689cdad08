/* SPDX-License-Identifier: MIT */
#include <stdint.h>

#include "backoff.h"
#include "clock.h"
#include "tap.h"

int main(void) {
        struct backoff b = BACKOFF_INIT(2 * USEC_PER_SEC, 60 * USEC_PER_SEC);
        uint64_t d, lo = UINT64_MAX, hi = 0, t0, t1;
        bool within = true;

        tap_is_int((long long) backoff_next(&b), 2 * USEC_PER_SEC, "the first delay is exactly min");
        for (unsigned i = 0; i < 5; i++) {
                uint64_t ceiling = 2 * USEC_PER_SEC << (i + 1);

                d = backoff_next(&b);
                within &= d >= 2 * USEC_PER_SEC && d <= (ceiling > 60 * USEC_PER_SEC ? 60 * USEC_PER_SEC : ceiling);
        }
        tap_ok(within, "each delay lies in [min, min * 2^attempts]");
        for (unsigned i = 0; i < 200; i++) {
                d = backoff_next(&b);
                lo = d < lo ? d : lo;
                hi = d > hi ? d : hi;
        }
        tap_ok(hi <= 60 * USEC_PER_SEC && lo >= 2 * USEC_PER_SEC, "capped at max, floored at min");
        tap_ok(hi - lo > 10 * USEC_PER_SEC, "jittered: delays spread over the range (%llu..%llu us)",
               (unsigned long long) lo, (unsigned long long) hi);
        backoff_reset(&b);
        tap_is_int((long long) backoff_next(&b), 2 * USEC_PER_SEC, "after a reset the next delay is min again");

        b = BACKOFF_INIT(5 * USEC_PER_SEC, 1 * USEC_PER_SEC);
        backoff_next(&b);
        tap_is_int((long long) backoff_next(&b), 5 * USEC_PER_SEC, "max below min means a fixed delay of min");

        t0 = clock_now_usec();
        t1 = clock_now_usec();
        tap_ok(t1 >= t0 && t0 > 0, "the monotonic clock does not go back");
        return tap_done();
}
