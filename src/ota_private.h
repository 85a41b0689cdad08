/* SPDX-License-Identifier: MIT */
/*
 * The OTA handler's state, shared by ota.c (job → download → verify →
 * activate) and update.c (reboot → self-test → commit or rollback).
 * Nothing outside these two files sees it.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>
#include <sys/types.h>

#include "config.h"
#include "jobs.h"
#include "ota.h"
#include "ota_document.h"
#include "update_state.h"

struct stream_download;
struct http_download;

/* The reference agent's reason words and codes (protocol.md §2.4), so that
 * fleet tooling written for FreeRTOS devices reads otad's failures too. */
#define OTA_ERR_JOB_PARSER 0x0c            /* OtaErrJobParserError */
#define OTA_JOB_PARSE_NON_CONFORMING 0x04  /* OtaJobParseErrNonConformingJobDoc */
#define OTA_ERR_REQUEST_FILE_BLOCK 0x08
#define OTA_ERR_INVALID_DATA_PROTOCOL 0x0d
#define OTA_ERR_MOMENTUM_ABORT 0x0e
#define OTA_ERR_DOWNGRADE 0x0f
#define OTA_ERR_SAME_VERSION 0x10
#define OTA_ERR_IMAGE_STATE_MISMATCH 0x11
#define OTA_ERR_USER_ABORT 0x13
#define OTA_PAL_SIGNATURE_CHECK_FAILED 0xe3
#define OTA_PAL_RX_FILE_CREATE_FAILED 0xe4
#define OTA_PAL_RX_FILE_TOO_LARGE 0xe5
#define OTA_PAL_BAD_SIGNER_CERT 0xe7
#define OTA_PAL_ACTIVATE_FAILED 0xec

/* One image: a whole files[] entry, or the consecutive parts of one. */
struct ota_image {
        const struct config_target *target;
        struct installer *installer;
        unsigned first, count; /* its files[] entries */
        uint64_t size;
        bool begun;
};

struct ota {
        struct otad *otad;
        struct job_handler handler;
        struct bootloader *bootloader; /* NULL: [bootloader] type=none */
        char *running_version;
        sd_event_source *kick;         /* runs the next step outside callbacks */
        sd_event_source *timer;        /* reboot delay, marker poll, report wait */

        /* The job in hand; job_id NULL when idle. */
        char *job_id;
        bool job_present;              /* the service still offers it */
        struct ota_document *doc;
        struct update_state state;
        struct ota_image images[OTA_DOCUMENT_MAX_FILES];
        size_t n_images;
        enum ota_protocol protocol;

        /* The transfer of files[state.file_index]. */
        struct stream_download *stream;
        struct http_download *http;
        bool transfer_done;
        int transfer_result;
        char transfer_reason[256];
        uint64_t file_done;            /* bytes of the current file written */
        uint64_t last_progress_usec;
        uint64_t last_save_usec;

        /* Activation of images[activate_index..]; command installers finish
         * asynchronously. */
        size_t activate_index;
        bool needs_reboot;
        bool activating;

        /* update.c: after activation. */
        pid_t child;                   /* health check or reboot command */
        sd_event_source *child_source;
        bool reboot_requested;
        bool active_reported;          /* "self_test":"active" sent */
        bool terminal_sent;            /* the final status is on its way */
        bool job_waiting;              /* a new job waits for this update's decision */
};

/* ota.c, for update.c */
void ota_kick(struct ota *ota);
int ota_report(struct ota *ota, enum job_status status, const struct status_detail *details, unsigned flags,
               jobs_update_done_fn done);
void ota_forget_job(struct ota *ota);
void ota_format_reason(char *buf, size_t size, const char *word, unsigned code, unsigned sub);

/* update.c */
/* Called when every image is activated: reports and reboots, or commits
 * right away when no slot needs a reboot. */
void update_activated(struct ota *ota);
/* At start: a persisted update that is past activation continues here. */
void update_resume(struct ota *ota);
/* The job of a persisted post-activation update was delivered (again). */
void update_job_delivered(struct ota *ota);
/* Records a terminal result, persists it, reports it and retires it. */
void update_finish(struct ota *ota, enum update_stage stage, const char *result, const char *reason,
                   const char *detail);
void update_stop(struct ota *ota);
/* Keeps the decided update as the last result and forgets it; a job that
 * waited for the decision is then asked for again. */
void update_retire(struct ota *ota);
