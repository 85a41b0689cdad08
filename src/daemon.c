/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>

#include "clock.h"
#include "config.h"
#include "custom_jobs.h"
#include "daemon.h"
#include "fileio.h"
#include "jobs.h"
#include "log.h"
#include "macro.h"
#include "mqtt.h"
#include "ota.h"

/* ---- STATUS= ------------------------------------------------------------ */

/* One line from the parts: "connected to host:8883; job J: verifying". The
 * update pipeline's part names the job it is about; it stands in for the
 * Jobs client's part while that job runs (or before the Jobs client heard
 * of it, e.g. a self-test right after a reboot). */
static void status_publish(struct otad *otad) {
        struct otad_status *st = &otad->status;
        char line[sizeof(st->line)], job[sizeof(st->job) + sizeof(st->update) + 80];

        if (st->stopping)
                snprintf(line, sizeof(line), "stopping");
        else {
                if (st->update[0] && (!st->job_id[0] || strcmp(st->job_id, st->update_job_id) == 0))
                        snprintf(job, sizeof(job), "job %s: %s", st->update_job_id, st->update);
                else
                        snprintf(job, sizeof(job), "%s", st->job);
                snprintf(line, sizeof(line), "%s%s%s", st->link, st->link[0] && job[0] ? "; " : "", job);
        }
        if (strcmp(line, st->line) == 0)
                return;
        snprintf(st->line, sizeof(st->line), "%s", line);
        log_debug("Status: %s", line);
        sd_notifyf(false, "STATUS=%s", line);
}

static void on_link(const struct mqtt_link *link, void *userdata) {
        struct otad *otad = userdata;
        char *buf = otad->status.link;
        size_t size = sizeof(otad->status.link);

        switch (link->state) {
        case MQTT_LINK_RESOLVING:
                snprintf(buf, size, "looking up %s", link->host);
                break;
        case MQTT_LINK_CONNECTING:
                snprintf(buf, size, "connecting to %s:%d (%s)", link->host, link->port, link->address);
                break;
        case MQTT_LINK_CONNECTED:
                snprintf(buf, size, "connected to %s:%d", link->host, link->port);
                break;
        case MQTT_LINK_WAITING:
                snprintf(buf, size, "reconnecting in %" PRIu64 " s: %.160s",
                         (link->retry_usec + USEC_PER_SEC / 2) / USEC_PER_SEC, link->reason ? link->reason : "");
                break;
        }
        status_publish(otad);
}

/* The update's part, as the OTA handler tells it (ota_status_fn): stage
 * (and percent, when >= 0) of job_id; job_id NULL clears it. */
static void on_update_progress(const char *job_id, const char *stage, int percent, void *userdata) {
        struct otad_status *st = &((struct otad *) userdata)->status;

        if (!job_id || !stage) {
                st->update[0] = st->update_job_id[0] = '\0';
        } else {
                snprintf(st->update_job_id, sizeof(st->update_job_id), "%.64s", job_id);
                if (percent >= 0)
                        snprintf(st->update, sizeof(st->update), "%s, %d%%", stage, percent);
                else
                        snprintf(st->update, sizeof(st->update), "%s", stage);
        }
        status_publish(userdata);
}

static void on_jobs(const struct jobs_state *state, void *userdata) {
        struct otad *otad = userdata;
        struct otad_status *st = &otad->status;

        switch (state->activity) {
        case JOBS_IDLE:
                snprintf(st->job, sizeof(st->job), "no pending job");
                break;
        case JOBS_RUNNING:
                snprintf(st->job, sizeof(st->job), "job %s (%s)", state->job_id, state->handler);
                break;
        case JOBS_FINISHED:
                snprintf(st->job, sizeof(st->job), "job %s %s", state->job_id, job_status_to_string(state->status));
                break;
        case JOBS_DROPPED:
                snprintf(st->job, sizeof(st->job), "job %s no longer offered", state->job_id);
                break;
        }
        snprintf(st->job_id, sizeof(st->job_id), "%.64s", state->activity == JOBS_RUNNING ? state->job_id : "");
        /* What the pipeline said about another job, or about this one before
         * it ended, is over. */
        if (state->activity != JOBS_RUNNING || strcmp(st->update_job_id, state->job_id) != 0)
                st->update[0] = st->update_job_id[0] = '\0';
        status_publish(otad);
}

static int on_terminate(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        struct otad *otad = userdata;

        log_milestone(LOG_INFO, OTAD_MID_STOPPING, NULL, NULL, "Received %s, stopping", strsignal((int) si->ssi_signo));
        sd_notify(false, "STOPPING=1");
        otad->status.stopping = true;
        status_publish(otad);
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
                r = mqtt_add_link_observer(otad->mqtt, on_link, otad);
        if (r >= 0)
                r = jobs_new(otad, &otad->jobs);
        if (r >= 0)
                r = jobs_add_observer(otad->jobs, on_jobs, otad);
        if (r >= 0)
                r = ota_new(otad, on_update_progress, otad, &otad->ota);
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
