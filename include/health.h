/* SPDX-License-Identifier: MIT */
/*
 * health: the health check of a newly booted slot: `systemctl
 * is-system-running --wait` when [update] wait_system_running says so
 * ("degraded" is a failed unit, not healthy enough to commit) and/or
 * [update] health_check run by /bin/sh -c, in a process group of its own
 * that is killed as a whole at [update] health_timeout, so a hung check
 * and whatever it forked never outlive the deadline. Owns the command line
 * and the deadline; never marks a slot.
 */
#pragma once

#include <stdbool.h>

#include "macro.h"
#include "otad.h"

struct health_check;

/* passed, or why not ("health check failed: exit status 3"). */
typedef void (*health_done_fn)(bool passed, const char *detail, void *userdata);

/* Starts the check; done() is called from the loop, never from inside
 * this call. 0 started; 1 nothing is configured to check (healthy, done()
 * is not called); <0 it could not start. */
int health_check_start(struct otad *otad, const char *job_id, health_done_fn done, void *userdata,
                       struct health_check **ret) _warn_unused_result_;
/* Kills the check (its whole process group) if it still runs. NULL is fine. */
void health_check_free(struct health_check *h);
