/* SPDX-License-Identifier: MIT */
/* resolve: host name lookups that never hold up the event loop (issue 10). */
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <systemd/sd-event.h>

#include "clock.h"
#include "resolve.h"
#include "tap.h"

struct answer {
        int calls, error;
        size_t n;
        char first[64];
        sd_event *event;
};

static void on_done(int error, int sys_errno, char *const *addresses, size_t n, void *userdata) {
        struct answer *a = userdata;

        a->calls++;
        a->error = error;
        a->n = n;
        if (n)
                snprintf(a->first, sizeof(a->first), "%s", addresses[0]);
        sd_event_exit(a->event, 0);
}

static int on_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        return sd_event_exit(sd_event_source_get_event(s), 1);
}

/* Runs the loop until done or 10 s. */
static int run(sd_event *event) {
        sd_event_source *timer = NULL;
        int code = 1;

        sd_event_add_time_relative(event, &timer, CLOCK_MONOTONIC, 10 * USEC_PER_SEC, 0, on_timeout, NULL);
        sd_event_loop(event);
        sd_event_get_exit_code(event, &code);
        sd_event_source_disable_unref(timer);
        return code;
}

static void lookup(const char *host, struct answer *a) {
        struct resolve_query *q = NULL;
        sd_event *event = NULL;

        sd_event_new(&event);
        *a = (struct answer){ .event = event };
        if (resolve_start(event, host, on_done, a, &q) < 0)
                a->error = -1;
        else if (run(event) != 0)
                a->error = -2;
        sd_event_unref(event);
}

int main(void) {
        struct answer a;
        struct resolve_query *q = NULL;
        sd_event *event = NULL;

        lookup("127.0.0.1", &a);
        tap_ok(a.calls == 1 && a.error == 0 && a.n == 1, "a numeric IPv4 address: one answer");
        tap_is_str(a.first, "127.0.0.1", "as it was");
        lookup("::1", &a);
        tap_ok(a.error == 0 && a.n == 1 && strcmp(a.first, "::1") == 0, "a numeric IPv6 address");
        lookup("localhost", &a);
        tap_ok(a.error == 0 && a.n >= 1, "localhost resolves (%zu addresses, first %s)", a.n, a.first);
        /* Refused by the resolver's own syntax check: no DNS server is asked. */
        lookup("no..such..host", &a);
        tap_ok(a.calls == 1 && a.error != 0, "an unknown name fails with an EAI_* code: %s",
               a.error > 0 || a.error < -2 ? gai_strerror(a.error) : "no answer");

        /* A cancelled query never calls back, and its thread cleans up. */
        sd_event_new(&event);
        a = (struct answer){ .event = event };
        tap_ok(resolve_start(event, "localhost", on_done, &a, &q) == 0, "started");
        resolve_cancel(q);
        sd_event_add_time_relative(event, NULL, CLOCK_MONOTONIC, 500 * USEC_PER_MSEC, 0, on_timeout, NULL);
        sd_event_loop(event);
        tap_is_int(a.calls, 0, "no callback after cancel");
        sd_event_unref(event);
        resolve_cancel(NULL);
        return tap_done();
}
