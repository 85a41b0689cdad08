/* SPDX-License-Identifier: MIT */
/*
 * ota: the handler of `afr_ota` jobs. Owns one update from the job document
 * to its end: routing each file to a target, the transfer (stream or HTTPS),
 * verification of what the target holds, activation, and reporting in the
 * reference agent's statusDetails forms (protocol.md §2.4). The lifecycle
 * after activation (reboot, self-test, commit or rollback) is update.c's.
 * Never speaks MQTT or HTTP itself and never writes a slot or a bootloader
 * variable directly: transfers, installers and bootloaders do.
 */
#pragma once

#include "otad.h"

/* Registers the handler with otad->jobs. Picks up a persisted update that
 * was in progress (resume, or self-test after a reboot). */
int ota_new(struct otad *otad, struct ota **ret);
void ota_free(struct ota *ota);

/* The running version: [update] version, else VERSION_ID of os_release,
 * else "0". A new string. */
int ota_running_version(const struct otad_config *config, char **ret);
/* Compares dotted versions numerically component by component ("1.10" >
 * "1.9"); non-numeric parts compare as text. <0, 0, >0. */
int ota_version_compare(const char *a, const char *b);
/* The reference agent's updatedBy form: "0x%08x" of major<<24|minor<<16|build
 * when the version is numeric x.y.z within those widths, else the text. */
void ota_version_updated_by(const char *version, char *buf, size_t size);
