/* SPDX-License-Identifier: MIT */
/*
 * faultshim: an LD_PRELOAD library that makes the real otad binary meet a
 * fault at one exact moment of an update, for tests/integration/
 * test_fault_matrix.py. The moment is "the lifecycle record with stage S is
 * being written" (the write of <state>/lifecycle.json.tmp that contains
 * "stage": "S"); the fault is one of
 *
 *   kill-before  SIGKILL before that record is written
 *   kill-after   SIGKILL right after it was renamed into place, before the
 *                directory was synced (what kill -9 can do: the page cache
 *                survives, so nothing is lost)
 *   power-cut    the same moment, but every write and rename that was not
 *                synced yet is undone first, then SIGKILL: what a power cut
 *                can do to the state directory and to the slot (unsynced
 *                data lost, a rename whose directory was not synced lost)
 *   enospc       that write fails with ENOSPC, and so does every later
 *                write into the state directory (a full /var stays full)
 *   erofs        the same with EROFS (a state directory remounted
 *                read-only)
 *   bootenv-eio  from that moment on every write of the bootloader
 *                environment (FAULTSHIM_BOOTENV, and its .new/.tmp copy)
 *                fails with EIO
 *
 * Environment: FAULTSHIM_STATE_DIR, FAULTSHIM_STAGE, FAULTSHIM_KIND,
 * FAULTSHIM_RECORD (the record's file name, default lifecycle.json),
 * FAULTSHIM_NTH (the how-manieth record of that stage, default 1: a stage
 * is recorded again when it makes progress, e.g. each image activated),
 * FAULTSHIM_ONCE (a file created when the fault fires; while it exists the
 * shim does nothing, so a restarted otad runs clean), FAULTSHIM_WATCH
 * (':'-separated paths whose unsynced writes a power cut undoes, besides
 * the state directory: the slot files), FAULTSHIM_BOOTENV. The shim takes
 * itself out of LD_PRELOAD so that programs otad starts run unshimmed.
 */
/* off_t is 64 bits on the 64-bit targets otad runs on; without the LFS
 * redirect, pwrite and pwrite64 are two symbols to interpose. */
#undef _FILE_OFFSET_BITS
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

enum kind { NONE, KILL_BEFORE, KILL_AFTER, POWER_CUT, ENOSPC_KIND, EROFS_KIND, BOOTENV_EIO };

static enum kind kind;
static bool armed, fired;
static char state_dir[PATH_MAX], stage_pattern[2][128], once_path[PATH_MAX], bootenv[PATH_MAX];
static char record_tmp[NAME_MAX + 8];
static char watch[8][PATH_MAX];
static size_t n_watch;
static int trigger_fd = -1; /* the record being written holds the stage */
static unsigned nth = 1, seen;

/* Undo log for a power cut: old contents of ranges written since the
 * file's last fsync, and renames whose directory was not synced. */
struct undo {
        char path[PATH_MAX];
        off_t offset;
        off_t old_size;
        size_t len;
        unsigned char *old; /* len bytes, or NULL: the range was past EOF */
        struct undo *next;
};
struct pending_rename {
        char path[PATH_MAX];   /* the renamed-to name */
        char backup[PATH_MAX + 32]; /* what it was before, "" when it did not exist */
        struct pending_rename *next;
};
static struct undo *undo_log;
static struct pending_rename *renames;
static unsigned backup_counter;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_rename)(const char *, const char *);

static void resolve(void) {
        if (real_write)
                return;
        real_write = dlsym(RTLD_NEXT, "write");
        real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
        real_fsync = dlsym(RTLD_NEXT, "fsync");
        real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
        real_rename = dlsym(RTLD_NEXT, "rename");
}

static void copy_env(char *dst, size_t size, const char *name) {
        const char *v = getenv(name);

        snprintf(dst, size, "%s", v ? v : "");
}

