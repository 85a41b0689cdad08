/* SPDX-License-Identifier: MIT */
/*
 * clock: the one way otad reads time for intervals and deadlines
 * (CLOCK_MONOTONIC, never the wall clock, which NTP and a real-time clock
 * battery move under a running gateway). No state.
 */
#pragma once

#include <stdint.h>

#define USEC_PER_MSEC UINT64_C(1000)
#define USEC_PER_SEC UINT64_C(1000000)

/* Microseconds of CLOCK_MONOTONIC. Inside an sd-event callback prefer
 * sd_event_now(), which is the same clock cached for the iteration. */
uint64_t clock_now_usec(void);
