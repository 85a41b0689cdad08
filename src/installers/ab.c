/* SPDX-License-Identifier: MIT */
/*
 * The A/B backend: the image is written, block by block as it arrives, into
 * the slot of [target.NAME] slot_class that is not booted; activation syncs
 * and closes it and says a reboot is due (switching the bootloader is the
 * lifecycle's, after it recorded the intent). Refuses, before writing a
 * byte, a slot that is booted, mounted, shares its device with the booted
 * slot, or is smaller than the image; block devices are opened O_EXCL, so the kernel refuses
 * them while anything else holds them (a mount, another writer).
 *
 * Read-back for verification: finish() syncs the slot and then drops its
 * pages from the page cache (POSIX_FADV_DONTNEED), so that the verification
 * reads that follow come from the device and prove what it holds, not what
 * the cache remembers of our writes. O_DIRECT would prove the same but
 * needs sector-aligned buffers, offsets and lengths, which the download's
 * blocks (any size, any offset) and the verifier's reads do not have; the
 * fadvise after a full sync gives the same guarantee with plain pread().
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backends.h"
#include "config.h"
#include "fileio.h"
#include "log.h"
#include "macro.h"
#include "otad.h"
#include "slot.h"

struct ab_installer {
        int fd;
        uint64_t size;      /* the image's */
        uint64_t capacity;  /* the slot's */
};

static struct ab_installer *ab_data(struct installer *in) {
        return in->data;
}

static const char *slot_class_of(const struct installer *in) {
        const char *c = in->target->slot_class;

        return c && *c ? c : "rootfs";
}

