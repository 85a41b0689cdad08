/* SPDX-License-Identifier: MIT */
#include "child.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/param.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "macro.h"
#include "subprocess.h"

/* One journal line per at most this much output: a program that prints
 * megabytes without a newline must not make one giant entry. */
#define LINE_MAX_BYTES 1024
/* Read at most this much per wakeup, so that a program that writes as fast
 * as it can does not keep the loop (and the watchdog) from everything else. */
#define READ_BUDGET (64 * 1024)
/* After the program exited, its group is dead: what is in a pipe is all
 * there will be, at most a pipe's capacity (1 MiB by default). */
#define EXIT_READ_BUDGET (1024 * 1024)
#define REAP_WAIT_USEC (100 * USEC_PER_MSEC)

struct child_pipe {
        sd_event_source *source; /* owns the fd; NULL when not used or closed */
        bool is_stderr;
        char line[LINE_MAX_BYTES];
        size_t len;
};

struct child {
        sd_event *event;
        pid_t pid; /* also its process group id */
        char *name;
        char *job_id;
        char *stage;
        bool log_output;

        sd_event_source *exit_source;
        sd_event_source *deadline;
        sd_event_source *kill_timer;
        uint64_t timeout_usec;
        uint64_t grace_usec;
        bool stopping;  /* SIGTERM sent */
        bool timed_out;
        bool exited;

        sd_event_source *input_source; /* owns stdin's write end */
        char *input;
        size_t input_size, input_off;

        struct child_pipe out, err;
        char *kept; /* keep_max + 1 bytes */
        size_t kept_len, keep_max;

        child_exit_fn on_exit;
        void *userdata;
};

/* Length of the valid UTF-8 sequence at p (at most left bytes), 0 when the
 * byte there does not start one (RFC 3629: no overlong forms, no
 * surrogates, nothing above U+10FFFF). */
static size_t utf8_sequence(const unsigned char *p, size_t left) {
        unsigned char lo = 0x80, hi = 0xbf;
        size_t n;

        if (p[0] < 0x80)
                return 1;
        if (p[0] >= 0xc2 && p[0] <= 0xdf)
                n = 2;
        else if (p[0] >= 0xe0 && p[0] <= 0xef) {
                n = 3;
                if (p[0] == 0xe0)
                        lo = 0xa0;
                else if (p[0] == 0xed)
                        hi = 0x9f;
        } else if (p[0] >= 0xf0 && p[0] <= 0xf4) {
                n = 4;
                if (p[0] == 0xf0)
                        lo = 0x90;
                else if (p[0] == 0xf4)
                        hi = 0x8f;
        } else
                return 0;
        if (left < n || p[1] < lo || p[1] > hi)
                return 0;
        for (size_t i = 2; i < n; i++)
                if ((p[i] & 0xc0) != 0x80)
                        return 0;
        return n;
}

/* One line of output made printable: UTF-8 and tabs stay, other control
 * characters (C0, DEL, C1) and invalid bytes become \xNN, so that neither
 * the journal nor a terminal reading stderr sees escape sequences. out has
 * room for 4 * len + 1 bytes. */
static void escape_line(const char *in, size_t len, char *out) {
        const unsigned char *p = (const unsigned char *) in;
        size_t o = 0;

        for (size_t i = 0; i < len;) {
                size_t n = utf8_sequence(p + i, len - i);
                bool control = n == 1 ? (p[i] < 0x20 && p[i] != '\t') || p[i] == 0x7f
                                      : n == 2 && p[i] == 0xc2 && p[i + 1] < 0xa0;

                if (n == 0 || control) {
                        /* a C1 control escapes both of its bytes */
                        size_t bytes = n == 0 ? 1 : n;

                        for (size_t k = 0; k < bytes; k++)
                                o += (size_t) sprintf(out + o, "\\x%02x", p[i + k]);
                        i += bytes;
                        continue;
                }
                memcpy(out + o, p + i, n);
                o += n;
                i += n;
        }
        out[o] = '\0';
}

