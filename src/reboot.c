/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "child.h"
#include "clock.h"
#include "config.h"
#include "log.h"
#include "reboot.h"
#include "subprocess.h"

#define MARKER_POLL_USEC USEC_PER_SEC

struct reboot {
        struct otad *otad;
        char *job_id;
        sd_event_source *timer;
        struct child *child;
        reboot_due_fn due;
        reboot_failed_fn failed;
        bool started;
        void *userdata;
};

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct reboot *rb = userdata;
        const struct otad_config *config = rb->otad->config;

        if (config->update.reboot_policy == REBOOT_MARKER && access(config->update.reboot_marker, F_OK) < 0) {
                (void) sd_event_source_set_time_relative(s, MARKER_POLL_USEC);
                (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
                return 0;
        }
        rb->timer = sd_event_source_disable_unref(rb->timer);
        rb->due(rb->userdata);
        return 0;
}

int reboot_new(struct otad *otad, const char *job_id, reboot_failed_fn failed, void *userdata,
               struct reboot **ret) {
        struct reboot *rb;

        assert_return(otad && job_id && failed && ret, -EINVAL);
        rb = calloc(1, sizeof(*rb));
        if (!rb)
                return -ENOMEM;
        *rb = (struct reboot){ .otad = otad, .job_id = strdup(job_id), .failed = failed, .userdata = userdata };
        if (!rb->job_id) {
                free(rb);
                return -ENOMEM;
        }
        *ret = rb;
        return 0;
}

int reboot_schedule(struct reboot *rb, const char *why, reboot_due_fn due) {
        const struct otad_config *config = rb->otad->config;
        uint64_t delay = 0;

        assert_return(rb && why && due, -EINVAL);
        if (rb->timer)
                return -EALREADY;
        rb->due = due;
        if (config->update.reboot_policy == REBOOT_DELAY && config->update.reboot_delay > 0) {
                delay = (uint64_t) config->update.reboot_delay * USEC_PER_SEC;
                log_job(LOG_NOTICE, rb->job_id, "reboot", "Rebooting in %lld s to %s",
                        (long long) config->update.reboot_delay, why);
        } else if (config->update.reboot_policy == REBOOT_MARKER)
                log_job(LOG_NOTICE, rb->job_id, "reboot", "Rebooting once %s exists, to %s",
                        config->update.reboot_marker, why);
        return sd_event_add_time_relative(rb->otad->event, &rb->timer, CLOCK_MONOTONIC, delay, 0, on_timer, rb);
}

static void on_command_exit(struct child *c, int wait_status, bool timed_out, void *userdata) {
        struct reboot *rb = userdata;
        const char *command = rb->otad->config->update.reboot_command;
        char how[128], detail[384];

        if (!timed_out && WIFEXITED(wait_status) && WEXITSTATUS(wait_status) == 0) {
                log_job(LOG_NOTICE, rb->job_id, "reboot", "Reboot requested; waiting to be stopped");
                return;
        }
        child_describe_exit(wait_status, timed_out, 0, how, sizeof(how));
        snprintf(detail, sizeof(detail), "reboot command \"%s\" failed: %s", command, how);
        log_job(LOG_ERR, rb->job_id, "reboot", "%s", detail);
        rb->failed(detail, rb->userdata);
}

static int on_failed_later(sd_event_source *s, void *userdata) {
        struct reboot *rb = userdata;
        char detail[384];

        rb->timer = sd_event_source_disable_unref(rb->timer);
        snprintf(detail, sizeof(detail), "cannot run reboot command \"%s\"", rb->otad->config->update.reboot_command);
        rb->failed(detail, rb->userdata);
        return 0;
}

int reboot_run(struct reboot *rb) {
        const char *command = rb->otad->config->update.reboot_command;
        char **argv = NULL;
        int r;

        assert_return(rb, -EINVAL);
        if (rb->started)
                return -EALREADY;
        rb->started = true;
        r = subprocess_split_command(command, &argv);
        if (r >= 0)
                r = child_start(rb->otad->event, argv,
                                &(const struct child_options){ .job_id = rb->job_id, .stage = "reboot",
                                                               .log_output = true },
                                on_command_exit, rb, &rb->child);
        subprocess_argv_free(argv);
        if (r < 0) {
                log_job_errno(LOG_ERR, r, rb->job_id, "reboot", "Failed to run reboot command \"%s\": %m", command);
                /* Reported from the loop, like every other outcome. */
                return sd_event_add_defer(rb->otad->event, &rb->timer, on_failed_later, rb);
        }
        log_job(LOG_NOTICE, rb->job_id, "reboot", "Running \"%s\"", command);
        return 0;
}

void reboot_free(struct reboot *rb) {
        if (!rb)
                return;
        sd_event_source_disable_unref(rb->timer);
        child_free(rb->child);
        free(rb->job_id);
        free(rb);
}
