/* SPDX-License-Identifier: MIT */
/*
 * custom_jobs: the job handler for documents that name an operation
 * ({"<operation_key>": "<name>", ...}): runs <handler_dir>/<name> with the
 * job document on stdin and reports its exit as SUCCEEDED/FAILED with a
 * reason and its stdout. Owns the runs of handlers (child.h runs each
 * program); never runs a file that is not a root-owned, not
 * group/world-writable regular file directly in the configured directory,
 * and never goes through a shell.
 */
#pragma once

#include <stdbool.h>

#include "otad.h"

/* Registers the handler with otad->jobs. */
int custom_jobs_new(struct otad *otad, struct custom_jobs **ret);
/* Kills running handlers (SIGKILL to their process groups) and unregisters. */
void custom_jobs_free(struct custom_jobs *c);

/* Operation names: [a-zA-Z0-9_.-]{1,255}, not starting with '.'. Pure. */
bool custom_jobs_operation_is_valid(const char *name);
/* Turns handler output into a statusDetails value (protocol.md §1.5):
 * control characters become spaces, invalid UTF-8 becomes '?', runs of
 * blanks shrink to one, at most max_chars characters (ending in "..." when
 * cut). Writes a NUL-terminated string of at most 4*max_chars+1 bytes into
 * buf (size ≥ 4*max_chars+1); returns its length, 0 when nothing printable
 * is left. Pure. */
size_t custom_jobs_sanitize_output(const char *in, size_t len, char *buf, size_t size, size_t max_chars);
