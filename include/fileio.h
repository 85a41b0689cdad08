/* SPDX-License-Identifier: MIT */
/*
 * fileio: durable small-file helpers every module uses. Owns the one way
 * otad persists state: write name.tmp, fsync, rename, fsync the directory
 * (never rewrite in place), and bounded whole-file reads.
 * Never logs (callers log with their context) and never interprets contents.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "macro.h"

/* Writes all len bytes to fd, retrying on EINTR and short writes. */
int write_all(int fd, const void *buf, size_t len);
/* pwrite()/pread() of exactly len bytes at offset. pread_all returns -EIO
 * when the file ends before len bytes. */
int pwrite_all(int fd, const void *buf, size_t len, uint64_t offset);
int pread_all(int fd, void *buf, size_t len, uint64_t offset);

/* Replaces path atomically with data: path.tmp is created (mode), written,
 * fsynced and renamed over path, then the directory is fsynced. After a
 * crash, path holds either the old or the new contents, never a mix. */
int write_file_atomic(const char *path, const void *data, size_t len, mode_t mode) _warn_unused_result_;
/* The same replace without fsync: readers see the old or the new contents,
 * never a mix, and the new ones survive the writer being killed (they are
 * in the page cache); after a power cut path may hold the old contents, or
 * on some file systems an empty or partial file. For records whose reader
 * can tell (a checksum) and that a durable copy backs up. */
int write_file_replace(const char *path, const void *data, size_t len, mode_t mode) _warn_unused_result_;

/* Reads a whole regular file of at most max_size bytes into a new buffer,
 * NUL-terminated (not counted in *ret_size). -EFBIG when larger, -ENOENT
 * when missing. *ret_data and *ret_size are untouched on failure;
 * ret_size may be NULL. */
int read_file_full(const char *path, size_t max_size, char **ret_data, size_t *ret_size);

/* fsync() of a directory, so that a rename or create in it is durable. */
int fsync_directory(const char *dir);
/* fsync() of the directory that contains path. */
int fsync_parent_directory(const char *path);

/* mkdir -p with mode for each directory created; existing directories are
 * left as they are. -ENOTDIR when a component exists and is not one. */
int mkdir_p(const char *path, mode_t mode);
