/* SPDX-License-Identifier: MIT */
/* tap: the Test Anything Protocol for otad's C unit tests, as meson reads it. */
#pragma once

#include <stdbool.h>

void tap_plan(int n);
/* Prints "ok N - name" or "not ok N - name"; returns cond. */
bool tap_ok(bool cond, const char *format, ...) __attribute__((format(printf, 2, 3)));
bool tap_is_int(long long got, long long want, const char *name);
bool tap_is_str(const char *got, const char *want, const char *name);
/* "# text" diagnostics */
void tap_diag(const char *format, ...) __attribute__((format(printf, 1, 2)));
void tap_skip(const char *reason, const char *name);
/* Prints the plan if none was given; returns the process exit status. */
int tap_done(void);
