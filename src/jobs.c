/* SPDX-License-Identifier: MIT */
/*
 * The AWS IoT Jobs client (protocol.md §1): one current job execution as
 * $next/get and notify-next expose it, de-duplicated deliveries, dispatch to
 * handlers. Status updates go through jobs_outbox.
 *
 * Every job the service offers gets an answer, even one whose message cannot
 * be parsed (nested deeper than cJSON's limit, not JSON, not UTF-8): notify-
 * next fires only when the next job changes (§1.2), so an unanswered job
 * would hold every later one behind it. Its jobId sits near the top of the
 * message and json_scan finds it without a tree.
 */
#include <cjson/cJSON.h>
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "backoff.h"
#include "clock.h"
#include "config.h"
#include "jobs.h"
#include "jobs_outbox.h"
#include "json_scan.h"
#include "log.h"
#include "macro.h"
#include "mqtt.h"

#define JOB_DOCUMENT_MAX 32768      /* AWS: job document ≤ 32768 bytes (§1.8) */
#define JOB_ID_MAX 64               /* AWS: jobId 1..64 [a-zA-Z0-9_-] (§1.7) */
#define CLIENT_TOKEN_MAX 64         /* AWS: clientToken ≤ 64 bytes (§1.3) */
#define MESSAGE_MAX (128 * 1024)    /* AWS IoT: an MQTT payload ≤ 128 KiB (§7) */
#define DETAIL_VALUE_MAX 1024      /* §1.5 */
#define REPLY_TIMEOUT_USEC (10 * USEC_PER_SEC) /* wait ≤10 s per attempt, like DC */
#define RETRY_MIN_USEC (2 * USEC_PER_SEC)
#define RETRY_MAX_USEC (300 * USEC_PER_SEC)
#define FINISHED_MAX 8

struct handler_entry {
        struct job_handler h;
        struct handler_entry *next;
};

struct observer_entry {
        jobs_observer_fn fn;
        void *userdata;
        struct observer_entry *next;
};

struct current_job {
        struct job job;
        cJSON *execution; /* owns everything job points into */
        const struct job_handler *handler;
};

struct jobs {
        struct otad *otad;
        struct mqtt_session *mqtt;
        struct mqtt_subscription *sub_notify, *sub_get;
        struct jobs_outbox *outbox;
        struct handler_entry *handlers;
        struct observer_entry *observers;
        struct current_job *current;
        /* Jobs we ended locally whose terminal update is not yet settled:
         * deliveries of them meanwhile are stale, never a new job. */
        struct {
                char id[JOB_ID_MAX + 1];
                int64_t execution_number;
        } finished[FINISHED_MAX];
        unsigned n_finished;
        char next_get_token[CLIENT_TOKEN_MAX + 1];
        unsigned next_get_attempts;
        struct backoff next_get_backoff;
        /* notify-next messages seen, and how many when the current $next/get
         * question was asked: an answer that crossed a newer notify-next
         * on the way may describe an older queue (AWS does not order them). */
        unsigned notify_seq;
        unsigned next_get_notify_seq;
        sd_event_source *next_get_timer;
        unsigned token_counter;
};

static int next_get_request(struct jobs *jobs);
static int next_get_send(struct jobs *jobs);

static void make_token(struct jobs *jobs, char *buf, size_t size) {
        uint32_t r = 0;

        (void) getrandom(&r, sizeof(r), GRND_NONBLOCK);
        /* Opaque to the service; ours only for correlation (§1.3, ≤64 bytes). */
        snprintf(buf, size, "%u-%08x", ++jobs->token_counter, r);
}

static void notify(struct jobs *jobs, enum jobs_activity activity, const char *job_id, const char *handler,
                   enum job_status status) {
        const struct jobs_state state = {
                .activity = activity,
                .job_id = job_id,
                .handler = handler,
                .status = status,
        };

        for (struct observer_entry *o = jobs->observers; o; o = o->next)
                o->fn(&state, o->userdata);
}

static void current_free(struct current_job *c) {
        if (!c)
                return;
        cJSON_Delete(c->execution);
        free(c);
}

static void finished_add(struct jobs *jobs, const char *id, int64_t execution_number) {
        if (jobs->n_finished == FINISHED_MAX) {
                memmove(&jobs->finished[0], &jobs->finished[1], sizeof(jobs->finished[0]) * (FINISHED_MAX - 1));
                jobs->n_finished--;
        }
        snprintf(jobs->finished[jobs->n_finished].id, sizeof(jobs->finished[0].id), "%s", id);
        jobs->finished[jobs->n_finished].execution_number = execution_number;
        jobs->n_finished++;
}

/* execution_number < 0: any execution of id. */
static bool finished_contains(const struct jobs *jobs, const char *id, int64_t execution_number) {
        for (unsigned i = 0; i < jobs->n_finished; i++)
                if (strcmp(jobs->finished[i].id, id) == 0 &&
                    (execution_number < 0 || jobs->finished[i].execution_number == execution_number))
                        return true;
        return false;
}

