/* SPDX-License-Identifier: MIT */
/*
 * bundle_job: an afr_ota job that carries an update bundle (files[0] is its
 * manifest, the other files its payload's parts) as the update lifecycle
 * sees it. Owns telling such a job apart, the manifest's checks before a
 * payload byte is fetched (its signature against [ota] trust_dir, its
 * parse, its parts against the job's files[], and the device's verdict:
 * [update] compatible, the running version, allow_downgrade and
 * allow_same_version), and the copy of the verified manifest in the state
 * directory that lets an install resume without fetching it again.
 * Never fetches or writes an image: bundle_install does, driven by the
 * lifecycle.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "bundle_manifest.h"
#include "macro.h"

struct otad_config;
struct ota_document;

/* files[0] names a manifest ("*.manifest") and parts follow it. */
bool bundle_job_is_bundle(const struct ota_document *doc);

/* What the checks say when they refuse: the reference agent's reason form
 * and a sentence. */
struct bundle_job_refusal {
        char reason[64];
        char detail[384];
};

/* Checks the manifest's bytes (files[0], as received) and decides. 0: the
 * bundle may be installed, *ret_manifest and ret_part_files[] (the files[]
 * entry of each part) are set, and the manifest is saved in the state
 * directory for a resume (failing that is an error: -errno, with the
 * directory in the refusal). <0: refused, the refusal says why. */
int bundle_job_accept(const struct otad_config *config, const struct ota_document *doc, const char *running_version,
                      const void *bytes, size_t size, struct bundle_manifest **ret_manifest,
                      unsigned ret_part_files[static BUNDLE_PARTS_MAX], struct bundle_job_refusal *refusal)
        _warn_unused_result_;
/* After a restart: the saved manifest, checked again the same way (its
 * signature too: the state directory is not trusted more than the job). */
int bundle_job_load(const struct otad_config *config, const struct ota_document *doc, const char *running_version,
                    struct bundle_manifest **ret_manifest, unsigned ret_part_files[static BUNDLE_PARTS_MAX],
                    struct bundle_job_refusal *refusal) _warn_unused_result_;
/* Removes what an install keeps in the state directory (the manifest, the
 * chunk map): the update ended, or another job replaces it. */
void bundle_job_forget(const struct otad_config *config);
