/* SPDX-License-Identifier: MIT */
#include <cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "config.h"
#include "jobs.h"
#include "lifecycle.h"
#include "log.h"
#include "macro.h"
#include "ota.h"
#include "ota_document.h"
#include "state.h"
#include "version.h"

/* The reference agent's codes for a document it cannot use (protocol.md
 * §2.4): OtaErrJobParserError / OtaJobParseErrNonConformingJobDoc, and
 * OtaErrInvalidDataProtocol. */
#define OTA_ERR_JOB_PARSER 0x0c
#define OTA_JOB_PARSE_NON_CONFORMING 0x04
#define OTA_ERR_INVALID_DATA_PROTOCOL 0x0d

struct ota {
        struct otad *otad;
        struct job_handler handler;
        struct lifecycle *lc;
        ota_status_fn status;
        void *status_userdata;

        char *job_id;        /* the job the service offers us now, NULL none */
        bool job_gone;       /* the update's job was cancelled: its reports go nowhere */
        bool job_waiting;    /* a new job waits for another update's decision */
        /* Reports owed to the update's job until the service delivers it
         * (again, after a restart or a reboot). */
        bool owe_ready, owe_active, owe_finished;
        uint64_t last_progress_usec;
        char last_progress[256]; /* the job and details of the last progress report */
};

static bool offered(const struct ota *ota, const struct state_record *rec) {
        return ota->job_id && rec && strcmp(ota->job_id, rec->job_id) == 0;
}

static int report(struct ota *ota, enum job_status status, const struct status_detail *details, unsigned flags,
                  jobs_update_done_fn done) {
        int r;

        r = jobs_update(ota->otad->jobs, ota->job_id, status, details, flags, done, ota);
        if (r < 0)
                log_job_errno(LOG_WARNING, r, ota->job_id, NULL, "Failed to send the %s update: %m",
                              job_status_to_string(status));
        return r;
}

static void set_status(struct ota *ota, const struct state_record *rec, int percent) {
        if (ota->status)
                ota->status(rec ? rec->job_id : NULL, rec ? stage_to_string(rec->stage) : NULL, percent,
                            ota->status_userdata);
}

/* reports in the reference agent's forms (protocol.md §2.4, §2.5) */

static void on_ready_done(int result, void *userdata) {
        struct ota *ota = userdata;

        lifecycle_ready_reported(ota->lc, result);
}

static void report_ready(struct ota *ota, const struct state_record *rec) {
        char updated_by[64];
        const struct status_detail details[] = {
                { "self_test", "ready" },
                { "updatedBy", updated_by },
                { NULL, NULL },
        };

        ota->owe_ready = false;
        version_updated_by(rec->old_version, updated_by, sizeof(updated_by));
        if (report(ota, JOB_IN_PROGRESS, details, 0, on_ready_done) < 0)
                lifecycle_ready_reported(ota->lc, -EIO);
}

static void report_active(struct ota *ota, const struct state_record *rec) {
        char updated_by[64];
        const struct status_detail details[] = {
                { "self_test", "active" },
                { "updatedBy", updated_by },
                { NULL, NULL },
        };
        _cleanup_free_ char *running = NULL;

        ota->owe_active = false;
        if (version_running(ota->otad->config, &running) < 0)
                return;
        version_updated_by(running, updated_by, sizeof(updated_by));
        (void) report(ota, JOB_IN_PROGRESS, details, 0, NULL);
}

static void on_finished_done(int result, void *userdata) {
        struct ota *ota = userdata;

        lifecycle_reported(ota->lc, result);
}

static void report_finished(struct ota *ota, const struct state_record *rec) {
        enum job_status status = strcmp(rec->result, "SUCCEEDED") == 0 ? JOB_SUCCEEDED : JOB_FAILED;
        struct status_detail details[6];
        char updated_by[80], fetched[24], reused[24];
        size_t n = 0;

        ota->owe_finished = false;
        details[n++] = (struct status_detail){ "reason", rec->reason };
        /* After a self-test the reference agent names the version that did
         * the download, with its two-space quirk: "  v1.0.0". */
        if (status == JOB_SUCCEEDED && rec->new_slot[0]) {
                snprintf(updated_by, sizeof(updated_by), "  v%s", rec->old_version);
                details[n++] = (struct status_detail){ "updatedBy", updated_by };
        }
        if (rec->detail[0])
                details[n++] = (struct status_detail){ "detail", rec->detail };
        if (rec->fetched || rec->reused) {
                snprintf(fetched, sizeof(fetched), "%" PRIu64, rec->fetched);
                snprintf(reused, sizeof(reused), "%" PRIu64, rec->reused);
                details[n++] = (struct status_detail){ "fetched", fetched };
                details[n++] = (struct status_detail){ "reused", reused };
        }
        details[n] = (struct status_detail){ NULL, NULL };
        if (report(ota, status, details, 0, on_finished_done) < 0)
                lifecycle_reported(ota->lc, -EIO);
}

