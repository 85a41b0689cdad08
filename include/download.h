/* SPDX-License-Identifier: MIT */
/*
 * download: the contract between a transfer (stream.c over MQTT file
 * streams, http.c over presigned HTTPS) and its owner (the OTA handler).
 * A transfer owns its protocol, its progress record and resuming from it;
 * the owner owns where the bytes go and what the result means.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

struct download_ops {
        /* Validated bytes [offset, offset+len) of the file. <0 aborts the
         * transfer with that error. */
        int (*write)(uint64_t offset, const void *buf, size_t len, void *userdata);
        /* Make everything written so far durable. A transfer calls this
         * before it persists a progress record that counts those bytes:
         * data reaches the target before the record that says it did. */
        int (*sync)(void *userdata);
        /* Received/total in blocks (stream) or bytes (HTTP), on every new
         * block or chunk; the owner rate-limits what it reports. */
        void (*progress)(uint64_t done, uint64_t total, void *userdata);
        /* The URL stopped working (HTTP 400/403/404, e.g. an expired
         * presigned URL): the owner fetches the job again and calls
         * http_download_set_url(). NULL for streams. */
        void (*need_fresh_url)(void *userdata);
        /* The transfer ended. result 0: every byte was written and synced.
         * <0: it gave up; reason is a short text for the journal and
         * statusDetails. Called once; the owner may free the transfer in it. */
        void (*finished)(int result, const char *reason, void *userdata);
};

/* What identifies one file of one job; a progress record written for other
 * values is discarded rather than resumed. */
struct download_file {
        const char *job_id;
        unsigned file_index;   /* position in afr_ota files[] */
        uint64_t size;         /* filesize */
        const char *signature; /* base64 text of sig-sha256-ecdsa, identity only */
        const char *state_path; /* where the transfer persists its progress */
};
