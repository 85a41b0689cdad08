/* SPDX-License-Identifier: MIT */
/*
 * update: the life of an update after its slot was activated (protocol.md
 * §2.5, §6.6): the "ready" report and the reboot; after the boot, the
 * version check, "active", the health check, and commit (mark good,
 * SUCCEEDED) or rollback (mark bad, FAILED, reboot into the old slot).
 * Every decision is persisted before it is acted on or reported, so a crash
 * or a power cut at any point resumes into the same decision.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <systemd/sd-event.h>
#include <unistd.h>

#include "bootloader.h"
#include "config.h"
#include "installer.h"
#include "log.h"
#include "macro.h"
#include "ota_private.h"
#include "slot.h"
#include "status.h"
#include "subprocess.h"

/* How long a terminal report may take before a rollback reboots anyway:
 * the decision is persisted and is reported again after the reboot. */
#define REPORT_WAIT_USEC (30 * 1000000ULL)
#define MARKER_POLL_USEC (1000000ULL)

static const char *state_dir(struct ota *ota) {
        return ota->otad->config->state.directory;
}

static void save(struct ota *ota) {
        int r = update_state_save(state_dir(ota), UPDATE_STATE_FILE, &ota->state);

        if (r < 0)
                log_job(LOG_ERR, ota->state.job_id, update_stage_to_string(ota->state.stage),
                        "Failed to persist the update state: %s", strerror(-r));
}

static void stop_timer(struct ota *ota) {
        ota->timer = sd_event_source_disable_unref(ota->timer);
}

static void stop_child(struct ota *ota) {
        ota->child_source = sd_event_source_disable_unref(ota->child_source);
        if (ota->child > 0) {
                kill(ota->child, SIGKILL);
                waitpid(ota->child, NULL, 0);
        }
        ota->child = -1;
}

void update_stop(struct ota *ota) {
        stop_timer(ota);
        stop_child(ota);
}

static int arm_timer(struct ota *ota, uint64_t usec, sd_event_time_handler_t fn) {
        stop_timer(ota);
        return sd_event_add_time_relative(ota->otad->event, &ota->timer, CLOCK_MONOTONIC, usec, 0, fn, ota);
}

void update_retire(struct ota *ota) {
        bool waiting = ota->job_waiting;

        update_state_save(state_dir(ota), UPDATE_LAST_FILE, &ota->state);
        update_state_remove(state_dir(ota), UPDATE_STATE_FILE);
        log_full(LOG_INFO, 0, &(const struct log_fields){ .message_id = OTAD_MID_JOB_FINISHED, .job_id = ota->state.job_id },
                 "Job %s ended %s (%s)", ota->state.job_id, ota->state.result, ota->state.reason);
        ota_forget_job(ota);
        ota->job_waiting = false;
        if (waiting)
                jobs_request_refresh(ota->otad->jobs);
}

static void start_reboot(struct ota *ota, const char *why);

static int on_report_wait_over(sd_event_source *s, uint64_t usec, void *userdata) {
        struct ota *ota = userdata;

        log_job(LOG_WARNING, ota->state.job_id, "rollback",
                "The service has not confirmed the result yet; rebooting anyway, it is reported after the reboot");
        start_reboot(ota, "roll back to the previous slot");
        return 0;
}

static void on_terminal_done(int result, void *userdata) {
        struct ota *ota = userdata;

        /* The report-wait timer is moot now, unless it already started the
         * reboot (whose delay or marker timer it then is). */
        if (!ota->reboot_requested)
                stop_timer(ota);
        if (result < 0)
                log_job(LOG_WARNING, ota->state.job_id, "report", "The service did not take the final status: %s",
                        strerror(-result));
        ota->state.reported = result >= 0;
        /* A rollback decided on the new slot goes back to the old one now
         * that the service knows; the record is retired after that boot. */
        if (ota->state.stage == UPDATE_ROLLED_BACK && ota->state.reboot_requested) {
                save(ota);
                if (!ota->reboot_requested)
                        start_reboot(ota, "roll back to the previous slot");
                return;
        }
        update_retire(ota);
}

