/* SPDX-License-Identifier: MIT */
/*
 * jobs_protocol: the vocabulary of the AWS IoT Jobs API as a device speaks
 * it (protocol.md §1.4, §1.5, §1.7): execution statuses and their names on
 * the wire, and the rules for job ids and statusDetails. Pure: no state, no
 * I/O; shared by the Jobs client, its outbox and the handler modules.
 */
#pragma once

#include <stdbool.h>

enum job_status {
        JOB_QUEUED,
        JOB_IN_PROGRESS,
        JOB_SUCCEEDED,
        JOB_FAILED,
        JOB_REJECTED,
        JOB_TIMED_OUT,
        JOB_REMOVED,
        JOB_CANCELED,
};

/* A statusDetails pair; arrays of these end at key == NULL. Keys follow
 * [a-zA-Z0-9:_-]{1,128}, values are 1..1024 printable characters, at most
 * 10 pairs: jobs_update() refuses anything else with -EINVAL. */
struct status_detail {
        const char *key;
        const char *value;
};

const char *job_status_to_string(enum job_status s);
int job_status_from_string(const char *s, enum job_status *ret);
/* Anything but QUEUED and IN_PROGRESS. */
bool job_status_is_terminal(enum job_status s);

/* Pure checks of the AWS limits (§1.5, §1.7), for callers that want to know
 * before jobs_update() refuses: 0, -E2BIG (>10 pairs) or -EINVAL. */
int jobs_validate_status_details(const struct status_detail *details);
bool jobs_job_id_is_valid(const char *id);
/* Makes a NUL-terminated value that may quote outside bytes valid as a
 * statusDetails value, in place: invalid UTF-8 and control characters
 * become '?', it is cut to 1024 characters, an empty one becomes "-". */
void jobs_detail_value_sanitize(char *value);
