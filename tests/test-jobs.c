/* SPDX-License-Identifier: MIT */
/* The AWS limits jobs.c enforces before anything goes on the wire
 * (protocol.md §1.5 statusDetails, §1.7 job ids). */
#include <errno.h>
#include <string.h>

#include "jobs.h"
#include "tap.h"

#define D(k, v) { (k), (v) }
#define END { NULL, NULL }

static char long_value[1100];

static int details(const struct status_detail *d) {
        return jobs_validate_status_details(d);
}

int main(void) {
        char id64[65], id65[66], key128[129], key129[130];
        enum job_status s;

        memset(id64, 'a', 64), id64[64] = '\0';
        memset(id65, 'a', 65), id65[65] = '\0';
        memset(key128, 'k', 128), key128[128] = '\0';
        memset(key129, 'k', 129), key129[129] = '\0';

        /* job ids: 1..64 of [a-zA-Z0-9_-] */
        tap_ok(jobs_job_id_is_valid("AFR_OTA-job1"), "plain job id");
        tap_ok(jobs_job_id_is_valid(id64), "64-character job id");
        tap_ok(!jobs_job_id_is_valid(id65), "65-character job id refused");
        tap_ok(!jobs_job_id_is_valid(""), "empty job id refused");
        tap_ok(!jobs_job_id_is_valid(NULL), "missing job id refused");
        tap_ok(!jobs_job_id_is_valid("a/b"), "'/' would change the update topic");
        tap_ok(!jobs_job_id_is_valid("+"), "wildcard refused");
        tap_ok(!jobs_job_id_is_valid("$next"), "'$next' is not a job id");
        tap_ok(!jobs_job_id_is_valid("job 1"), "space refused");
        tap_ok(!jobs_job_id_is_valid("j\xc3\xa9"), "non-ASCII refused");

        /* statusDetails */
        tap_is_int(details(NULL), 0, "no details");
        tap_is_int(details((const struct status_detail[]){ END }), 0, "empty details");
        tap_is_int(details((const struct status_detail[]){ D("reason", "exit status 3"), D("stdout", "ok"), END }), 0,
                   "reason + stdout");
        tap_is_int(details((const struct status_detail[]){ D("self_test", "ready"), D("updatedBy", "0x01000001"), END }),
                   0, "reference agent's keys");
        tap_is_int(details((const struct status_detail[]){ D("a:b_c-D9", "x"), END }), 0, "key pattern [a-zA-Z0-9:_-]");
        tap_is_int(details((const struct status_detail[]){ D(key128, "x"), END }), 0, "128-character key");
        tap_is_int(details((const struct status_detail[]){ D(key129, "x"), END }), -EINVAL, "129-character key");
        tap_is_int(details((const struct status_detail[]){ D("", "x"), END }), -EINVAL, "empty key");
        tap_is_int(details((const struct status_detail[]){ D("bad key", "x"), END }), -EINVAL, "space in key");
        tap_is_int(details((const struct status_detail[]){ D("k.k", "x"), END }), -EINVAL, "'.' in key");
        tap_is_int(details((const struct status_detail[]){ D("k", ""), END }), -EINVAL, "empty value (AWS: min 1)");
        tap_is_int(details((const struct status_detail[]){ D("k", NULL), END }), -EINVAL, "NULL value");
        tap_is_int(details((const struct status_detail[]){ D("k", "line\nbreak"), END }), -EINVAL, "newline in value");
        tap_is_int(details((const struct status_detail[]){ D("k", "tab\there"), END }), -EINVAL, "tab in value");
        tap_is_int(details((const struct status_detail[]){ D("k", "del\x7f"), END }), -EINVAL, "DEL in value");
        tap_is_int(details((const struct status_detail[]){ D("k", "c1\xc2\x85"), END }), -EINVAL, "C1 control (NEL)");
        tap_is_int(details((const struct status_detail[]){ D("k", "bad\xff"), END }), -EINVAL, "invalid UTF-8");
        tap_is_int(details((const struct status_detail[]){ D("k", "caf\xc3\xa9 \xe2\x9c\x93"), END }), 0,
                   "printable UTF-8");
        tap_is_int(details((const struct status_detail[]){ D("k", "v"), D("k", "w"), END }), -EINVAL,
                   "duplicate key");

        memset(long_value, 'v', 1024);
        long_value[1024] = '\0';
        tap_is_int(details((const struct status_detail[]){ D("k", long_value), END }), 0, "1024-character value");
        /* The limit counts characters, not bytes. */
        tap_is_int(details((const struct status_detail[]){ D("k", "\xc3\xa9\xc3\xa9"), END }), 0, "2 characters in 4 bytes");
        long_value[1024] = 'v';
        long_value[1025] = '\0';
        tap_is_int(details((const struct status_detail[]){ D("k", long_value), END }), -EINVAL, "1025-character value");

        tap_is_int(details((const struct status_detail[]){ D("k0", "v"), D("k1", "v"), D("k2", "v"), D("k3", "v"),
                                                           D("k4", "v"), D("k5", "v"), D("k6", "v"), D("k7", "v"),
                                                           D("k8", "v"), D("k9", "v"), END }),
                   0, "10 pairs");
        tap_is_int(details((const struct status_detail[]){ D("k0", "v"), D("k1", "v"), D("k2", "v"), D("k3", "v"),
                                                           D("k4", "v"), D("k5", "v"), D("k6", "v"), D("k7", "v"),
                                                           D("k8", "v"), D("k9", "v"), D("k10", "v"), END }),
                   -E2BIG, "11 pairs");

        /* Reasons that quote outside bytes are made valid, never refused
         * (a refused terminal update would leave the job blocking the queue). */
        {
                char v[2048];

                strcpy(v, "cut \xc3");
                jobs_detail_value_sanitize(v);
                tap_is_str(v, "cut ?", "a cut UTF-8 sequence becomes '?'");
                strcpy(v, "tab\there\x85nel \xc2\x85");
                jobs_detail_value_sanitize(v);
                tap_ok(details((const struct status_detail[]){ D("reason", v), END }) == 0,
                       "controls replaced: \"%s\" is valid", v);
                strcpy(v, "");
                jobs_detail_value_sanitize(v);
                tap_is_str(v, "-", "an empty value becomes \"-\"");
                memset(v, 'x', 1500);
                v[1500] = '\0';
                jobs_detail_value_sanitize(v);
                tap_is_int((long long) strlen(v), 1024, "cut to 1024 characters");
                strcpy(v, "caf\xc3\xa9 \xe2\x9c\x93");
                jobs_detail_value_sanitize(v);
                tap_is_str(v, "caf\xc3\xa9 \xe2\x9c\x93", "printable UTF-8 stays as it is");
        }

        /* status names on the wire */
        tap_is_str(job_status_to_string(JOB_SUCCEEDED), "SUCCEEDED", "SUCCEEDED, not SUCCESS");
        tap_is_str(job_status_to_string(JOB_IN_PROGRESS), "IN_PROGRESS", "IN_PROGRESS");
        tap_ok(job_status_from_string("CANCELED", &s) == 0 && s == JOB_CANCELED, "CANCELED parses");
        tap_ok(job_status_from_string("CANCELLED", &s) == -EINVAL, "British spelling is not a status");
        tap_ok(job_status_from_string(NULL, &s) == -EINVAL, "NULL is not a status");
        tap_ok(!job_status_is_terminal(JOB_QUEUED) && !job_status_is_terminal(JOB_IN_PROGRESS) &&
                       job_status_is_terminal(JOB_REJECTED) && job_status_is_terminal(JOB_CANCELED),
               "terminal statuses");
        return tap_done();
}