static void finished_remove(struct jobs *jobs, const char *id) {
        for (unsigned i = 0; i < jobs->n_finished;)
                if (strcmp(jobs->finished[i].id, id) == 0) {
                        memmove(&jobs->finished[i], &jobs->finished[i + 1],
                                sizeof(jobs->finished[0]) * (jobs->n_finished - i - 1));
                        jobs->n_finished--;
                } else
                        i++;
}

static void current_cancel(struct jobs *jobs, const char *why) {
        struct current_job *c = jobs->current;

        if (!c)
                return;
        jobs->current = NULL;
        log_job(LOG_NOTICE, c->job.id, NULL, "Job %s is no longer offered by the service (%s): stopping it", c->job.id, why);
        if (c->handler && c->handler->cancel)
                c->handler->cancel(&c->job, c->handler->userdata);
        notify(jobs, JOBS_DROPPED, c->job.id, NULL, c->job.status);
        current_free(c);
}

/* ---- status updates ------------------------------------------------------ */

/* The outbox settled a report. */
static void on_report_settled(const char *job_id, enum job_status status, int result, void *userdata) {
        struct jobs *jobs = userdata;

        /* A refused status for the job we are running: the service no
         * longer lets us change it, e.g. it was cancelled and we missed the
         * notify-next. */
        if (result == -ESTALE && jobs->current && strcmp(jobs->current->job.id, job_id) == 0)
                current_cancel(jobs, "status update refused as an invalid state transition");
        if (!job_status_is_terminal(status))
                return;
        if (!jobs_outbox_has_terminal(jobs->outbox, job_id))
                finished_remove(jobs, job_id);
        /* The queue moved on: ask what is next now rather than wait for a
         * notify-next that a lost message could hide. */
        if (mqtt_session_is_connected(jobs->mqtt))
                (void) next_get_request(jobs);
}

int jobs_update(struct jobs *jobs, const char *job_id, enum job_status status, const struct status_detail *details,
                unsigned flags, jobs_update_done_fn done, void *userdata) {
        int r;

        assert(jobs);

        if (!jobs_job_id_is_valid(job_id) || (status != JOB_IN_PROGRESS && status != JOB_SUCCEEDED &&
                                               status != JOB_FAILED && status != JOB_REJECTED))
                return -EINVAL;
        r = jobs_validate_status_details(details);
        if (r < 0)
                return r;
        if ((flags & JOBS_UPDATE_PROGRESS) && !mqtt_session_is_connected(jobs->mqtt))
                return -ENOTCONN;
        r = jobs_outbox_add(jobs->outbox, job_id, status, details, flags & JOBS_UPDATE_PROGRESS, done, userdata);
        if (r < 0)
                return r;

        /* A terminal status ends the job here and now; its handler is done. */
        if (job_status_is_terminal(status) && jobs->current && strcmp(jobs->current->job.id, job_id) == 0) {
                struct current_job *c = take_ptr(&jobs->current);

                finished_add(jobs, c->job.id, c->job.execution_number);
                log_milestone(status == JOB_SUCCEEDED ? LOG_INFO : LOG_WARNING, OTAD_MID_JOB_FINISHED, c->job.id,
                              NULL, "Job %s finished: %s", c->job.id, job_status_to_string(status));
                notify(jobs, JOBS_FINISHED, c->job.id, NULL, status);
                current_free(c);
        }
        jobs_outbox_kick(jobs->outbox);
        return 0;
}

/* ---- $next/get ----------------------------------------------------------- */

static int on_next_get_timer(sd_event_source *es, uint64_t usec, void *userdata) {
        struct jobs *jobs = userdata;

        jobs->next_get_timer = sd_event_source_disable_unref(jobs->next_get_timer);
        if (jobs->next_get_token[0])
                log_warning("No answer to $next/get yet, asking again");
        return next_get_send(jobs);
}

/* Sends $next/get with the current token: retries keep it, so that the
 * answer to any attempt counts. */
static int next_get_send(struct jobs *jobs) {
        char body[128];
        uint64_t wait = REPLY_TIMEOUT_USEC;
        int r;

        jobs->next_get_timer = sd_event_source_disable_unref(jobs->next_get_timer);
        if (!jobs->next_get_token[0])
                make_token(jobs, jobs->next_get_token, sizeof(jobs->next_get_token));
        snprintf(body, sizeof(body), "{\"clientToken\":\"%s\"}", jobs->next_get_token);
        r = mqtt_publish(jobs->mqtt, "jobs/$next/get", body, strlen(body), 1);
        if (r < 0) {
                jobs->next_get_token[0] = '\0';
                return r == -ENOTCONN ? 0 : log_error_errno(r, "Failed to ask for the next job: %m");
        }
        jobs->next_get_attempts++;
        log_debug("Asked for the next job ($next/get %s)", jobs->next_get_token);
        if (jobs->next_get_attempts > 1)
                wait += backoff_next(&jobs->next_get_backoff);
        r = sd_event_add_time_relative(jobs->otad->event, &jobs->next_get_timer, CLOCK_MONOTONIC, wait, 0,
                                       on_next_get_timer, jobs);
        if (r < 0)
                log_warning_errno(r, "Failed to arm the $next/get timeout: %m, ignoring");
        return 0;
}