__attribute__((constructor)) static void init(void) {
        char list[8 * PATH_MAX], kind_name[32], stage[64];
        const char *preload;

        resolve();
        copy_env(state_dir, sizeof(state_dir), "FAULTSHIM_STATE_DIR");
        copy_env(stage, sizeof(stage), "FAULTSHIM_STAGE");
        copy_env(once_path, sizeof(once_path), "FAULTSHIM_ONCE");
        copy_env(bootenv, sizeof(bootenv), "FAULTSHIM_BOOTENV");
        copy_env(kind_name, sizeof(kind_name), "FAULTSHIM_KIND");
        copy_env(list, sizeof(list), "FAULTSHIM_WATCH");
        if (getenv("FAULTSHIM_NTH"))
                nth = (unsigned) strtoul(getenv("FAULTSHIM_NTH"), NULL, 10);
        copy_env(record_tmp, sizeof(record_tmp) - 5, "FAULTSHIM_RECORD");
        if (!*record_tmp)
                strcpy(record_tmp, "lifecycle.json");
        strcat(record_tmp, ".tmp");
        for (char *save = NULL, *p = strtok_r(list, ":", &save); p && n_watch < 8; p = strtok_r(NULL, ":", &save))
                snprintf(watch[n_watch++], PATH_MAX, "%s", p);
        /* cJSON_Print writes "key":\t"value"; allow a plain space too. */
        snprintf(stage_pattern[0], sizeof(stage_pattern[0]), "\"stage\":\t\"%s\"", stage);
        snprintf(stage_pattern[1], sizeof(stage_pattern[1]), "\"stage\": \"%s\"", stage);
        kind = !strcmp(kind_name, "kill-before")   ? KILL_BEFORE
               : !strcmp(kind_name, "kill-after")  ? KILL_AFTER
               : !strcmp(kind_name, "power-cut")   ? POWER_CUT
               : !strcmp(kind_name, "enospc")      ? ENOSPC_KIND
               : !strcmp(kind_name, "erofs")       ? EROFS_KIND
               : !strcmp(kind_name, "bootenv-eio") ? BOOTENV_EIO
                                                   : NONE;
        armed = kind != NONE && *state_dir && *stage && (!*once_path || access(once_path, F_OK) < 0);
        /* Programs otad starts (health checks, installers) run unshimmed. */
        preload = getenv("LD_PRELOAD");
        if (preload && strstr(preload, "faultshim"))
                unsetenv("LD_PRELOAD");
}

static bool fd_path(int fd, char *buf, size_t size) {
        char link[64];
        ssize_t n;

        snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
        n = readlink(link, buf, size - 1);
        if (n < 0)
                return false;
        buf[n] = '\0';
        return true;
}

static bool under(const char *path, const char *dir) {
        size_t n = strlen(dir);

        return n && strncmp(path, dir, n) == 0 && (path[n] == '/' || path[n] == '\0');
}

static bool watched(const char *path) {
        if (under(path, state_dir))
                return true;
        for (size_t i = 0; i < n_watch; i++)
                if (under(path, watch[i]))
                        return true;
        return false;
}

static bool is_bootenv(const char *path) {
        size_t n = strlen(bootenv);

        return n && strncmp(path, bootenv, n) == 0 && (path[n] == '\0' || path[n] == '.');
}

static void fire(void) {
        int fd;

        fired = true;
        armed = kind == ENOSPC_KIND || kind == EROFS_KIND || kind == BOOTENV_EIO; /* sticky ones stay */
        if (*once_path && (fd = open(once_path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644)) >= 0)
                close(fd);
}

/* A power cut: what was not synced never reached the disk. */
static void lose_unsynced(void) {
        int fd;

        for (struct undo *u = undo_log; u; u = u->next) {
                fd = open(u->path, O_WRONLY | O_CLOEXEC);
                if (fd < 0)
                        continue;
                if (u->old)
                        (void) real_pwrite64(fd, u->old, u->len, u->offset);
                (void) ftruncate(fd, u->old_size);
                close(fd);
        }
        for (struct pending_rename *p = renames; p; p = p->next) {
                if (*p->backup)
                        (void) real_rename(p->backup, p->path);
                else
                        (void) unlink(p->path);
        }
        sync();
}

static void die(void) {
        if (kind == POWER_CUT)
                lose_unsynced();
        kill(getpid(), SIGKILL);
}

static void record_undo(int fd, const char *path, off_t offset, size_t len) {
        struct undo *u = calloc(1, sizeof(*u));
        struct stat st;
        ssize_t n;

        if (!u || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
                free(u);
                return;
        }
        snprintf(u->path, sizeof(u->path), "%s", path);
        u->offset = offset;
        u->old_size = st.st_size;
        if (offset < st.st_size) {
                u->len = (size_t) (st.st_size - offset) < len ? (size_t) (st.st_size - offset) : len;
                u->old = malloc(u->len);
                n = u->old ? pread(fd, u->old, u->len, offset) : -1;
                if (n < 0) {
                        free(u->old);
                        u->old = NULL;
                } else
                        u->len = (size_t) n;
        }
        /* Newest first: undone in reverse order of writing. */
        u->next = undo_log;
        undo_log = u;
}