static void pipe_log_line(struct child *c, struct child_pipe *p, size_t len) {
        char clean[4 * LINE_MAX_BYTES + 1];

        if (len > 0 && p->line[len - 1] == '\r') /* CRLF */
                len--;
        if (len == 0)
                return;
        escape_line(p->line, len, clean);
        log_job(p->is_stderr ? LOG_WARNING : LOG_INFO, c->job_id, c->stage, "%s[%d]%s: %s", c->name, (int) c->pid,
                p->is_stderr ? " (stderr)" : "", clean);
}

/* A full line buffer without newline is logged up to the last complete
 * UTF-8 sequence; an incomplete one starts the next line. */
static size_t split_point(const struct child_pipe *p) {
        const unsigned char *l = (const unsigned char *) p->line;
        size_t start = p->len;

        while (start > 0 && p->len - start < 3 && (l[start - 1] & 0xc0) == 0x80)
                start--;
        if (start > 0 && l[start - 1] >= 0xc2 && l[start - 1] <= 0xf4) {
                size_t want = l[start - 1] >= 0xf0 ? 4 : l[start - 1] >= 0xe0 ? 3 : 2;

                if (p->len - (start - 1) < want)
                        return start - 1;
        }
        return p->len;
}

static void pipe_consume(struct child *c, struct child_pipe *p, const char *data, size_t n) {
        if (!p->is_stderr && c->kept_len < c->keep_max) {
                size_t take = MIN(n, c->keep_max - c->kept_len);

                memcpy(c->kept + c->kept_len, data, take);
                c->kept_len += take;
                c->kept[c->kept_len] = '\0';
        }
        if (!c->log_output)
                return;
        for (size_t i = 0; i < n; i++) {
                if (data[i] == '\n') {
                        pipe_log_line(c, p, p->len);
                        p->len = 0;
                        continue;
                }
                if (p->len == sizeof(p->line)) {
                        size_t cut = split_point(p);

                        pipe_log_line(c, p, cut);
                        memmove(p->line, p->line + cut, p->len - cut);
                        p->len -= cut;
                }
                p->line[p->len++] = data[i];
        }
}

static void pipe_close(struct child *c, struct child_pipe *p) {
        if (!p->source)
                return;
        if (c->log_output)
                pipe_log_line(c, p, p->len); /* the last line, without newline */
        p->len = 0;
        p->source = sd_event_source_disable_unref(p->source);
}

/* Reads what is there, up to budget bytes; closes at EOF or error. */
static void pipe_read(struct child *c, struct child_pipe *p, size_t budget) {
        char buf[4096];

        while (p->source && budget > 0) {
                ssize_t n = read(sd_event_source_get_io_fd(p->source), buf, MIN(sizeof(buf), budget));

                if (n > 0) {
                        pipe_consume(c, p, buf, (size_t) n);
                        budget -= (size_t) n;
                } else if (n < 0 && errno == EINTR)
                        continue;
                else if (n < 0 && errno == EAGAIN)
                        return;
                else
                        pipe_close(c, p);
        }
}

static int on_output(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct child *c = userdata;

        pipe_read(c, s == c->out.source ? &c->out : &c->err, READ_BUDGET);
        return 0;
}

static int on_input(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct child *c = userdata;

        while (c->input_off < c->input_size) {
                ssize_t n = write(fd, c->input + c->input_off, c->input_size - c->input_off);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && errno == EAGAIN)
                        return 0;
                if (n < 0) /* EPIPE: it does not read its stdin; its business */
                        break;
                c->input_off += (size_t) n;
        }
        /* closing gives it EOF */
        c->input_source = sd_event_source_disable_unref(c->input_source);
        return 0;
}

