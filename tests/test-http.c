/* SPDX-License-Identifier: MIT */
/* Unit tests of http.c's pure parts: the loggable form of a presigned URL,
 * refusing non-HTTPS URLs, and resume offsets without a usable record. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <systemd/sd-event.h>

#include "config.h"
#include "http.h"
#include "macro.h"
#include "tap.h"

static void test_url_for_log(void) {
        static const struct {
                const char *url, *want;
        } cases[] = {
                { "https://bucket.s3.eu-west-1.amazonaws.com/ota/image.bin?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                  "&X-Amz-Credential=AKIA%2F20240101&X-Amz-Signature=abcdef&X-Amz-Security-Token=secret",
                  "https://bucket.s3.eu-west-1.amazonaws.com/ota/image.bin" },
                { "https://127.0.0.1:18443/a/b%20c.bin?t=1#frag", "https://127.0.0.1:18443/a/b%20c.bin" },
                { "https://user:password@example.com/x", "https://example.com/x" },
                { "https://example.com", "https://example.com/" },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                _cleanup_free_ char *got = NULL;
                int r = http_url_for_log(cases[i].url, &got);
                tap_ok(r == 0 && got && strcmp(got, cases[i].want) == 0, "log form of URL %zu is %s (got %s)", i,
                       cases[i].want, got ? got : "(null)");
        }
        char *untouched = (char *) 0x1;
        tap_is_int(http_url_for_log("not a url at all", &untouched), -EINVAL, "garbage is refused");
        tap_ok(untouched == (char *) 0x1, "ret untouched on failure");
}

static void on_finished(int result, const char *reason, void *userdata) {
}
static int on_write(uint64_t offset, const void *buf, size_t len, void *userdata) {
        return 0;
}
static void on_need_url(void *userdata) {
}

static void test_refusals(void) {
        static const struct download_ops ops = {
                .write = on_write, .need_fresh_url = on_need_url, .finished = on_finished,
        };
        struct otad_config config = { .ota = { .http_retries = 1, .http_low_speed_time = 1, .http_ca_file = (char *) "" } };
        struct download_file file = { .job_id = "j", .size = 10 };
        struct http_download *d = (struct http_download *) 0x1;
        sd_event *e = NULL;

        if (sd_event_new(&e) < 0)
                abort();
        struct otad otad = { .event = e, .config = &config };

        tap_is_int(http_download_new(&otad, "http://example.com/x", &file, &ops, NULL, &d), -EINVAL,
                   "plain http refused");
        tap_is_int(http_download_new(&otad, "file:///etc/passwd", &file, &ops, NULL, &d), -EINVAL,
                   "file:// refused");
        file.size = 0;
        tap_is_int(http_download_new(&otad, "https://example.com/x", &file, &ops, NULL, &d), -EINVAL,
                   "size 0 refused");
        tap_ok(d == (struct http_download *) 0x1, "ret untouched on failure");

        file.size = 10;
        file.state_path = "/nonexistent/dir/progress";
        tap_is_int((long long) http_progress_resume_offset(&file), 0, "no record: resume from 0");
        file.state_path = NULL;
        tap_is_int((long long) http_progress_resume_offset(&file), 0, "no state path: resume from 0");
        sd_event_unref(e);
}

int main(void) {
        test_url_for_log();
        test_refusals();
        return tap_done();
}