static void synced(int fd) {
        char path[PATH_MAX];
        struct stat st;

        if (!fd_path(fd, path, sizeof(path)) || fstat(fd, &st) < 0)
                return;
        if (S_ISDIR(st.st_mode)) {
                for (struct pending_rename **p = &renames; *p;) {
                        char *slash = strrchr((*p)->path, '/');

                        if (slash && (size_t) (slash - (*p)->path) == strlen(path) &&
                            strncmp((*p)->path, path, strlen(path)) == 0) {
                                struct pending_rename *done = *p;

                                *p = done->next;
                                if (*done->backup)
                                        unlink(done->backup);
                                free(done);
                        } else
                                p = &(*p)->next;
                }
                return;
        }
        for (struct undo **u = &undo_log; *u;) {
                if (strcmp((*u)->path, path) == 0) {
                        struct undo *done = *u;

                        *u = done->next;
                        free(done->old);
                        free(done);
                } else
                        u = &(*u)->next;
        }
}

/* Whether a write of len bytes to path must fail now, and with what. */
static int injected_errno(const char *path, const void *buf, size_t len, bool *ret_trigger) {
        bool record = false;

        *ret_trigger = false;
        if (!armed)
                return 0;
        if (under(path, state_dir)) {
                const char *base = strrchr(path, '/');

                record = base && strcmp(base + 1, record_tmp) == 0 &&
                         (memmem(buf, len, stage_pattern[0], strlen(stage_pattern[0])) ||
                          memmem(buf, len, stage_pattern[1], strlen(stage_pattern[1])));
                if (fired && (kind == ENOSPC_KIND || kind == EROFS_KIND))
                        return kind == ENOSPC_KIND ? ENOSPC : EROFS;
                if (!fired && record && ++seen >= nth) {
                        *ret_trigger = true;
                        if (kind == ENOSPC_KIND || kind == EROFS_KIND) {
                                fire();
                                return kind == ENOSPC_KIND ? ENOSPC : EROFS;
                        }
                }
        }
        if (fired && kind == BOOTENV_EIO && is_bootenv(path))
                return EIO;
        return 0;
}

static ssize_t shimmed_write(int fd, const void *buf, size_t count, off_t offset, bool positional) {
        char path[PATH_MAX];
        bool trigger;
        int e;

        resolve();
        if (!armed || !fd_path(fd, path, sizeof(path)))
                goto real;
        e = injected_errno(path, buf, count, &trigger);
        if (e) {
                errno = e;
                return -1;
        }
        if (trigger) {
                if (kind == KILL_BEFORE) {
                        fire();
                        die();
                } else if (kind == KILL_AFTER || kind == POWER_CUT)
                        trigger_fd = fd;
                else if (kind == BOOTENV_EIO)
                        fire();
        }
        if (kind == POWER_CUT && armed && watched(path))
                record_undo(fd, path, positional ? offset : lseek(fd, 0, SEEK_CUR), count);
real:
        return positional ? real_pwrite64(fd, buf, count, offset) : real_write(fd, buf, count);
}

ssize_t write(int fd, const void *buf, size_t count) {
        return shimmed_write(fd, buf, count, 0, false);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
        return shimmed_write(fd, buf, count, offset, true);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
        return shimmed_write(fd, buf, count, offset, true);
}

int fsync(int fd) {
        resolve();
        if (kind == POWER_CUT && armed)
                synced(fd);
        return real_fsync(fd);
}

int fdatasync(int fd) {
        resolve();
        if (kind == POWER_CUT && armed)
                synced(fd);
        return real_fdatasync(fd);
}

int close(int fd) {
        static int (*real_close)(int);

        if (!real_close)
                real_close = dlsym(RTLD_NEXT, "close");
        if (fd == trigger_fd)
                trigger_fd = -2; /* the record is complete: the rename comes next */
        return real_close(fd);
}

int rename(const char *oldpath, const char *newpath) {
        char resolved[PATH_MAX];
        bool trigger = trigger_fd == -2 && armed && under(newpath, state_dir) &&
                       strstr(oldpath, record_tmp) != NULL;
        struct pending_rename *p;
        int r;

        resolve();
        if (armed && kind == BOOTENV_EIO && fired && is_bootenv(newpath)) {
                errno = EIO;
                return -1;
        }
        if (kind == POWER_CUT && armed && watched(newpath) && (p = calloc(1, sizeof(*p)))) {
                snprintf(p->path, sizeof(p->path), "%s", realpath(newpath, resolved) ? resolved : newpath);
                snprintf(p->backup, sizeof(p->backup), "%s.faultshim-%u", p->path, backup_counter++);
                if (link(p->path, p->backup) < 0)
                        p->backup[0] = '\0';
                p->next = renames;
                renames = p;
        }
        r = real_rename(oldpath, newpath);
        if (trigger) {
                trigger_fd = -1;
                fire();
                die();
        }
        return r;
}
