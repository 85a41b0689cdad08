/* SPDX-License-Identifier: MIT */
/*
 * installer: the pluggable target that one job file is written into, and what
 * makes it take effect. Owns the bytes on the target; never talks to the
 * network and never decides whether an image is trusted (verify does).
 * Backends live in src/installers/ and are chosen per [target.NAME].
 *
 * Life of one job file: begin -> write* (any order, any offsets) -> sync ... ->
 * finish -> read (verification reads back what was written) -> activate ->
 * (after reboot, for ab) confirm or reject, which is bootloader_mark_good()
 * or bootloader_mark_bad() on in->slot's bootname (bootloader.h): no
 * installer object survives the reboot. abort() may come at any point
 * before activate.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "macro.h"
#include "otad.h"

struct config_target;
struct config_slot;

/* How an activate() that returned -EINPROGRESS ends (the command backend
 * runs a program that may take minutes, inside the sd-event loop). r is what
 * activate() would have returned: 0 done, 1 reboot needed, negative errno on
 * failure; in->reason says why then. Called exactly once, from the event
 * loop, never from inside activate(); the installer may be freed in it. */
typedef void (*installer_activate_done_t)(struct installer *in, int r, void *userdata);

struct installer_ops {
        const char *name;
        /* Prepares to receive size bytes. resume: keep what an earlier run of
         * this job wrote (the download state says which blocks are there). */
        int (*begin)(struct installer *in, uint64_t size, bool resume) _warn_unused_result_;
        int (*write)(struct installer *in, uint64_t offset, const void *buf, size_t len) _warn_unused_result_;
        /* Makes everything written so far durable (fdatasync). The download
         * calls this before it persists the block map that counts those
         * blocks. */
        int (*sync)(struct installer *in) _warn_unused_result_;
        /* All bytes written and synced; no more writes. */
        int (*finish)(struct installer *in) _warn_unused_result_;
        /* Reads back bytes [offset, offset+len) exactly as the target holds them. */
        int (*read)(struct installer *in, uint64_t offset, void *buf, size_t len) _warn_unused_result_;
        /* The image is verified: make it take effect. Returns 1 when a
         * reboot into in->slot is needed for that (A/B: the caller switches
         * the bootloader), 0 when done (file), or
         * -EINPROGRESS when it goes on in the event loop (command): then
         * in->activate_done is called with the result later, and it must
         * have been set (installer_set_activate_done) before. */
        int (*activate)(struct installer *in) _warn_unused_result_;
        /* Gives up the job: removes the partial file or staged image. */
        void (*abort)(struct installer *in);
        void (*free)(struct installer *in);
};

struct installer {
        const struct installer_ops *ops;
        const struct config_target *target;
        struct otad *otad;
        char *job_id;
        /* ab: the slot being written, known after begin(); NULL otherwise.
         * Its bootname is what the lifecycle marks good or bad after the
         * reboot. */
        const struct config_slot *slot;
        /* Why the last failing call failed, for the job's statusDetails
         * ("slot B is mounted", "exit status 3"); NULL when none did. */
        char *reason;
        installer_activate_done_t activate_done;
        void *activate_userdata;
        void *data; /* the backend's */
};

/* Creates the backend for target. Nothing is opened until begin(). */
int installer_new(struct otad *otad, const struct config_target *target, const char *job_id,
                  struct installer **ret) _warn_unused_result_;
/* Closes what begin() opened and frees in. Keeps what an unfinished job
 * wrote (a partial file, a staged image) so that a restarted otad can
 * resume it; abort() is what removes it. A running activation is stopped:
 * its program's process group gets SIGKILL (this does not wait for long). */
void installer_free(struct installer *in);
void installer_set_activate_done(struct installer *in, installer_activate_done_t cb, void *userdata);
/* Replaces in->reason; for backends. Returns error, so a backend can write
 * `return installer_fail(in, -EBUSY, "slot %s is mounted", ...)`; also logs
 * the reason at error level with the job id. */
int installer_fail(struct installer *in, int error, const char *format, ...) __attribute__((format(printf, 3, 4)));