static void format_duration(uint64_t usec, char *buf, size_t size) {
        if (usec % USEC_PER_SEC == 0)
                snprintf(buf, size, "%llu s", (unsigned long long) (usec / USEC_PER_SEC));
        else
                snprintf(buf, size, "%llu ms", (unsigned long long) (usec / USEC_PER_MSEC));
}

void child_describe_exit(int wait_status, bool timed_out, uint64_t timeout_usec, char *buf, size_t size) {
        char duration[32];

        if (timed_out) {
                format_duration(timeout_usec, duration, sizeof(duration));
                snprintf(buf, size, "timed out after %s", duration);
        } else if (WIFEXITED(wait_status))
                snprintf(buf, size, "exit status %d", WEXITSTATUS(wait_status));
        else if (WIFSIGNALED(wait_status))
                snprintf(buf, size, "killed by signal %d (%s)", WTERMSIG(wait_status),
                         sigabbrev_np(WTERMSIG(wait_status)) ? sigabbrev_np(WTERMSIG(wait_status)) : "?");
        else
                snprintf(buf, size, "wait status 0x%x", (unsigned) wait_status);
}

static int on_kill_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct child *c = userdata;
        char grace[32];

        format_duration(c->grace_usec, grace, sizeof(grace));
        log_job(LOG_WARNING, c->job_id, c->stage, "%s[%d] still runs %s after SIGTERM, sending SIGKILL to its process group",
                c->name, (int) c->pid, grace);
        /* not reaped yet (the exit callback stops this timer): the group id is still ours */
        (void) kill(-c->pid, SIGKILL);
        return 0;
}

static void stop_group(struct child *c) {
        c->stopping = true;
        (void) kill(-c->pid, SIGTERM);
        /* a stopped process handles SIGTERM only once continued (as systemd does) */
        (void) kill(-c->pid, SIGCONT);
        if (sd_event_add_time(c->event, &c->kill_timer, CLOCK_MONOTONIC, clock_now_usec() + c->grace_usec, 0,
                              on_kill_timer, c) < 0) {
                log_job(LOG_WARNING, c->job_id, c->stage, "%s[%d]: cannot arm the SIGKILL timer, sending SIGKILL now",
                        c->name, (int) c->pid);
                (void) kill(-c->pid, SIGKILL);
        }
}

static int on_deadline(sd_event_source *s, uint64_t usec, void *userdata) {
        struct child *c = userdata;
        char timeout[32];

        c->deadline = sd_event_source_disable_unref(c->deadline);
        if (c->stopping)
                return 0;
        c->timed_out = true;
        format_duration(c->timeout_usec, timeout, sizeof(timeout));
        log_job(LOG_WARNING, c->job_id, c->stage, "%s[%d] timed out after %s, sending SIGTERM to its process group",
                c->name, (int) c->pid, timeout);
        stop_group(c);
        return 0;
}

void child_terminate(struct child *c) {
        if (!c || c->exited || c->stopping)
                return;
        stop_group(c);
}

static int wait_status_of(const siginfo_t *si) {
        switch (si->si_code) {
        case CLD_EXITED:
                return (si->si_status & 0xff) << 8;
        case CLD_DUMPED:
                return (si->si_status & 0x7f) | 0x80;
        default: /* CLD_KILLED: only exits are watched */
                return si->si_status & 0x7f;
        }
}

static int on_exit_event(sd_event_source *s, const siginfo_t *si, void *userdata) {
        struct child *c = userdata;

        if (!c) /* handed to the loop by child_free(): sd-event reaps it after this */
                return 0;
        c->exited = true;
        /* sd-event reaps the program only after this callback, so its
         * process group id cannot have been reused: kill what it left
         * running before it can hold our pipes or outlive its job. */
        (void) kill(-c->pid, SIGKILL);
        c->exit_source = sd_event_source_disable_unref(c->exit_source);
        c->deadline = sd_event_source_disable_unref(c->deadline);
        c->kill_timer = sd_event_source_disable_unref(c->kill_timer);
        c->input_source = sd_event_source_disable_unref(c->input_source);
        pipe_read(c, &c->out, EXIT_READ_BUDGET);
        pipe_read(c, &c->err, EXIT_READ_BUDGET);
        pipe_close(c, &c->out);
        pipe_close(c, &c->err);
        /* last: it may free c */
        c->on_exit(c, wait_status_of(si), c->timed_out, c->userdata);
        return 0;
}