static void next_get_answered(struct jobs *jobs) {
        jobs->next_get_token[0] = '\0';
        jobs->next_get_attempts = 0;
        backoff_reset(&jobs->next_get_backoff);
        jobs->next_get_timer = sd_event_source_disable_unref(jobs->next_get_timer);
}

/* A new question: the queue may have changed since any earlier one. */
static int next_get_request(struct jobs *jobs) {
        jobs->next_get_notify_seq = jobs->notify_seq;
        next_get_answered(jobs);
        return next_get_send(jobs);
}

int jobs_request_refresh(struct jobs *jobs) {
        assert(jobs);

        if (!mqtt_session_is_connected(jobs->mqtt))
                return -ENOTCONN;
        return next_get_request(jobs);
}

/* ---- dispatch ------------------------------------------------------------ */

/* Reports a job we will not run: REJECTED while QUEUED; FAILED once it is
 * IN_PROGRESS, because AWS refuses IN_PROGRESS -> REJECTED (§1.4). reason
 * says what is wrong, detail (may be NULL) where and what was expected. */
static void job_refuse(struct jobs *jobs, const char *job_id, enum job_status current, bool rejectable,
                       const char *reason, const char *detail) {
        enum job_status s = rejectable && current == JOB_QUEUED ? JOB_REJECTED : JOB_FAILED;
        char value[DETAIL_VALUE_MAX * 4 + 1], detail_value[DETAIL_VALUE_MAX * 4 + 1];
        struct status_detail d[3] = { { NULL, NULL }, { NULL, NULL }, { NULL, NULL } };
        int r;

        /* Reasons may quote the document (cut anywhere, any bytes): they
         * must still make valid statusDetails, or the update would be
         * refused and the job would block the queue. */
        snprintf(value, sizeof(value), "%s", reason);
        jobs_detail_value_sanitize(value);
        d[0] = (struct status_detail){ "reason", value };
        if (detail && detail[0]) {
                snprintf(detail_value, sizeof(detail_value), "%s", detail);
                jobs_detail_value_sanitize(detail_value);
                d[1] = (struct status_detail){ "detail", detail_value };
        }
        log_job(LOG_WARNING, job_id, NULL, "Job %s: %s: %s%s%s", job_id, s == JOB_REJECTED ? "rejecting" : "failing", reason,
                d[1].key ? ": " : "", d[1].key ? detail_value : "");
        finished_add(jobs, job_id, 0);
        r = jobs_update(jobs, job_id, s, d, 0, NULL, NULL);
        if (r < 0)
                log_job_errno(LOG_ERR, r, job_id, NULL, "Job %s: failed to queue the %s update: %m", job_id,
                              job_status_to_string(s));
        notify(jobs, JOBS_FINISHED, job_id, NULL, s);
}

static bool rejection_errno(int r) {
        /* The document cannot be run here, and never will be. */
        return r == -EINVAL || r == -EBADMSG || r == -ENOENT || r == -EPERM || r == -EOPNOTSUPP || r == -EMSGSIZE;
}

static const char *json_type_name(const cJSON *v) {
        return cJSON_IsArray(v) ? "an array" : cJSON_IsString(v) ? "a string" : cJSON_IsNumber(v) ? "a number"
               : cJSON_IsBool(v) ? "a boolean" : cJSON_IsNull(v) ? "null" : "an object";
}

/* versionNumber, executionNumber: optional non-negative integers. */
static int execution_int(const cJSON *execution, const char *name, int64_t *ret, char *reason, size_t size) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(execution, name);

        if (!v)
                return 0; /* optional: keep the default */
        if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 9007199254740992.0 ||
            v->valuedouble != (double) (int64_t) v->valuedouble) {
                if (cJSON_IsNumber(v))
                        snprintf(reason, size, "the job execution's %s is %g, not a non-negative integer", name,
                                 v->valuedouble);
                else
                        snprintf(reason, size, "the job execution's %s is %s, not a non-negative integer", name,
                                 json_type_name(v));
                return -EINVAL;
        }
        *ret = (int64_t) v->valuedouble;
        return 0;
}

/* Where and why json_scan found text broken, e.g. "an unexpected character
 * at byte 12 of 40". */
