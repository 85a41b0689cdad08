/* SPDX-License-Identifier: MIT */
/* json_scan: where and why a Jobs message cJSON refuses is broken, and the
 * members that still let otad answer it (issue 11). */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json_scan.h"
#include "tap.h"

enum { JOB_ID, STATUS, TOKEN, DOCUMENT, N };

static struct json_scan_member members[N];
static struct json_scan_result res;

static int scan(const char *text) {
        memset(members, 0, sizeof(members));
        members[JOB_ID] = (struct json_scan_member){ .path = { "execution", "jobId" } };
        members[STATUS] = (struct json_scan_member){ .path = { "execution", "status" } };
        members[TOKEN] = (struct json_scan_member){ .path = { "clientToken" } };
        members[DOCUMENT] = (struct json_scan_member){ .path = { "execution", "jobDocument" } };
        return json_scan(text, strlen(text), CJSON_NESTING_LIMIT, members, N, &res);
}

/* {"execution":{"jobId":"deep-1","jobDocument":{"a":[[[...]]]},"status":"QUEUED"}} */
static char *deep_message(size_t levels, bool id_last) {
        size_t size = 2 * levels + 256, n = 0;
        char *s = malloc(size);

        n += (size_t) snprintf(s + n, size - n, "{\"timestamp\":1,\"execution\":{%s\"jobDocument\":{\"a\":",
                              id_last ? "" : "\"jobId\":\"deep-1\",");
        for (size_t i = 0; i < levels; i++)
                s[n++] = '[';
        for (size_t i = 0; i < levels; i++)
                s[n++] = ']';
        snprintf(s + n, size - n, "}%s,\"status\":\"QUEUED\"}}", id_last ? ",\"jobId\":\"deep-1\"" : "");
        return s;
}

