/* SPDX-License-Identifier: MIT */
/*
 * images: what one afr_ota job writes where. Groups the job's files[] into
 * images (a whole file, or the consecutive parts of one), routes each to the
 * first [target.NAME] that accepts it, orders them (A/B images last, so a
 * file or command target that fails leaves no slot armed for a reboot) and
 * owns the installer of each. Never downloads, verifies or decides anything
 * about the update's course.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "macro.h"
#include "ota_document.h"
#include "otad.h"

struct image {
        const struct config_target *target;
        struct installer *installer;
        unsigned first, count; /* its files[] entries */
        uint64_t size;
        bool begun;            /* installer begin() done in this run */
};

struct images {
        struct image v[OTA_DOCUMENT_MAX_FILES];
        size_t n;
};

/* Plans doc's images. -ENOENT (no target accepts a file) or -EEXIST (two
 * images for one target) with a sentence in detail. */
int images_plan(struct images *images, const struct otad_config *config, const struct ota_document *doc,
                char *detail, size_t detail_size) _warn_unused_result_;
/* The one image of an update bundle (bundle_job.h): all of doc's files
 * make it, the manifest's route (files[0]'s filepath and fileType) picks
 * its target, and its size is the manifest's image_size, set once the
 * manifest is read. */
int images_plan_bundle(struct images *images, const struct otad_config *config, const struct ota_document *doc,
                       char *detail, size_t detail_size) _warn_unused_result_;
/* Creates the installer of each image; nothing is opened yet. */
int images_open(struct images *images, struct otad *otad, const char *job_id) _warn_unused_result_;
/* Closes the installers; abort: they remove what they wrote (partial files,
 * staged images) first. The plan is forgotten. */
void images_close(struct images *images, bool abort);

struct image *images_of_file(struct images *images, unsigned file_index);
/* The image's installer begin(size, resume), once per run. */
int image_begin(struct image *image, bool resume) _warn_unused_result_;

/* What identifies the job's files for resuming, as 64 hex digits: an
 * identical job delivered again (with fresh presigned URLs) matches, a
 * changed size, signature, target or protocol does not. */
void images_identity(const struct images *images, const struct ota_document *doc, const char *job_id,
                     enum ota_protocol protocol, char ret[static 65]);

/* "a,b": the target names, for the record (and for discarding a job's
 * partial files after a restart). */
void images_target_names(const struct images *images, char *buf, size_t size);

/* Removes what the file and command targets named in target_names hold of
 * job_id (its partial files, staged images): an update the state
 * directory remembered but that will never resume. */
void images_discard(struct otad *otad, const char *job_id, const char *target_names);
