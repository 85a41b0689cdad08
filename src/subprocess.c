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
#include <unistd.h>

#include "clock.h"
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

int subprocess_spawn(char *const argv[], char *const envp[], const int fds[3], pid_t *ret_pid) {
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
        if (fds[0] >= 0)
                r = posix_spawn_file_actions_adddup2(&fa, fds[0], STDIN_FILENO);
        else
                r = posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
        for (int i = 1; r == 0 && i < 3; i++)
                if (fds[i] >= 0)
                        r = posix_spawn_file_actions_adddup2(&fa, fds[i], i);
        /* close_range() where the kernel has it, /proc/self/fd otherwise */
        if (r == 0)
                r = posix_spawn_file_actions_addclosefrom_np(&fa, 3);
        if (r == 0)
                r = posix_spawn_file_actions_addchdir_np(&fa, "/");
        if (r == 0)
                r = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF |
                                                            POSIX_SPAWN_SETPGROUP);
        if (r == 0)
                r = posix_spawnattr_setpgroup(&attr, 0);
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

int subprocess_start(char *const argv[], char *const envp[], int stdout_fd, int stderr_fd, pid_t *ret_pid) {
        return subprocess_spawn(argv, envp, (const int[3]){ -1, stdout_fd, stderr_fd }, ret_pid);
}

int subprocess_env_new(char *const extra[], char ***ret_envp) {
        size_t n = 0, i = 0;
        char **v;

        for (char **e = environ; e && *e; e++)
                n++;
        for (char *const *e = extra; e && *e; e++)
                n++;
        v = calloc(n + 1, sizeof(char *));
        if (!v)
                return -ENOMEM;
        for (char **e = environ; e && *e; e++) {
                if (strncmp(*e, "OTAD_", 5) == 0)
                        continue;
                v[i] = strdup(*e);
                if (!v[i++])
                        goto oom;
        }
        for (char *const *e = extra; e && *e; e++) {
                v[i] = strdup(*e);
                if (!v[i++])
                        goto oom;
        }
        *ret_envp = v;
        return 0;
oom:
        subprocess_argv_free(v);
        return -ENOMEM;
}

int subprocess_run(char *const argv[], uint64_t timeout_usec, size_t max_out, char **ret_out, int *ret_status) {
        _cleanup_close_ int rd = -1;
        _cleanup_free_ char *out = NULL;
        int fds[2];
        size_t len = 0;
        uint64_t deadline = clock_now_usec() + timeout_usec;
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
                uint64_t now = clock_now_usec();
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
                if (clock_now_usec() >= deadline) {
                        timed_out = true;
                        break;
                }
                (void) usleep(10000);
        }
        if (timed_out) {
                /* the leader is not reaped yet: its group id is still ours */
                (void) kill(-pid, SIGKILL);
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
