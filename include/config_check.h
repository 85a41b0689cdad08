/* SPDX-License-Identifier: MIT */
/*
 * config_check: what `otad --check-config` promises beyond the syntax that
 * config_load() checks: the files a configuration names exist and are what
 * they should be (the device certificate parses, is valid now and matches
 * its private key, which only its owner can read; the CA files hold
 * certificates). One table of checks, each logging every problem it finds.
 * Never connects, never writes, never changes the configuration.
 */
#pragma once

struct otad_config;

/* Certificates that expire within this many days get a warning: time
 * enough to rotate one before the broker or the chain check refuses it. */
#define CONFIG_CHECK_EXPIRY_WARNING_DAYS 30

/* Runs every check. Logs each problem (errors and warnings, each naming
 * the file and what to do) and adds the warnings to *warnings. Returns 0
 * when nothing is wrong (warnings allowed), else the first error
 * (-ENOENT, -EPERM, -EKEYEXPIRED, -EKEYREJECTED, -EBADMSG, ...). */
int config_check(const struct otad_config *config, unsigned *warnings);