static void send_terminal(struct ota *ota) {
        char updated_by[80];
        struct status_detail details[4];
        size_t n = 0;
        enum job_status status = strcmp(ota->state.result, "SUCCEEDED") == 0 ? JOB_SUCCEEDED : JOB_FAILED;

        details[n++] = (struct status_detail){ "reason", ota->state.reason };
        /* After a self-test the reference agent names the version that did
         * the download, with its two-space quirk: "  v1.0.0". */
        if (status == JOB_SUCCEEDED && ota->state.new_slot[0]) {
                snprintf(updated_by, sizeof(updated_by), "  v%s", ota->state.old_version);
                details[n++] = (struct status_detail){ "updatedBy", updated_by };
        }
        if (ota->state.detail[0])
                details[n++] = (struct status_detail){ "detail", ota->state.detail };
        details[n] = (struct status_detail){ NULL, NULL };
        if (ota_report(ota, status, details, 0, on_terminal_done) < 0)
                on_terminal_done(-EINVAL, ota);
}

void update_finish(struct ota *ota, enum update_stage stage, const char *result, const char *reason,
                   const char *detail) {
        const char *mid = stage == UPDATE_COMMITTED ? OTAD_MID_COMMITTED
                        : stage == UPDATE_ROLLED_BACK ? OTAD_MID_ROLLED_BACK
                                                      : OTAD_MID_UPDATE_FAILED;

        ota->state.stage = stage;
        snprintf(ota->state.result, sizeof(ota->state.result), "%s", result);
        snprintf(ota->state.reason, sizeof(ota->state.reason), "%s", reason);
        snprintf(ota->state.detail, sizeof(ota->state.detail), "%s", detail ? detail : "");
        ota->state.reported = false;
        save(ota);
        log_full(stage == UPDATE_COMMITTED ? LOG_NOTICE : LOG_ERR, 0,
                 &(const struct log_fields){ .message_id = mid, .job_id = ota->state.job_id,
                                             .stage = update_stage_to_string(stage),
                                             .slot = ota->state.new_slot[0] ? ota->state.new_slot : NULL },
                 "Job %s %s: %s%s%s", ota->state.job_id,
                 stage == UPDATE_COMMITTED ? "committed" : stage == UPDATE_ROLLED_BACK ? "rolled back" : "failed",
                 reason, detail && *detail ? ": " : "", detail ? detail : "");
        otad_set_status(ota->otad, "job %s: %s", ota->state.job_id, update_stage_to_string(stage));
        /* A rollback on the new slot reboots once the service has the
         * result, or after REPORT_WAIT_USEC: it is persisted and reported
         * again after that boot anyway. */
        if (stage == UPDATE_ROLLED_BACK && ota->state.reboot_requested)
                arm_timer(ota, REPORT_WAIT_USEC, on_report_wait_over);
        if (ota->job_present) {
                ota->terminal_sent = true;
                send_terminal(ota);
        } else if ((ota->job_id || ota->job_waiting) && !(stage == UPDATE_ROLLED_BACK && ota->state.reboot_requested))
                update_retire(ota); /* cancelled, or another job is next: nobody asks for this result */
        /* else: decided after a reboot before the service delivered the job
         * again (update_job_delivered() reports it), or rolling back first. */
}

/* reboot */

