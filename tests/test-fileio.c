/* SPDX-License-Identifier: MIT */
/* Unit tests of fileio: atomic replace, bounded reads, mkdir_p, cleanup. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileio.h"
#include "macro.h"
#include "tap.h"

static char dir[] = "/tmp/test-fileio.XXXXXX";

static char *path_in(const char *name) {
        char *p = NULL;
        if (asprintf(&p, "%s/%s", dir, name) < 0)
                abort();
        return p;
}

static void test_atomic_write(void) {
        _cleanup_free_ char *p = path_in("state"), *tmp = path_in("state.tmp");
        _cleanup_free_ char *got = NULL;
        size_t size = 0;
        struct stat st;

        tap_is_int(write_file_atomic(p, "first", 5, 0600), 0, "atomic write creates the file");
        tap_is_int(write_file_atomic(p, "second!", 7, 0600), 0, "atomic write replaces the file");
        tap_is_int(read_file_full(p, 1024, &got, &size), 0, "read back");
        tap_is_str(got, "second!", "contents are the new ones");
        tap_is_int((long long) size, 7, "size is the new one");
        tap_ok(stat(tmp, &st) < 0 && errno == ENOENT, "no .tmp left behind");
        tap_ok(stat(p, &st) == 0 && (st.st_mode & 07777) == 0600, "mode is 0600");

        /* A stale tmp from a crash is overwritten, not appended to. */
        int fd = open(tmp, O_WRONLY | O_CREAT, 0600);
        (void) !write(fd, "garbage garbage garbage", 23);
        close(fd);
        tap_is_int(write_file_atomic(p, "x", 1, 0600), 0, "atomic write over a stale tmp");
        free(got);
        got = NULL;
        tap_is_int(read_file_full(p, 1024, &got, &size), 0, "read back after stale tmp");
        tap_is_str(got, "x", "stale tmp contents did not leak");

        /* A symlink planted at path.tmp is not followed. */
        _cleanup_free_ char *victim = path_in("victim");
        tap_is_int(write_file_atomic(victim, "keep", 4, 0600), 0, "victim written");
        unlink(tmp);
        tap_ok(symlink(victim, tmp) == 0, "symlink planted at .tmp");
        tap_is_int(write_file_atomic(p, "y", 1, 0600), -ELOOP, "symlinked .tmp refused");
        free(got);
        got = NULL;
        tap_is_int(read_file_full(victim, 1024, &got, NULL), 0, "victim readable");
        tap_is_str(got, "keep", "victim untouched");
        unlink(tmp);

        _cleanup_free_ char *missing = path_in("no/such/dir/file");
        tap_is_int(write_file_atomic(missing, "z", 1, 0600), -ENOENT, "missing directory gives -ENOENT");
}

static void test_read_limits(void) {
        _cleanup_free_ char *p = path_in("big");
        char buf[4096];
        char *got = (char *) 0x1;
        size_t size = 12345;

        memset(buf, 'a', sizeof(buf));
        tap_is_int(write_file_atomic(p, buf, sizeof(buf), 0644), 0, "4 KiB file written");
        tap_is_int(read_file_full(p, 4095, &got, &size), -EFBIG, "file over the cap gives -EFBIG");
        tap_ok(got == (char *) 0x1 && size == 12345, "ret_* untouched on failure");
        tap_is_int(read_file_full(p, 4096, &got, &size), 0, "file at the cap is read");
        tap_is_int((long long) size, 4096, "whole file read");
        tap_ok(got[4096] == '\0', "NUL-terminated");
        free(got);

        _cleanup_free_ char *none = path_in("none");
        tap_is_int(read_file_full(none, 10, &got, NULL), -ENOENT, "missing file gives -ENOENT");
        tap_is_int(read_file_full(dir, 10, &got, NULL), -EISDIR, "directory gives -EISDIR");

        _cleanup_free_ char *empty = path_in("empty");
        tap_is_int(write_file_atomic(empty, "", 0, 0644), 0, "empty file written");
        got = NULL;
        tap_is_int(read_file_full(empty, 10, &got, &size), 0, "empty file read");
        tap_ok(got && got[0] == '\0' && size == 0, "empty file is an empty string");
        free(got);
}

static void test_pio(void) {
        _cleanup_free_ char *p = path_in("pio");
        _cleanup_close_ int fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        char buf[8] = { 0 };

        tap_is_int(pwrite_all(fd, "world", 5, 6), 0, "pwrite at offset 6");
        tap_is_int(pwrite_all(fd, "hello ", 6, 0), 0, "pwrite at offset 0");
        tap_is_int(pread_all(fd, buf, 5, 6), 0, "pread at offset 6");
        tap_is_str(buf, "world", "pread data");
        tap_is_int(pread_all(fd, buf, 8, 6), -EIO, "pread past EOF gives -EIO");
}

static void test_mkdir_p(void) {
        _cleanup_free_ char *deep = path_in("a/b//c/d/");
        _cleanup_free_ char *d = path_in("a/b/c/d");
        _cleanup_free_ char *file = path_in("a/file");
        _cleanup_free_ char *under_file = path_in("a/file/x");
        struct stat st;

        tap_is_int(mkdir_p(deep, 0750), 0, "mkdir_p creates a deep path");
        tap_ok(stat(d, &st) == 0 && S_ISDIR(st.st_mode) && (st.st_mode & 0777) == (0750 & ~umask(022)),
               "deep directory exists with the mode");
        tap_is_int(mkdir_p(d, 0750), 0, "mkdir_p of an existing path is fine");
        tap_is_int(write_file_atomic(file, "f", 1, 0600), 0, "a file in the way");
        tap_is_int(mkdir_p(under_file, 0750), -ENOTDIR, "a file in the way gives -ENOTDIR");
        tap_is_int(fsync_directory(d), 0, "fsync_directory");
        tap_is_int(fsync_parent_directory(file), 0, "fsync_parent_directory");
        tap_is_int(fsync_parent_directory("relative-name"), 0, "fsync_parent_directory of a bare name");
}

static int cleaned;
static void count_cleanup(int *p) {
        if (*p >= 0)
                cleaned++;
}

static void test_cleanup(void) {
        {
                _cleanup_(count_cleanup) int a = 1;
                _cleanup_(count_cleanup) int b = -1;
                (void) a;
                (void) b;
        }
        tap_is_int(cleaned, 1, "cleanup runs at scope exit, only for held resources");

        int fd;
        {
                _cleanup_close_ int f = open("/dev/null", O_RDONLY | O_CLOEXEC);
                fd = take_fd(&f);
        }
        tap_ok(fcntl(fd, F_GETFD) >= 0, "take_fd hands the fd over");
        close(fd);
}

int main(void) {
        umask(022);
        if (!mkdtemp(dir)) {
                perror("mkdtemp");
                return 1;
        }

        test_atomic_write();
        test_read_limits();
        test_pio();
        test_mkdir_p();
        test_cleanup();

        char cmd[128];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
        (void) !system(cmd);
        return tap_done();
}
