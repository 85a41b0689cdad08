/* SPDX-License-Identifier: MIT */
/* Helpers shared by the installer, bootloader and slot unit tests: scratch
 * directories, a config file loaded through config_load, shelling out to the
 * oracle tools. Everything is static inline: each test is one program. */
#pragma once

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "config.h"
#include "fileio.h"
#include "macro.h"
#include "tap.h"

/* Printf into a new string; aborts on OOM (tests only). */
__attribute__((format(printf, 1, 2))) static inline char *xprintf(const char *format, ...) {
        char *s = NULL;
        va_list ap;

        va_start(ap, format);
        if (vasprintf(&s, format, ap) < 0)
                abort();
        va_end(ap);
        return s;
}

/* Runs a shell command line; returns its exit status (or -1). */
__attribute__((format(printf, 1, 2))) static inline int run(const char *format, ...) {
        char *cmd = NULL;
        va_list ap;
        int r;

        va_start(ap, format);
        if (vasprintf(&cmd, format, ap) < 0)
                abort();
        va_end(ap);
        r = system(cmd);
        free(cmd);
        if (r < 0 || !WIFEXITED(r))
                return -1;
        return WEXITSTATUS(r);
}

/* Runs a command line and returns its stdout (up to 64 KiB), or NULL. */
__attribute__((format(printf, 1, 2))) static inline char *capture(const char *format, ...) {
        char *cmd = NULL, *out;
        size_t len = 0;
        va_list ap;
        FILE *f;

        va_start(ap, format);
        if (vasprintf(&cmd, format, ap) < 0)
                abort();
        va_end(ap);
        f = popen(cmd, "r");
        free(cmd);
        if (!f)
                return NULL;
        out = calloc(1, 65537);
        if (!out)
                abort();
        len = fread(out, 1, 65536, f);
        out[len] = '\0';
        if (pclose(f) != 0) {
                free(out);
                return NULL;
        }
        return out;
}

static inline bool have_tool(const char *name) {
        return run("command -v %s >/dev/null 2>&1", name) == 0;
}

static inline char *make_scratch(const char *name) {
        char *dir = xprintf("/tmp/%s.XXXXXX", name);

        if (!mkdtemp(dir))
                abort();
        return dir;
}

static inline void remove_scratch(const char *dir) {
        if (dir && strncmp(dir, "/tmp/", 5) == 0)
                (void) run("rm -rf '%s'", dir);
}

static inline int write_bytes(const char *path, const void *data, size_t len) {
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        int r;

        if (fd < 0)
                return -errno;
        r = write_all(fd, data, len);
        close(fd);
        return r;
}

/* Writes dir/otad.conf: a minimal [mqtt] (config_load needs it) plus extra,
 * and loads it. */
static inline struct otad_config *load_config(const char *dir, const char *extra) {
        char *path = xprintf("%s/otad.conf", dir);
        char *text = xprintf("[mqtt]\nendpoint = localhost\nthing_name = t\nca_file = /x\ncert_file = /x\n"
                             "key_file = /x\n\n[state]\ndirectory = %s/state\n\n%s",
                             dir, extra);
        struct otad_config *c = NULL;

        if (write_bytes(path, text, strlen(text)) < 0 || config_load(path, &c) < 0)
                c = NULL;
        free(path);
        free(text);
        return c;
}

/* Deterministic test bytes: a different pattern per seed. */
static inline void fill_pattern(unsigned char *buf, size_t len, unsigned seed) {
        unsigned x = seed * 2654435761u + 1;

        for (size_t i = 0; i < len; i++) {
                x = x * 1103515245u + 12345u;
                buf[i] = (unsigned char) (x >> 16);
        }
}
