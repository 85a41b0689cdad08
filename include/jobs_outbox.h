/* SPDX-License-Identifier: MIT */
/*
 * jobs_outbox: the Jobs client's UpdateJobExecution requests on their way to
 * the service (protocol.md §1.3, §1.6). Owns their order (first in, first
 * out, only the head in flight, so the service applies them in the order
 * they were made), the clientToken that matches each answer on
 * jobs/<id>/update/accepted|rejected, the reply timeout, retries with
 * backoff of transient refusals, QoS 0 progress reports without retries,
 * and the one FAILED that replaces a terminal status the service refused.
 * Never decides which job runs or which status to report: jobs.c does.
 */
#pragma once

#include <stdbool.h>

#include "jobs_protocol.h"
#include "otad.h"

struct jobs_outbox;

/* Once per report: 0 when the service accepted it, or a negative errno
 * when it finally refused it (-ENOTCONN: a progress report dropped offline). */
typedef void (*jobs_outbox_done_fn)(int result, void *userdata);

/* A report was settled: result 0 when the service accepted it (a progress
 * report: when it was sent), or -ESTALE (the execution takes no more
 * changes: InvalidStateTransition, TerminalStateReached), -ENOENT
 * (ResourceNotFound), -EINVAL (refused as invalid), -EPROTO (another
 * refusal) or the publish error. Called before the report's own done
 * callback; job_id is valid during the call. Not called for progress
 * reports dropped offline. */
typedef void (*jobs_outbox_settled_fn)(const char *job_id, enum job_status status, int result, void *userdata);

/* Subscribes to jobs/+/update/+ on mqtt. */
int jobs_outbox_new(struct otad *otad, struct mqtt_session *mqtt, jobs_outbox_settled_fn settled, void *userdata,
                    struct jobs_outbox **ret);
/* Forgets every queued report without calling anyone. */
void jobs_outbox_free(struct jobs_outbox *o);

/* Queues a report (arguments already validated, details may be NULL);
 * jobs_outbox_kick() sends it once it is the head of the queue. progress:
 * QoS 0, settled once sent, never retried, dropped when offline. */
int jobs_outbox_add(struct jobs_outbox *o, const char *job_id, enum job_status status,
                    const struct status_detail *details, bool progress, jobs_outbox_done_fn done,
                    void *userdata);
/* Sends the head of the queue, unless the session is down or it is in
 * flight already: after jobs_outbox_add() and on every connect. */
void jobs_outbox_kick(struct jobs_outbox *o);
/* The session is down: progress reports are dropped (done(-ENOTCONN));
 * the report in flight is sent again after the reconnect. */
void jobs_outbox_disconnected(struct jobs_outbox *o);
/* Whether a terminal report of job_id is still queued. */
bool jobs_outbox_has_terminal(const struct jobs_outbox *o, const char *job_id);
