/* SPDX-License-Identifier: MIT */
/*
 * version: which version the running system is, how two versions compare,
 * and how a version is written in the reference agent's updatedBy. Owns
 * reading VERSION_ID from os-release; never decides whether an update may
 * go ahead (the update lifecycle does) and never writes anything.
 */
#pragma once

#include <stddef.h>

struct otad_config;

/* The running version: [update] version, else VERSION_ID of [update]
 * os_release (one pair of matching quotes removed), else "0". A new
 * string in *ret; 0 or -ENOMEM. */
int version_running(const struct otad_config *config, char **ret);
/* Compares dotted versions numerically component by component ("1.10" >
 * "1.9"); non-numeric parts compare as text, byte by byte. <0, 0, >0. */
int version_compare(const char *a, const char *b);
/* The reference agent's updatedBy form: "0x%08x" of major<<24|minor<<16|build
 * when the version is numeric x.y.z within those widths, else the text. */
void version_updated_by(const char *version, char *buf, size_t size);
