/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileio.h"
#include "macro.h"

int write_all(int fd, const void *buf, size_t len) {
        const uint8_t *p = buf;

        while (len > 0) {
                ssize_t n = write(fd, p, len);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (n == 0)
                        return -EIO;
                p += n;
                len -= (size_t) n;
        }
        return 0;
}

int pwrite_all(int fd, const void *buf, size_t len, uint64_t offset) {
        const uint8_t *p = buf;

        if (offset > (uint64_t) INT64_MAX - len)
                return -EOVERFLOW;
        while (len > 0) {
                ssize_t n = pwrite(fd, p, len, (off_t) offset);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (n == 0)
                        return -EIO;
                p += n;
                len -= (size_t) n;
                offset += (uint64_t) n;
        }
        return 0;
}

int pread_all(int fd, void *buf, size_t len, uint64_t offset) {
        uint8_t *p = buf;

        if (offset > (uint64_t) INT64_MAX - len)
                return -EOVERFLOW;
        while (len > 0) {
                ssize_t n = pread(fd, p, len, (off_t) offset);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (n == 0)
                        return -EIO; /* the file ends before what was asked */
                p += n;
                len -= (size_t) n;
                offset += (uint64_t) n;
        }
        return 0;
}

int fsync_directory(const char *dir) {
        _cleanup_close_ int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
                return -errno;
        if (fsync(fd) < 0)
                return -errno;
        return 0;
}

int fsync_parent_directory(const char *path) {
        _cleanup_free_ char *dir = strdup(path);
        if (!dir)
                return -ENOMEM;

        char *slash = strrchr(dir, '/');
        if (!slash)
                return fsync_directory(".");
        if (slash == dir)
                return fsync_directory("/");
        *slash = '\0';
        return fsync_directory(dir);
}

static int replace_file(const char *path, const void *data, size_t len, mode_t mode, bool durable) {
        _cleanup_free_ char *tmp = NULL;
        _cleanup_close_ int fd = -1;
        int r;

        if (asprintf(&tmp, "%s.tmp", path) < 0)
                return -ENOMEM;

        /* O_TRUNC: a stale path.tmp from a crash is garbage, never resumed.
         * O_NOFOLLOW: a planted symlink must not redirect our write. */
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
        if (fd < 0)
                return -errno;

        r = write_all(fd, data, len);
        if (r < 0)
                goto fail;
        if (durable && fsync(fd) < 0) {
                r = -errno;
                goto fail;
        }
        if (close(take_fd(&fd)) < 0) {
                r = -errno;
                goto fail;
        }
        if (rename(tmp, path) < 0) {
                r = -errno;
                goto fail;
        }
        /* The rename is only durable once the directory entry is. */
        return durable ? fsync_parent_directory(path) : 0;

fail:
        (void) unlink(tmp);
        return r;
}

int write_file_atomic(const char *path, const void *data, size_t len, mode_t mode) {
        return replace_file(path, data, len, mode, true);
}

int write_file_replace(const char *path, const void *data, size_t len, mode_t mode) {
        return replace_file(path, data, len, mode, false);
}

int read_file_full(const char *path, size_t max_size, char **ret_data, size_t *ret_size) {
        _cleanup_close_ int fd = -1;
        _cleanup_free_ char *buf = NULL;
        struct stat st;
        size_t size = 0, cap;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (S_ISDIR(st.st_mode))
                return -EISDIR;
        if (!S_ISREG(st.st_mode))
                return -EBADF;
        if ((uint64_t) st.st_size > max_size)
                return -EFBIG;

        /* The file may grow after fstat(); read until EOF but never more
         * than max_size + 1 bytes, so growth is detected, not followed. */
        cap = (size_t) st.st_size + 1;
        buf = malloc(cap + 1);
        if (!buf)
                return -ENOMEM;
        for (;;) {
                ssize_t n = read(fd, buf + size, cap - size);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (n == 0)
                        break;
                size += (size_t) n;
                if (size > max_size)
                        return -EFBIG;
                if (size == cap) {
                        size_t ncap = cap * 2 > max_size + 1 ? max_size + 1 : cap * 2;
                        char *nbuf = realloc(buf, ncap + 1);
                        if (!nbuf)
                                return -ENOMEM;
                        buf = nbuf;
                        cap = ncap;
                }
        }
        buf[size] = '\0';

        *ret_data = take_ptr(&buf);
        if (ret_size)
                *ret_size = size;
        return 0;
}

int mkdir_p(const char *path, mode_t mode) {
        _cleanup_free_ char *p = strdup(path);
        struct stat st;

        if (!p)
                return -ENOMEM;
        if (p[0] == '\0')
                return -EINVAL;

        /* Walk each prefix ending before a '/', then the whole path. */
        for (char *s = p + 1;; s++) {
                if (*s != '/' && *s != '\0')
                        continue;
                char saved = *s;
                *s = '\0';
                if (mkdir(p, mode) < 0) {
                        if (errno != EEXIST)
                                return -errno;
                        if (stat(p, &st) < 0)
                                return -errno;
                        if (!S_ISDIR(st.st_mode))
                                return -ENOTDIR;
                }
                *s = saved;
                if (saved == '\0')
                        break;
                while (s[1] == '/')
                        s++;
        }
        return 0;
}
