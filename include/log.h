/* SPDX-License-Identifier: MIT */
/*
 * log: the daemon's only way to say something to a person.
 * Owns the choice between the journal (structured fields, when stderr is the
 * journal stream) and plain stderr lines, and the level filter.
 * Never decides anything: callers log where they make a decision, once.
 */
#pragma once

#include <stdarg.h>
#include <syslog.h>

/* A fixed MESSAGE_ID per milestone, so `journalctl MESSAGE_ID=...` finds
 * every occurrence across versions. Never change a published value. */
#define OTAD_MID_STARTED        "53e7acdcb6a24fe4a14f5ddf144cfcc3"
#define OTAD_MID_CONNECTED      "26d0572c794d4396a38c8aeacb1e10cd"
#define OTAD_MID_DISCONNECTED   "90686fd1f6b14bbd870e523da720e521"
#define OTAD_MID_JOB_RECEIVED   "c973a4eace2041d59c753beb6330b8c8"
#define OTAD_MID_JOB_FINISHED   "25592f82f6de4a9489e30dafdce2c443"
#define OTAD_MID_UPDATE_STARTED "f61209aebc964f75bc360e5f493777b0"
#define OTAD_MID_IMAGE_VERIFIED "01b0ee85354f44c7ae5d6756e76c9a5f"
#define OTAD_MID_SLOT_ACTIVATED "2df47ef3a6af4767baae96d5bb0bb256"
#define OTAD_MID_COMMITTED      "776cc40014444347b20e42b23f576cb2"
#define OTAD_MID_ROLLED_BACK    "771d178eea884aada53cf4bcc5b33e0b"
#define OTAD_MID_UPDATE_FAILED  "2881205e92ad4f96952110c75a0c6f55"
#define OTAD_MID_STOPPING       "d5b22586263f4f48bc345ca99c219889"

/* Optional structured context of one log line. Any member may be NULL. */
struct log_fields {
        const char *message_id; /* MESSAGE_ID=, one of OTAD_MID_* */
        const char *job_id;     /* OTAD_JOB_ID= */
        const char *stage;      /* OTAD_STAGE=, e.g. "download", "verify" */
        const char *slot;       /* OTAD_SLOT= */
};

/* Chooses the sink: the journal when $JOURNAL_STREAM names our stderr (the
 * way systemd tells a service that its stderr is the journal), else stderr. */
void log_open(void);
void log_set_max_level(int level);
int log_get_max_level(void);
/* "err", "warning", "notice", "info", "debug" -> LOG_*; -EINVAL otherwise. */
int log_level_from_string(const char *s);
const char *log_level_to_string(int level);

/* Returns -abs(error) when error != 0, else 0, so a caller can write
 * `return log_error_errno(r, "Failed to open %s: %m", path)`: errno is
 * abs(error) while the message is formatted, so %m names the cause (the
 * glibc extension systemd's logging relies on too). */
int log_full(int level, int error, const struct log_fields *fields,
             const char *format, ...) __attribute__((format(printf, 4, 5)));
int log_fullv(int level, int error, const struct log_fields *fields,
              const char *format, va_list ap) __attribute__((format(printf, 4, 0)));

#define log_debug(...)   log_full(LOG_DEBUG, 0, NULL, __VA_ARGS__)
#define log_info(...)    log_full(LOG_INFO, 0, NULL, __VA_ARGS__)
#define log_notice(...)  log_full(LOG_NOTICE, 0, NULL, __VA_ARGS__)
#define log_warning(...) log_full(LOG_WARNING, 0, NULL, __VA_ARGS__)
#define log_error(...)   log_full(LOG_ERR, 0, NULL, __VA_ARGS__)

#define log_warning_errno(e, ...) log_full(LOG_WARNING, (e), NULL, __VA_ARGS__)
#define log_error_errno(e, ...)   log_full(LOG_ERR, (e), NULL, __VA_ARGS__)

/* A line about one job: carries OTAD_JOB_ID= and OTAD_STAGE=. */
#define log_job(level, job, stg, ...) \
        log_full((level), 0, &(const struct log_fields){ .job_id = (job), .stage = (stg) }, __VA_ARGS__)
#define log_job_errno(level, error, job, stg, ...) \
        log_full((level), (error), &(const struct log_fields){ .job_id = (job), .stage = (stg) }, __VA_ARGS__)
/* A milestone: carries MESSAGE_ID= as well. */
#define log_milestone(level, mid, job, stg, ...) \
        log_full((level), 0, &(const struct log_fields){ .message_id = (mid), .job_id = (job), .stage = (stg) }, __VA_ARGS__)