/* A pipe whose read (out) or write (!out) end is ours, non-blocking; the
 * program's end blocks, as programs expect of their stdio. */
static int make_pipe(int fds[2], bool ours_reads) {
        if (pipe2(fds, O_CLOEXEC) < 0)
                return -errno;
        if (fcntl(fds[ours_reads ? 0 : 1], F_SETFL, O_NONBLOCK) < 0)
                return -errno;
        return 0;
}

static int watch_pipe(struct child *c, struct child_pipe *p, int *fd, bool is_stderr) {
        int r;

        p->is_stderr = is_stderr;
        r = sd_event_add_io(c->event, &p->source, *fd, EPOLLIN, on_output, c);
        if (r < 0)
                return r;
        (void) sd_event_source_set_io_fd_own(p->source, true);
        *fd = -1;
        return 0;
}

/* sd-event sees children only with SIGCHLD blocked (daemon.c blocks it at
 * start; this is for other callers, such as the unit tests). */
static int block_sigchld(void) {
        sigset_t set;

        sigemptyset(&set);
        sigaddset(&set, SIGCHLD);
        return sigprocmask(SIG_BLOCK, &set, NULL) < 0 ? -errno : 0;
}

static char *basename_dup(const char *path) {
        const char *slash = strrchr(path, '/');

        return strdup(slash ? slash + 1 : path);
}

int child_start(sd_event *event, char *const argv[], const struct child_options *opts, child_exit_fn on_exit,
                void *userdata, struct child **ret) {
        static const struct child_options none = { 0 };
        int in[2] = { -1, -1 }, out[2] = { -1, -1 }, err[2] = { -1, -1 };
        struct child *c;
        int r;

        if (!event || !argv || !argv[0] || !on_exit || !ret)
                return -EINVAL;
        if (!opts)
                opts = &none;
        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->event = event;
        c->on_exit = on_exit;
        c->userdata = userdata;
        c->log_output = opts->log_output;
        c->timeout_usec = opts->timeout_usec;
        c->grace_usec = opts->kill_grace_usec > 0 ? opts->kill_grace_usec : CHILD_KILL_GRACE_USEC;
        c->keep_max = opts->keep_output;
        c->name = opts->name ? strdup(opts->name) : basename_dup(argv[0]);
        c->job_id = opts->job_id ? strdup(opts->job_id) : NULL;
        c->stage = opts->stage ? strdup(opts->stage) : NULL;
        c->kept = calloc(1, c->keep_max + 1);
        if (!c->name || (opts->job_id && !c->job_id) || (opts->stage && !c->stage) || !c->kept) {
                r = -ENOMEM;
                goto fail;
        }
        if (opts->input) {
                c->input = malloc(opts->input_size > 0 ? opts->input_size : 1);
                if (!c->input) {
                        r = -ENOMEM;
                        goto fail;
                }
                memcpy(c->input, opts->input, opts->input_size);
                c->input_size = opts->input_size;
                r = make_pipe(in, false);
                if (r < 0)
                        goto fail;
        }
        if (opts->log_output || opts->keep_output > 0) {
                r = make_pipe(out, true);
                if (r < 0)
                        goto fail;
        }
        if (opts->log_output) {
                r = make_pipe(err, true);
                if (r < 0)
                        goto fail;
        }
        r = block_sigchld();
        if (r < 0)
                goto fail;

        r = subprocess_spawn(argv, opts->envp, (const int[3]){ in[0], out[1], err[1] }, &c->pid);
        if (r < 0)
                goto fail;
        closep(&in[0]);
        closep(&out[1]);
        closep(&err[1]);
        in[0] = out[1] = err[1] = -1;

        r = sd_event_add_child(event, &c->exit_source, c->pid, WEXITED, on_exit_event, c);
        if (r < 0) {
                /* not watched, so not left running: it just started, SIGKILL ends it at once */
                (void) kill(-c->pid, SIGKILL);
                (void) waitpid(c->pid, NULL, 0);
                c->pid = 0;
                goto fail;
        }
        if (in[1] >= 0) {
                r = sd_event_add_io(event, &c->input_source, in[1], EPOLLOUT, on_input, c);
                if (r < 0)
                        goto fail;
                (void) sd_event_source_set_io_fd_own(c->input_source, true);
                in[1] = -1;
        }
        if (out[0] >= 0 && (r = watch_pipe(c, &c->out, &out[0], false)) < 0)
                goto fail;
        if (err[0] >= 0 && (r = watch_pipe(c, &c->err, &err[0], true)) < 0)
                goto fail;
        if (c->timeout_usec > 0) {
                /* from now, not from sd_event_now(): that is when this loop
                 * iteration began, maybe long before the program did */
                r = sd_event_add_time(event, &c->deadline, CLOCK_MONOTONIC, clock_now_usec() + c->timeout_usec, 0,
                                      on_deadline, c);
                if (r < 0)
                        goto fail;
        }
        *ret = c;
        return 0;
fail:
        for (int i = 0; i < 2; i++) {
                closep(&in[i]);
                closep(&out[i]);
                closep(&err[i]);
        }
        child_free(c);
        return r;
}

