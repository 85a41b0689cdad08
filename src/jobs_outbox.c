/* SPDX-License-Identifier: MIT */
/*
 * UpdateJobExecution requests, one at a time (protocol.md §1.3): no
 * expectedVersion is sent, so the order we send them in is the order the
 * service applies them in, and only the head of the queue is ever in
 * flight. Each report keeps one clientToken for all its attempts, so that a
 * late answer to an earlier attempt settles it just as well (a service
 * slower than our timeout must not make us retry forever).
 */
#include <cjson/cJSON.h>
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "backoff.h"
#include "clock.h"
#include "jobs_outbox.h"
#include "jobs_protocol.h"
#include "log.h"
#include "macro.h"
#include "mqtt.h"

#define CLIENT_TOKEN_MAX 64 /* AWS: clientToken ≤ 64 bytes (§1.3) */
#define JOB_ID_MAX 64       /* AWS: jobId 1..64 (§1.7) */
#define REPLY_TIMEOUT_USEC (10 * USEC_PER_SEC) /* wait ≤10 s per attempt, like DC (§1.6) */
#define RETRY_MIN_USEC (2 * USEC_PER_SEC)
#define RETRY_MAX_USEC (300 * USEC_PER_SEC)
#define PROGRESS_REMEMBERED 8

struct report {
        struct jobs_outbox *outbox;
        char *job_id;
        enum job_status status;
        char *details_json; /* serialized statusDetails object, or NULL */
        bool progress; /* QoS 0, fire and forget */
        jobs_outbox_done_fn done;
        void *userdata;
        char token[CLIENT_TOKEN_MAX + 1];
        unsigned attempts;
        bool in_flight;
        bool is_fallback; /* the FAILED sent because a terminal report was refused */
        struct backoff backoff;
        sd_event_source *timer; /* reply timeout or retry backoff */
        struct report *next;
};

struct jobs_outbox {
        struct otad *otad;
        struct mqtt_session *mqtt;
        struct mqtt_subscription *sub;
        jobs_outbox_settled_fn settled;
        void *userdata;
        struct report *queue;
        unsigned token_counter;
        /* Progress reports go out at QoS 0 and are settled when sent; the
         * service still answers them. Their tokens, so that those answers
         * are recognised as ours. */
        struct {
                char job_id[JOB_ID_MAX + 1];
                char token[CLIENT_TOKEN_MAX + 1];
        } progress[PROGRESS_REMEMBERED];
        unsigned progress_next;
};

static void report_send(struct report *r);

static void make_token(struct jobs_outbox *o, char *buf, size_t size) {
        uint32_t r = 0;

        (void) getrandom(&r, sizeof(r), GRND_NONBLOCK);
        /* Opaque to the service; ours only for correlation (§1.3, ≤64 bytes). */
        snprintf(buf, size, "u%u-%08x", ++o->token_counter, r);
}

static void report_free(struct report *r) {
        if (!r)
                return;
        sd_event_source_disable_unref(r->timer);
        free(r->job_id);
        free(r->details_json);
        free(r);
}

