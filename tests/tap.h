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
/* Runs a shell command in dir, its output discarded; system()'s status.
 * For the set-up of tests that make keys and files with the CLI tools. */
int tap_sh(const char *dir, const char *format, ...) __attribute__((format(printf, 2, 3)));
/* Prints the plan if none was given; returns the process exit status. */
int tap_done(void);
