/* SPDX-License-Identifier: MIT */
/*
 * jobs: the AWS IoT Jobs client. Owns the current job execution (one at a
 * time, as $next/notify-next expose them), de-duplication of repeated
 * deliveries, answering every job it is offered (one it cannot even parse is
 * rejected by its jobId), and the dispatch of job documents to handler
 * modules; status updates travel through jobs_outbox. Never does a job's
 * work.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "jobs_protocol.h"
#include "otad.h"

typedef struct cJSON cJSON;

/* One job execution as the service last described it. Read-only for handlers. */
struct job {
        char *id;                 /* [a-zA-Z0-9_-]{1,64} */
        enum job_status status;
        int64_t version_number;
        int64_t execution_number;
        const cJSON *status_details; /* object or NULL */
        const cJSON *document;       /* jobDocument object */
};

/* A handler module. The first registered handler whose accepts() says yes
 * gets the job. */
struct job_handler {
        const char *name;
        bool (*accepts)(const cJSON *document, void *userdata);
        /* Begin work. 0: the handler now owns the job until it reports a
         * terminal status through jobs_update() (it may do so before
         * returning). <0: jobs ends the job with reason (if set, else the
         * errno text): -EINVAL, -EBADMSG, -ENOENT, -EPERM, -EOPNOTSUPP and
         * -EMSGSIZE mean "this document can never run here" and give
         * REJECTED while the job is QUEUED; anything else, or a job already
         * IN_PROGRESS (AWS refuses IN_PROGRESS -> REJECTED), gives FAILED.
         * The job's pointers stay valid until refresh(), cancel() or the
         * terminal jobs_update(); copy what you keep longer. */
        int (*start)(const struct job *job, char *reason, size_t reason_size, void *userdata);
        /* The same job was delivered again, e.g. with fresh presigned URLs.
         * May be NULL. */
        void (*refresh)(const struct job *job, void *userdata);
        /* The service no longer offers this job (cancelled, removed, timed
         * out), or otad is stopping: stop its work now, report nothing. */
        void (*cancel)(const struct job *job, void *userdata);
        void *userdata;
};

enum {
        /* Progress: QoS 0, not retried, dropped when offline (like the
         * reference agent's "receive" updates). */
        JOBS_UPDATE_PROGRESS = 1 << 0,
};

/* Called once per jobs_update() with 0 when the service accepted the update,
 * or a negative errno when it finally refused it (reason in the journal). */
typedef void (*jobs_update_done_fn)(int result, void *userdata);

/* What the Jobs client is doing, for whoever shows it to a person (the
 * daemon's STATUS= line). */
enum jobs_activity {
        JOBS_IDLE,     /* the service offers no job */
        JOBS_RUNNING,  /* job_id went to the handler named handler */
        JOBS_FINISHED, /* job_id ended locally with status */
        JOBS_DROPPED,  /* the service no longer offers job_id (cancelled, removed, timed out) */
};

struct jobs_state {
        enum jobs_activity activity;
        const char *job_id;  /* all but IDLE */
        const char *handler; /* RUNNING */
        enum job_status status; /* FINISHED */
};

typedef void (*jobs_observer_fn)(const struct jobs_state *state, void *userdata);

int jobs_new(struct otad *otad, struct jobs **ret);
void jobs_free(struct jobs *jobs);
int jobs_register_handler(struct jobs *jobs, const struct job_handler *handler);
/* For a handler module's free(): forgets the handler by name. A job it
 * holds is dropped locally without a status update or cancel() (the module
 * stopped the work itself); the service offers it again after a restart. */
void jobs_unregister_handler(struct jobs *jobs, const char *name);
/* Called on every change of what the client is doing, in registration
 * order. */
int jobs_add_observer(struct jobs *jobs, jobs_observer_fn fn, void *userdata);

/* Publishes an UpdateJobExecution for job_id. A terminal status ends the
 * job locally and the client then asks for the next one. done may be NULL. */
int jobs_update(struct jobs *jobs, const char *job_id, enum job_status status,
                const struct status_detail *details, unsigned flags,
                jobs_update_done_fn done, void *userdata);
/* Asks the service for the current job again ($next/get): e.g. to obtain a
 * fresh presigned URL. The answer arrives through the handler's refresh(). */
int jobs_request_refresh(struct jobs *jobs);