static void scan_detail(const char *text, size_t len, const struct json_scan_result *res, size_t bad_utf8,
                        char *buf, size_t size) {
        if (bad_utf8 < len && (!res->error || bad_utf8 <= res->error_offset))
                snprintf(buf, size, "byte 0x%02x at offset %zu of %zu is not valid UTF-8", (unsigned char) text[bad_utf8],
                         bad_utf8, len);
        else if (res->error && res->error_offset < len && (unsigned char) text[res->error_offset] >= 0x20 &&
                 (unsigned char) text[res->error_offset] < 0x7f)
                snprintf(buf, size, "%s ('%c') at byte %zu of %zu", res->error, text[res->error_offset],
                         res->error_offset, len);
        else if (res->error && res->error_offset < len)
                snprintf(buf, size, "%s (byte 0x%02x) at byte %zu of %zu", res->error,
                         (unsigned char) text[res->error_offset], res->error_offset, len);
        else if (res->error)
                snprintf(buf, size, "%s (%zu bytes)", res->error, len);
        else if (res->depth_exceeded)
                snprintf(buf, size, "level %d begins at byte %zu of %zu; otad parses at most %d levels",
                         CJSON_NESTING_LIMIT + 1, res->depth_offset, len, CJSON_NESTING_LIMIT);
        else
                snprintf(buf, size, "cJSON could not parse these %zu bytes", len);
}

/* Makes the jobDocument an object we own: over MQTT it is an object, but
 * the API types it as a string, so accept a string holding JSON too. */
static int execution_document(cJSON *execution, char *reason, size_t reason_size, char *detail,
                              size_t detail_size) {
        cJSON *doc = cJSON_GetObjectItemCaseSensitive(execution, "jobDocument");
        cJSON *parsed;
        size_t len;

        if (cJSON_IsObject(doc))
                return 0;
        if (!cJSON_IsString(doc)) {
                snprintf(reason, reason_size, doc ? "the job document is not a JSON object" : "the job execution has no jobDocument");
                if (doc)
                        snprintf(detail, detail_size, "it is %s", json_type_name(doc));
                return -EBADMSG;
        }
        len = strlen(doc->valuestring);
        if (len > JOB_DOCUMENT_MAX) {
                snprintf(reason, reason_size, "the job document is %zu bytes, more than AWS's limit of %d", len,
                         JOB_DOCUMENT_MAX);
                return -EMSGSIZE;
        }
        parsed = cJSON_Parse(doc->valuestring);
        if (!cJSON_IsObject(parsed)) {
                struct json_scan_result res;

                snprintf(reason, reason_size, parsed ? "the job document is not a JSON object" : "the job document is not valid JSON");
                if (parsed)
                        snprintf(detail, detail_size, "it is a string holding %s", json_type_name(parsed));
                else if (json_scan(doc->valuestring, len, CJSON_NESTING_LIMIT, NULL, 0, &res) >= 0)
                        scan_detail(doc->valuestring, len, &res, json_scan_utf8_invalid(doc->valuestring, len), detail,
                                    detail_size);
                cJSON_Delete(parsed);
                return -EBADMSG;
        }
        cJSON_ReplaceItemInObjectCaseSensitive(execution, "jobDocument", parsed);
        return 0;
}

static void no_handler_detail(const struct jobs *jobs, char *buf, size_t size) {
        size_t used = 0;

        buf[0] = '\0';
        for (const struct handler_entry *h = jobs->handlers; h && used < size; h = h->next)
                used += (size_t) snprintf(buf + used, size - used, "%s%s", used ? ", " : "handlers tried: ", h->h.name);
        if (!jobs->handlers)
                snprintf(buf, size, "no handler is registered");
}

static void job_start(struct jobs *jobs, cJSON *execution, const char *job_id, enum job_status status,
                      int64_t version, int64_t execution_number) {
        struct current_job *c;
        _cleanup_free_ char *printed = NULL;
        char reason[256] = "", detail[512] = "";
        int r;

        log_milestone(LOG_INFO, OTAD_MID_JOB_RECEIVED, job_id, NULL, "Job %s received (%s, execution %" PRId64 ")",
                      job_id, job_status_to_string(status), execution_number);

        r = execution_document(execution, reason, sizeof(reason), detail, sizeof(detail));
        if (r < 0) {
                job_refuse(jobs, job_id, status, true, reason, detail);
                cJSON_Delete(execution);
                return;
        }
        printed = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(execution, "jobDocument"));
        if (printed && strlen(printed) > JOB_DOCUMENT_MAX) {
                snprintf(reason, sizeof(reason), "the job document is %zu bytes, more than AWS's limit of %d",
                         strlen(printed), JOB_DOCUMENT_MAX);
                job_refuse(jobs, job_id, status, true, reason, NULL);
                cJSON_Delete(execution);
                return;
        }

        c = calloc(1, sizeof(*c));
        if (!c) {
                log_error("Out of memory, job %s will be picked up again later", job_id);
                cJSON_Delete(execution);
                return;
        }
        c->execution = execution;
        c->job.id = cJSON_GetObjectItemCaseSensitive(execution, "jobId")->valuestring;
        c->job.status = status;
        c->job.version_number = version;
        c->job.execution_number = execution_number;
        c->job.status_details = cJSON_GetObjectItemCaseSensitive(execution, "statusDetails");
        if (!cJSON_IsObject(c->job.status_details))
                c->job.status_details = NULL;
        c->job.document = cJSON_GetObjectItemCaseSensitive(execution, "jobDocument");
        jobs->current = c;

        for (struct handler_entry *h = jobs->handlers; h; h = h->next) {
                if (!h->h.accepts(c->job.document, h->h.userdata))
                        continue;
                c->handler = &h->h;
                log_job(LOG_INFO, job_id, NULL, "Job %s: handing it to the %s handler", job_id, h->h.name);
                notify(jobs, JOBS_RUNNING, job_id, h->h.name, status);
                r = h->h.start(&c->job, reason, sizeof(reason), h->h.userdata);
                if (r >= 0)
                        return;
                /* start() failed: the job is ours to end. */
                if (jobs->current == c) {
                        jobs->current = NULL;
                        if (!reason[0]) {
                                errno = -r;
                                snprintf(reason, sizeof(reason), "the %s handler could not start it: %m", h->h.name);
                        }
                        job_refuse(jobs, job_id, status, rejection_errno(r), reason, NULL);
                        current_free(c);
                }
                return;
        }
        jobs->current = NULL;
        no_handler_detail(jobs, detail, sizeof(detail));
        job_refuse(jobs, job_id, status, true, "no handler accepts this job document", detail);
        current_free(c);
}

