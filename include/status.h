/* SPDX-License-Identifier: MIT */
/*
 * status: what `otad status` shows: the booted slot, both slots' bootloader
 * state and versions, the job in progress with its stage and percent, and
 * the last result, for a person or as JSON. Reads the state directory and
 * the bootloader; never changes either (except that the daemon records the
 * version of each slot it boots, through status_record_slot_version()).
 */
#pragma once

#include <stdbool.h>

struct otad_config;

int status_print(const struct otad_config *config, bool json);
/* Remembers that the slot bootname runs version (the daemon calls this for
 * the booted slot at start); written only when it changed. */
int status_record_slot_version(const struct otad_config *config, const char *bootname, const char *version);
