/* SPDX-License-Identifier: MIT */
#include "grubenv.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileio.h"
#include "macro.h"

void grubenv_done(struct grubenv *env) {
        for (size_t i = 0; i < env->n; i++) {
                free(env->names[i]);
                free(env->values[i]);
        }
        free(env->names);
        free(env->values);
        env->names = env->values = NULL;
        env->n = 0;
}

static ssize_t grubenv_index(const struct grubenv *env, const char *name) {
        for (size_t i = 0; i < env->n; i++)
                if (strcmp(env->names[i], name) == 0)
                        return (ssize_t) i;
        return -1;
}

const char *grubenv_get(const struct grubenv *env, const char *name) {
        ssize_t i = grubenv_index(env, name);

        return i < 0 ? NULL : env->values[i];
}

static int grubenv_append(struct grubenv *env, char *name, char *value) {
        char **names, **values;

        names = realloc(env->names, (env->n + 1) * sizeof(char *));
        if (!names)
                return -ENOMEM;
        env->names = names;
        values = realloc(env->values, (env->n + 1) * sizeof(char *));
        if (!values)
                return -ENOMEM;
        env->values = values;
        env->names[env->n] = name;
        env->values[env->n] = value;
        env->n++;
        return 0;
}

int grubenv_set(struct grubenv *env, const char *name, const char *value) {
        ssize_t i;
        char *n, *v;
        int r;

        if (!*name || name[0] == '#' || strpbrk(name, "=\n\\"))
                return -EINVAL;
        v = strdup(value);
        if (!v)
                return -ENOMEM;
        i = grubenv_index(env, name);
        if (i >= 0) {
                free(env->values[i]);
                env->values[i] = v;
                return 0;
        }
        n = strdup(name);
        if (!n) {
                free(v);
                return -ENOMEM;
        }
        r = grubenv_append(env, n, v);
        if (r < 0) {
                free(n);
                free(v);
        }
        return r;
}

int grubenv_unset(struct grubenv *env, const char *name) {
        ssize_t i = grubenv_index(env, name);

        if (i < 0)
                return 0;
        free(env->names[i]);
        free(env->values[i]);
        memmove(&env->names[i], &env->names[i + 1], (env->n - (size_t) i - 1) * sizeof(char *));
        memmove(&env->values[i], &env->values[i + 1], (env->n - (size_t) i - 1) * sizeof(char *));
        env->n--;
        return 0;
}

int grubenv_equal(const struct grubenv *a, const struct grubenv *b) {
        if (a->n != b->n)
                return 0;
        for (size_t i = 0; i < a->n; i++) {
                const char *v = grubenv_get(b, a->names[i]);

                if (!v || strcmp(v, a->values[i]) != 0)
                        return 0;
        }
        return 1;
}

/* GRUB's lib/envblk.c reads a block line by line: lines starting with '#'
 * are comments (the header and the padding), every other line is
 * name=value up to an unescaped newline; "\x" stands for x. */