/* Everything the service tells us about the next job goes through here:
 * notify-next and $next/get answers, with or without an execution. */
static void on_next_execution(struct jobs *jobs, const cJSON *wrapper, const char *source) {
        const cJSON *execution = cJSON_GetObjectItemCaseSensitive(wrapper, "execution");
        const cJSON *id, *st;
        enum job_status status = JOB_QUEUED;
        int64_t version = 0, execution_number = 0;
        char reason[256];
        cJSON *copy;

        if (!execution) {
                /* {"timestamp":…}: nothing pending (§1.2). */
                if (jobs->current)
                        current_cancel(jobs, "the queue is empty");
                else
                        log_debug("No pending job (%s)", source);
                notify(jobs, JOBS_IDLE, NULL, NULL, JOB_QUEUED);
                return;
        }
        id = cJSON_GetObjectItemCaseSensitive(execution, "jobId");
        if (!cJSON_IsObject(execution) || !cJSON_IsString(id)) {
                log_error("Ignoring a %s message whose execution has no jobId string: no job to answer", source);
                return;
        }
        if (!jobs_job_id_is_valid(id->valuestring)) {
                /* Its update topic would be invalid, so we cannot even
                 * reject it; the service would not have created it. */
                log_error("Ignoring job '%.80s' from %s: a job id must be 1-64 of [a-zA-Z0-9_-]; it cannot be updated and needs to be cancelled in the cloud",
                          id->valuestring, source);
                if (jobs->current)
                        current_cancel(jobs, "another job is next");
                return;
        }
        st = cJSON_GetObjectItemCaseSensitive(execution, "status");
        if (st && (!cJSON_IsString(st) || job_status_from_string(st->valuestring, &status) < 0)) {
                snprintf(reason, sizeof(reason), "the job execution's status %s%.32s%s is not a job status",
                         cJSON_IsString(st) ? "\"" : "", cJSON_IsString(st) ? st->valuestring : json_type_name(st),
                         cJSON_IsString(st) ? "\"" : "");
                job_refuse(jobs, id->valuestring, JOB_IN_PROGRESS, false, reason, "expected QUEUED or IN_PROGRESS");
                return;
        }
        if (execution_int(execution, "versionNumber", &version, reason, sizeof(reason)) < 0 ||
            execution_int(execution, "executionNumber", &execution_number, reason, sizeof(reason)) < 0) {
                job_refuse(jobs, id->valuestring, status, true, reason, NULL);
                return;
        }

        if (jobs->current && strcmp(jobs->current->job.id, id->valuestring) == 0 &&
            jobs->current->job.execution_number == execution_number) {
                struct current_job *c = jobs->current;
                cJSON *old = c->execution;
                char detail[256];

                /* The same job again, e.g. with fresh presigned URLs (§9.14). */
                copy = cJSON_Duplicate(execution, true);
                if (!copy || execution_document(copy, reason, sizeof(reason), detail, sizeof(detail)) < 0) {
                        cJSON_Delete(copy);
                        return;
                }
                c->execution = copy;
                c->job.id = cJSON_GetObjectItemCaseSensitive(copy, "jobId")->valuestring;
                c->job.status = status;
                c->job.version_number = version;
                c->job.status_details = cJSON_GetObjectItemCaseSensitive(copy, "statusDetails");
                if (!cJSON_IsObject(c->job.status_details))
                        c->job.status_details = NULL;
                c->job.document = cJSON_GetObjectItemCaseSensitive(copy, "jobDocument");
                log_debug("Job %s delivered again (%s): same job", c->job.id, source);
                if (c->handler && c->handler->refresh)
                        c->handler->refresh(&c->job, c->handler->userdata);
                cJSON_Delete(old);
                return;
        }
        if (finished_contains(jobs, id->valuestring, execution_number) || finished_contains(jobs, id->valuestring, 0)) {
                log_debug("Job %s delivered again (%s) while its final status is on the way, ignoring",
                          id->valuestring, source);
                return;
        }
        if (jobs->current)
                current_cancel(jobs, "another job is next");

        copy = cJSON_Duplicate(execution, true);
        if (!copy) {
                log_error("Out of memory, job %s will be picked up again later", id->valuestring);
                return;
        }
        job_start(jobs, copy, cJSON_GetObjectItemCaseSensitive(copy, "jobId")->valuestring, status, version,
                  execution_number);
}

