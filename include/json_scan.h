/* SPDX-License-Identifier: MIT */
/*
 * json_scan: reads a JSON text (RFC 8259, UTF-8) in one pass, without a tree
 * and without recursion, to say where and why a message cJSON refuses is
 * broken (nesting deeper than cJSON's limit, invalid bytes, truncation) and
 * to still pick out the few members a reply needs, e.g. the jobId of a job
 * execution whose document cannot be parsed. Never allocates more than one
 * bit per nesting level; never interprets what it finds.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#define JSON_SCAN_PATH_MAX 4
#define JSON_SCAN_VALUE_MAX 128

enum json_scan_type {
        JSON_SCAN_NONE,   /* not seen */
        JSON_SCAN_STRING,
        JSON_SCAN_NUMBER,
        JSON_SCAN_OBJECT,
        JSON_SCAN_ARRAY,
        JSON_SCAN_LITERAL, /* true, false, null */
};

/* One member to look for, by the object keys that lead to it from the root
 * ({"execution", "jobId"}); only plain (unescaped) keys match. The first
 * occurrence counts. */
struct json_scan_member {
        const char *path[JSON_SCAN_PATH_MAX + 1]; /* NULL-terminated */

        /* Filled in by json_scan(): */
        enum json_scan_type type;
        size_t start, end;  /* byte offsets of the value; end is 0 while it never closed */
        /* A string value without escapes of up to JSON_SCAN_VALUE_MAX bytes,
         * else "" with plain = false. */
        char value[JSON_SCAN_VALUE_MAX + 1];
        bool plain;
};

struct json_scan_result {
        /* The first syntax error: NULL when the text is well-formed JSON.
         * error_offset is the byte it was found at (len for a truncation). */
        const char *error;
        size_t error_offset;
        /* Where the nesting first went deeper than the max_depth asked for
         * (depth_exceeded false if never); scanning goes on past it. */
        bool depth_exceeded;
        size_t depth_offset;
        size_t depth_max; /* the deepest nesting seen */
};

/* Scans text[0..len). Stops at the first syntax error; members found before
 * it stay filled in. 0, or -ENOMEM. */
int json_scan(const char *text, size_t len, size_t max_depth, struct json_scan_member *members, size_t n_members,
              struct json_scan_result *ret);

/* The offset of the first byte that is not part of valid UTF-8 (overlong
 * forms, surrogates and code points above U+10FFFF are invalid), or len. */
size_t json_scan_utf8_invalid(const char *text, size_t len);