static int code_to_errno(const char *code) {
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

static struct report *report_new(struct jobs_outbox *o, const char *job_id, enum job_status status,
                                 const struct status_detail *details, bool progress, jobs_outbox_done_fn done,
                                 void *userdata) {
        struct report *r = calloc(1, sizeof(*r));

        if (!r)
                return NULL;
        r->outbox = o;
        r->status = status;
        r->progress = progress;
        r->done = done;
        r->userdata = userdata;
        r->backoff = BACKOFF_INIT(RETRY_MIN_USEC, RETRY_MAX_USEC);
        make_token(o, r->token, sizeof(r->token));
        r->job_id = strdup(job_id);
        if (!r->job_id) {
                report_free(r);
                return NULL;
        }
        if (details && details[0].key) {
                cJSON *obj = cJSON_CreateObject();

                for (size_t i = 0; obj && details[i].key; i++)
                        if (!cJSON_AddStringToObject(obj, details[i].key, details[i].value)) {
                                cJSON_Delete(obj);
                                obj = NULL;
                        }
                r->details_json = obj ? cJSON_PrintUnformatted(obj) : NULL;
                cJSON_Delete(obj);
                if (!r->details_json) {
                        report_free(r);
                        return NULL;
                }
        }
        return r;
}

static void enqueue(struct jobs_outbox *o, struct report *r) {
        struct report **p;

        for (p = &o->queue; *p; p = &(*p)->next)
                ;
        *p = r;
}

/* A terminal status the service refused for a reason other than "already
 * terminal" would leave the job IN_PROGRESS and blocking the queue: report
 * FAILED with the service's own words instead, once. */
static void enqueue_fallback(struct jobs_outbox *o, const struct report *refused, const char *code,
                             const char *message) {
        char reason[256], detail[1025];
        struct status_detail d[3] = { { NULL, NULL }, { NULL, NULL }, { NULL, NULL } };
        struct report *r;

        snprintf(reason, sizeof(reason), "the service refused status %s: %s", job_status_to_string(refused->status),
                 code ? code : "no answer");
        jobs_detail_value_sanitize(reason);
        d[0] = (struct status_detail){ "reason", reason };
        if (message && message[0]) {
                snprintf(detail, sizeof(detail), "%s", message);
                jobs_detail_value_sanitize(detail);
                d[1] = (struct status_detail){ "detail", detail };
        }
        r = report_new(o, refused->job_id, JOB_FAILED, d, false, NULL, NULL);
        if (!r) {
                log_job(LOG_ERR, refused->job_id, NULL, "Job %s: out of memory, cannot report it FAILED", refused->job_id);
                return;
        }
        r->is_fallback = true;
        enqueue(o, r);
}

/* Takes r off the queue, tells jobs.c and r's owner, and moves on. */
static void report_finish(struct jobs_outbox *o, struct report *r, int result, const char *code,
                          const char *message) {
        struct report **p = &o->queue;
        jobs_outbox_done_fn done = r->done;
        void *userdata = r->userdata;

        while (*p && *p != r)
                p = &(*p)->next;
        if (*p)
                *p = r->next;

        if (result == 0)
                log_job(job_status_is_terminal(r->status) ? LOG_INFO : LOG_DEBUG, r->job_id, NULL,
                        "Job %s: %s accepted by the service", r->job_id, job_status_to_string(r->status));
        if (job_status_is_terminal(r->status) && result < 0 && result != -ESTALE && result != -ENOENT &&
            !r->is_fallback && r->status != JOB_FAILED)
                enqueue_fallback(o, r, code, message);
        if (o->settled)
                o->settled(r->job_id, r->status, result, o->userdata);
        report_free(r);
        if (done)
                done(result, userdata);
        jobs_outbox_kick(o);
}

static int on_report_timer(sd_event_source *es, uint64_t usec, void *userdata) {
        struct report *r = userdata;

        r->timer = sd_event_source_disable_unref(r->timer);
        if (r->in_flight) {
                r->in_flight = false;
                log_job(LOG_WARNING, r->job_id, NULL, "Job %s: no answer to the %s update within 10 s, sending it again",
                        r->job_id, job_status_to_string(r->status));
                (void) sd_event_add_time_relative(r->outbox->otad->event, &r->timer, CLOCK_MONOTONIC,
                                                  backoff_next(&r->backoff), 0, on_report_timer, r);
                return 0;
        }
        report_send(r);
        return 0;
}

static void progress_remember(struct jobs_outbox *o, const struct report *r) {
        unsigned i = o->progress_next++ % PROGRESS_REMEMBERED;

        snprintf(o->progress[i].job_id, sizeof(o->progress[i].job_id), "%s", r->job_id);
        snprintf(o->progress[i].token, sizeof(o->progress[i].token), "%s", r->token);
}

static bool progress_is_ours(const struct jobs_outbox *o, const char *job_id, const char *token) {
        for (unsigned i = 0; i < PROGRESS_REMEMBERED; i++)
                if (o->progress[i].token[0] && strcmp(o->progress[i].token, token) == 0 &&
                    strcmp(o->progress[i].job_id, job_id) == 0)
                        return true;
        return false;
}

static void report_send(struct report *r) {
        struct jobs_outbox *o = r->outbox;
        _cleanup_free_ char *topic = NULL, *body = NULL;
        int ret;

        if (r->in_flight || r->timer || !mqtt_session_is_connected(o->mqtt))
                return;
        /* Compact JSON, status + statusDetails like the reference agent
         * (§2.4); no expectedVersion (see the top of this file). */
        if (asprintf(&body, "{\"status\":\"%s\"%s%s,\"clientToken\":\"%s\"}", job_status_to_string(r->status),
                     r->details_json ? ",\"statusDetails\":" : "", r->details_json ? r->details_json : "",
                     r->token) < 0 ||
            asprintf(&topic, "jobs/%s/update", r->job_id) < 0) {
                body = topic = NULL;
                log_job(LOG_ERR, r->job_id, NULL, "Job %s: out of memory, status update delayed", r->job_id);
                (void) sd_event_add_time_relative(o->otad->event, &r->timer, CLOCK_MONOTONIC, RETRY_MIN_USEC, 0,
                                                  on_report_timer, r);
                return;
        }
        r->attempts++;
        ret = mqtt_publish(o->mqtt, topic, body, strlen(body), r->progress ? 0 : 1);
        if (ret == -ENOTCONN)
                return; /* sent again on the next connect */
        if (ret < 0) {
                log_job_errno(LOG_ERR, ret, r->job_id, NULL, "Job %s: failed to publish the %s update: %m",
                              r->job_id, job_status_to_string(r->status));
                report_finish(o, r, ret, NULL, NULL);
                return;
        }
        log_job(LOG_DEBUG, r->job_id, NULL, "Job %s: sent %s", r->job_id, body);
        if (r->progress) {
                /* Progress is fire-and-forget, like the reference agent's "receive". */
                progress_remember(o, r);
                report_finish(o, r, 0, NULL, NULL);
                return;
        }
        r->in_flight = true;
        ret = sd_event_add_time_relative(o->otad->event, &r->timer, CLOCK_MONOTONIC, REPLY_TIMEOUT_USEC, 0,
                                         on_report_timer, r);
        if (ret < 0)
                log_job_errno(LOG_WARNING, ret, r->job_id, NULL,
                              "Job %s: failed to arm the reply timeout: %m, ignoring", r->job_id);
}

static void on_reply(struct jobs_outbox *o, const char *job_id, bool accepted, const cJSON *reply) {
        const cJSON *token = cJSON_GetObjectItemCaseSensitive(reply, "clientToken");
        const cJSON *code = cJSON_GetObjectItemCaseSensitive(reply, "code");
        const cJSON *message = cJSON_GetObjectItemCaseSensitive(reply, "message");
        const char *c = cJSON_IsString(code) ? code->valuestring : NULL;
        const char *m = cJSON_IsString(message) ? message->valuestring : NULL;
        struct report *r = o->queue;

        if (!r || !r->attempts || !cJSON_IsString(token) || strcmp(token->valuestring, r->token) != 0 ||
            strcmp(r->job_id, job_id) != 0) {
                if (cJSON_IsString(token) && progress_is_ours(o, job_id, token->valuestring)) {
                        if (accepted)
                                log_job(LOG_DEBUG, job_id, NULL, "Job %s: progress update %s accepted by the service", job_id,
                                        token->valuestring);
                        else
                                log_job(LOG_WARNING, job_id, NULL, "Job %s: the service refused progress update %s: %s: %s",
                                        job_id, token->valuestring, c ? c : "(no code)", m ? m : "(no message)");
                        return;
                }
                log_info("Ignoring an update %s of job %s that answers no request of ours (clientToken %s)",
                         accepted ? "acceptance" : "rejection", job_id,
                         cJSON_IsString(token) ? token->valuestring : "missing");
                return;
        }
        if (!r->in_flight && !accepted) {
                /* A rejection of an earlier attempt; the retry is on its way. */
                log_debug("Ignoring a late rejection of an earlier %s update of job %s",
                          job_status_to_string(r->status), job_id);
                return;
        }
        r->in_flight = false;
        r->timer = sd_event_source_disable_unref(r->timer);
        if (accepted) {
                report_finish(o, r, 0, NULL, NULL);
                return;
        }
        if (c && (strcmp(c, "RequestThrottled") == 0 || strcmp(c, "InternalError") == 0 ||
                  strcmp(c, "VersionMismatch") == 0)) {
                /* Transient (§1.6, DC's policy). VersionMismatch cannot come
                 * from our requests (no expectedVersion); if a service sends
                 * it anyway, the retry simply re-applies our status. */
                log_job(LOG_WARNING, r->job_id, NULL, "Job %s: %s update rejected with %s, retrying", r->job_id,
                        job_status_to_string(r->status), c);
                (void) sd_event_add_time_relative(o->otad->event, &r->timer, CLOCK_MONOTONIC,
                                                  backoff_next(&r->backoff), 0, on_report_timer, r);
                return;
        }
        log_job(LOG_ERR, r->job_id, NULL, "Job %s: the service refused the %s update: %s: %s", r->job_id,
                job_status_to_string(r->status), c ? c : "(no code)", m ? m : "(no message)");
        report_finish(o, r, code_to_errno(c), c, m);
}

/* jobs/<id>/update/accepted|rejected */
static void on_update_topic(const char *topic, const uint8_t *payload, size_t len, void *userdata) {
        struct jobs_outbox *o = userdata;
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
        j = cJSON_ParseWithLength((const char *) payload, len);
        if (!cJSON_IsObject(j)) {
                log_warning("Ignoring an answer on %s that is not a JSON object (%zu bytes)", topic, len);
                cJSON_Delete(j);
                return;
        }
        on_reply(o, job_id, accepted, j);
        cJSON_Delete(j);
}

int jobs_outbox_new(struct otad *otad, struct mqtt_session *mqtt, jobs_outbox_settled_fn settled, void *userdata,
                    struct jobs_outbox **ret) {
        struct jobs_outbox *o;
        int r;

        assert(otad);
        assert(mqtt);
        assert(ret);

        o = calloc(1, sizeof(*o));
        if (!o)
                return -ENOMEM;
        o->otad = otad;
        o->mqtt = mqtt;
        o->settled = settled;
        o->userdata = userdata;
        /* AWS delivers the answers without a subscription, mosquitto only
         * with one. */
        r = mqtt_subscribe(mqtt, "jobs/+/update/+", 1, on_update_topic, NULL, o, &o->sub);
        if (r < 0) {
                free(o);
                return r;
        }
        *ret = o;
        return 0;
}

void jobs_outbox_free(struct jobs_outbox *o) {
        if (!o)
                return;
        while (o->queue) {
                struct report *r = o->queue;

                o->queue = r->next;
                report_free(r);
        }
        mqtt_unsubscribe(o->sub);
        free(o);
}

int jobs_outbox_add(struct jobs_outbox *o, const char *job_id, enum job_status status,
                    const struct status_detail *details, bool progress, jobs_outbox_done_fn done,
                    void *userdata) {
        struct report *r = report_new(o, job_id, status, details, progress, done, userdata);

        assert(o);
        assert(job_id);

        if (!r)
                return -ENOMEM;
        enqueue(o, r);
        return 0;
}

void jobs_outbox_kick(struct jobs_outbox *o) {
        assert(o);

        if (o->queue)
                report_send(o->queue);
}

void jobs_outbox_disconnected(struct jobs_outbox *o) {
        struct report **p = &o->queue;

        assert(o);

        /* Progress is dropped when offline; a newer one follows
         * soon enough. */
        while (*p) {
                struct report *r = *p;

                if (!r->progress) {
                        p = &r->next;
                        continue;
                }
                *p = r->next;
                if (r->done)
                        r->done(-ENOTCONN, r->userdata);
                report_free(r);
        }
        /* A report in flight is sent again, with the same token, after the
         * reconnect; the service applies a repeated status twice
         * harmlessly (IN_PROGRESS -> IN_PROGRESS is allowed). */
        for (struct report *r = o->queue; r; r = r->next)
                if (r->in_flight) {
                        r->in_flight = false;
                        r->timer = sd_event_source_disable_unref(r->timer);
                }
}

bool jobs_outbox_has_terminal(const struct jobs_outbox *o, const char *job_id) {
        assert(o);
        assert(job_id);

        for (const struct report *r = o->queue; r; r = r->next)
                if (strcmp(r->job_id, job_id) == 0 && job_status_is_terminal(r->status))
                        return true;
        return false;
}
