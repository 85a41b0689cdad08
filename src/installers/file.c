/* SPDX-License-Identifier: MIT */
/*
 * The file backend: the job file is written into
 * <directory>/.<target>-<job>.otad-partial and, once verified, renamed to
 * <directory>/<target name>, so readers of that path see the old file or the
 * whole new one, never a mix. The name never comes from the job document's
 * filepath: that is outside input and could name any path.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backends.h"
#include "config.h"
#include "fileio.h"
#include "log.h"
#include "macro.h"
#include "sandbox.h"

int partial_file_open(struct partial_file *f, const char *dir, const char *name, uint64_t size, bool resume,
                      mode_t dir_mode) {
        _cleanup_free_ char *path = NULL;
        _cleanup_close_ int fd = -1;
        struct stat st;
        int r;

        r = mkdir_p(dir, dir_mode);
        if (r < 0)
                return r;
        if (asprintf(&path, "%s/%s", dir, name) < 0)
                return -ENOMEM;
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW | (resume ? 0 : O_TRUNC), 0644);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode))
                return -EEXIST;
        if ((uint64_t) st.st_size > size && ftruncate(fd, (off_t) size) < 0)
                return -errno;
        if (size > 0) {
                r = fallocate(fd, 0, 0, (off_t) size);
                if (r < 0 && (errno == EOPNOTSUPP || errno == ENOSYS)) /* e.g. tmpfs before 3.5, some FUSE */
                        r = ftruncate(fd, (off_t) size);
                if (r < 0)
                        return -errno;
        }
        partial_file_close(f);
        free(f->path);
        f->fd = take_fd(&fd);
        f->path = take_ptr(&path);
        f->size = size;
        return 0;
}

int partial_file_write(struct partial_file *f, uint64_t offset, const void *buf, size_t len) {
        if (f->fd < 0)
                return -EBADF;
        if (offset > f->size || len > f->size - offset)
                return -ERANGE;
        return pwrite_all(f->fd, buf, len, offset);
}

int partial_file_read(struct partial_file *f, uint64_t offset, void *buf, size_t len) {
        if (f->fd < 0)
                return -EBADF;
        if (offset > f->size || len > f->size - offset)
                return -ERANGE;
        return pread_all(f->fd, buf, len, offset);
}

int partial_file_sync(struct partial_file *f) {
        if (f->fd < 0)
                return -EBADF;
        return fdatasync(f->fd) < 0 ? -errno : 0;
}

void partial_file_close(struct partial_file *f) {
        if (f->fd >= 0)
                close(f->fd);
        f->fd = -1;
}

void partial_file_remove(struct partial_file *f) {
        partial_file_close(f);
        if (f->path)
                (void) unlink(f->path);
}

struct file_installer {
        struct partial_file partial;
};

static struct file_installer *file_data(struct installer *in) {
        return in->data;
}

static int file_begin(struct installer *in, uint64_t size, bool resume) {
        struct file_installer *d = file_data(in);
        _cleanup_free_ char *name = NULL;
        const char *dir = in->target->directory;
        int r;

        if (!dir || !*dir)
                return installer_fail(in, -EINVAL, "type=file needs directory=");
        if (strchr(in->target->name, '/'))
                return installer_fail(in, -EINVAL, "a target name with '/' cannot name a file");
        if (!d) {
                d = calloc(1, sizeof(*d));
                if (!d)
                        return -ENOMEM;
                d->partial.fd = -1;
                in->data = d;
        }
        r = installer_private_name(in, "otad-partial", &name);
        if (r < 0)
                return r;
        r = partial_file_open(&d->partial, dir, name, size, resume, 0755);
        if (r == -EROFS) {
                /* ProtectSystem=strict: say which drop-in opens dir */
                _cleanup_free_ char *advice = sandbox_advice(dir);

                return installer_fail(in, r, "cannot create %s/%s: %m; %s", dir, name,
                                      advice ? advice : "read-only in otad's sandbox");
        }
        if (r < 0)
                return installer_fail(in, r, "cannot create %s/%s: %m", dir, name);
        log_job(LOG_DEBUG, in->job_id, NULL, "[target.%s]: writing %s (%llu bytes%s)", in->target->name,
                d->partial.path, (unsigned long long) size, resume ? ", resuming" : "");
        return 0;
}

static int file_write(struct installer *in, uint64_t offset, const void *buf, size_t len) {
        struct file_installer *d = file_data(in);
        int r;

        if (!d)
                return -EBADF;
        r = partial_file_write(&d->partial, offset, buf, len);
        if (r < 0)
                return installer_fail(in, r, "cannot write %s: %m", d->partial.path);
        return 0;
}

static int file_sync(struct installer *in) {
        struct file_installer *d = file_data(in);
        int r;

        if (!d)
                return -EBADF;
        r = partial_file_sync(&d->partial);
        if (r < 0)
                return installer_fail(in, r, "cannot sync %s: %m", d->partial.path);
        return 0;
}

static int file_read(struct installer *in, uint64_t offset, void *buf, size_t len) {
        struct file_installer *d = file_data(in);

        if (!d)
                return -EBADF;
        return partial_file_read(&d->partial, offset, buf, len);
}

static int file_activate(struct installer *in) {
        struct file_installer *d = file_data(in);
        _cleanup_free_ char *final = NULL;
        int r;

        if (!d || d->partial.fd < 0)
                return -EBADF;
        if (fsync(d->partial.fd) < 0)
                return installer_fail(in, -errno, "cannot sync %s: %m", d->partial.path);
        if (asprintf(&final, "%s/%s", in->target->directory, in->target->name) < 0)
                return -ENOMEM;
        if (rename(d->partial.path, final) < 0)
                return installer_fail(in, -errno, "cannot rename %s to %s: %m", d->partial.path, final);
        partial_file_close(&d->partial);
        r = fsync_directory(in->target->directory);
        if (r < 0)
                return installer_fail(in, r, "cannot sync directory %s: %m", in->target->directory);
        log_milestone(LOG_INFO, OTAD_MID_SLOT_ACTIVATED, in->job_id, "activate", "[target.%s]: installed %s",
                      in->target->name, final);
        return 0;
}

static void file_abort(struct installer *in) {
        struct file_installer *d = file_data(in);

        if (d)
                partial_file_remove(&d->partial);
        else if (in->target->directory && *in->target->directory)
                installer_remove_private_file(in, in->target->directory, "otad-partial");
}

static void file_free(struct installer *in) {
        struct file_installer *d = file_data(in);

        if (!d)
                return;
        partial_file_close(&d->partial);
        free(d->partial.path);
        free(d);
        in->data = NULL;
}

const struct installer_ops installer_file_ops = {
        .name = "file",
        .begin = file_begin,
        .write = file_write,
        .sync = file_sync,
        .finish = file_sync,
        .read = file_read,
        .activate = file_activate,
        .abort = file_abort,
        .free = file_free,
};
