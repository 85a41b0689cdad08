/* SPDX-License-Identifier: MIT */
/*
 * update_state: the persisted record of the OTA job in progress (and of the
 * last one that ended), so that every step of an update survives kill -9,
 * a reboot and a power cut. Owns the record's format and its atomic
 * replacement in the state directory; never decides what a stage means.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

enum update_stage {
        UPDATE_DOWNLOADING, /* files are being fetched into their targets */
        UPDATE_VERIFIED,    /* every file verified; nothing activated yet */
        UPDATE_ACTIVATED,   /* the new slot is set to boot once; reboot pending */
        UPDATE_TESTING,     /* booted the new slot; health check running */
        UPDATE_COMMITTED,   /* new slot marked good (terminal) */
        UPDATE_ROLLED_BACK, /* new slot marked bad, old one primary (terminal) */
        UPDATE_FAILED,      /* ended before activation (terminal) */
        _UPDATE_STAGE_MAX,
};

#define UPDATE_STATE_FILE "update.json" /* the job in progress */
#define UPDATE_LAST_FILE "last.json"    /* the last job that ended */

struct update_state {
        char job_id[129];
        int64_t execution_number;
        enum update_stage stage;
        char identity[65];   /* SHA-256 over what identifies the job's files */
        unsigned file_index; /* files[] entry being downloaded */
        unsigned n_files;
        uint64_t done;       /* bytes received over all files */
        uint64_t total;      /* bytes of all files */
        char protocol[8];    /* "mqtt" or "http" */
        char target[64];     /* the ab target whose slot was activated, "" none */
        char slot_class[64];
        char old_slot[64];   /* bootnames */
        char new_slot[64];
        char old_version[64];
        char new_version[64];
        char targets[256];   /* the job's target names, comma-separated */
        bool reboot_requested; /* the reboot command was started */
        char result[16];     /* SUCCEEDED / FAILED once decided */
        char reason[128];    /* statusDetails "reason", reference form */
        char detail[512];    /* statusDetails "detail", for people */
        bool reported;       /* the terminal status was accepted by the service */
        int64_t updated_at;  /* epoch seconds */
};

const char *update_stage_to_string(enum update_stage stage);
int update_stage_from_string(const char *s);
bool update_stage_is_terminal(enum update_stage stage);

/* Loads dir/name. -ENOENT when there is none, -EBADMSG when it cannot be
 * parsed; *ret untouched on failure. */
int update_state_load(const char *dir, const char *name, struct update_state *ret);
/* Replaces dir/name atomically (tmp, fsync, rename, fsync dir) and stamps
 * updated_at. */
int update_state_save(const char *dir, const char *name, struct update_state *state);
int update_state_remove(const char *dir, const char *name);