/* The update's job was delivered (again): what it is owed goes out now. */
static void deliver_owed(struct ota *ota) {
        const struct state_record *rec = lifecycle_record(ota->lc);

        if (!offered(ota, rec))
                return;
        if (ota->owe_ready)
                report_ready(ota, rec);
        if (ota->owe_active)
                report_active(ota, rec);
        if (ota->owe_finished)
                report_finished(ota, rec);
}

/* lifecycle_ops */

static void on_stage(const struct state_record *rec, enum stage from, void *userdata) {
        struct ota *ota = userdata;

        set_status(ota, rec, rec->stage == STAGE_DOWNLOAD && rec->total ? (int) (rec->done * 100 / rec->total) : -1);
}

static void on_progress(const struct state_record *rec, uint64_t done, uint64_t total, void *userdata) {
        struct ota *ota = userdata;
        uint64_t now = clock_now_usec();
        uint64_t interval = (uint64_t) ota->otad->config->ota.progress_interval * USEC_PER_SEC;
        char receive[48], fetched[24], reused[24], key[sizeof(ota->last_progress)];
        const struct status_detail details[] = {
                { "receive", receive },
                /* A bundle says what the adaptive update saved. */
                { rec->fetched || rec->reused ? "fetched" : NULL, fetched },
                { "reused", reused },
                { NULL, NULL },
        };

        set_status(ota, rec, rec->total ? (int) (rec->done * 100 / rec->total) : 0);
        /* The first block, the last one, and otherwise at most once per
         * progress_interval: the service gets a heartbeat, not a flood
         * (AWS counts every publish against 100/s per connection). */
        if (!offered(ota, rec) || done == 0 || (done != 1 && done != total && now - ota->last_progress_usec < interval))
                return;
        snprintf(receive, sizeof(receive), "%" PRIu64 "/%" PRIu64, done, total);
        snprintf(fetched, sizeof(fetched), "%" PRIu64, rec->fetched);
        snprintf(reused, sizeof(reused), "%" PRIu64, rec->reused);
        /* A bundle's transfers end (and its first one starts) more than
         * once at the same count: the service gets the same details once. */
        snprintf(key, sizeof(key), "%s %s %s %s", rec->job_id, receive, fetched, reused);
        if (strcmp(key, ota->last_progress) == 0)
                return;
        ota->last_progress_usec = now;
        memcpy(ota->last_progress, key, sizeof(key));
        (void) report(ota, JOB_IN_PROGRESS, details, JOBS_UPDATE_PROGRESS, NULL);
}

static void on_need_fresh_url(void *userdata) {
        struct ota *ota = userdata;

        (void) jobs_request_refresh(ota->otad->jobs);
}

static void on_ready(const struct state_record *rec, void *userdata) {
        struct ota *ota = userdata;

        if (offered(ota, rec))
                report_ready(ota, rec);
        else
                ota->owe_ready = true;
}

static void on_active(const struct state_record *rec, void *userdata) {
        struct ota *ota = userdata;

        if (offered(ota, rec))
                report_active(ota, rec);
        else if (!ota->job_gone)
                ota->owe_active = true;
}

static void on_finished(const struct state_record *rec, void *userdata) {
        struct ota *ota = userdata;

        if (offered(ota, rec))
                report_finished(ota, rec);
        else if (ota->job_gone || ota->job_waiting || ota->job_id)
                /* Cancelled, or the service offers another job: nobody asks
                 * for this result any more. */
                lifecycle_reported(ota->lc, -ESRCH);
        else
                ota->owe_finished = true; /* decided before the job was delivered again */
}

static void on_idle(void *userdata) {
        struct ota *ota = userdata;
        bool waiting = ota->job_waiting;

        ota->owe_ready = ota->owe_active = ota->owe_finished = false;
        ota->job_gone = false;
        ota->job_waiting = false;
        set_status(ota, NULL, -1);
        /* The job that waited for this decision: ask for it again. */
        if (waiting) {
                free(ota->job_id);
                ota->job_id = NULL;
                (void) jobs_request_refresh(ota->otad->jobs);
        }
}

static const struct lifecycle_ops lifecycle_ops = {
        .stage = on_stage,
        .progress = on_progress,
        .need_fresh_url = on_need_fresh_url,
        .ready = on_ready,
        .active = on_active,
        .finished = on_finished,
        .idle = on_idle,
};

/* job_handler */

