/* SPDX-License-Identifier: MIT */
/* The installer backends, for installer.c's table, and what they share. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "installer.h"

extern const struct installer_ops installer_file_ops;
extern const struct installer_ops installer_ab_ops;
extern const struct installer_ops installer_command_ops;

/* A file name made of the target name and the job id with every byte
 * outside [A-Za-z0-9._-] replaced by '_': ".<target>-<job>.<suffix>". The
 * job id comes from the network (AWS allows [a-zA-Z0-9_-]); it must never
 * be able to name another directory. */
int installer_private_name(const struct installer *in, const char *suffix, char **ret);
/* Unlinks dir/<installer_private_name(suffix)>: abort() of an installer that
 * was not begun in this run (a job discarded after a restart) still removes
 * what an earlier run left. */
void installer_remove_private_file(const struct installer *in, const char *dir, const char *suffix);

/* A file written at offsets as blocks arrive: the file backend's partial
 * file and the command backend's staged image. */
struct partial_file {
        int fd;     /* -1 when closed */
        char *path; /* NULL before partial_file_open */
        uint64_t size;
};

/* Opens (creating) dir/name for size bytes; dir is created when missing.
 * resume keeps what the file holds, else it starts empty. Space for size
 * bytes is reserved up front, so a full disk fails here, not mid-download. */
int partial_file_open(struct partial_file *f, const char *dir, const char *name, uint64_t size, bool resume,
                      mode_t dir_mode);
/* -ERANGE for bytes beyond size. */
int partial_file_write(struct partial_file *f, uint64_t offset, const void *buf, size_t len);
int partial_file_read(struct partial_file *f, uint64_t offset, void *buf, size_t len);
int partial_file_sync(struct partial_file *f);
void partial_file_close(struct partial_file *f);
/* Closes and unlinks the file. */
void partial_file_remove(struct partial_file *f);
