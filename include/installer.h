/* SPDX-License-Identifier: MIT */
/*
 * installer: the pluggable target that one job file is written into, and what
 * makes it take effect. Owns the bytes on the target; never talks to the
 * network and never decides whether an image is trusted (verify does).
 * Backends live in src/installers/ and are chosen per [target.NAME].
 *
 * Life of one job file: begin -> write* (any order, any offsets) -> sync ... ->
 * finish -> read (verification reads back what was written) -> activate ->
 * (after reboot) confirm or reject. abort() may come at any point before
 * activate.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "otad.h"

struct config_target;

struct installer_ops {
        const char *name;
        /* Prepares to receive size bytes. resume: keep what an earlier run of
         * this job wrote (the download state says which blocks are there). */
        int (*begin)(struct installer *in, uint64_t size, bool resume);
        int (*write)(struct installer *in, uint64_t offset, const void *buf, size_t len);
        /* Makes everything written so far durable (fdatasync). The download
         * calls this before it persists the block map that counts those
         * blocks. */
        int (*sync)(struct installer *in);
        /* All bytes written and synced; no more writes. */
        int (*finish)(struct installer *in);
        /* Reads back bytes [offset, offset+len) exactly as the target holds them. */
        int (*read)(struct installer *in, uint64_t offset, void *buf, size_t len);
        /* The image is verified: make it take effect. Returns 1 when a
         * reboot is needed for that (A/B), 0 when done (file, command). */
        int (*activate)(struct installer *in);
        void (*abort)(struct installer *in);
        void (*free)(struct installer *in);
};

struct installer {
        const struct installer_ops *ops;
        const struct config_target *target;
        struct otad *otad;
        char *job_id;
        void *data; /* the backend's */
};

/* Creates the backend for target. Nothing is opened until begin(). */
int installer_new(struct otad *otad, const struct config_target *target, const char *job_id,
                  struct installer **ret);
void installer_free(struct installer *in);