static bool same_device(const char *a, const char *b) {
        struct stat sa, sb;

        if (stat(a, &sa) < 0 || stat(b, &sb) < 0)
                return false;
        if (S_ISBLK(sa.st_mode) && S_ISBLK(sb.st_mode))
                return sa.st_rdev == sb.st_rdev;
        return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

static int ab_begin(struct installer *in, uint64_t size, bool resume) {
        const struct otad_config *config = in->otad->config;
        const struct config_slot *booted, *slot;
        struct ab_installer *d;
        _cleanup_close_ int fd = -1;
        struct stat st;
        uint64_t capacity;
        int r;

        if (ab_data(in))
                return -EALREADY;
        r = slot_booted(config, slot_class_of(in), NULL, &booted);
        if (r < 0)
                return installer_fail(in, r, "cannot tell which slot of class %s is booted, writing none",
                                      slot_class_of(in));
        r = slot_inactive(config, slot_class_of(in), NULL, &slot);
        if (r < 0)
                return installer_fail(in, r, "no inactive slot in class %s", slot_class_of(in));
        if (slot == booted || same_device(slot->device, booted->device))
                return installer_fail(in, -EBUSY, "slot %s (%s) is the booted slot, refusing to write it",
                                      slot->bootname ? slot->bootname : slot->name, slot->device);
        r = slot_is_mounted(slot, NULL);
        if (r < 0)
                return installer_fail(in, r, "cannot tell whether slot %s (%s) is mounted, writing nothing",
                                      slot->name, slot->device);
        if (r > 0)
                return installer_fail(in, -EBUSY, "slot %s (%s) is mounted, refusing to write it",
                                      slot->bootname ? slot->bootname : slot->name, slot->device);

        if (stat(slot->device, &st) < 0)
                return installer_fail(in, -errno, "cannot open slot %s (%s): %m", slot->name, slot->device);
        /* O_EXCL on a block device: the kernel refuses it while mounted or
         * opened exclusively elsewhere. It means nothing for a regular file
         * (tests), which must exist already: a slot is never created. */
        fd = open(slot->device, O_RDWR | O_CLOEXEC | O_NOCTTY | (S_ISBLK(st.st_mode) ? O_EXCL : 0));
        if (fd < 0)
                return installer_fail(in, -errno, "cannot open slot %s (%s): %m", slot->name, slot->device);
        if (fstat(fd, &st) < 0)
                return -errno;
        if (S_ISBLK(st.st_mode)) {
                if (ioctl(fd, BLKGETSIZE64, &capacity) < 0)
                        return installer_fail(in, -errno, "cannot get the size of %s: %m", slot->device);
        } else if (S_ISREG(st.st_mode))
                capacity = (uint64_t) st.st_size;
        else
                return installer_fail(in, -ENOTBLK, "slot device %s is neither a block device nor a file",
                                      slot->device);
        if (capacity < size)
                return installer_fail(in, -ENOSPC, "slot %s (%s) holds %llu bytes, the image needs %llu",
                                      slot->name, slot->device, (unsigned long long) capacity,
                                      (unsigned long long) size);

        d = calloc(1, sizeof(*d));
        if (!d)
                return -ENOMEM;
        d->fd = take_fd(&fd);
        d->size = size;
        d->capacity = capacity;
        in->data = d;
        in->slot = slot;
        log_full(LOG_INFO, 0, &(const struct log_fields){ .job_id = in->job_id, .slot = slot->bootname },
                 "[target.%s]: writing %llu bytes into slot %s (%s)%s; booted is %s", in->target->name,
                 (unsigned long long) size, slot->bootname ? slot->bootname : slot->name, slot->device,
                 resume ? ", resuming" : "", booted->bootname ? booted->bootname : booted->name);
        return 0;
}

static int ab_write(struct installer *in, uint64_t offset, const void *buf, size_t len) {
        struct ab_installer *d = ab_data(in);
        int r;

        if (!d)
                return -EBADF;
        if (offset > d->size || len > d->size - offset)
                return -ERANGE;
        r = pwrite_all(d->fd, buf, len, offset);
        if (r < 0)
                return installer_fail(in, r, "cannot write slot %s at offset %llu: %m", in->slot->device,
                                      (unsigned long long) offset);
        return 0;
}

static int ab_sync(struct installer *in) {
        struct ab_installer *d = ab_data(in);

        if (!d)
                return -EBADF;
        if (fdatasync(d->fd) < 0)
                return installer_fail(in, -errno, "cannot sync slot %s: %m", in->slot->device);
        return 0;
}

static int ab_finish(struct installer *in) {
        struct ab_installer *d = ab_data(in);
        int r;

        r = ab_sync(in);
        if (r < 0)
                return r;
        /* all pages are clean now; dropping them makes read() go to the device */
        r = posix_fadvise(d->fd, 0, 0, POSIX_FADV_DONTNEED);
        if (r != 0)
                log_warning_errno(-r, "Failed to drop the page cache of %s, read-back may come from memory: %m, ignoring",
                                  in->slot->device);
        return 0;
}

static int ab_read(struct installer *in, uint64_t offset, void *buf, size_t len) {
        struct ab_installer *d = ab_data(in);

        if (!d)
                return -EBADF;
        if (offset > d->size || len > d->size - offset)
                return -ERANGE;
        return pread_all(d->fd, buf, len, offset);
}

/* The image is verified: synced and closed, it waits for the lifecycle to
 * switch the bootloader (after it recorded that intent). */
static int ab_activate(struct installer *in) {
        struct ab_installer *d = ab_data(in);
        int r;

        if (!d || !in->slot)
                return -EBADF;
        if (!in->slot->bootname || !*in->slot->bootname)
                return installer_fail(in, -EINVAL, "slot %s has no bootname=, the bootloader cannot boot it",
                                      in->slot->name);
        r = ab_sync(in);
        if (r < 0)
                return r;
        close(d->fd);
        d->fd = -1;
        return 1;
}

static void ab_free(struct installer *in) {
        struct ab_installer *d = ab_data(in);

        if (!d)
                return;
        if (d->fd >= 0)
                close(d->fd);
        free(d);
        in->data = NULL;
}

/* The inactive slot keeps what was written: it is not selected for boot,
 * and the next update overwrites it. */
static void ab_abort(struct installer *in) {
        ab_free(in);
}

const struct installer_ops installer_ab_ops = {
        .name = "ab",
        .begin = ab_begin,
        .write = ab_write,
        .sync = ab_sync,
        .finish = ab_finish,
        .read = ab_read,
        .activate = ab_activate,
        .abort = ab_abort,
        .free = ab_free,
};
