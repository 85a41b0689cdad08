/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "child.h"
#include "clock.h"
#include "config.h"
#include "health.h"
#include "log.h"

struct health_check {
        struct child *child;
        uint64_t timeout_usec;
        health_done_fn done;
        void *userdata;
};

static void on_check_exit(struct child *c, int wait_status, bool timed_out, void *userdata) {
        struct health_check *h = userdata;
        char how[128], detail[192];

        if (!timed_out && WIFEXITED(wait_status) && WEXITSTATUS(wait_status) == 0) {
                h->done(true, "health check passed", h->userdata);
                return;
        }
        if (timed_out)
                /* Killed with everything it started: the deadline is the
                 * deadline of the whole process group. */
                snprintf(detail, sizeof(detail), "health check did not pass within %llu s",
                         (unsigned long long) (h->timeout_usec / USEC_PER_SEC));
        else {
                child_describe_exit(wait_status, false, 0, how, sizeof(how));
                snprintf(detail, sizeof(detail), "health check failed: %s", how);
        }
        h->done(false, detail, h->userdata);
}

int health_check_start(struct otad *otad, const char *job_id, health_done_fn done, void *userdata,
                       struct health_check **ret) {
        const struct otad_config *config = otad->config;
        _cleanup_free_ char *script = NULL;
        char *argv[] = { (char *) "/bin/sh", (char *) "-c", NULL, NULL };
        struct health_check *h;
        int r;

        assert_return(otad && done && ret, -EINVAL);
        if (!config->update.wait_system_running && !*config->update.health_check)
                return 1;
        if (asprintf(&script, "%s%s%s", config->update.wait_system_running ? "systemctl is-system-running --wait" : "",
                     config->update.wait_system_running && *config->update.health_check ? " && " : "",
                     config->update.health_check) < 0)
                return -ENOMEM;
        h = calloc(1, sizeof(*h));
        if (!h)
                return -ENOMEM;
        h->done = done;
        h->userdata = userdata;
        h->timeout_usec = (uint64_t) config->update.health_timeout * USEC_PER_SEC;
        argv[2] = script;
        r = child_start(otad->event, argv,
                        &(const struct child_options){ .job_id = job_id, .stage = "self-test",
                                                       .timeout_usec = h->timeout_usec, .log_output = true },
                        on_check_exit, h, &h->child);
        if (r < 0) {
                free(h);
                return r;
        }
        log_job(LOG_NOTICE, job_id, "self-test", "Running health check (deadline %lld s): %s",
                (long long) config->update.health_timeout, script);
        *ret = h;
        return 0;
}

void health_check_free(struct health_check *h) {
        if (!h)
                return;
        child_free(h->child);
        free(h);
}