static int on_reboot_exit(sd_event_source *s, const siginfo_t *si, void *userdata) {
        struct ota *ota = userdata;
        char how[64];

        ota->child_source = sd_event_source_disable_unref(ota->child_source);
        ota->child = -1;
        if (si->si_code == CLD_EXITED && si->si_status == 0) {
                log_job(LOG_NOTICE, ota->state.job_id, "reboot", "Reboot requested; waiting to be stopped");
                otad_set_status(ota->otad, "job %s: rebooting", ota->state.job_id);
                return 0;
        }
        if (si->si_code == CLD_EXITED)
                snprintf(how, sizeof(how), "exit status %d", si->si_status);
        else
                snprintf(how, sizeof(how), "killed by signal %d", si->si_status);
        log_job(LOG_ERR, ota->state.job_id, "reboot", "Reboot command \"%s\" failed: %s",
                ota->otad->config->update.reboot_command, how);
        if (ota->state.stage == UPDATE_ACTIVATED) {
                char reason[64], detail[256];

                /* Undo the try-once, so that no later reboot boots an
                 * image nobody watched over. */
                if (ota->bootloader)
                        bootloader_mark_bad(ota->bootloader, ota->state.new_slot);
                ota->state.reboot_requested = false;
                ota_format_reason(reason, sizeof(reason), NULL, OTA_PAL_ACTIVATE_FAILED, 0);
                snprintf(detail, sizeof(detail), "reboot command \"%s\" failed: %s",
                         ota->otad->config->update.reboot_command, how);
                update_finish(ota, UPDATE_FAILED, "FAILED", reason, detail);
        }
        return 0;
}

static void run_reboot_command(struct ota *ota) {
        char **argv = NULL;
        pid_t pid;
        int r;

        stop_timer(ota);
        ota->state.reboot_requested = true;
        save(ota);
        r = subprocess_split_command(ota->otad->config->update.reboot_command, &argv);
        if (r >= 0)
                r = subprocess_start(argv, NULL, -1, -1, &pid);
        subprocess_argv_free(argv);
        if (r >= 0)
                r = sd_event_add_child(ota->otad->event, &ota->child_source, pid, WEXITED, on_reboot_exit, ota);
        if (r < 0) {
                log_job(LOG_ERR, ota->state.job_id, "reboot", "Failed to run reboot command \"%s\": %s",
                        ota->otad->config->update.reboot_command, strerror(-r));
                return;
        }
        ota->child = pid;
        log_job(LOG_NOTICE, ota->state.job_id, "reboot", "Running \"%s\"", ota->otad->config->update.reboot_command);
}

static int on_reboot_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct ota *ota = userdata;
        const struct otad_config *config = ota->otad->config;

        if (config->update.reboot_policy == REBOOT_MARKER && access(config->update.reboot_marker, F_OK) < 0) {
                arm_timer(ota, MARKER_POLL_USEC, on_reboot_timer);
                return 0;
        }
        run_reboot_command(ota);
        return 0;
}

static void start_reboot(struct ota *ota, const char *why) {
        const struct otad_config *config = ota->otad->config;

        ota->reboot_requested = true;
        otad_set_status(ota->otad, "job %s: reboot to %s", ota->state.job_id, why);
        if (config->update.reboot_policy == REBOOT_DELAY && config->update.reboot_delay > 0) {
                log_job(LOG_NOTICE, ota->state.job_id, "reboot", "Rebooting in %lld s to %s",
                        (long long) config->update.reboot_delay, why);
                arm_timer(ota, (uint64_t) config->update.reboot_delay * 1000000ULL, on_reboot_timer);
        } else if (config->update.reboot_policy == REBOOT_MARKER) {
                log_job(LOG_NOTICE, ota->state.job_id, "reboot", "Rebooting once %s exists, to %s",
                        config->update.reboot_marker, why);
                arm_timer(ota, 0, on_reboot_timer);
        } else
                run_reboot_command(ota);
}

static void on_ready_done(int result, void *userdata) {
        struct ota *ota = userdata;

        if (result < 0)
                log_job(LOG_WARNING, ota->state.job_id, "activate",
                        "The service refused \"self_test\":\"ready\"; rebooting all the same, the self-test reports after the boot");
        start_reboot(ota, "boot the new slot");
}

static void report_ready(struct ota *ota) {
        char updated_by[64];
        const struct status_detail details[] = {
                { "self_test", "ready" },
                { "updatedBy", updated_by },
                { NULL, NULL },
        };

        ota_version_updated_by(ota->state.old_version, updated_by, sizeof(updated_by));
        if (ota_report(ota, JOB_IN_PROGRESS, details, 0, on_ready_done) < 0)
                start_reboot(ota, "boot the new slot");
}

