/* SPDX-License-Identifier: MIT */
/*
 * backoff: the one retry policy of otad (MQTT reconnects, Jobs requests,
 * HTTPS retries, stream back-off): exponential growth from min to max with
 * full jitter, so that a fleet that lost its broker at the same moment does
 * not come back at the same moment (AWS's architecture guidance). Owns the
 * arithmetic only: callers arm their own timers.
 */
#pragma once

#include <stdint.h>

struct backoff {
        uint64_t min_usec;  /* the first delay, and the floor of every delay */
        uint64_t max_usec;  /* the ceiling the growth stops at */
        unsigned attempts;  /* delays handed out since the last reset */
};

#define BACKOFF_INIT(min, max) ((struct backoff){ .min_usec = (min), .max_usec = (max) })

/* The delay before the next attempt, counting it: uniform in
 * [min, min(max, min * 2^attempts)], so the first delay is exactly min.
 * max < min is treated as max == min. */
uint64_t backoff_next(struct backoff *b);
/* After a success: the next delay is min again. */
void backoff_reset(struct backoff *b);
