/* SPDX-License-Identifier: MIT */
/*
 * download: the contract between a transfer (stream.c over MQTT file
 * streams, http.c over presigned HTTPS) and its owner (the OTA handler).
 * A transfer owns its protocol, its progress record and resuming from it;
 * the owner owns where the bytes go and what the result means.
 *
 * Progress records, and what a crash can take from them. A record may only
 * count bytes that are on the target when it is read back; it should lose
 * little when otad is killed however often (systemd's watchdog, an OOM
 * kill, a kill -9 every second), and it must not cost a sync per block.
 *  - kill -9 (or a crash of otad alone) loses the process, not the kernel:
 *    bytes write() handed to the target are in the page cache and reach
 *    the device later; a record renamed into place without fsync is there
 *    too. So a record written after the data, neither synced, is true after
 *    a kill -9.
 *  - A power cut (or a kernel crash, or a reboot) loses the page cache:
 *    unsynced data and an unsynced record may each survive or not, in any
 *    combination. Only bytes synced before the record was written may be
 *    counted after it.
 * So a record carries two counts and the boot id (/proc/sys/kernel/random/
 * boot_id) of the boot the first is true in: "written" (handed to the
 * target; renamed into place without fsync every window of blocks or few
 * hundred KiB, which costs a small write and no flush) and "durable"
 * (synced, then recorded with fsync, once a second or MiB as before). A
 * reader in the same boot resumes from "written"; in another boot from
 * "durable". A power cut can so lose at most what came since the last
 * durable record (or, on a file system that keeps neither version of a
 * renamed but unsynced file, the record: the download starts over); a kill
 * loses at most what was in flight and since the last written record. The
 * signature check over the whole file stays the last word on every byte.
 *
 * Wanted ranges (an adaptive update fetches only the chunks of a bundle's
 * payload the device does not have; include/ranges.h). Without them a
 * transfer fetches and writes the whole file, exactly as before. With them:
 *  - write() gets exactly the wanted bytes and never a byte outside them:
 *    a stream block or an HTTP body that covers more (a block across a
 *    range's edge, a gap fetched with its neighbours) is clipped. The
 *    consumer of a delta is the payload decoder at payload offsets, and a
 *    byte outside the ranges belongs to a chunk the device takes from its
 *    active slot: it is not the consumer's to see, and clipping costs no copy.
 *  - Each wanted byte is written once per run, in no guaranteed order (MQTT:
 *    as blocks arrive; HTTPS: ascending). A later run writes again exactly
 *    what the progress record did not count, with the same content.
 *  - progress() counts wanted bytes (done/total) on both transports.
 *  - The record is tied to the wanted set (a SHA-256 of it): a record for
 *    another set, or for the whole file, is discarded rather than resumed.
 *  - An empty set (wanted != NULL, n_wanted == 0) finishes at once with 0.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

struct download_ops {
        /* Validated bytes [offset, offset+len) of the file. <0 aborts the
         * transfer with that error. When it returns 0 the bytes are with
         * the kernel (written to the target, at least into its page cache),
         * not in a buffer of otad's: a kill -9 right after does not lose
         * them, and a record may count them for resuming in this boot. */
        int (*write)(uint64_t offset, const void *buf, size_t len, void *userdata);
        /* Make everything written so far durable (also what an earlier,
         * killed run wrote: a sync covers the whole target). A transfer
         * calls this before it persists a record that counts those bytes
         * as durable: data reaches the device before the record that says
         * it did. */
        int (*sync)(void *userdata);
        /* Received/total in blocks (stream) or bytes (HTTP), on every new
         * block or chunk; the owner rate-limits what it reports. With
         * wanted ranges: wanted bytes written/wanted bytes, both transports. */
        void (*progress)(uint64_t done, uint64_t total, void *userdata);
        /* The URL stopped working (HTTP 400/403/404, e.g. an expired
         * presigned URL): the owner fetches the job again and calls
         * http_download_set_url(). NULL for streams. */
        void (*need_fresh_url)(void *userdata);
        /* The transfer ended. result 0: every byte (every wanted byte) was
         * written and synced.
         * <0: it gave up; reason is a short text for the journal and
         * statusDetails. Called once; the owner may free the transfer in it. */
        void (*finished)(int result, const char *reason, void *userdata);
};

/* Bytes [offset, offset + length) of a file. */
struct download_range {
        uint64_t offset;
        uint64_t length;
};

/* What identifies one file of one job; a progress record written for other
 * values is discarded rather than resumed. */
struct download_file {
        const char *job_id;
        unsigned file_index;   /* position in afr_ota files[] */
        uint64_t size;         /* filesize */
        const char *signature; /* base64 text of sig-sha256-ecdsa, identity only */
        const char *state_path; /* where the transfer persists its progress */
        /* The bytes to fetch: sorted by offset, none empty, none overlapping
         * another, all within size (touching ones are fine). The transfer
         * copies them. NULL: the whole file. */
        const struct download_range *wanted;
        size_t n_wanted;
};
