/* SPDX-License-Identifier: MIT */
/*
 * ota: the Jobs handler of `afr_ota` documents. Owns the conversation with
 * the job: parsing its document, handing it to the update lifecycle
 * (lifecycle.h), and reporting what the lifecycle tells it in the
 * reference agent's statusDetails forms (protocol.md §2.4, §2.5), including
 * the reports owed to a job until the service delivers it again after a
 * restart or a reboot. Never downloads, verifies, installs or decides
 * anything about the update itself.
 */
#pragma once

#include "otad.h"

/* What the update in hand is doing, for the daemon's STATUS= line: job_id
 * and stage NULL when idle; percent -1 when it does not apply. */
typedef void (*ota_status_fn)(const char *job_id, const char *stage, int percent, void *userdata);

/* Registers the handler with otad->jobs and picks up a persisted update
 * (resume, or the self-test after a reboot). status may be NULL. */
int ota_new(struct otad *otad, ota_status_fn status, void *userdata, struct ota **ret);
void ota_free(struct ota *ota);