static int ota_start(const struct job *job, char *reason, size_t reason_size, void *userdata) {
        struct ota *ota = userdata;
        const struct state_record *rec = lifecycle_record(ota->lc);
        struct ota_document *doc = NULL;
        char parse_reason[256], detail[320];
        int r;

        if (rec && strcmp(rec->job_id, job->id) == 0 && !lifecycle_needs_document(ota->lc)) {
                /* The update this device already has in hand (after a
                 * reboot, or decided and not yet reported): the lifecycle
                 * owns it, the job only gets what it is owed. */
                free(ota->job_id);
                ota->job_id = strdup(job->id);
                if (!ota->job_id)
                        return -ENOMEM;
                deliver_owed(ota);
                return 0;
        }
        if (lifecycle_busy_with_other(ota->lc, job->id)) {
                log_job(LOG_NOTICE, job->id, NULL, "Job %s waits until the update of job %s is decided", job->id,
                        rec->job_id);
                ota->job_waiting = true;
                return 0;
        }
        free(ota->job_id);
        ota->job_id = strdup(job->id);
        if (!ota->job_id)
                return -ENOMEM;
        ota->job_gone = false;
        ota->owe_ready = ota->owe_active = ota->owe_finished = false;

        r = ota_document_parse(job->document, &doc, parse_reason, sizeof(parse_reason));
        if (r < 0) {
                if (r == -EPROTONOSUPPORT)
                        snprintf(reason, reason_size, "aborted: 0x%08x", OTA_ERR_INVALID_DATA_PROTOCOL);
                else
                        snprintf(reason, reason_size, "0x%08x: 0x%08x", OTA_ERR_JOB_PARSER,
                                 OTA_JOB_PARSE_NON_CONFORMING);
                snprintf(detail, sizeof(detail), "job document: %s", parse_reason);
                lifecycle_refuse(ota->lc, job->id, job->execution_number, reason, detail);
                return 0;
        }
        /* The reference agent stays silent until the first block; a job
         * that looks QUEUED for minutes worries operators, so say so now. */
        (void) report(ota, JOB_IN_PROGRESS, NULL, 0, NULL);
        r = lifecycle_take(ota->lc, job->id, job->execution_number, doc);
        if (r == -EBUSY) {
                ota->job_waiting = true;
                return 0;
        }
        return r;
}

static void ota_refresh(const struct job *job, void *userdata) {
        struct ota *ota = userdata;
        const struct state_record *rec = lifecycle_record(ota->lc);
        struct ota_document *doc = NULL;
        char reason[256];

        if (!ota->job_id && !ota->job_waiting) {
                /* The job that waited for another update's decision, asked
                 * for again once that was decided. */
                (void) ota_start(job, reason, sizeof(reason), ota);
                return;
        }
        if (!ota->job_id || strcmp(ota->job_id, job->id) != 0 || !rec || strcmp(rec->job_id, job->id) != 0)
                return;
        if (lifecycle_needs_document(ota->lc)) {
                (void) ota_start(job, reason, sizeof(reason), ota);
                return;
        }
        deliver_owed(ota);
        /* The same job again, with fresh presigned URLs: hand the new URL
         * of the file in flight to its transfer. */
        if (rec->stage == STAGE_DOWNLOAD && ota_document_parse(job->document, &doc, reason, sizeof(reason)) >= 0) {
                lifecycle_refresh(ota->lc, doc);
                ota_document_free(doc);
        }
}

static void ota_cancel(const struct job *job, void *userdata) {
        struct ota *ota = userdata;

        if (!ota->job_id || strcmp(ota->job_id, job->id) != 0)
                return;
        free(ota->job_id);
        ota->job_id = NULL;
        if (ota->job_waiting)
                return; /* the waiting job went away; the update in hand is another job's */
        ota->job_gone = true;
        ota->owe_ready = ota->owe_active = ota->owe_finished = false;
        lifecycle_cancel(ota->lc);
}

static bool ota_accepts(const cJSON *document, void *userdata) {
        return ota_document_is_afr_ota(document);
}

int ota_new(struct otad *otad, ota_status_fn status, void *userdata, struct ota **ret) {
        struct ota *ota;
        int r;

        assert_return(otad && ret, -EINVAL);
        ota = calloc(1, sizeof(*ota));
        if (!ota)
                return log_error_errno(-ENOMEM, "Out of memory");
        ota->otad = otad;
        ota->status = status;
        ota->status_userdata = userdata;
        ota->handler = (struct job_handler){
                .name = "afr_ota",
                .accepts = ota_accepts,
                .start = ota_start,
                .refresh = ota_refresh,
                .cancel = ota_cancel,
                .userdata = ota,
        };
        r = jobs_register_handler(otad->jobs, &ota->handler);
        if (r < 0)
                goto fail;
        r = lifecycle_new(otad, &lifecycle_ops, ota, &ota->lc);
        if (r < 0)
                goto fail;
        *ret = ota;
        return 0;
fail:
        log_error_errno(r, "Failed to set up the OTA handler: %m");
        ota_free(ota);
        return r;
}

void ota_free(struct ota *ota) {
        if (!ota)
                return;
        if (ota->otad->jobs)
                jobs_unregister_handler(ota->otad->jobs, ota->handler.name);
        lifecycle_free(ota->lc);
        free(ota->job_id);
        free(ota);
}
