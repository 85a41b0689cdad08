/* SPDX-License-Identifier: MIT */
/*
 * child: one helper program run from the event loop (a job handler, the
 * command installer's program, the health check, the reboot command).
 * Owns the program's process group from start to reaping: its stdin, its
 * output pipes (read without blocking, logged line by line and/or kept),
 * an optional deadline, and the one exit callback. Never blocks the loop
 * and never decides what an exit status means for a job.
 *
 * The group lives as long as the program: when the program exits, whatever
 * it left running in its process group is killed (SIGKILL) before the exit
 * callback, as systemd kills what a service's main process leaves behind.
 * (A program that means to leave work running hands it to systemd-run.)
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <systemd/sd-event.h>

#include "clock.h"

/* Between SIGTERM and SIGKILL, when the caller does not say. */
#define CHILD_KILL_GRACE_USEC (5 * USEC_PER_SEC)

struct child;

struct child_options {
        /* Log lines read "NAME[PID]: line" and "NAME[PID] (stderr): line";
         * NULL: the basename of argv[0]. */
        const char *name;
        const char *job_id;       /* OTAD_JOB_ID= of those lines, may be NULL */
        const char *stage;        /* OTAD_STAGE= of those lines, may be NULL */
        char *const *envp;        /* NULL: otad's environment; see subprocess_env_new() */
        /* Written to its stdin (copied at start), then EOF; NULL: stdin is
         * /dev/null. A pipe: the daemon must ignore SIGPIPE (mqtt.c does),
         * so that a program that does not read does not kill otad. */
        const void *input;
        size_t input_size;
        uint64_t timeout_usec;    /* 0: no deadline */
        uint64_t kill_grace_usec; /* SIGTERM -> SIGKILL; 0: CHILD_KILL_GRACE_USEC */
        /* stdout lines at info, stderr lines at warning level. Lines longer
         * than 1024 bytes are split; control characters and bytes that are
         * not UTF-8 are written as \xNN. When false (and for stdout when
         * keep_output is 0 too), the program writes to otad's own
         * stdout/stderr. */
        bool log_output;
        /* Keep the first this many bytes of stdout for child_output(); 0: none. */
        size_t keep_output;
};

/* Called once, from the event loop (never from child_start), when the
 * program has exited: wait_status as waitpid() gives it; timed_out when the
 * deadline passed first (the status then shows the signal that ended it).
 * The output it wrote before it exited has been read by then; what is left
 * of its process group is killed. c may be freed in the callback. */
typedef void (*child_exit_fn)(struct child *c, int wait_status, bool timed_out, void *userdata);

/* Starts argv (subprocess_spawn(): own process group, no fd of ours, empty
 * signal mask, default signal handlers, working directory "/") and watches
 * it from event. -errno when it cannot be started (-ENOENT for a missing
 * program, -EACCES for one that is not executable), on_exit is then never
 * called. opts may be NULL: no deadline, nothing logged or kept. */
int child_start(sd_event *event, char *const argv[], const struct child_options *opts, child_exit_fn on_exit,
                void *userdata, struct child **ret);
/* If it still runs: SIGKILL to its whole process group, then reaps it
 * (waits up to 100 ms: a process that got SIGKILL exits at once unless it
 * sleeps uninterruptibly in the kernel; then the event loop reaps it when
 * it goes). on_exit is not called. NULL is fine. */
void child_free(struct child *c);

/* Stops it as the deadline would (SIGTERM to its group, SIGKILL after the
 * grace), without timed_out: a cancelled job. on_exit follows as usual.
 * Nothing after it has exited or while it is being stopped already. */
void child_terminate(struct child *c);

/* Its process id, which is also its process group id. */
pid_t child_pid(const struct child *c);
/* The kept head of its stdout, NUL-terminated ("" when nothing was kept);
 * *ret_size (may be NULL) is its length, which counts NUL bytes the
 * program wrote. Complete once on_exit is called. */
const char *child_output(const struct child *c, size_t *ret_size);

/* "exit status 3", "killed by signal 9 (KILL)", or with timed_out "timed
 * out after 30 s" (timeout_usec in whole seconds, else milliseconds). */
void child_describe_exit(int wait_status, bool timed_out, uint64_t timeout_usec, char *buf, size_t size);