void update_activated(struct ota *ota) {
        char reason[64], detail[160];
        const struct config_slot *booted = NULL;

        if (!ota->needs_reboot) {
                /* Files and programs take effect without a reboot: done. */
                snprintf(reason, sizeof(reason), "accepted  v%s", ota->running_version);
                snprintf(detail, sizeof(detail), "%u file(s) installed", ota->state.n_files);
                update_finish(ota, UPDATE_COMMITTED, "SUCCEEDED", reason, detail);
                return;
        }
        if (slot_booted(ota->otad->config, ota->state.slot_class, NULL, &booted) >= 0)
                snprintf(ota->state.old_slot, sizeof(ota->state.old_slot), "%s", booted->bootname);
        ota->state.stage = UPDATE_ACTIVATED;
        save(ota);
        otad_set_status(ota->otad, "job %s: slot %s activated for one boot", ota->state.job_id, ota->state.new_slot);
        report_ready(ota);
}

/* after the boot */

static void self_test_failed(struct ota *ota, unsigned code, const char *detail) {
        char reason[64];
        int r = 0;

        if (ota->bootloader)
                r = bootloader_mark_bad(ota->bootloader, ota->state.new_slot);
        if (r < 0)
                log_job(LOG_CRIT, ota->state.job_id, "rollback",
                        "Failed to mark slot %s bad: %s; the bootloader falls back on its own at the next boot",
                        ota->state.new_slot, strerror(-r));
        ota_format_reason(reason, sizeof(reason), "rejected", code, 0);
        /* Reboot into the old slot once the service has the result (or
         * after REPORT_WAIT_USEC). */
        ota->state.reboot_requested = true;
        update_finish(ota, UPDATE_ROLLED_BACK, "FAILED", reason, detail);
}

static void commit(struct ota *ota) {
        char reason[80], detail[160];
        int r = 0;

        if (ota->bootloader)
                r = bootloader_mark_good(ota->bootloader, ota->state.new_slot);
        if (r < 0) {
                snprintf(detail, sizeof(detail), "health check passed but marking slot %s good failed: %s",
                         ota->state.new_slot, strerror(-r));
                self_test_failed(ota, 0, detail);
                return;
        }
        snprintf(ota->state.new_version, sizeof(ota->state.new_version), "%s", ota->running_version);
        snprintf(reason, sizeof(reason), "accepted  v%s", ota->running_version);
        snprintf(detail, sizeof(detail), "slot %s committed", ota->state.new_slot);
        update_finish(ota, UPDATE_COMMITTED, "SUCCEEDED", reason, detail);
}

static int on_health_exit(sd_event_source *s, const siginfo_t *si, void *userdata) {
        struct ota *ota = userdata;
        char detail[256];

        ota->child_source = sd_event_source_disable_unref(ota->child_source);
        ota->child = -1;
        stop_timer(ota);
        if (si->si_code == CLD_EXITED && si->si_status == 0) {
                log_job(LOG_NOTICE, ota->state.job_id, "self-test", "Health check passed");
                commit(ota);
                return 0;
        }
        if (si->si_code == CLD_EXITED)
                snprintf(detail, sizeof(detail), "health check failed: exit status %d", si->si_status);
        else
                snprintf(detail, sizeof(detail), "health check failed: killed by signal %d", si->si_status);
        self_test_failed(ota, 0, detail);
        return 0;
}

static int on_health_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        struct ota *ota = userdata;
        char detail[128];

        stop_child(ota);
        snprintf(detail, sizeof(detail), "health check did not pass within %lld s",
                 (long long) ota->otad->config->update.health_timeout);
        self_test_failed(ota, 0, detail);
        return 0;
}

static void report_active(struct ota *ota) {
        char updated_by[64];
        const struct status_detail details[] = {
                { "self_test", "active" },
                { "updatedBy", updated_by },
                { NULL, NULL },
        };

        if (ota->active_reported || !ota->job_present)
                return;
        ota->active_reported = true;
        ota_version_updated_by(ota->running_version, updated_by, sizeof(updated_by));
        ota_report(ota, JOB_IN_PROGRESS, details, 0, NULL);
}