/* ---- messages cJSON cannot read ------------------------------------------ */

enum { M_JOB_ID, M_STATUS, M_TOKEN, M_DOCUMENT, M_EXECUTION, M_COUNT };

/* What can still be read of a message cJSON refused, or one too large to
 * parse, and why it is broken. */
struct unreadable {
        struct json_scan_member m[M_COUNT];
        char reason[160];
        char detail[256];
};

static void unreadable_scan(const uint8_t *payload, size_t len, const char *what, struct unreadable *u) {
        const char *text = (const char *) payload;
        struct json_scan_result res = { 0 };
        size_t bad_utf8 = json_scan_utf8_invalid(text, len);
        const char *subject;
        size_t at;

        *u = (struct unreadable){
                .m = {
                        [M_JOB_ID] = { .path = { "execution", "jobId" } },
                        [M_STATUS] = { .path = { "execution", "status" } },
                        [M_TOKEN] = { .path = { "clientToken" } },
                        [M_DOCUMENT] = { .path = { "execution", "jobDocument" } },
                        [M_EXECUTION] = { .path = { "execution" } },
                },
        };
        if (json_scan(text, len, CJSON_NESTING_LIMIT, u->m, M_COUNT, &res) < 0) {
                snprintf(u->reason, sizeof(u->reason), "%s cannot be read", what);
                snprintf(u->detail, sizeof(u->detail), "out of memory scanning its %zu bytes", len);
                return;
        }
        at = bad_utf8 < len && (!res.error || bad_utf8 <= res.error_offset) ? bad_utf8
             : res.error                                                  ? res.error_offset
                                                                          : res.depth_offset;
        /* The job document, when the fault lies within it. */
        subject = u->m[M_DOCUMENT].type != JSON_SCAN_NONE && at >= u->m[M_DOCUMENT].start &&
                                  (u->m[M_DOCUMENT].end == 0 || at < u->m[M_DOCUMENT].end)
                          ? "the job document"
                          : what;
        if (len > MESSAGE_MAX) {
                snprintf(u->reason, sizeof(u->reason), "%s is too large", what);
                snprintf(u->detail, sizeof(u->detail), "%zu bytes; AWS IoT sends at most %d in one message", len,
                         MESSAGE_MAX);
                return;
        }
        if (bad_utf8 < len && (!res.error || bad_utf8 <= res.error_offset))
                snprintf(u->reason, sizeof(u->reason), "%s is not valid UTF-8", subject);
        else if (res.error)
                snprintf(u->reason, sizeof(u->reason), "%s is not valid JSON", subject);
        else if (res.depth_exceeded)
                snprintf(u->reason, sizeof(u->reason), "%s nests arrays and objects deeper than %d levels", subject,
                         CJSON_NESTING_LIMIT);
        else
                snprintf(u->reason, sizeof(u->reason), "%s cannot be parsed", what);
        scan_detail(text, len, &res, bad_utf8, u->detail, sizeof(u->detail));
}

/* A notify-next or $next/get answer we cannot parse. If it names a job, the
 * job is answered (REJECTED while QUEUED) so that the queue moves on. */
static void on_unreadable_execution(struct jobs *jobs, const struct unreadable *u, size_t len, const char *source) {
        const struct json_scan_member *id = &u->m[M_JOB_ID], *st = &u->m[M_STATUS];
        enum job_status status = JOB_QUEUED;

        if (u->m[M_EXECUTION].type == JSON_SCAN_NONE || id->type == JSON_SCAN_NONE) {
                log_error("Ignoring a %s message that cannot be read: %s: %s; it names no job to answer", source,
                          u->reason, u->detail);
                return;
        }
        if (id->type != JSON_SCAN_STRING || !id->plain || !jobs_job_id_is_valid(id->value)) {
                log_error("Ignoring a %s message that cannot be read (%s: %s): its jobId is not 1-64 of [a-zA-Z0-9_-], so it cannot be answered and needs to be cancelled in the cloud",
                          source, u->reason, u->detail);
                return;
        }
        if (st->type == JSON_SCAN_STRING && st->plain)
                (void) job_status_from_string(st->value, &status);
        if (jobs->current && strcmp(jobs->current->job.id, id->value) == 0) {
                log_job(LOG_ERR, id->value, NULL, "Job %s delivered again (%s) in a message that cannot be read: %s: %s; the job goes on",
                        id->value, source, u->reason, u->detail);
                return;
        }
        if (finished_contains(jobs, id->value, -1)) {
                log_debug("Job %s delivered again (%s) while its final status is on the way, ignoring", id->value, source);
                return;
        }
        log_milestone(LOG_INFO, OTAD_MID_JOB_RECEIVED, id->value, NULL, "Job %s received (%s, %zu bytes that cannot be parsed)",
                      id->value, job_status_to_string(status), len);
        if (jobs->current)
                current_cancel(jobs, "another job is next");
        job_refuse(jobs, id->value, status, true, u->reason, u->detail);
}

