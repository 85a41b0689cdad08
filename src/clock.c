/* SPDX-License-Identifier: MIT */
#include <time.h>

#include "clock.h"

uint64_t clock_now_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / 1000;
}
