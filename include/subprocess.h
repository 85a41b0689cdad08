/* SPDX-License-Identifier: MIT */
/*
 * subprocess: starting helper programs (handlers, installer programs, the
 * custom bootloader script, the health check) without a shell of our own.
 * Owns splitting a configured command line on whitespace and what a new
 * process inherits: its standard fds, signal state, process group,
 * working directory and environment. Never interprets what the program
 * prints; subprocess_spawn never waits (child.h watches a program from
 * the event loop, subprocess_run waits for a short one).
 */
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Splits command on blanks (no quoting, no shell) into a NULL-terminated
 * vector; -EINVAL for an empty command. Free with subprocess_argv_free. */
int subprocess_split_command(const char *command, char ***ret_argv);
void subprocess_argv_free(char **argv);

/* Starts argv[0] (searched in $PATH unless it contains '/') with envp (NULL:
 * this process's environment); -errno when it cannot be executed (glibc's
 * posix_spawn reports the exec failure). fds[0..2] become the child's
 * stdin, stdout and stderr; -1 means /dev/null for stdin and this
 * process's for stdout/stderr. The child
 *   - leads a process group of its own (pgid == pid), so that kill(-pid)
 *     reaches whatever it starts;
 *   - holds no other fd of ours (libmosquitto's socket, for one, is not
 *     close-on-exec: a helper must not hold the MQTT session);
 *   - starts with an empty signal mask and default signal handlers,
 *     whatever sd-event blocked or mqtt.c ignored here (but for glibc's
 *     two internal signals, 32 and 33, which its posix_spawn leaves
 *     ignored; a program that uses them sets its own handlers);
 *   - runs in "/", as under systemd, whatever otad's working directory. */
int subprocess_spawn(char *const argv[], char *const envp[], const int fds[3], pid_t *ret_pid);
/* subprocess_spawn with stdin /dev/null. */
int subprocess_start(char *const argv[], char *const envp[], int stdout_fd, int stderr_fd, pid_t *ret_pid);

/* This process's environment without OTAD_* variables (nothing inherited
 * may pose as what otad sets), followed by extra ("NAME=value" strings,
 * NULL-terminated; NULL for none). Free with subprocess_argv_free. */
int subprocess_env_new(char *const extra[], char ***ret_envp);

/* Runs argv to completion, blocking, for short helpers only: collects up
 * to max_out bytes of its stdout (NUL-terminated) into *ret_out, leaves
 * stderr to ours, and kills its process group (SIGKILL) after
 * timeout_usec: -ETIMEDOUT. On return the child is reaped. *ret_status is
 * the exit status, or 128+N when killed by signal N. */
int subprocess_run(char *const argv[], uint64_t timeout_usec, size_t max_out, char **ret_out, int *ret_status);
