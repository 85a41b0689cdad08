/* SPDX-License-Identifier: MIT */
/*
 * bundle_install: brings the image of an update bundle into its target while
 * the payload arrives. First the payload's header (the chunk index, which
 * the payload decoder checks against the manifest's header_sha256); then
 * each chunk is either found on the device (delta.h: written by an earlier
 * run of this install, or copied from the active slot after its checksum
 * matched) or fetched, and only its bytes (transfer.h with wanted ranges,
 * part by part), checked against its two checksums, decompressed and
 * written at its image offset by the decoder.
 *
 * Owns the decoder, the plan, the chunks being assembled from fetched bytes
 * (bounded by what is in flight), and the chunk map that makes an install
 * resumable after kill -9 or a power cut: <state>/bundle.chunks, in
 * blockmap's record format, counts the chunks written in this boot and
 * those the target synced before the map counted them (download.h explains
 * why both). Never decides whether the bundle may be installed and never
 * reads the whole image back: the lifecycle does both (the read-back
 * against the manifest's image_sha256 is the last word on every byte).
 *
 * Threads: the scan of the active slot and the copy of its chunks run in a
 * worker (worker.h); everything else runs on the loop.
 */
#pragma once

#include <stdint.h>

#include "config.h"
#include "macro.h"
#include "otad.h"

struct bundle_install;
struct bundle_manifest;
struct config_slot;
struct installer;
struct ota_document;

struct bundle_install_stats {
        uint32_t chunks;            /* in the bundle */
        uint32_t chunks_done;       /* in the target now */
        uint32_t chunks_resumed;    /* of those: written by an earlier run */
        uint32_t chunks_reused;     /* copied from the active slot in this run */
        uint32_t chunks_fetched;    /* fetched in this run */
        uint32_t chunks_refetched;  /* fetched again after a checksum mismatch */
        uint64_t payload_bytes;     /* the payload, header included */
        uint64_t done_bytes;        /* payload bytes (header, chunks) no longer to fetch */
        uint64_t fetched_bytes;     /* payload bytes fetched in this run */
        uint64_t reused_bytes;      /* image bytes copied from the active slot in this run */
        uint64_t to_fetch_bytes;    /* payload bytes the plan fetches in this run */
        char delta[384];            /* what was found where, and why not more */
};

struct bundle_install_ops {
        void (*progress)(const struct bundle_install_stats *st, void *userdata);
        /* The presigned URL stopped working: get the job again and call
         * bundle_install_set_url(). */
        void (*need_fresh_url)(void *userdata);
        /* Every chunk is in the target and synced (0), or the install gave
         * up (<0, reason for people). Called once, from the loop; the owner
         * may free the install in it. */
        void (*finished)(int result, const char *reason, void *userdata);
};

struct bundle_install_params {
        const struct ota_document *doc;
        enum ota_protocol protocol;
        const struct bundle_manifest *manifest;
        const unsigned *part_files;      /* the files[] entry of each manifest part */
        struct installer *target;        /* begun for the manifest's image_size */
        const struct config_slot *active; /* the booted slot to reuse chunks from; NULL: none */
        const char *job_id;
};

/* Everything in params must outlive the install. */
int bundle_install_start(struct otad *otad, const struct bundle_install_params *params,
                         const struct bundle_install_ops *ops, void *userdata,
                         struct bundle_install **ret) _warn_unused_result_;
/* Stops (no finished callback). The chunk map stays for a resume. NULL is fine. */
void bundle_install_free(struct bundle_install *b);
/* Fresh presigned URLs: the part in flight continues with its new URL. */
void bundle_install_set_url(struct bundle_install *b, const struct ota_document *doc);
void bundle_install_get_stats(const struct bundle_install *b, struct bundle_install_stats *ret);

/* Removes the chunk map: the install ended, or another job replaces it. */
void bundle_install_forget(const struct otad_config *config);
