/* SPDX-License-Identifier: MIT */
/*
 * worker: runs one long blocking call (reading back and hashing a whole
 * image, syncing a slot) in a thread of its own and hands its result back
 * to the event loop, so that the loop keeps pinging the watchdog however
 * slow the storage is (a 2 GiB slot on an SD card takes minutes). Owns the
 * thread and the wake-up; never touches what the call works on.
 *
 * The call must not touch otad's state: it gets its argument and a
 * cancellation flag, nothing else, and the loop does not touch what it
 * handed over until done() runs.
 */
#pragma once

#include <stdbool.h>
#include <systemd/sd-event.h>

#include "macro.h"

struct worker;

/* Runs in the thread. Returns 0 or a negative errno; should poll
 * worker_cancelled() between slices and return -ECANCELED. */
typedef int (*worker_fn)(struct worker *w, void *arg);
/* Runs on the loop, once, with what fn returned; the worker is freed
 * right after it returns (do not free it in here). */
typedef void (*worker_done_fn)(int result, void *userdata);

int worker_start(sd_event *event, worker_fn fn, void *arg, worker_done_fn done, void *userdata,
                 struct worker **ret) _warn_unused_result_;
bool worker_cancelled(const struct worker *w);
/* Asks the call to stop, waits for the thread (one slice of its work) and
 * frees; done() is not called. NULL is fine. */
void worker_free(struct worker *w);
