/* SPDX-License-Identifier: MIT */
/*
 * reboot: asks the system to reboot the way [update] reboot_policy says
 * (at once, after reboot_delay seconds, or once reboot_marker exists) and
 * runs [update] reboot_command. Owns that wait and the command; never
 * decides whether a reboot is due, and never persists anything: its owner
 * records the reboot between due() and reboot_run().
 */
#pragma once

#include "macro.h"
#include "otad.h"

struct reboot;

/* The policy allows the reboot now. */
typedef void (*reboot_due_fn)(void *userdata);
/* The command could not run or failed; detail for people. */
typedef void (*reboot_failed_fn)(const char *detail, void *userdata);

/* failed() is called from the loop when reboot_run()'s command could not
 * run or failed. */
int reboot_new(struct otad *otad, const char *job_id, reboot_failed_fn failed, void *userdata,
               struct reboot **ret) _warn_unused_result_;
/* Waits as the policy says, then calls due() from the loop (never from
 * inside this call). why: for the log ("boot the new slot"). */
int reboot_schedule(struct reboot *rb, const char *why, reboot_due_fn due) _warn_unused_result_;
/* Runs reboot_command, once (-EALREADY after that). On success otad waits
 * to be stopped by it. */
int reboot_run(struct reboot *rb) _warn_unused_result_;
/* Stops waiting, and kills a reboot command that still runs (systemctl
 * reboot returns as soon as systemd has queued the job, long before the
 * stop reaches otad). NULL is fine. */
void reboot_free(struct reboot *rb);
