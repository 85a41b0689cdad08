/* SPDX-License-Identifier: MIT */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tap.h"

static int tap_count;
static int tap_failed;
static int tap_planned = -1;

void tap_plan(int n) {
        tap_planned = n;
        printf("1..%d\n", n);
}

void tap_diag(const char *format, ...) {
        va_list ap;

        printf("# ");
        va_start(ap, format);
        vprintf(format, ap);
        va_end(ap);
        printf("\n");
}

static bool tap_report(bool cond, const char *name) {
        tap_count++;
        if (!cond)
                tap_failed++;
        printf("%sok %d - %s\n", cond ? "" : "not ", tap_count, name);
        fflush(stdout);
        return cond;
}

bool tap_ok(bool cond, const char *format, ...) {
        char name[512];
        va_list ap;

        va_start(ap, format);
        vsnprintf(name, sizeof(name), format, ap);
        va_end(ap);
        return tap_report(cond, name);
}

bool tap_is_int(long long got, long long want, const char *name) {
        if (!tap_report(got == want, name))
                tap_diag("  got %lld, want %lld", got, want);
        return got == want;
}

bool tap_is_str(const char *got, const char *want, const char *name) {
        bool same = got && want ? strcmp(got, want) == 0 : got == want;

        if (!tap_report(same, name))
                tap_diag("  got \"%s\", want \"%s\"", got ? got : "(null)", want ? want : "(null)");
        return same;
}

void tap_skip(const char *reason, const char *name) {
        tap_count++;
        printf("ok %d - %s # SKIP %s\n", tap_count, name, reason);
}

int tap_done(void) {
        if (tap_planned < 0)
                printf("1..%d\n", tap_count);
        else if (tap_planned != tap_count) {
                printf("# planned %d tests but ran %d\n", tap_planned, tap_count);
                return 1;
        }
        return tap_failed ? 1 : 0;
}

int tap_sh(const char *dir, const char *format, ...) {
        char *cmd = NULL, *full = NULL;
        va_list ap;
        int r;

        va_start(ap, format);
        r = vasprintf(&cmd, format, ap);
        va_end(ap);
        if (r < 0 || asprintf(&full, "cd '%s' && ( %s ) >/dev/null 2>&1", dir, cmd) < 0)
                abort();
        r = system(full);
        free(cmd);
        free(full);
        return r;
}