/* The JSON object of a Jobs message, or NULL with *ret_unreadable filled in
 * when cJSON cannot (or must not) parse it. */
static cJSON *parse_message(const char *topic, const uint8_t *payload, size_t len, struct unreadable *u,
                            bool *ret_unreadable) {
        cJSON *j = NULL;

        *ret_unreadable = false;
        /* JSON is UTF-8 (RFC 8259); cJSON does not check, handlers must
         * not be handed anything else. */
        if (len <= MESSAGE_MAX && json_scan_utf8_invalid((const char *) payload, len) == len)
                j = cJSON_ParseWithLength((const char *) payload, len);
        if (!j) {
                unreadable_scan(payload, len, "the job execution message", u);
                *ret_unreadable = true;
                return NULL;
        }
        if (!cJSON_IsObject(j)) {
                log_error("Ignoring a message on %s that is %s, not a JSON object", topic, json_type_name(j));
                cJSON_Delete(j);
                return NULL;
        }
        return j;
}

/* ---- MQTT ---------------------------------------------------------------- */

static void on_notify_next(const char *topic, const uint8_t *payload, size_t len, void *userdata) {
        struct jobs *jobs = userdata;
        struct unreadable u;
        bool unreadable;
        cJSON *j = parse_message(topic, payload, len, &u, &unreadable);

        if (unreadable) {
                jobs->notify_seq++;
                on_unreadable_execution(jobs, &u, len, "notify-next");
        }
        if (!j)
                return;
        jobs->notify_seq++;
        on_next_execution(jobs, j, "notify-next");
        cJSON_Delete(j);
}

static bool answer_names_current(const struct jobs *jobs, const cJSON *answer) {
        const cJSON *execution = cJSON_GetObjectItemCaseSensitive(answer, "execution");
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(execution, "jobId");
        int64_t number = 0;
        char ignored[128];

        return jobs->current && cJSON_IsString(id) && strcmp(id->valuestring, jobs->current->job.id) == 0 &&
               execution_int(execution, "executionNumber", &number, ignored, sizeof(ignored)) == 0 &&
               number == jobs->current->job.execution_number;
}

static void next_get_rejected(struct jobs *jobs, const char *code) {
        log_warning("$next/get rejected: %s, asking again later", code ? code : "(no code)");
        jobs->next_get_token[0] = '\0';
        (void) sd_event_add_time_relative(jobs->otad->event, &jobs->next_get_timer, CLOCK_MONOTONIC,
                                          backoff_next(&jobs->next_get_backoff), 0, on_next_get_timer, jobs);
}

/* An answer to our $next/get that cJSON cannot read: the token says it is
 * ours, the jobId which job it offers. */
static void on_unreadable_get_answer(struct jobs *jobs, bool accepted, const struct unreadable *u, size_t len) {
        const struct json_scan_member *token = &u->m[M_TOKEN], *id = &u->m[M_JOB_ID];

        if (!jobs->next_get_token[0] || token->type != JSON_SCAN_STRING || !token->plain ||
            strcmp(token->value, jobs->next_get_token) != 0) {
                log_warning("Ignoring a $next/get answer that cannot be read and names no request of ours: %s: %s",
                            u->reason, u->detail);
                return;
        }
        jobs->next_get_timer = sd_event_source_disable_unref(jobs->next_get_timer);
        if (!accepted) {
                next_get_rejected(jobs, NULL);
                return;
        }
        if (jobs->notify_seq != jobs->next_get_notify_seq &&
            !(jobs->current && id->plain && strcmp(id->value, jobs->current->job.id) == 0)) {
                log_debug("Ignoring a $next/get answer that a newer notify-next overtook");
                next_get_answered(jobs);
                return;
        }
        next_get_answered(jobs);
        on_unreadable_execution(jobs, u, len, "$next/get");
}

/* jobs/<id>/get/accepted|rejected: answers to $next/get (and describes). */
static void on_get_reply(const char *topic, const uint8_t *payload, size_t len, void *userdata) {
        struct jobs *jobs = userdata;
        const cJSON *token, *code;
        struct unreadable u;
        bool accepted, unreadable;
        cJSON *j;

        if (strncmp(topic, "jobs/$next/get/", 15) != 0)
                return;
        accepted = strcmp(topic + 15, "accepted") == 0;
        if (!accepted && strcmp(topic + 15, "rejected") != 0)
                return;
        j = parse_message(topic, payload, len, &u, &unreadable);
        if (unreadable)
                on_unreadable_get_answer(jobs, accepted, &u, len);
        if (!j)
                return;
        token = cJSON_GetObjectItemCaseSensitive(j, "clientToken");
        if (!jobs->next_get_token[0] || !cJSON_IsString(token) ||
            strcmp(token->valuestring, jobs->next_get_token) != 0) {
                log_debug("Ignoring a $next/get answer to an earlier request");
                cJSON_Delete(j);
                return;
        }
        jobs->next_get_timer = sd_event_source_disable_unref(jobs->next_get_timer);
        if (accepted && jobs->notify_seq != jobs->next_get_notify_seq && !answer_names_current(jobs, j)) {
                /* A notify-next came after we asked: it is at least as new
                 * as this answer, which would only undo it. */
                log_debug("Ignoring a $next/get answer that a newer notify-next overtook");
                next_get_answered(jobs);
        } else if (accepted) {
                next_get_answered(jobs);
                on_next_execution(jobs, j, "$next/get");
        } else {
                code = cJSON_GetObjectItemCaseSensitive(j, "code");
                next_get_rejected(jobs, cJSON_IsString(code) ? code->valuestring : NULL);
        }
        cJSON_Delete(j);
}