static void run_health_check(struct ota *ota) {
        const struct otad_config *config = ota->otad->config;
        _cleanup_free_ char *script = NULL;
        char *argv[] = { (char *) "/bin/sh", (char *) "-c", NULL, NULL };
        pid_t pid;
        int r;

        if (!config->update.wait_system_running && !*config->update.health_check) {
                log_job(LOG_NOTICE, ota->state.job_id, "self-test", "No health check configured; committing");
                commit(ota);
                return;
        }
        /* "degraded" is a failed unit: not healthy enough to commit. */
        if (asprintf(&script, "%s%s%s", config->update.wait_system_running ? "systemctl is-system-running --wait" : "",
                     config->update.wait_system_running && *config->update.health_check ? " && " : "",
                     config->update.health_check) < 0)
                return;
        argv[2] = script;
        r = subprocess_start(argv, NULL, -1, -1, &pid);
        if (r >= 0)
                r = sd_event_add_child(ota->otad->event, &ota->child_source, pid, WEXITED, on_health_exit, ota);
        if (r < 0) {
                char detail[128];

                snprintf(detail, sizeof(detail), "cannot run the health check: %s", strerror(-r));
                self_test_failed(ota, 0, detail);
                return;
        }
        ota->child = pid;
        arm_timer(ota, (uint64_t) config->update.health_timeout * 1000000ULL, on_health_timeout);
        log_job(LOG_NOTICE, ota->state.job_id, "self-test", "Running health check: %s", script);
        otad_set_status(ota->otad, "job %s: self-test of slot %s", ota->state.job_id, ota->state.new_slot);
}

/* Booted the new slot: check the version, then let the health check decide. */
static void start_self_test(struct ota *ota) {
        const struct otad_config *config = ota->otad->config;
        int cmp = ota_version_compare(ota->running_version, ota->state.old_version);
        char detail[256];

        ota->state.stage = UPDATE_TESTING;
        save(ota);
        log_job(LOG_NOTICE, ota->state.job_id, "self-test", "Booted slot %s with version %s (was %s)",
                ota->state.new_slot, ota->running_version, ota->state.old_version);
        if (cmp == 0 && !config->update.allow_same_version) {
                snprintf(detail, sizeof(detail), "the new slot runs the same version %s as before",
                         ota->running_version);
                self_test_failed(ota, OTA_ERR_SAME_VERSION, detail);
                return;
        }
        if (cmp < 0 && !config->update.allow_downgrade) {
                snprintf(detail, sizeof(detail), "downgrade from %s to %s refused", ota->state.old_version,
                         ota->running_version);
                self_test_failed(ota, OTA_ERR_DOWNGRADE, detail);
                return;
        }
        report_active(ota);
        run_health_check(ota);
}

/* The bootloader booted the old slot although the new one was set to boot
 * once: it fell back (the new kernel or init failed, or a watchdog reset). */
static void fell_back(struct ota *ota, const char *booted) {
        char detail[256];
        int r = 0;

        if (ota->bootloader)
                r = bootloader_mark_bad(ota->bootloader, ota->state.new_slot);
        if (r < 0)
                log_job(LOG_ERR, ota->state.job_id, "rollback", "Failed to mark slot %s bad: %s", ota->state.new_slot,
                        strerror(-r));
        snprintf(detail, sizeof(detail),
                 "booted slot %s although slot %s was activated for one boot: the bootloader fell back", booted,
                 ota->state.new_slot);
        ota->state.reboot_requested = false;
        update_finish(ota, UPDATE_ROLLED_BACK, "FAILED", "rejected: 0x00000010", detail);
}

