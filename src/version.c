/* SPDX-License-Identifier: MIT */
#include "version.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "fileio.h"
#include "macro.h"

/* os-release(5) is small; anything bigger is not one. */
#define OS_RELEASE_MAX (64 * 1024)

/* VERSION_ID= of an os-release text (modified in place), or NULL. */
static char *os_release_version_id(char *text) {
        char *save = NULL;

        for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
                size_t n;

                if (strncmp(line, "VERSION_ID=", 11) != 0)
                        continue;
                line += 11;
                n = strlen(line);
                if (n >= 2 && (line[0] == '"' || line[0] == '\'') && line[n - 1] == line[0]) {
                        line[n - 1] = '\0';
                        line++;
                }
                return line;
        }
        return NULL;
}

int version_running(const struct otad_config *config, char **ret) {
        _cleanup_free_ char *text = NULL;
        const char *found = NULL;
        char *version;

        if (config->update.version && *config->update.version)
                found = config->update.version;
        else if (config->update.os_release &&
                 read_file_full(config->update.os_release, OS_RELEASE_MAX, &text, NULL) >= 0)
                found = os_release_version_id(text);
        version = strdup(found ? found : "0");
        if (!version)
                return -ENOMEM;
        *ret = version;
        return 0;
}

int version_compare(const char *a, const char *b) {
        while (*a || *b) {
                if (isdigit((unsigned char) *a) && isdigit((unsigned char) *b)) {
                        char *end_a, *end_b;
                        unsigned long long x = strtoull(a, &end_a, 10);
                        unsigned long long y = strtoull(b, &end_b, 10);

                        if (x != y)
                                return x < y ? -1 : 1;
                        a = end_a;
                        b = end_b;
                } else {
                        if (*a != *b)
                                return (unsigned char) *a < (unsigned char) *b ? -1 : 1;
                        a++;
                        b++;
                }
        }
        return 0;
}

void version_updated_by(const char *version, char *buf, size_t size) {
        unsigned major, minor, build;
        char tail;

        if (sscanf(version, "%u.%u.%u%c", &major, &minor, &build, &tail) == 3 && major < 256 && minor < 256 &&
            build < 65536)
                snprintf(buf, size, "0x%08x", (major << 24) | (minor << 16) | build);
        else
                snprintf(buf, size, "%s", version);
}
