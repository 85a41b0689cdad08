/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>

#include "config.h"
#include "custom_jobs.h"
#include "daemon.h"
#include "fileio.h"
#include "jobs.h"
#include "log.h"
#include "macro.h"
#include "mqtt.h"
#include "ota.h"

void otad_set_status(struct otad *otad, const char *format, ...) {
        char status[256];
        va_list ap;

        va_start(ap, format);
        vsnprintf(status, sizeof(status), format, ap);
        va_end(ap);
        if (strcmp(status, otad->status) == 0)
                return;
        memcpy(otad->status, status, sizeof(status));
        log_debug("Status: %s", status);
        sd_notifyf(false, "STATUS=%s", status);
}

/* The update's part of the STATUS= line, as the OTA handler tells it. */
static void on_update_status(const char *job_id, const char *stage, int percent, void *userdata) {
        struct otad *otad = userdata;

        if (!job_id)
                otad_set_status(otad, "idle, waiting for jobs");
        else if (percent >= 0)
                otad_set_status(otad, "job %s: %s, %d%%", job_id, stage, percent);
        else
                otad_set_status(otad, "job %s: %s", job_id, stage);
}

static int on_terminate(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        struct otad *otad = userdata;

        log_milestone(LOG_INFO, OTAD_MID_STOPPING, NULL, NULL, "Received %s, stopping", strsignal((int) si->ssi_signo));
        sd_notify(false, "STOPPING=1");
        otad_set_status(otad, "stopping");
        return sd_event_exit(sd_event_source_get_event(s), 0);
}

/* Reloading would mean swapping the broker, the targets or the slots under
 * an update in flight; a restart is the one safe way to apply a new
 * configuration, and systemd's Restart= makes that cheap. */
static int on_hangup(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        log_notice("Received SIGHUP, ignoring: restart otad to apply a changed configuration");
        return 0;
}

int otad_new(struct otad_config *config, struct otad **ret) {
        struct otad *otad;
        sigset_t mask;
        int r;

        otad = calloc(1, sizeof(*otad));
        if (!otad)
                return log_error_errno(-ENOMEM, "Out of memory");
        otad->config = config;

        /* The state directory holds what must survive kill -9 and power
         * cuts; it is private to otad. */
        r = mkdir_p(config->state.directory, 0700);
        if (r < 0) {
                log_error_errno(r, "Failed to create state directory %s: %m", config->state.directory);
                goto fail;
        }

        r = sd_event_default(&otad->event);
        if (r < 0) {
                log_error_errno(r, "Failed to create event loop: %m");
                goto fail;
        }
        /* sd-event needs the signals blocked to receive them through
         * signalfd; SIGCHLD too, for handler and installer processes. */
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        sigaddset(&mask, SIGCHLD);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        r = sd_event_add_signal(otad->event, NULL, SIGTERM, on_terminate, otad);
        if (r >= 0)
                r = sd_event_add_signal(otad->event, NULL, SIGINT, on_terminate, otad);
        if (r >= 0)
                r = sd_event_add_signal(otad->event, NULL, SIGHUP, on_hangup, otad);
        if (r < 0) {
                log_error_errno(r, "Failed to add signal handlers: %m");
                goto fail;
        }
        /* Sends WATCHDOG=1 at half of WatchdogSec= from the loop itself: a
         * stuck loop stops the pings and systemd restarts us. */
        r = sd_event_set_watchdog(otad->event, true);
        if (r < 0) {
                log_error_errno(r, "Failed to enable the watchdog: %m");
                goto fail;
        }

        /* Transport first, then the Jobs client on it, then the handlers
         * that register with the Jobs client; each logs its own failure. */
        r = mqtt_session_new(otad, &otad->mqtt);
        if (r >= 0)
                r = jobs_new(otad, &otad->jobs);
        if (r >= 0)
                r = ota_new(otad, on_update_status, otad, &otad->ota);
        if (r >= 0)
                r = custom_jobs_new(otad, &otad->custom);
        if (r < 0)
                goto fail;

        *ret = otad;
        return 0;
fail:
        otad_free(otad);
        return r;
}

int otad_run(struct otad *otad) {
        int r;

        log_milestone(LOG_INFO, OTAD_MID_STARTED, NULL, NULL, "otad %s started for thing %s",
                      OTAD_VERSION, otad->config->mqtt.thing_name);
        r = mqtt_session_start(otad->mqtt);
        if (r < 0)
                return r;
        sd_notify(false, "READY=1");

        r = sd_event_loop(otad->event);
        if (r < 0)
                return log_error_errno(r, "Event loop failed: %m");
        return 0;
}

void otad_free(struct otad *otad) {
        if (!otad)
                return;
        /* Reverse order: handlers stop their work (killing handler
         * processes) before the Jobs client and the session go away. */
        custom_jobs_free(otad->custom);
        ota_free(otad->ota);
        jobs_free(otad->jobs);
        mqtt_session_free(otad->mqtt);
        sd_event_unref(otad->event);
        free(otad);
}