/* otad started with an activated update in the state directory. */
static void resume_activated(struct ota *ota) {
        const struct config_slot *booted = NULL;
        int r;

        if (!ota->state.reboot_requested)
                return; /* not rebooted yet: the job's next delivery goes on with "ready" */
        r = slot_booted(ota->otad->config, ota->state.slot_class, NULL, &booted);
        if (r < 0) {
                log_job(LOG_ERR, ota->state.job_id, "self-test", "Cannot tell which slot is booted: %s", strerror(-r));
                return;
        }
        ota->state.reboot_requested = false;
        if (strcmp(booted->bootname, ota->state.new_slot) == 0)
                start_self_test(ota);
        else
                fell_back(ota, booted->bootname);
}

/* With no update in flight, the booted slot is good: tell the bootloader on
 * every start, or schemes that count boots (U-Boot's BOOT_x_LEFT) would
 * eventually fall back from a healthy slot (what rauc-mark-good does). */
static void mark_booted_good(struct ota *ota) {
        const struct otad_config *config = ota->otad->config;
        const struct config_slot *booted = NULL;

        if (!ota->bootloader)
                return;
        for (size_t i = 0; i < config->n_targets; i++) {
                if (config->targets[i].type != TARGET_AB)
                        continue;
                if (slot_booted(config, config->targets[i].slot_class, NULL, &booted) >= 0)
                        bootloader_mark_good(ota->bootloader, booted->bootname);
        }
}

/* `otad status` shows each slot's version as of its last boot. */
static void record_booted_versions(struct ota *ota) {
        const struct otad_config *config = ota->otad->config;
        const struct config_slot *booted = NULL;

        for (size_t i = 0; i < config->n_targets; i++)
                if (config->targets[i].type == TARGET_AB &&
                    slot_booted(config, config->targets[i].slot_class, NULL, &booted) >= 0)
                        status_record_slot_version(config, booted->bootname, ota->running_version);
}

void update_resume(struct ota *ota) {
        struct update_state saved;

        record_booted_versions(ota);
        if (update_state_load(state_dir(ota), UPDATE_STATE_FILE, &saved) < 0) {
                mark_booted_good(ota);
                otad_set_status(ota->otad, "idle, waiting for jobs");
                return;
        }
        if (saved.stage < UPDATE_ACTIVATED)
                return; /* the job's next delivery resumes the download */
        /* ota->job_id stays NULL until the service delivers the job again. */
        ota->state = saved;
        log_job(LOG_NOTICE, saved.job_id, update_stage_to_string(saved.stage), "Found update of job %s in stage %s",
                saved.job_id, update_stage_to_string(saved.stage));
        if (update_stage_is_terminal(saved.stage)) {
                const struct config_slot *booted = NULL;
                bool on_new_slot = saved.new_slot[0] &&
                                   slot_booted(ota->otad->config, saved.slot_class, NULL, &booted) >= 0 &&
                                   strcmp(booted->bootname, saved.new_slot) == 0;

                if (saved.stage == UPDATE_ROLLED_BACK && on_new_slot) {
                        /* Decided, not yet back on the old slot. */
                        arm_timer(ota, REPORT_WAIT_USEC, on_report_wait_over);
                        return;
                }
                ota->state.reboot_requested = false;
                if (saved.reported) {
                        update_retire(ota); /* e.g. back on the old slot after a reported rollback */
                        mark_booted_good(ota);
                }
                return;
        }
        if (saved.stage == UPDATE_ACTIVATED || saved.stage == UPDATE_TESTING) {
                ota->state.reboot_requested = saved.reboot_requested || saved.stage == UPDATE_TESTING;
                resume_activated(ota);
        }
}

void update_job_delivered(struct ota *ota) {
        switch (ota->state.stage) {
        case UPDATE_ACTIVATED:
                if (!ota->state.reboot_requested && !ota->reboot_requested)
                        report_ready(ota);
                break;
        case UPDATE_TESTING:
                report_active(ota);
                break;
        case UPDATE_COMMITTED:
        case UPDATE_ROLLED_BACK:
        case UPDATE_FAILED:
                if (!ota->state.reported && !ota->terminal_sent) {
                        ota->terminal_sent = true;
                        if (ota->state.stage == UPDATE_COMMITTED)
                                report_active(ota);
                        send_terminal(ota);
                }
                break;
        default:
                break;
        }
}