int main(void) {
        char *deep;
        cJSON *j;

        /* well-formed */
        tap_is_int(scan("{\"clientToken\":\"1-ab\",\"execution\":{\"jobId\":\"job-1\",\"status\":\"QUEUED\","
                        "\"jobDocument\":{\"operation\":\"hello\",\"n\":[1,-2.5e3,true,null,{}]}}}"),
                   0, "scans");
        tap_ok(!res.error, "valid JSON has no error");
        tap_is_str(members[JOB_ID].value, "job-1", "execution.jobId");
        tap_is_str(members[STATUS].value, "QUEUED", "execution.status");
        tap_is_str(members[TOKEN].value, "1-ab", "clientToken at the top");
        tap_ok(members[DOCUMENT].type == JSON_SCAN_OBJECT && members[DOCUMENT].end > members[DOCUMENT].start,
               "the jobDocument object's span");
        tap_is_int((long long) res.depth_max, 5, "deepest nesting");

        /* Not at the top level, not inside "execution": no match. */
        scan("{\"x\":{\"jobId\":\"no\"},\"execution\":[{\"jobId\":\"no\"}],\"jobId\":\"no\"}");
        tap_ok(members[JOB_ID].type == JSON_SCAN_NONE, "a jobId elsewhere is not execution.jobId");
        scan("{\"execution\":{\"job\\u0049d\":\"escaped-key\"}}");
        tap_ok(members[JOB_ID].type == JSON_SCAN_NONE, "an escaped key does not match");
        scan("{\"execution\":{\"jobId\":\"a\\\"b\"}}");
        tap_ok(members[JOB_ID].type == JSON_SCAN_STRING && !members[JOB_ID].plain,
               "an escaped value is found but not plain");
        scan("{\"execution\":{\"jobId\":42}}");
        tap_ok(members[JOB_ID].type == JSON_SCAN_NUMBER, "a number where a string belongs");
        scan("{\"execution\":{\"jobId\":\"first\",\"jobId\":\"second\"}}");
        tap_is_str(members[JOB_ID].value, "first", "the first occurrence counts");

        /* nesting beyond cJSON's limit: found, and the scan goes on */
        deep = deep_message(1000, false);
        j = cJSON_Parse(deep);
        tap_ok(!j, "cJSON refuses 1000 arrays in a document (the issue)");
        cJSON_Delete(j);
        scan(deep);
        tap_ok(!res.error, "it is valid JSON");
        tap_ok(res.depth_exceeded, "deeper than the limit");
        tap_is_int((long long) res.depth_max, 1003, "1003 levels in all");
        tap_ok(res.depth_offset > members[DOCUMENT].start && res.depth_offset < members[DOCUMENT].end,
               "the depth is exceeded inside the document");
        tap_is_str(members[JOB_ID].value, "deep-1", "jobId before the deep part");
        tap_is_str(members[STATUS].value, "QUEUED", "status after the deep part");
        free(deep);
        deep = deep_message(100000, true);
        scan(deep);
        tap_is_str(members[JOB_ID].value, "deep-1", "jobId after 100000 levels (no recursion)");
        free(deep);

        /* broken */
        scan("{\"execution\":{\"jobId\":\"t-1\",\"jobDocument\":{\"op\":\"hel");
        tap_is_str(res.error, "the text ends inside a string", "truncated in a string");
        tap_is_str(members[JOB_ID].value, "t-1", "jobId before the truncation");
        tap_ok(members[DOCUMENT].type == JSON_SCAN_OBJECT && members[DOCUMENT].end == 0,
               "the document never closed");
        scan("{\"execution\":{\"jobId\":\"t-2\"}");
        tap_is_str(res.error, "the text ends before the JSON value does", "truncated between members");
        scan("{\"a\":tru");
        tap_is_str(res.error, "the text ends inside a literal", "truncated literal");
        scan("{\"a\":1}x");
        tap_is_str(res.error, "text after the JSON value", "trailing text");
        tap_is_int((long long) res.error_offset, 7, "at its first byte");
        scan("{\"a\":01}");
        tap_ok(res.error != NULL, "leading zero");
        scan("{\"a\":1.}");
        tap_is_str(res.error, "an invalid number", "a number without digits after the point");
        scan("{\"a\":\"\\x\"}");
        tap_is_str(res.error, "an invalid escape", "\\x");
        scan("{\"a\":\"\\u12g4\"}");
        tap_is_str(res.error, "an invalid \\u escape", "\\u with a non-hex digit");
        scan("{\"a\":\"tab\there\"}");
        tap_is_str(res.error, "a control character in a string", "a raw tab in a string");
        scan("{\"a\":1,}");
        tap_ok(res.error && res.error_offset == 7, "trailing comma in an object");
        scan("[1,2]]");
        tap_is_str(res.error, "text after the JSON value", "one bracket too many");
        scan("{\"a\" 1}");
        tap_is_str(res.error, "an unexpected character (expected ':')", "missing colon");
        scan("");
        tap_is_str(res.error, "the text ends before the JSON value does", "empty");

        /* UTF-8 */
        scan("{\"execution\":{\"jobId\":\"u-1\",\"jobDocument\":{\"n\":\"caf\xe9\"}}}");
        tap_is_str(res.error, "invalid UTF-8", "Latin-1 in a string");
        tap_is_int((long long) json_scan_utf8_invalid("caf\xc3\xa9 \xe2\x9c\x93 \xf0\x9f\x98\x80", 14), 14,
                   "valid 2-, 3- and 4-byte sequences");
        tap_is_int((long long) json_scan_utf8_invalid("ab\xc0\xaf", 4), 2, "overlong '/'");
        tap_is_int((long long) json_scan_utf8_invalid("ab\xed\xa0\x80", 5), 2, "a UTF-16 surrogate");
        tap_is_int((long long) json_scan_utf8_invalid("ab\xf4\x90\x80\x80", 6), 2, "above U+10FFFF");
        tap_is_int((long long) json_scan_utf8_invalid("ab\xe2\x9c", 4), 2, "cut in the middle");
        return tap_done();
}
