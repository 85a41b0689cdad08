/* SPDX-License-Identifier: MIT */
/*
 * The AWS IoT Jobs client (protocol.md §1): one current job execution as
 * $next/get and notify-next expose it, de-duplicated deliveries, status
 * updates with clientToken correlation and retries, dispatch to handlers.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "config.h"
#include "jobs.h"
#include "log.h"
#include "macro.h"
#include "mqtt.h"

#define JOB_DOCUMENT_MAX 32768      /* AWS: job document ≤ 32768 bytes (§1.8) */
#define JOB_ID_MAX 64               /* AWS: jobId 1..64 [a-zA-Z0-9_-] (§1.7) */
#define CLIENT_TOKEN_MAX 64         /* AWS: clientToken ≤ 64 bytes (§1.3) */
#define DETAILS_MAX_PAIRS 10        /* §1.5 */
#define DETAIL_KEY_MAX 128
#define DETAIL_VALUE_MAX 1024
#define REPLY_TIMEOUT_USEC (10 * 1000000ULL) /* wait ≤10 s per attempt, like DC */
#define RETRY_MIN_USEC (2 * 1000000ULL)
#define RETRY_MAX_USEC (300 * 1000000ULL)
#define FINISHED_MAX 8

struct handler_entry {
        struct job_handler h;
        struct handler_entry *next;
};

/* One jobs_update() until the service accepted it or finally refused it. */
struct update {
        struct jobs *jobs;
        char *job_id;
        enum job_status status;
        char *details_json; /* serialized statusDetails object, or NULL */
        unsigned flags;
        jobs_update_done_fn done;
        void *userdata;
        char token[CLIENT_TOKEN_MAX + 1];
        unsigned attempts;
        bool in_flight;
        bool is_fallback; /* the FAILED we send when a terminal update was refused */
        sd_event_source *timer; /* reply timeout or retry backoff */
        struct update *next;
};

struct current_job {
        struct job job;
        cJSON *execution; /* owns everything job points into */
        const struct job_handler *handler;
};

struct jobs {
        struct otad *otad;
        struct mqtt_session *mqtt;
        struct mqtt_subscription *sub_notify, *sub_get, *sub_update;
        struct handler_entry *handlers;
        struct current_job *current;
        struct update *updates; /* FIFO; only the head is ever in flight */
        /* Jobs we ended locally whose terminal update is not yet settled:
         * deliveries of them meanwhile are stale, never a new job. */
        struct {
                char id[JOB_ID_MAX + 1];
                int64_t execution_number;
        } finished[FINISHED_MAX];
        unsigned n_finished;
        char next_get_token[CLIENT_TOKEN_MAX + 1];
        unsigned next_get_attempts;
        /* notify-next messages seen, and how many when the current $next/get
         * question was asked: an answer that crossed a newer notify-next
         * on the way may describe an older queue (AWS does not order them). */
        unsigned notify_seq;
        unsigned next_get_notify_seq;
        sd_event_source *next_get_timer;
        unsigned token_counter;
};

static void update_send(struct update *u);
static void updates_kick(struct jobs *jobs);
static int next_get_request(struct jobs *jobs);
static int next_get_send(struct jobs *jobs);

static const char *const status_names[] = {
        [JOB_QUEUED] = "QUEUED",       [JOB_IN_PROGRESS] = "IN_PROGRESS", [JOB_SUCCEEDED] = "SUCCEEDED",
        [JOB_FAILED] = "FAILED",       [JOB_REJECTED] = "REJECTED",       [JOB_TIMED_OUT] = "TIMED_OUT",
        [JOB_REMOVED] = "REMOVED",     [JOB_CANCELED] = "CANCELED",
};

const char *job_status_to_string(enum job_status s) {
        if ((size_t) s >= ELEMENTSOF(status_names))
                return "UNKNOWN";
        return status_names[s];
}

int job_status_from_string(const char *s, enum job_status *ret) {
        for (size_t i = 0; i < ELEMENTSOF(status_names); i++)
                if (s && strcmp(s, status_names[i]) == 0) {
                        *ret = (enum job_status) i;
                        return 0;
                }
        return -EINVAL;
}

static bool status_is_terminal(enum job_status s) {
        return s != JOB_QUEUED && s != JOB_IN_PROGRESS;
}