int grubenv_parse(const char *block, size_t size, struct grubenv *ret) {
        struct grubenv env = { 0 };
        const char *p = block, *end = block + size;
        int r;

        if (size != GRUBENV_SIZE || memcmp(block, GRUBENV_HEADER, strlen(GRUBENV_HEADER)) != 0)
                return -EBADMSG;

        while (p < end) {
                const char *eq, *line_end;
                char *name, *value, *o;

                if (*p == '#') {
                        p = memchr(p, '\n', (size_t) (end - p));
                        if (!p)
                                break; /* the padding runs to the end of the block */
                        p++;
                        continue;
                }
                if (*p == '\n') { /* an empty line says nothing */
                        p++;
                        continue;
                }
                eq = memchr(p, '=', (size_t) (end - p));
                line_end = memchr(p, '\n', (size_t) (end - p));
                if (!eq || (line_end && line_end < eq) || eq == p || memchr(p, '\0', (size_t) (eq - p))) {
                        r = -EBADMSG;
                        goto fail;
                }
                name = strndup(p, (size_t) (eq - p));
                value = malloc((size_t) (end - eq));
                if (!name || !value) {
                        free(name);
                        free(value);
                        r = -ENOMEM;
                        goto fail;
                }
                o = value;
                for (p = eq + 1; p < end && *p != '\n'; p++) {
                        if (*p == '\\' && p + 1 < end)
                                p++;
                        if (*p == '\0') { /* GRUB would stop here: not a block it wrote */
                                free(name);
                                free(value);
                                r = -EBADMSG;
                                goto fail;
                        }
                        *o++ = *p;
                }
                *o = '\0';
                if (p >= end) { /* no newline: the block was cut inside this variable */
                        free(name);
                        free(value);
                        r = -EBADMSG;
                        goto fail;
                }
                p++;
                /* a name twice: GRUB's load_env sets each in turn, so the
                 * last one is what boots; keep one entry with that value */
                {
                        ssize_t i = grubenv_index(&env, name);

                        if (i >= 0) {
                                free(env.values[i]);
                                env.values[i] = value;
                                free(name);
                                continue;
                        }
                }
                r = grubenv_append(&env, name, value);
                if (r < 0) {
                        free(name);
                        free(value);
                        goto fail;
                }
        }
        *ret = env;
        return 0;
fail:
        grubenv_done(&env);
        return r;
}

int grubenv_read(const char *path, struct grubenv *ret) {
        _cleanup_free_ char *data = NULL;
        size_t size;
        int r;

        /* read one byte more than a block, so that a longer file is refused */
        r = read_file_full(path, GRUBENV_SIZE + 1, &data, &size);
        if (r == -EFBIG)
                return -EBADMSG;
        if (r < 0)
                return r;
        return grubenv_parse(data, size, ret);
}

int grubenv_format(const struct grubenv *env, char block[GRUBENV_SIZE]) {
        size_t len = strlen(GRUBENV_HEADER);

        memset(block, '#', GRUBENV_SIZE);
        memcpy(block, GRUBENV_HEADER, len);
        for (size_t i = 0; i < env->n; i++) {
                const char *name = env->names[i];

                if (len + strlen(name) + 1 > GRUBENV_SIZE)
                        return -ENOSPC;
                memcpy(block + len, name, strlen(name));
                len += strlen(name);
                block[len++] = '=';
                for (const char *v = env->values[i]; *v; v++) {
                        if (*v == '\\' || *v == '\n') {
                                if (len >= GRUBENV_SIZE)
                                        return -ENOSPC;
                                block[len++] = '\\';
                        }
                        if (len >= GRUBENV_SIZE)
                                return -ENOSPC;
                        block[len++] = *v;
                }
                if (len >= GRUBENV_SIZE)
                        return -ENOSPC;
                block[len++] = '\n';
        }
        return 0;
}

int grubenv_write(const char *path, const struct grubenv *env) {
        char block[GRUBENV_SIZE];
        _cleanup_free_ char *tmp = NULL;
        _cleanup_close_ int fd = -1;
        int r;

        r = grubenv_format(env, block);
        if (r < 0)
                return r;
        if (asprintf(&tmp, "%s.new", path) < 0)
                return -ENOMEM;

        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
        if (fd < 0)
                return -errno;
        r = write_all(fd, block, sizeof(block));
        if (r >= 0 && fsync(fd) < 0)
                r = -errno;
        if (r >= 0 && close(take_fd(&fd)) < 0)
                r = -errno;
        if (r >= 0 && rename(tmp, path) < 0)
                r = -errno;
        if (r < 0) {
                (void) unlink(tmp);
                return r;
        }
        r = fsync_parent_directory(path);
        if (r < 0)
                return r;
        /* GRUB reads the file system as it lies on the disk and replays no
         * ext4 journal: the rename is in the journal only until ext4
         * checkpoints it, some 30 s later, and a power cut before that
         * boots by the old environment. syncfs() writes the metadata
         * where GRUB looks. */
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0 || syncfs(fd) < 0)
                return -errno;
        return 0;
}
