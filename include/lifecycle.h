/* SPDX-License-Identifier: MIT */
/*
 * lifecycle: the one state machine of an OTA update, from the job taken to
 * its commit or rollback. Owns the stages (state.h), the events that move
 * them and the table of allowed transitions, and the rule that makes the
 * update unable to lie: every transition persists the new stage first and
 * acts only when that succeeded. When persisting fails the update ends
 * FAILED with a reason that names the state directory, and nothing risky
 * happens on a state that is not on disk: the bootloader is never switched
 * to a new slot, and a slot is never marked good, without the record that
 * says so; undoing (marking the new slot bad, going back to the old one)
 * is always allowed.
 *
 * Drives the transfers (transfer.h), the verification read-back (verify.h,
 * in a worker thread so that a slow slot never starves the watchdog), the
 * installers (images.h), the bootloader, the reboot (reboot.h) and the
 * health check (health.h) through their narrow interfaces; none of them
 * writes a stage. Reports up only through the callbacks it was handed: the
 * job's statusDetails are its owner's (ota.c), `otad status` reads the
 * record, and the journal line of each transition carries OTAD_STAGE=.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "macro.h"
#include "otad.h"
#include "state.h"

struct ota_document;
struct lifecycle;

/* Every callback gets the record as it is now (valid until the next call
 * into the lifecycle). None may call back into the lifecycle except where
 * it says so. */
struct lifecycle_ops {
        /* A stage was entered (its journal line is written). */
        void (*stage)(const struct state_record *rec, enum stage from, void *userdata);
        /* Download progress, in the units the reference agent's "receive"
         * counts (stream blocks; 4 KiB over HTTPS). */
        void (*progress)(const struct state_record *rec, uint64_t done_units, uint64_t total_units,
                         void *userdata);
        /* The presigned URL stopped working: get the job again and call
         * lifecycle_refresh() with its document. */
        void (*need_fresh_url)(void *userdata);
        /* Every image is activated and the new slot is set to boot once:
         * report "self_test: ready", then call lifecycle_ready_reported(). */
        void (*ready)(const struct state_record *rec, void *userdata);
        /* Booted the new slot and the version is acceptable: the health
         * check starts; report "self_test: active". */
        void (*active)(const struct state_record *rec, void *userdata);
        /* The update ended (rec->result, reason, detail): report it, then
         * call lifecycle_reported(). Also for an unreported end found at
         * start. */
        void (*finished)(const struct state_record *rec, void *userdata);
        /* No update in hand any more (retired to last.json, or cancelled). */
        void (*idle)(void *userdata);
};

/* Reads the state directory and continues what it holds: after a reboot
 * into the new slot the self-test starts at once; an update that needs its
 * job document (download, verify, an unfinished activation) waits for
 * lifecycle_take(). With no record, the booted slot is marked good (what
 * rauc-mark-good does); with an unreadable one, nothing is marked. */
int lifecycle_new(struct otad *otad, const struct lifecycle_ops *ops, void *userdata,
                  struct lifecycle **ret) _warn_unused_result_;
void lifecycle_free(struct lifecycle *lc);

/* The update in hand, or NULL. */
const struct state_record *lifecycle_record(const struct lifecycle *lc);
/* Whether the update in hand belongs to another job and must be decided
 * (activated and not yet committed or rolled back) before a new one may
 * start. A decided one is retired by lifecycle_take(). */
bool lifecycle_busy_with_other(const struct lifecycle *lc, const char *job_id);

/* Whether the update in hand can go on only with its job document (it is
 * downloading, verifying or activating): the job's next delivery must go
 * to lifecycle_take(), not just be noted. */
bool lifecycle_needs_document(const struct lifecycle *lc);

/* Starts the update of an afr_ota job, or resumes it when the record is of
 * this job and its files. Takes doc. Everything from here on, refusals
 * included, is reported through ops. -EBUSY: see lifecycle_busy_with_other(). */
int lifecycle_take(struct lifecycle *lc, const char *job_id, int64_t execution_number,
                   struct ota_document *doc);
/* A job that cannot even start (malformed document, no usable protocol):
 * ends FAILED with reason and detail, recorded as the last result. */
void lifecycle_refuse(struct lifecycle *lc, const char *job_id, int64_t execution_number, const char *reason,
                      const char *detail);
/* The same job again with fresh presigned URLs. Does not take doc. */
void lifecycle_refresh(struct lifecycle *lc, const struct ota_document *doc);
/* The service no longer offers the job: before activation its work stops
 * and its files go; between activation and the reboot the new slot is
 * marked bad; after the reboot the self-test still decides. */
void lifecycle_cancel(struct lifecycle *lc);

/* Answers to ops->ready() and ops->finished(): result 0 when the service
 * took the status, <0 when it finally refused it or nobody asks for it. */
void lifecycle_ready_reported(struct lifecycle *lc, int result);
void lifecycle_reported(struct lifecycle *lc, int result);