static void on_connection(bool connected, bool session_present, void *userdata) {
        struct jobs *jobs = userdata;

        if (!connected) {
                jobs->next_get_token[0] = '\0';
                jobs->next_get_timer = sd_event_source_disable_unref(jobs->next_get_timer);
                jobs_outbox_disconnected(jobs->outbox);
                return;
        }
        /* The queue may have changed while we were away (§1.2: notify-next
         * is not replayed for a clean session). */
        (void) next_get_request(jobs);
        jobs_outbox_kick(jobs->outbox);
}

int jobs_new(struct otad *otad, struct jobs **ret) {
        struct jobs *jobs;
        int r;

        assert(otad);
        assert(otad->mqtt);
        assert(ret);

        jobs = calloc(1, sizeof(*jobs));
        if (!jobs)
                return log_error_errno(-ENOMEM, "Out of memory");
        jobs->otad = otad;
        jobs->mqtt = otad->mqtt;
        jobs->next_get_backoff = BACKOFF_INIT(RETRY_MIN_USEC, RETRY_MAX_USEC);

        /* AWS delivers /accepted|/rejected without a subscription, mosquitto
         * (and other brokers) only with one; notify-next always needs one. */
        r = mqtt_subscribe(jobs->mqtt, "jobs/notify-next", 1, on_notify_next, NULL, jobs, &jobs->sub_notify);
        if (r >= 0)
                r = mqtt_subscribe(jobs->mqtt, "jobs/+/get/+", 1, on_get_reply, NULL, jobs, &jobs->sub_get);
        if (r >= 0)
                r = jobs_outbox_new(otad, jobs->mqtt, on_report_settled, jobs, &jobs->outbox);
        if (r >= 0)
                r = mqtt_add_connection_handler(jobs->mqtt, on_connection, jobs);
        if (r < 0) {
                log_error_errno(r, "Failed to set up the Jobs client: %m");
                jobs_free(jobs);
                return r;
        }
        *ret = jobs;
        return 0;
}

void jobs_free(struct jobs *jobs) {
        if (!jobs)
                return;
        /* Handler modules are freed before us and unregister themselves; a
         * job still held here is simply forgotten: the service offers it
         * again after the restart. */
        current_free(take_ptr(&jobs->current));
        jobs_outbox_free(jobs->outbox);
        while (jobs->handlers) {
                struct handler_entry *h = jobs->handlers;

                jobs->handlers = h->next;
                free(h);
        }
        while (jobs->observers) {
                struct observer_entry *o = jobs->observers;

                jobs->observers = o->next;
                free(o);
        }
        sd_event_source_disable_unref(jobs->next_get_timer);
        mqtt_unsubscribe(jobs->sub_notify);
        mqtt_unsubscribe(jobs->sub_get);
        free(jobs);
}

int jobs_register_handler(struct jobs *jobs, const struct job_handler *handler) {
        struct handler_entry *e, **p;

        assert(jobs);

        if (!handler || !handler->name || !handler->accepts || !handler->start || !handler->cancel)
                return -EINVAL;
        e = calloc(1, sizeof(*e));
        if (!e)
                return -ENOMEM;
        e->h = *handler;
        for (p = &jobs->handlers; *p; p = &(*p)->next)
                ;
        *p = e;
        return 0;
}

void jobs_unregister_handler(struct jobs *jobs, const char *name) {
        struct handler_entry **p = &jobs->handlers;

        if (!jobs)
                return;
        while (*p) {
                struct handler_entry *e = *p;

                if (strcmp(e->h.name, name) != 0) {
                        p = &e->next;
                        continue;
                }
                if (jobs->current && jobs->current->handler == &e->h)
                        current_free(take_ptr(&jobs->current));
                *p = e->next;
                free(e);
        }
}

int jobs_add_observer(struct jobs *jobs, jobs_observer_fn fn, void *userdata) {
        struct observer_entry *o = calloc(1, sizeof(*o)), **p;

        assert(jobs);
        assert(fn);

        if (!o)
                return -ENOMEM;
        o->fn = fn;
        o->userdata = userdata;
        for (p = &jobs->observers; *p; p = &(*p)->next)
                ;
        *p = o;
        return 0;
}
