/* SPDX-License-Identifier: MIT */
/*
 * state: the persisted record of the OTA job in progress (lifecycle.json)
 * and of the last one that ended (last.json), so that every stage of an
 * update survives kill -9, a reboot and a power cut. Owns the record's
 * format, the stage names (the same words in the record, in `otad status`
 * and in the journal's OTAD_STAGE=) and the record's atomic replacement in
 * the state directory. Never decides what a stage means: lifecycle does.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "macro.h"

/* The stages of one update, in the order an update goes through them. */
enum stage {
        STAGE_DOWNLOAD,  /* files[file_index] is being fetched into its target */
        STAGE_VERIFY,    /* files[file_index] is complete: read back and verified */
        STAGE_ACTIVATE,  /* every file verified; the images are made to take
                          * effect (for an A/B image: the bootloader is set to
                          * try new_slot once; this record says so first) */
        STAGE_REBOOT,    /* the reboot into new_slot was requested */
        STAGE_SELF_TEST, /* booted new_slot; the health check decides */
        STAGE_COMMIT,    /* new_slot marked good, SUCCEEDED (terminal) */
        STAGE_ROLLBACK,  /* ended after activation: new_slot marked bad, the
                          * old slot boots, FAILED (terminal) */
        STAGE_FAIL,      /* ended before activation, FAILED (terminal) */
        _STAGE_MAX,
};

#define STATE_CURRENT_FILE "lifecycle.json" /* the job in progress */
#define STATE_LAST_FILE "last.json"         /* the last job that ended */

struct state_record {
        char job_id[129];
        int64_t execution_number;
        enum stage stage;
        unsigned starts;     /* otad starts in this stage that did not leave it */
        char identity[65];   /* SHA-256 over what identifies the job's files */
        unsigned file_index; /* files[] entry being downloaded or verified */
        unsigned n_files;
        unsigned n_images;   /* files grouped into images (parts of one image) */
        unsigned activated;  /* images already made to take effect, in plan order */
        uint64_t done;       /* bytes received over all files (a bundle: the payload
                              * bytes no longer to fetch, fetched or reused) */
        uint64_t total;      /* bytes of all files */
        uint64_t fetched;    /* a bundle: payload bytes fetched by this run */
        uint64_t reused;     /* a bundle: image bytes copied from the active slot */
        char protocol[8];    /* "mqtt" or "http" */
        char targets[256];   /* the job's target names, comma-separated */
        char target[64];     /* the ab target, "" when the job has none */
        char slot_class[64];
        char old_slot[64];   /* bootnames */
        char new_slot[64];
        char old_version[64];
        char new_version[64];
        char result[16];     /* SUCCEEDED / FAILED once decided */
        char reason[128];    /* statusDetails "reason", reference form */
        char detail[512];    /* statusDetails "detail", for people */
        bool reported;       /* the service accepted the terminal status */
        int64_t updated_at;  /* epoch seconds */
};

const char *stage_to_string(enum stage stage);
int stage_from_string(const char *s);
bool stage_is_terminal(enum stage stage);

/* Loads dir/name. -ENOENT when there is none, -EBADMSG when it cannot be
 * parsed; *ret untouched on failure. */
int state_load(const char *dir, const char *name, struct state_record *ret);
/* Replaces dir/name atomically (tmp, fsync, rename, fsync dir) and stamps
 * updated_at. A failure means the record on disk is the old one. */
int state_save(const char *dir, const char *name, struct state_record *record) _warn_unused_result_;
int state_remove(const char *dir, const char *name) _warn_unused_result_;
