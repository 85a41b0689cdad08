/* SPDX-License-Identifier: MIT */
/* The Jobs API's statuses and limits (protocol.md §1.4, §1.5, §1.7). */
#include <assert.h>
#include <errno.h>
#include <string.h>

#include "jobs_protocol.h"
#include "macro.h"

#define JOB_ID_MAX 64        /* AWS: jobId 1..64 [a-zA-Z0-9_-] (§1.7) */
#define DETAILS_MAX_PAIRS 10 /* §1.5 */
#define DETAIL_KEY_MAX 128
#define DETAIL_VALUE_MAX 1024

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
        assert(ret);

        for (size_t i = 0; i < ELEMENTSOF(status_names); i++)
                if (s && strcmp(s, status_names[i]) == 0) {
                        *ret = (enum job_status) i;
                        return 0;
                }
        return -EINVAL;
}

bool job_status_is_terminal(enum job_status s) {
        return s != JOB_QUEUED && s != JOB_IN_PROGRESS;
}

bool jobs_job_id_is_valid(const char *id) {
        size_t n = id ? strlen(id) : 0;

        if (n < 1 || n > JOB_ID_MAX)
                return false;
        return strspn(id, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") == n;
}

/* One UTF-8 character at p: its length, or 0 when invalid; *ret_cp the
 * code point. */
static unsigned utf8_char(const unsigned char *p, unsigned *ret_cp) {
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
                return 0;
        for (unsigned i = 1; i < len; i++) {
                if ((p[i] & 0xc0) != 0x80)
                        return 0;
                cp = cp << 6 | (p[i] & 0x3f);
        }
        *ret_cp = cp;
        return len;
}

static bool is_control(unsigned cp) {
        return cp < 0x20 || (cp >= 0x7f && cp < 0xa0);
}

/* [^\p{C}]+ over UTF-8: no C0/C1 controls, no DEL, valid encoding; length
 * counted in characters. */
static bool detail_value_is_valid(const char *v) {
        const unsigned char *p = (const unsigned char *) v;
        size_t chars = 0;

        while (*p) {
                unsigned cp, len = utf8_char(p, &cp);

                if (len == 0 || is_control(cp))
                        return false;
                p += len;
                chars++;
        }
        return chars >= 1 && chars <= DETAIL_VALUE_MAX;
}

void jobs_detail_value_sanitize(char *value) {
        unsigned char *p = (unsigned char *) value;
        size_t chars = 0;

        assert(value);

        while (*p && chars < DETAIL_VALUE_MAX) {
                unsigned cp, len = utf8_char(p, &cp);

                if (len == 0 || is_control(cp)) {
                        *p++ = '?';
                } else
                        p += len;
                chars++;
        }
        *p = '\0';
        if (!value[0])
                strcpy(value, "-");
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