/* Reaps the program, which has just got SIGKILL; if it does not go within
 * REAP_WAIT_USEC, the loop reaps it when it goes. */
static void reap(struct child *c) {
        uint64_t until = clock_now_usec() + REAP_WAIT_USEC;

        for (;;) {
                siginfo_t si = { 0 };

                if (waitid(P_PID, c->pid, &si, WEXITED | WNOHANG) < 0) {
                        if (errno == EINTR)
                                continue;
                        return; /* ECHILD: reaped already */
                }
                if (si.si_pid == c->pid)
                        return;
                if (clock_now_usec() >= until)
                        break;
                (void) nanosleep(&(struct timespec){ .tv_nsec = 1000 * 1000 }, NULL);
        }
        log_job(LOG_WARNING, c->job_id, c->stage, "%s[%d] got SIGKILL but has not exited yet, leaving it to the event loop",
                c->name, (int) c->pid);
        if (c->exit_source && sd_event_source_set_floating(c->exit_source, true) >= 0) {
                (void) sd_event_source_set_userdata(c->exit_source, NULL);
                c->exit_source = sd_event_source_unref(c->exit_source);
        }
}

void child_free(struct child *c) {
        if (!c)
                return;
        if (c->pid > 0 && !c->exited) {
                /* not reaped: its process group id is still ours */
                (void) kill(-c->pid, SIGKILL);
                reap(c);
        }
        c->exit_source = sd_event_source_disable_unref(c->exit_source);
        c->deadline = sd_event_source_disable_unref(c->deadline);
        c->kill_timer = sd_event_source_disable_unref(c->kill_timer);
        c->input_source = sd_event_source_disable_unref(c->input_source);
        c->out.source = sd_event_source_disable_unref(c->out.source);
        c->err.source = sd_event_source_disable_unref(c->err.source);
        free(c->input);
        free(c->kept);
        free(c->name);
        free(c->job_id);
        free(c->stage);
        free(c);
}

pid_t child_pid(const struct child *c) {
        return c->pid;
}

const char *child_output(const struct child *c, size_t *ret_size) {
        if (ret_size)
                *ret_size = c->kept_len;
        return c->kept;
}
