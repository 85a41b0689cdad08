/* SPDX-License-Identifier: MIT */
/*
 * Data-driven tests of the afr_ota parser: every tests/cases/afr_ota/NAME.json
 * is parsed and compared with NAME.expect, whose first line is "ok" or
 * "error: <part of the reason>", and whose further lines "field = value"
 * check parsed values ("(null)" for a missing text).
 */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fileio.h"
#include "macro.h"
#include "ota_document.h"
#include "tap.h"

static const char *text(const char *s) {
        return s ? s : "(null)";
}

/* The value of one named field as text, into buf. */
static const char *field(const struct ota_document *doc, const char *name, char *buf, size_t size) {
        unsigned i;
        int n = 0;
        const struct ota_document_file *f;
        const char *member;

        if (strcmp(name, "protocols") == 0) {
                snprintf(buf, size, "%s%s%s", doc->protocols & OTA_DOCUMENT_MQTT ? "MQTT" : "",
                         doc->protocols == (OTA_DOCUMENT_MQTT | OTA_DOCUMENT_HTTP) ? "," : "",
                         doc->protocols & OTA_DOCUMENT_HTTP ? "HTTP" : "");
                return buf;
        }
        if (strcmp(name, "streamname") == 0)
                return text(doc->stream_name);
        if (strcmp(name, "n_files") == 0) {
                snprintf(buf, size, "%zu", doc->n_files);
                return buf;
        }
        if (sscanf(name, "files[%u].%n", &i, &n) != 1 || n == 0 || i >= doc->n_files)
                return "(no such field)";
        f = &doc->files[i];
        member = name + n;

#define TEXT(m) if (strcmp(member, #m) == 0) return text(f->m)
#define NUM(m) if (strcmp(member, #m) == 0) { snprintf(buf, size, "%" PRIu64, (uint64_t) f->m); return buf; }
        TEXT(filepath);
        TEXT(image);
        TEXT(certfile);
        TEXT(signature_key);
        TEXT(signature_hash);
        TEXT(signature_alg);
        TEXT(update_data_url);
        TEXT(auth_scheme);
        NUM(filesize);
        NUM(fileid);
        NUM(file_type);
        NUM(attr);
        NUM(signature_len);
        NUM(part_offset);
        NUM(image_size);
#undef TEXT
#undef NUM
        if (strcmp(member, "is_part") == 0)
                return f->is_part ? "yes" : "no";
        return "(no such field)";
}

static void run_case(const char *dir, const char *name) {
        _cleanup_free_ char *json_path = NULL, *expect_path = NULL, *json = NULL, *expect = NULL;
        struct ota_document *doc = NULL;
        const cJSON *job_document;
        cJSON *root = NULL;
        char reason[256] = "", *line, *save = NULL;
        int r;

        if (asprintf(&json_path, "%s/%s.json", dir, name) < 0 ||
            asprintf(&expect_path, "%s/%s.expect", dir, name) < 0)
                abort();
        if (read_file_full(json_path, 1 << 20, &json, NULL) < 0 ||
            read_file_full(expect_path, 1 << 16, &expect, NULL) < 0) {
                tap_ok(false, "%s: case files readable", name);
                return;
        }

        root = cJSON_Parse(json);
        if (!root) {
                r = -EINVAL;
                snprintf(reason, sizeof reason, "not JSON");
        } else {
                /* A whole $next/get answer or a bare jobDocument. */
                const cJSON *execution = cJSON_GetObjectItemCaseSensitive(root, "execution");

                job_document = execution ? cJSON_GetObjectItemCaseSensitive(execution, "jobDocument") : root;
                r = ota_document_parse(job_document, &doc, reason, sizeof reason);
        }

        line = strtok_r(expect, "\n", &save);
        if (line && strncmp(line, "error: ", 7) == 0) {
                tap_ok(r < 0 && strstr(reason, line + 7), "%s: fails with \"%s\" (got %d \"%s\")", name,
                       line + 7, r, reason);
        } else if (tap_ok(line && strcmp(line, "ok") == 0 && r == 0, "%s: parses (%s)", name,
                          r < 0 ? reason : "ok")) {
                while ((line = strtok_r(NULL, "\n", &save))) {
                        char key[128], want[1200], buf[64];

                        if (sscanf(line, "%127s = %1199[^\n]", key, want) != 2)
                                continue;
                        tap_is_str(field(doc, key, buf, sizeof buf), want, key);
                }
        }

        ota_document_free(doc);
        cJSON_Delete(root);
}

static int compare_names(const void *a, const void *b) {
        return strcmp(*(char *const *) a, *(char *const *) b);
}

int main(void) {
        const char *root = getenv("OTAD_SOURCE_ROOT");
        _cleanup_free_ char *dir = NULL;
        char **names = NULL;
        size_t n = 0;
        struct dirent *de;
        DIR *d;

        if (asprintf(&dir, "%s/tests/cases/afr_ota", root ? root : ".") < 0)
                abort();
        d = opendir(dir);
        if (!d) {
                tap_ok(false, "open %s", dir);
                return tap_done();
        }
        while ((de = readdir(d))) {
                size_t len = strlen(de->d_name);

                if (len > 5 && strcmp(de->d_name + len - 5, ".json") == 0) {
                        names = realloc(names, (n + 1) * sizeof *names);
                        if (!names || !(names[n++] = strndup(de->d_name, len - 5)))
                                abort();
                }
        }
        closedir(d);
        qsort(names, n, sizeof *names, compare_names);

        tap_ok(n >= 40, "found %zu cases in %s", n, dir);
        for (size_t i = 0; i < n; i++) {
                run_case(dir, names[i]);
                free(names[i]);
        }
        free(names);

        return tap_done();
}
