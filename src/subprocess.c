/* SPDX-License-Identifier: MIT */
#include "subprocess.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdbool.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "macro.h"

extern char **environ;

void subprocess_argv_free(char **argv) {
        if (!argv)
                return;
        for (char **a = argv; *a; a++)
                free(*a);
        free(argv);
}

int subprocess_split_command(const char *command, char ***ret_argv) {
        _cleanup_free_ char *copy = strdup(command ? command : "");
        char **argv = NULL;
        size_t n = 0;
        char *save = NULL;

        if (!copy)
                return -ENOMEM;
        for (char *w = strtok_r(copy, " \t\n", &save); w; w = strtok_r(NULL, " \t\n", &save)) {
                char **grown = realloc(argv, (n + 2) * sizeof(char *));

                if (!grown)
                        goto oom;
                argv = grown;
                argv[n] = strdup(w);
                argv[n + 1] = NULL;
                if (!argv[n])
                        goto oom;
                n++;
        }
        if (n == 0)
                return -EINVAL;
        *ret_argv = argv;
        return 0;
oom:
        subprocess_argv_free(argv);
        return -ENOMEM;
}

int subprocess_start(char *const argv[], char *const envp[], int stdout_fd, int stderr_fd, pid_t *ret_pid) {
        posix_spawn_file_actions_t fa;
        posix_spawnattr_t attr;
        sigset_t none, all;
        pid_t pid;
        int r;

        r = posix_spawn_file_actions_init(&fa);
        if (r != 0)
                return -r;
        r = posix_spawnattr_init(&attr);
        if (r != 0) {
                posix_spawn_file_actions_destroy(&fa);
                return -r;
        }
        sigemptyset(&none);
        sigfillset(&all);
        r = posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
        if (r == 0 && stdout_fd >= 0)
                r = posix_spawn_file_actions_adddup2(&fa, stdout_fd, STDOUT_FILENO);
        if (r == 0 && stderr_fd >= 0)
                r = posix_spawn_file_actions_adddup2(&fa, stderr_fd, STDERR_FILENO);
        if (r == 0)
                r = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
        if (r == 0)
                r = posix_spawnattr_setsigmask(&attr, &none);
        if (r == 0)
                r = posix_spawnattr_setsigdefault(&attr, &all);
        if (r == 0)
                r = posix_spawnp(&pid, argv[0], &fa, &attr, argv, envp ? envp : environ);
        posix_spawnattr_destroy(&attr);
        posix_spawn_file_actions_destroy(&fa);
        if (r != 0)
                return -r;
        *ret_pid = pid;
        return 0;
}

static uint64_t now_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

void subprocess_describe_status(int wait_status, char *buf, size_t size) {
        if (WIFEXITED(wait_status))
                snprintf(buf, size, "exit status %d", WEXITSTATUS(wait_status));
        else if (WIFSIGNALED(wait_status))
                snprintf(buf, size, "killed by signal %d", WTERMSIG(wait_status));
        else
                snprintf(buf, size, "wait status 0x%x", (unsigned) wait_status);
}

int subprocess_run(char *const argv[], uint64_t timeout_usec, size_t max_out, char **ret_out, int *ret_status) {
        _cleanup_close_ int rd = -1;
        _cleanup_free_ char *out = NULL;
        int fds[2];
        size_t len = 0;
        uint64_t deadline = now_usec() + timeout_usec;
        bool timed_out = false;
        pid_t pid;
        int status = 0, r;

        out = calloc(1, max_out + 1);
        if (!out)
                return -ENOMEM;
        if (pipe2(fds, O_CLOEXEC) < 0)
                return -errno;
        rd = fds[0];
        r = subprocess_start(argv, NULL, fds[1], -1, &pid);
        close(fds[1]);
        if (r < 0)
                return r;

        /* read stdout until EOF (everything past max_out is drained and dropped) */
        for (;;) {
                struct pollfd p = { .fd = rd, .events = POLLIN };
                uint64_t now = now_usec();
                char buf[512];
                ssize_t n;

                if (now >= deadline) {
                        timed_out = true;
                        break;
                }
                r = poll(&p, 1, (int) ((deadline - now + 999) / 1000));
                if (r < 0 && errno == EINTR)
                        continue;
                if (r <= 0)
                        continue;
                n = read(rd, buf, sizeof(buf));
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                if (len < max_out) {
                        size_t take = (size_t) n < max_out - len ? (size_t) n : max_out - len;

                        memcpy(out + len, buf, take);
                        len += take;
                }
        }
        /* then wait for the exit, within the same deadline */
        while (!timed_out) {
                pid_t w = waitpid(pid, &status, WNOHANG);

                if (w == pid)
                        break;
                if (w < 0 && errno != EINTR)
                        return -errno;
                if (now_usec() >= deadline) {
                        timed_out = true;
                        break;
                }
                (void) usleep(10000);
        }
        if (timed_out) {
                (void) kill(pid, SIGKILL);
                while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                        ;
                return -ETIMEDOUT;
        }
        out[len] = '\0';
        *ret_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
        if (ret_out)
                *ret_out = take_ptr(&out);
        return 0;
}
