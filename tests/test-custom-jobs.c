/* SPDX-License-Identifier: MIT */
/* custom_jobs' pure parts: which operation names may name a file, and how
 * handler output becomes a statusDetails value (protocol.md §1.5). */
#include <string.h>

#include "custom_jobs.h"
#include "tap.h"

static const char *clean(const char *in, size_t max_chars) {
        static char buf[4 * 1024 + 1];

        custom_jobs_sanitize_output(in, strlen(in), buf, sizeof(buf), max_chars);
        return buf;
}

int main(void) {
        static char big[3000], want[1100];

        tap_ok(custom_jobs_operation_is_valid("reboot"), "reboot");
        tap_ok(custom_jobs_operation_is_valid("install-app_2.sh"), "dots, dashes, underscores");
        tap_ok(!custom_jobs_operation_is_valid(""), "empty");
        tap_ok(!custom_jobs_operation_is_valid(".hidden"), "leading dot");
        tap_ok(!custom_jobs_operation_is_valid(".."), "parent directory");
        tap_ok(!custom_jobs_operation_is_valid("../bin/sh"), "path traversal");
        tap_ok(!custom_jobs_operation_is_valid("/bin/sh"), "absolute path");
        tap_ok(!custom_jobs_operation_is_valid("a b"), "space");
        tap_ok(!custom_jobs_operation_is_valid("a;rm"), "shell metacharacter");

        tap_is_str(clean("hello\n", 1024), "hello", "trailing newline dropped");
        tap_is_str(clean("  a\n\nb\tc\r\n", 1024), "a b c", "controls become single spaces");
        tap_is_str(clean("\x1b[31mred\x1b[0m", 1024), "[31mred [0m", "escape sequences defused");
        tap_is_str(clean("caf\xc3\xa9", 1024), "caf\xc3\xa9", "UTF-8 kept");
        tap_is_str(clean("bad\xff\xfe.", 1024), "bad??.", "invalid UTF-8 replaced");
        tap_is_str(clean("cut\xc3", 1024), "cut?", "truncated UTF-8 replaced");
        tap_is_str(clean("\n\n", 1024), "", "nothing printable");
        tap_is_str(clean("0123456789", 10), "0123456789", "exactly the limit");
        tap_is_str(clean("0123456789\n\n", 10), "0123456789", "limit then blanks");
        tap_is_str(clean("0123456789A", 10), "0123456...", "one over the limit");
        tap_is_str(clean("\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9", 5), "\xc3\xa9\xc3\xa9...",
                   "limit counts characters");

        memset(big, 'x', sizeof(big) - 1);
        memset(want, 'x', 1021);
        memcpy(want + 1021, "...", 4);
        tap_is_str(clean(big, 1024), want, "long output cut to 1024 characters");
        tap_is_int((long long) strlen(clean(big, 1024)), 1024, "1024 bytes for ASCII");
        return tap_done();
}
