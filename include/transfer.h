/* SPDX-License-Identifier: MIT */
/*
 * transfer: brings the bytes of one files[] entry of an afr_ota job onto
 * its image's target, over the job's MQTT stream or its presigned HTTPS URL
 * (stream.c / http.c behind include/download.h), at the entry's offset in a
 * multi-part image. Owns the download object and the file's progress
 * record path; never verifies, never decides what a failure means.
 */
#pragma once

#include <stdint.h>

#include "config.h"
#include "macro.h"
#include "otad.h"

struct installer;
struct ota_document;
struct transfer;
struct download_range;

/* Where the bytes of the file go: write(base + offset) for the file's
 * offset, sync() before a progress record counts them. */
struct transfer_sink {
        int (*write)(uint64_t offset, const void *buf, size_t len, void *userdata);
        int (*sync)(void *userdata);
        void *userdata;
        uint64_t base;
};

struct transfer_ops {
        /* done/total in the units the reference agent reports ("receive":
         * stream blocks, or 4 KiB units over HTTPS; with wanted ranges,
         * 4 KiB units of the wanted bytes on both), and the bytes of this
         * file received so far (of the wanted ones, with wanted ranges). */
        void (*progress)(uint64_t done_units, uint64_t total_units, uint64_t done_bytes, void *userdata);
        /* The presigned URL stopped working: get the job again and call
         * transfer_set_url(). */
        void (*need_fresh_url)(void *userdata);
        /* Every (wanted) byte is in the sink and synced (0), or the transfer
         * gave up (<0, reason for people). Called once, from the loop; the
         * owner may free the transfer in it. */
        void (*finished)(int result, const char *reason, void *userdata);
};

/* The sink of an installer: the image's bytes at base + offset. */
void transfer_sink_installer(struct installer *in, uint64_t base, struct transfer_sink *ret);

/* Fetches files[file_index] of doc (all of it, or the n_wanted ranges of
 * wanted, which are copied) into sink. */
int transfer_start(struct otad *otad, const struct ota_document *doc, enum ota_protocol protocol,
                   unsigned file_index, const struct transfer_sink *sink, const struct download_range *wanted,
                   size_t n_wanted, const char *job_id, const struct transfer_ops *ops, void *userdata,
                   struct transfer **ret) _warn_unused_result_;
/* Stops (no finished callback); the progress record stays for a resume.
 * NULL is fine. */
void transfer_free(struct transfer *t);
/* A fresh presigned URL after need_fresh_url() (HTTPS only; ignored else). */
int transfer_set_url(struct transfer *t, const char *url);

/* Removes the progress records of every file: the job ended or another
 * one replaces it. */
void transfer_remove_progress(const struct otad_config *config);
/* Removes the progress record of files[file_index]: it is verified, the
 * record is no longer needed for resuming. */
void transfer_forget_progress(const struct otad_config *config, unsigned file_index);
