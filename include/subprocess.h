/* SPDX-License-Identifier: MIT */
/*
 * subprocess: starting helper programs (the command installer's program, the
 * custom bootloader script) without a shell. Owns splitting a configured
 * command line on whitespace, the child's standard fds and signal state.
 * Never interprets what the program prints; subprocess_start never waits.
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
 * this process's environment). stdin is /dev/null; stdout_fd / stderr_fd
 * become the child's stdout/stderr, -1 keeps this process's. The child
 * starts with an empty signal mask and default signal handlers, whatever
 * sd-event blocked here. */
int subprocess_start(char *const argv[], char *const envp[], int stdout_fd, int stderr_fd, pid_t *ret_pid);

/* Runs argv to completion, for short helpers only: collects up to max_out
 * bytes of its stdout (NUL-terminated) into *ret_out, leaves stderr to ours,
 * and kills it (SIGKILL) after timeout_usec: -ETIMEDOUT. On return the
 * child is reaped. *ret_status is the exit status, or 128+N when killed by
 * signal N. */
int subprocess_run(char *const argv[], uint64_t timeout_usec, size_t max_out, char **ret_out, int *ret_status);

/* "exit status N" / "killed by signal N" for a waitpid() status. */
void subprocess_describe_status(int wait_status, char *buf, size_t size);