bool jobs_job_id_is_valid(const char *id) {
        size_t n = id ? strlen(id) : 0;

        if (n < 1 || n > JOB_ID_MAX)
                return false;
        return strspn(id, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") == n;
}

/* [^\p{C}]+ over UTF-8: no C0/C1 controls, no DEL, valid encoding; length
 * counted in characters. */
static bool detail_value_is_valid(const char *v) {
        const unsigned char *p = (const unsigned char *) v;
        size_t chars = 0;

        while (*p) {
                unsigned c = *p, len, cp;

                if (c < 0x80)
                        len = 1, cp = c;
                else if ((c & 0xe0) == 0xc0)
                        len = 2, cp = c & 0x1f;
                else if ((c & 0xf0) == 0xe0)
                        len = 3, cp = c & 0x0f;
                else if ((c & 0xf8) == 0xf0)
                        len = 4, cp = c & 0x07;
                else
                        return false;
                for (unsigned i = 1; i < len; i++) {
                        if ((p[i] & 0xc0) != 0x80)
                                return false;
                        cp = cp << 6 | (p[i] & 0x3f);
                }
                if (cp < 0x20 || (cp >= 0x7f && cp < 0xa0))
                        return false;
                p += len;
                chars++;
        }
        return chars >= 1 && chars <= DETAIL_VALUE_MAX;
}

int jobs_validate_status_details(const struct status_detail *details) {
        size_t n = 0;

        for (; details && details[n].key; n++) {
                size_t klen = strlen(details[n].key);

                if (n >= DETAILS_MAX_PAIRS)
                        return -E2BIG;
                if (klen < 1 || klen > DETAIL_KEY_MAX ||
                    strspn(details[n].key, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_-") != klen)
                        return -EINVAL;
                if (!details[n].value || !detail_value_is_valid(details[n].value))
                        return -EINVAL;
                for (size_t i = 0; i < n; i++)
                        if (strcmp(details[i].key, details[n].key) == 0)
                                return -EINVAL;
        }
        return 0;
}

static void make_token(struct jobs *jobs, char *buf, size_t size) {
        uint32_t r = 0;

        (void) getrandom(&r, sizeof(r), GRND_NONBLOCK);
        /* Opaque to the service; ours only for correlation (§1.3, ≤64 bytes). */
        snprintf(buf, size, "%u-%08x", ++jobs->token_counter, r);
}

static uint64_t backoff_usec(unsigned attempts) {
        uint64_t ceiling = RETRY_MIN_USEC;
        uint32_t r = 0;

        for (unsigned i = 1; i < attempts && ceiling < RETRY_MAX_USEC; i++)
                ceiling *= 2;
        if (ceiling > RETRY_MAX_USEC)
                ceiling = RETRY_MAX_USEC;
        (void) getrandom(&r, sizeof(r), GRND_NONBLOCK);
        return RETRY_MIN_USEC / 2 + (uint64_t) r * (ceiling - RETRY_MIN_USEC / 2) / UINT32_MAX;
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

static bool finished_contains(const struct jobs *jobs, const char *id, int64_t execution_number) {
        for (unsigned i = 0; i < jobs->n_finished; i++)
                if (strcmp(jobs->finished[i].id, id) == 0 && jobs->finished[i].execution_number == execution_number)
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

/* ---- status updates ------------------------------------------------------ */

static void update_free(struct update *u) {
        if (!u)
                return;
        sd_event_source_disable_unref(u->timer);
        free(u->job_id);
        free(u->details_json);
        free(u);
}

static int update_code_to_errno(const char *code) {
        if (!code)
                return -EPROTO;
        if (strcmp(code, "InvalidStateTransition") == 0 || strcmp(code, "TerminalStateReached") == 0)
                return -ESTALE;
        if (strcmp(code, "ResourceNotFound") == 0)
                return -ENOENT;
        if (strcmp(code, "InvalidRequest") == 0 || strcmp(code, "InvalidJson") == 0 ||
            strcmp(code, "InvalidTopic") == 0)
                return -EINVAL;
        return -EPROTO;
}

static void job_log(int level, const char *job_id, const char *format, ...) __attribute__((format(printf, 3, 4)));
static void job_log(int level, const char *job_id, const char *format, ...) {
        va_list ap;

        va_start(ap, format);
        log_fullv(level, 0, &(const struct log_fields){ .job_id = job_id }, format, ap);
        va_end(ap);
}

static void current_cancel(struct jobs *jobs, const char *why) {
        struct current_job *c = jobs->current;

        if (!c)
                return;
        jobs->current = NULL;
        job_log(LOG_NOTICE, c->job.id, "Job %s is no longer offered by the service (%s): stopping it", c->job.id, why);
        if (c->handler && c->handler->cancel)
                c->handler->cancel(&c->job, c->handler->userdata);
        current_free(c);
}

/* Takes u off the queue, tells its owner, and moves on. */
static void update_finish(struct jobs *jobs, struct update *u, int result, const char *code) {
        struct update **p = &jobs->updates;
        bool terminal = status_is_terminal(u->status);
        jobs_update_done_fn done = u->done;
        void *userdata = u->userdata;

        while (*p && *p != u)
                p = &(*p)->next;
        if (*p)
                *p = u->next;

        if (result == 0)
                job_log(terminal ? LOG_INFO : LOG_DEBUG, u->job_id, "Job %s: %s accepted by the service", u->job_id,
                        job_status_to_string(u->status));

        /* A refused status for the job we are running: the service no
         * longer lets us change it, e.g. it was cancelled and we missed the
         * notify-next. */
        if (result == -ESTALE && jobs->current && strcmp(jobs->current->job.id, u->job_id) == 0)
                current_cancel(jobs, "status update refused as an invalid state transition");

        /* A terminal status the service refused for a reason other than
         * "already terminal" would leave the job IN_PROGRESS and blocking the
         * queue: report FAILED with a plain reason instead, once. */
        if (terminal && result < 0 && result != -ESTALE && result != -ENOENT && !u->is_fallback &&
            u->status != JOB_FAILED) {
                _cleanup_free_ char *reason = NULL;
                struct status_detail d[2] = { { NULL, NULL }, { NULL, NULL } };

                if (asprintf(&reason, "status %s refused: %s", job_status_to_string(u->status),
                             code ? code : "no answer") >= 0) {
                        d[0] = (struct status_detail){ "reason", reason };
                        (void) jobs_update(jobs, u->job_id, JOB_FAILED, d, 0, NULL, NULL);
                        if (jobs->updates) {
                                struct update *last = jobs->updates;

                                while (last->next)
                                        last = last->next;
                                last->is_fallback = true;
                        }
                }
        }
        if (terminal) {
                bool more = false;

                for (struct update *o = jobs->updates; o; o = o->next)
                        if (strcmp(o->job_id, u->job_id) == 0 && status_is_terminal(o->status))
                                more = true;
                if (!more)
                        finished_remove(jobs, u->job_id);
                /* The queue moved on: ask what is next now rather than wait
                 * for a notify-next that a lost message could hide. */
                if (mqtt_session_is_connected(jobs->mqtt))
                        (void) next_get_request(jobs);
        }
        update_free(u);
        if (done)
                done(result, userdata);
        updates_kick(jobs);
}

static int on_update_timer(sd_event_source *es, uint64_t usec, void *userdata) {
        struct update *u = userdata;

        u->timer = sd_event_source_disable_unref(u->timer);
        if (u->in_flight) {
                u->in_flight = false;
                job_log(LOG_WARNING, u->job_id, "Job %s: no answer to the %s update within 10 s, sending it again", u->job_id,
                        job_status_to_string(u->status));
                (void) sd_event_add_time_relative(u->jobs->otad->event, &u->timer, CLOCK_MONOTONIC,
                                                  backoff_usec(u->attempts), 0, on_update_timer, u);
                return 0;
        }
        update_send(u);
        return 0;
}

static void update_send(struct update *u) {
        struct jobs *jobs = u->jobs;
        _cleanup_free_ char *topic = NULL, *body = NULL;
        int r;

        if (u->in_flight || u->timer || !mqtt_session_is_connected(jobs->mqtt))
                return;
        /* Compact JSON, status + statusDetails like the reference agent
         * (§2.4); no expectedVersion, so the service applies updates in the
         * order we send them (we send one at a time). */
        if (asprintf(&body, "{\"status\":\"%s\"%s%s,\"clientToken\":\"%s\"}", job_status_to_string(u->status),
                     u->details_json ? ",\"statusDetails\":" : "", u->details_json ? u->details_json : "",
                     u->token) < 0 ||
            asprintf(&topic, "jobs/%s/update", u->job_id) < 0) {
                body = topic = NULL;
                log_error("Out of memory, status update of job %s delayed", u->job_id);
                (void) sd_event_add_time_relative(jobs->otad->event, &u->timer, CLOCK_MONOTONIC, RETRY_MIN_USEC, 0,
                                                  on_update_timer, u);
                return;
        }
        u->attempts++;
        r = mqtt_publish(jobs->mqtt, topic, body, strlen(body), (u->flags & JOBS_UPDATE_PROGRESS) ? 0 : 1);
        if (r == -ENOTCONN)
                return; /* sent again on the next connect */
        if (r < 0) {
                job_log(LOG_ERR, u->job_id, "Job %s: failed to publish the %s update: %s", u->job_id,
                        job_status_to_string(u->status), strerror(-r));
                update_finish(jobs, u, r, NULL);
                return;
        }
        job_log(LOG_DEBUG, u->job_id, "Job %s: sent %s", u->job_id, body);
        if (u->flags & JOBS_UPDATE_PROGRESS) {
                /* Progress is fire-and-forget, like the reference agent's "receive". */
                update_finish(jobs, u, 0, NULL);
                return;
        }
        u->in_flight = true;
        r = sd_event_add_time_relative(jobs->otad->event, &u->timer, CLOCK_MONOTONIC, REPLY_TIMEOUT_USEC, 0,
                                       on_update_timer, u);
        if (r < 0)
                log_warning("Failed to arm the reply timeout of job %s: %s, ignoring", u->job_id, strerror(-r));
}

static void updates_kick(struct jobs *jobs) {
        if (jobs->updates)
                update_send(jobs->updates);
}

static void on_update_reply(struct jobs *jobs, const char *job_id, bool accepted, const cJSON *reply) {
        const cJSON *token = cJSON_GetObjectItemCaseSensitive(reply, "clientToken");
        const cJSON *code = cJSON_GetObjectItemCaseSensitive(reply, "code");
        const cJSON *message = cJSON_GetObjectItemCaseSensitive(reply, "message");
        struct update *u = jobs->updates;
        const char *c;

        if (!u || !u->attempts || !cJSON_IsString(token) || strcmp(token->valuestring, u->token) != 0 ||
            strcmp(u->job_id, job_id) != 0) {
                log_debug("Ignoring an update reply for job %s that answers no request of ours", job_id);
                return;
        }
        if (!u->in_flight && !accepted) {
                /* A rejection of an earlier attempt; the retry is on its way. */
                log_debug("Ignoring a late rejection of an earlier %s update of job %s", job_status_to_string(u->status),
                          job_id);
                return;
        }
        u->in_flight = false;
        u->timer = sd_event_source_disable_unref(u->timer);
        if (accepted) {
                update_finish(jobs, u, 0, NULL);
                return;
        }
        c = cJSON_IsString(code) ? code->valuestring : NULL;
        if (c && (strcmp(c, "RequestThrottled") == 0 || strcmp(c, "InternalError") == 0 ||
                  strcmp(c, "VersionMismatch") == 0)) {
                /* Transient (§1.6, DC's policy). VersionMismatch cannot come
                 * from our requests (no expectedVersion); if a service sends
                 * it anyway, the retry simply re-applies our status. */
                job_log(LOG_WARNING, u->job_id, "Job %s: %s update rejected with %s, retrying", u->job_id,
                        job_status_to_string(u->status), c);
                (void) sd_event_add_time_relative(jobs->otad->event, &u->timer, CLOCK_MONOTONIC,
                                                  backoff_usec(u->attempts), 0, on_update_timer, u);
                return;
        }
        job_log(LOG_ERR, u->job_id, "Job %s: the service refused the %s update: %s: %s", u->job_id,
                job_status_to_string(u->status), c ? c : "(no code)",
                cJSON_IsString(message) ? message->valuestring : "(no message)");
        update_finish(jobs, u, update_code_to_errno(c), c);
}

int jobs_update(struct jobs *jobs, const char *job_id, enum job_status status, const struct status_detail *details,
                unsigned flags, jobs_update_done_fn done, void *userdata) {
        struct update *u, **p;
        int r;

        if (!jobs_job_id_is_valid(job_id) || (status != JOB_IN_PROGRESS && status != JOB_SUCCEEDED &&
                                               status != JOB_FAILED && status != JOB_REJECTED))
                return -EINVAL;
        r = jobs_validate_status_details(details);
        if (r < 0)
                return r;
        if ((flags & JOBS_UPDATE_PROGRESS) && !mqtt_session_is_connected(jobs->mqtt))
                return -ENOTCONN;

        u = calloc(1, sizeof(*u));
        if (!u)
                return -ENOMEM;
        u->jobs = jobs;
        u->status = status;
        u->flags = flags;
        u->done = done;
        u->userdata = userdata;
        /* One token for all attempts: a late answer to an earlier attempt
         * settles the update just as well (a service slower than our
         * timeout must not make us retry forever). */
        make_token(jobs, u->token, sizeof(u->token));
        u->job_id = strdup(job_id);
        if (!u->job_id) {
                update_free(u);
                return -ENOMEM;
        }
        if (details && details[0].key) {
                cJSON *o = cJSON_CreateObject();

                for (size_t i = 0; o && details[i].key; i++)
                        if (!cJSON_AddStringToObject(o, details[i].key, details[i].value)) {
                                cJSON_Delete(o);
                                o = NULL;
                        }
                u->details_json = o ? cJSON_PrintUnformatted(o) : NULL;
                cJSON_Delete(o);
                if (!u->details_json) {
                        update_free(u);
                        return -ENOMEM;
                }
        }
        for (p = &jobs->updates; *p; p = &(*p)->next)
                ;
        *p = u;

        /* A terminal status ends the job here and now; its handler is done. */
        if (status_is_terminal(status) && jobs->current && strcmp(jobs->current->job.id, job_id) == 0) {
                struct current_job *c = take_ptr(&jobs->current);

                finished_add(jobs, c->job.id, c->job.execution_number);
                log_milestone(status == JOB_SUCCEEDED ? LOG_INFO : LOG_WARNING, OTAD_MID_JOB_FINISHED, c->job.id,
                              NULL, "Job %s finished: %s", c->job.id, job_status_to_string(status));
                current_free(c);
                otad_set_status(jobs->otad, "job %s %s", job_id, job_status_to_string(status));
        }
        updates_kick(jobs);
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
        r = sd_event_add_time_relative(jobs->otad->event, &jobs->next_get_timer, CLOCK_MONOTONIC,
                                       REPLY_TIMEOUT_USEC + (jobs->next_get_attempts > 1
                                                                     ? backoff_usec(jobs->next_get_attempts - 1)
                                                                     : 0),
                                       0, on_next_get_timer, jobs);
        if (r < 0)
                log_warning("Failed to arm the $next/get timeout: %s, ignoring", strerror(-r));
        return 0;
}

/* A new question: the queue may have changed since any earlier one. */
static int next_get_request(struct jobs *jobs) {
        jobs->next_get_notify_seq = jobs->notify_seq;
        jobs->next_get_token[0] = '\0';
        jobs->next_get_attempts = 0;
        return next_get_send(jobs);
}

int jobs_request_refresh(struct jobs *jobs) {
        if (!mqtt_session_is_connected(jobs->mqtt))
                return -ENOTCONN;
        return next_get_request(jobs);
}

/* ---- dispatch ------------------------------------------------------------ */

/* Reports a job we will not run: REJECTED while QUEUED; FAILED once it is
 * IN_PROGRESS, because AWS refuses IN_PROGRESS -> REJECTED (§1.4). */
static void job_refuse(struct jobs *jobs, const char *job_id, enum job_status current, bool rejectable,
                       const char *reason) {
        enum job_status s = rejectable && current == JOB_QUEUED ? JOB_REJECTED : JOB_FAILED;
        char value[DETAIL_VALUE_MAX + 1];
        struct status_detail d[2] = { { NULL, NULL }, { NULL, NULL } };
        int r;

        /* Reasons may quote the document (cut anywhere, any bytes): when
         * that breaks the statusDetails rules, fall back to plain ASCII so
         * that the update can never be refused and block the queue. */
        snprintf(value, sizeof(value), "%s", reason[0] ? reason : "unknown error");
        if (!detail_value_is_valid(value))
                for (char *p = value; *p; p++)
                        if ((unsigned char) *p < 0x20 || (unsigned char) *p >= 0x7f)
                                *p = '?';
        d[0] = (struct status_detail){ "reason", value };
        job_log(LOG_WARNING, job_id, "Job %s: %s: %s", job_id, s == JOB_REJECTED ? "rejecting" : "failing", reason);
        finished_add(jobs, job_id, 0);
        r = jobs_update(jobs, job_id, s, d, 0, NULL, NULL);
        if (r < 0)
                job_log(LOG_ERR, job_id, "Job %s: failed to queue the %s update: %s", job_id, job_status_to_string(s),
                        strerror(-r));
}

static bool rejection_errno(int r) {
        /* The document cannot be run here, and never will be. */
        return r == -EINVAL || r == -EBADMSG || r == -ENOENT || r == -EPERM || r == -EOPNOTSUPP || r == -EMSGSIZE;
}

static int execution_int(const cJSON *execution, const char *name, int64_t *ret) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(execution, name);

        if (!v)
                return 0; /* optional: keep the default */
        if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 9007199254740992.0)
                return -EINVAL;
        *ret = (int64_t) v->valuedouble;
        return 0;
}

/* Makes the jobDocument an object we own: over MQTT it is an object, but
 * the API types it as a string, so accept a string holding JSON too. */
static int execution_document(cJSON *execution, const char **ret_error) {
        cJSON *doc = cJSON_GetObjectItemCaseSensitive(execution, "jobDocument");
        cJSON *parsed;

        if (cJSON_IsObject(doc))
                return 0;
        if (!cJSON_IsString(doc)) {
                *ret_error = doc ? "the job document is not a JSON object" : "the job has no job document";
                return -EBADMSG;
        }
        if (strlen(doc->valuestring) > JOB_DOCUMENT_MAX) {
                *ret_error = "the job document is larger than AWS's 32768 bytes";
                return -EMSGSIZE;
        }
        parsed = cJSON_Parse(doc->valuestring);
        if (!cJSON_IsObject(parsed)) {
                cJSON_Delete(parsed);
                *ret_error = "the job document is not valid JSON";
                return -EBADMSG;
        }
        cJSON_ReplaceItemInObjectCaseSensitive(execution, "jobDocument", parsed);
        return 0;
}

static void job_start(struct jobs *jobs, cJSON *execution, const char *job_id, enum job_status status,
                      int64_t version, int64_t execution_number) {
        struct current_job *c;
        const char *error = NULL;
        _cleanup_free_ char *printed = NULL;
        char reason[256] = "";
        int r;

        log_milestone(LOG_INFO, OTAD_MID_JOB_RECEIVED, job_id, NULL, "Job %s received (%s, execution %" PRId64 ")",
                      job_id, job_status_to_string(status), execution_number);

        r = execution_document(execution, &error);
        if (r < 0) {
                job_refuse(jobs, job_id, status, true, error);
                cJSON_Delete(execution);
                return;
        }
        printed = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(execution, "jobDocument"));
        if (printed && strlen(printed) > JOB_DOCUMENT_MAX) {
                snprintf(reason, sizeof(reason), "the job document is %zu bytes, more than AWS's limit of %d",
                         strlen(printed), JOB_DOCUMENT_MAX);
                job_refuse(jobs, job_id, status, true, reason);
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
                job_log(LOG_INFO, job_id, "Job %s: handing it to the %s handler", job_id, h->h.name);
                otad_set_status(jobs->otad, "running job %s (%s)", job_id, h->h.name);
                r = h->h.start(&c->job, reason, sizeof(reason), h->h.userdata);
                if (r >= 0)
                        return;
                /* start() failed: the job is ours to end. */
                if (jobs->current == c) {
                        jobs->current = NULL;
                        job_refuse(jobs, job_id, status, rejection_errno(r), reason[0] ? reason : strerror(-r));
                        current_free(c);
                }
                return;
        }
        jobs->current = NULL;
        job_refuse(jobs, job_id, status, true, "no handler for this job document");
        current_free(c);
}

/* Everything the service tells us about the next job goes through here:
 * notify-next and $next/get answers, with or without an execution. */
static void on_next_execution(struct jobs *jobs, const cJSON *wrapper, const char *source) {
        const cJSON *execution = cJSON_GetObjectItemCaseSensitive(wrapper, "execution");
        const cJSON *id, *st;
        enum job_status status = JOB_QUEUED;
        int64_t version = 0, execution_number = 0;
        cJSON *copy;

        if (!execution) {
                /* {"timestamp":…}: nothing pending (§1.2). */
                if (jobs->current)
                        current_cancel(jobs, "the queue is empty");
                else
                        log_debug("No pending job (%s)", source);
                otad_set_status(jobs->otad, "idle, no pending job");
                return;
        }
        id = cJSON_GetObjectItemCaseSensitive(execution, "jobId");
        if (!cJSON_IsObject(execution) || !cJSON_IsString(id)) {
                log_error("Ignoring a %s message whose execution has no jobId string", source);
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
                job_refuse(jobs, id->valuestring, JOB_IN_PROGRESS, false, "the job execution has an invalid status");
                return;
        }
        if (execution_int(execution, "versionNumber", &version) < 0 ||
            execution_int(execution, "executionNumber", &execution_number) < 0) {
                job_refuse(jobs, id->valuestring, status, true,
                           "the job execution has a versionNumber or executionNumber that is not a number");
                return;
        }

        if (jobs->current && strcmp(jobs->current->job.id, id->valuestring) == 0 &&
            jobs->current->job.execution_number == execution_number) {
                struct current_job *c = jobs->current;
                cJSON *old = c->execution;
                const char *error = NULL;

                /* The same job again, e.g. with fresh presigned URLs (§9.14). */
                copy = cJSON_Duplicate(execution, true);
                if (!copy || execution_document(copy, &error) < 0) {
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
        if (finished_contains(jobs, id->valuestring, execution_number) ||
            finished_contains(jobs, id->valuestring, 0)) {
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

/* ---- MQTT ---------------------------------------------------------------- */

static cJSON *parse_payload(const char *topic, const uint8_t *payload, size_t len) {
        cJSON *j = cJSON_ParseWithLength((const char *) payload, len);

        if (!cJSON_IsObject(j)) {
                log_error("Ignoring a message on %s that is not a JSON object (%zu bytes)", topic, len);
                cJSON_Delete(j);
                return NULL;
        }
        return j;
}

static void on_notify_next(const char *topic, const uint8_t *payload, size_t len, void *userdata) {
        struct jobs *jobs = userdata;
        cJSON *j = parse_payload(topic, payload, len);

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

        return jobs->current && cJSON_IsString(id) && strcmp(id->valuestring, jobs->current->job.id) == 0 &&
               execution_int(execution, "executionNumber", &number) == 0 &&
               number == jobs->current->job.execution_number;
}

/* jobs/<id>/get/accepted|rejected: answers to $next/get (and describes). */
static void on_get_reply(const char *topic, const uint8_t *payload, size_t len, void *userdata) {
        struct jobs *jobs = userdata;
        const cJSON *token, *code;
        bool accepted;
        cJSON *j;

        if (strncmp(topic, "jobs/$next/get/", 15) != 0)
                return;
        accepted = strcmp(topic + 15, "accepted") == 0;
        if (!accepted && strcmp(topic + 15, "rejected") != 0)
                return;
        j = parse_payload(topic, payload, len);
        if (!j)
                return;
        token = cJSON_GetObjectItemCaseSensitive(j, "clientToken");
        if (!jobs->next_get_token[0] || !cJSON_IsString(token) ||
            strcmp(token->valuestring, jobs->next_get_token) != 0) {
                log_debug("Ignoring a $next/get answer to an earlier request");
                cJSON_Delete(j);
                return;
        }
        jobs->next_get_token[0] = '\0';
        jobs->next_get_timer = sd_event_source_disable_unref(jobs->next_get_timer);
        if (accepted && jobs->notify_seq != jobs->next_get_notify_seq && !answer_names_current(jobs, j)) {
                /* A notify-next came after we asked: it is at least as new
                 * as this answer, which would only undo it. */
                log_debug("Ignoring a $next/get answer that a newer notify-next overtook");
                jobs->next_get_attempts = 0;
        } else if (accepted) {
                jobs->next_get_attempts = 0;
                on_next_execution(jobs, j, "$next/get");
        } else {
                code = cJSON_GetObjectItemCaseSensitive(j, "code");
                log_warning("$next/get rejected: %s, asking again later",
                            cJSON_IsString(code) ? code->valuestring : "(no code)");
                jobs->next_get_attempts++;
                (void) sd_event_add_time_relative(jobs->otad->event, &jobs->next_get_timer, CLOCK_MONOTONIC,
                                                  backoff_usec(jobs->next_get_attempts), 0, on_next_get_timer, jobs);
        }
        cJSON_Delete(j);
}

/* jobs/<id>/update/accepted|rejected */
static void on_update_topic(const char *topic, const uint8_t *payload, size_t len, void *userdata) {
        struct jobs *jobs = userdata;
        char job_id[JOB_ID_MAX + 1];
        const char *p = topic + 5, *slash = strchr(p, '/');
        bool accepted;
        cJSON *j;

        if (!slash || (size_t) (slash - p) > JOB_ID_MAX)
                return;
        memcpy(job_id, p, (size_t) (slash - p));
        job_id[slash - p] = '\0';
        if (strcmp(slash, "/update/accepted") == 0)
                accepted = true;
        else if (strcmp(slash, "/update/rejected") == 0)
                accepted = false;
        else
                return;
        j = parse_payload(topic, payload, len);
        if (!j)
                return;
        on_update_reply(jobs, job_id, accepted, j);
        cJSON_Delete(j);
}

static void on_connection(bool connected, bool session_present, void *userdata) {
        struct jobs *jobs = userdata;

        if (!connected) {
                struct update **p = &jobs->updates;

                jobs->next_get_token[0] = '\0';
                jobs->next_get_timer = sd_event_source_disable_unref(jobs->next_get_timer);
                /* Progress is dropped when offline (jobs.h); a newer one
                 * follows soon enough. */
                while (*p) {
                        struct update *u = *p;

                        if (!(u->flags & JOBS_UPDATE_PROGRESS)) {
                                p = &u->next;
                                continue;
                        }
                        *p = u->next;
                        if (u->done)
                                u->done(-ENOTCONN, u->userdata);
                        update_free(u);
                }
                /* An update in flight is sent again, with a new token, after
                 * the reconnect; the service applies a repeated status twice
                 * harmlessly (IN_PROGRESS -> IN_PROGRESS is allowed). */
                for (struct update *u = jobs->updates; u; u = u->next)
                        if (u->in_flight) {
                                u->in_flight = false;
                                u->timer = sd_event_source_disable_unref(u->timer);
                        }
                return;
        }
        /* The queue may have changed while we were away (§1.2: notify-next
         * is not replayed for a clean session). */
        jobs->next_get_attempts = 0;
        (void) next_get_request(jobs);
        updates_kick(jobs);
}

int jobs_new(struct otad *otad, struct jobs **ret) {
        struct jobs *jobs;
        int r;

        jobs = calloc(1, sizeof(*jobs));
        if (!jobs)
                return log_error_errno(-ENOMEM, "Out of memory");
        jobs->otad = otad;
        jobs->mqtt = otad->mqtt;

        /* AWS delivers /accepted|/rejected without a subscription, mosquitto
         * (and other brokers) only with one; notify-next always needs one. */
        r = mqtt_subscribe(jobs->mqtt, "jobs/notify-next", 1, on_notify_next, NULL, jobs, &jobs->sub_notify);
        if (r >= 0)
                r = mqtt_subscribe(jobs->mqtt, "jobs/+/get/+", 1, on_get_reply, NULL, jobs, &jobs->sub_get);
        if (r >= 0)
                r = mqtt_subscribe(jobs->mqtt, "jobs/+/update/+", 1, on_update_topic, NULL, jobs, &jobs->sub_update);
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
        while (jobs->updates) {
                struct update *u = jobs->updates;

                jobs->updates = u->next;
                update_free(u);
        }
        while (jobs->handlers) {
                struct handler_entry *h = jobs->handlers;

                jobs->handlers = h->next;
                free(h);
        }
        sd_event_source_disable_unref(jobs->next_get_timer);
        mqtt_unsubscribe(jobs->sub_notify);
        mqtt_unsubscribe(jobs->sub_get);
        mqtt_unsubscribe(jobs->sub_update);
        free(jobs);
}

int jobs_register_handler(struct jobs *jobs, const struct job_handler *handler) {
        struct handler_entry *e, **p;

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
