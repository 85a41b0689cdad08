/* SPDX-License-Identifier: MIT */
/*
 * Custom job handlers: {"operation":"NAME"} runs <handler_dir>/NAME.
 * fork+exec without a shell, its own process group, the job document on
 * stdin, OTAD_JOB_ID/OTAD_THING_NAME in the environment, stdout/stderr to
 * the journal line by line, a timeout (SIGTERM, SIGKILL after a grace).
 */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "config.h"
#include "custom_jobs.h"
#include "jobs.h"
#include "log.h"
#include "macro.h"
#include "mqtt.h"

#define HANDLER_NAME "custom"
#define KILL_GRACE_USEC (5 * 1000000ULL)
#define DETAIL_CHARS 1024  /* AWS: statusDetails values ≤ 1024 characters (§1.5) */
#define OUTPUT_KEEP 8192   /* bytes of stdout kept for statusDetails */
#define LINE_MAX_BYTES 1024

struct stream {
        sd_event_source *source;
        char line[LINE_MAX_BYTES + 1];
        size_t line_len;
};

struct run {
        struct custom_jobs *owner;
        char *job_id;
        char *operation;
        char *document; /* stdin */
        size_t document_len, document_off;
        pid_t pid;
        sd_event_source *child;
        sd_event_source *input;
        struct stream out, err;
        sd_event_source *timeout;
        sd_event_source *kill_timer;
        char output[OUTPUT_KEEP];
        size_t output_len;
        bool timed_out;
        bool cancelled; /* report nothing, just make sure it is gone */
        struct run *next;
};

struct custom_jobs {
        struct otad *otad;
        struct run *runs;
};

bool custom_jobs_operation_is_valid(const char *name) {
        size_t n = strlen(name);

        return n >= 1 && n <= 255 && name[0] != '.' &&
               strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") == n;
}

size_t custom_jobs_sanitize_output(const char *in, size_t len, char *buf, size_t size, size_t max_chars) {
        const unsigned char *p = (const unsigned char *) in, *end = p + len;
        size_t o = 0, chars = 0, cut = 0;
        bool blank = true; /* drops leading blanks */

        if (size < 4 * max_chars + 1 || max_chars < 4)
                return 0;
        while (p < end) {
                unsigned c = *p, n = 1, cp = c;
                char tmp[4];
                size_t tl = 1;

                if (c >= 0x80) {
                        n = (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 0;
                        cp = n == 2 ? c & 0x1f : n == 3 ? c & 0x0f : c & 0x07;
                        for (unsigned i = 1; n && i < n; i++) {
                                if (p + i >= end || (p[i] & 0xc0) != 0x80)
                                        n = 0;
                                else
                                        cp = cp << 6 | (p[i] & 0x3f);
                        }
                }
                if (n == 0) { /* invalid UTF-8 */
                        tmp[0] = '?';
                        p++;
                } else if (cp < 0x20 || cp == 0x7f || (cp >= 0x80 && cp < 0xa0) || cp == ' ') {
                        p += n;
                        if (blank)
                                continue;
                        tmp[0] = ' ';
                } else {
                        memcpy(tmp, p, n);
                        tl = n;
                        p += n;
                }
                blank = tmp[0] == ' ';
                if (blank && chars == max_chars)
                        continue; /* may be trailing blanks, trimmed below */
                if (chars == max_chars - 3)
                        cut = o;
                if (chars == max_chars) {
                        /* Too long: end with "..." within the limit. */
                        memcpy(buf + cut, "...", 4);
                        return cut + 3;
                }
                memcpy(buf + o, tmp, tl);
                o += tl;
                chars++;
        }
        while (o > 0 && buf[o - 1] == ' ')
                o--;
        buf[o] = '\0';
        return o;
}

static void run_free(struct run *r) {
        if (!r)
                return;
        sd_event_source_disable_unref(r->input);
        sd_event_source_disable_unref(r->out.source);
        sd_event_source_disable_unref(r->err.source);
        sd_event_source_disable_unref(r->timeout);
        sd_event_source_disable_unref(r->kill_timer);
        /* child_process_own: unref kills (SIGKILL) and reaps a live child. */
        sd_event_source_disable_unref(r->child);
        free(r->job_id);
        free(r->operation);
        free(r->document);
        free(r);
}

static void run_remove(struct run *r) {
        struct run **p = &r->owner->runs;

        while (*p && *p != r)
                p = &(*p)->next;
        if (*p)
                *p = r->next;
        run_free(r);
}

static void run_kill(struct run *r, int sig) {
        if (r->pid > 0 && r->child)
                /* The whole process group: handlers may start children. */
                (void) kill(-r->pid, sig);
}

static void stream_flush_line(struct run *r, struct stream *s, bool is_err) {
        char clean[4 * 256 + 1];

        if (s->line_len == 0)
                return;
        if (custom_jobs_sanitize_output(s->line, s->line_len, clean, sizeof(clean), 256) > 0)
                log_job(is_err ? LOG_WARNING : LOG_INFO, r->job_id, HANDLER_NAME, "%s[%d]%s: %s", r->operation,
                        (int) r->pid, is_err ? " (stderr)" : "", clean);
        s->line_len = 0;
}

static void stream_consume(struct run *r, struct stream *s, bool is_err, const char *data, size_t n) {
        if (!is_err) {
                size_t room = sizeof(r->output) - r->output_len;

                memcpy(r->output + r->output_len, data, n < room ? n : room);
                r->output_len += n < room ? n : room;
        }
        for (size_t i = 0; i < n; i++) {
                if (data[i] == '\n' || s->line_len == LINE_MAX_BYTES) {
                        stream_flush_line(r, s, is_err);
                        if (data[i] == '\n')
                                continue;
                }
                s->line[s->line_len++] = data[i];
        }
}

/* Reads what is there; returns true at EOF or error (source closed). */
static bool stream_drain(struct run *r, struct stream *s, bool is_err) {
        char buf[4096];

        if (!s->source)
                return true;
        for (;;) {
                ssize_t n = read(sd_event_source_get_io_fd(s->source), buf, sizeof(buf));

                if (n > 0) {
                        stream_consume(r, s, is_err, buf, (size_t) n);
                        continue;
                }
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && errno == EAGAIN)
                        return false;
                stream_flush_line(r, s, is_err);
                s->source = sd_event_source_disable_unref(s->source);
                return true;
        }
}

static int on_stdout(sd_event_source *es, int fd, uint32_t revents, void *userdata) {
        struct run *r = userdata;

        stream_drain(r, &r->out, false);
        return 0;
}

static int on_stderr(sd_event_source *es, int fd, uint32_t revents, void *userdata) {
        struct run *r = userdata;

        stream_drain(r, &r->err, true);
        return 0;
}

static int on_stdin(sd_event_source *es, int fd, uint32_t revents, void *userdata) {
        struct run *r = userdata;

        while (r->document_off < r->document_len) {
                ssize_t n = write(fd, r->document + r->document_off, r->document_len - r->document_off);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && errno == EAGAIN)
                        return 0;
                if (n < 0) /* EPIPE: the handler does not read stdin; fine. */
                        break;
                r->document_off += (size_t) n;
        }
        /* Closing gives the handler EOF. */
        r->input = sd_event_source_disable_unref(r->input);
        return 0;
}

static void run_report(struct run *r, const siginfo_t *si) {
        struct custom_jobs *cj = r->owner;
        char reason[128], out[4 * DETAIL_CHARS + 1];
        struct status_detail d[3] = { { NULL, NULL }, { NULL, NULL }, { NULL, NULL } };
        enum job_status status = JOB_FAILED;
        int ret;

        if (r->timed_out)
                snprintf(reason, sizeof(reason), "timed out after %lld s",
                         (long long) cj->otad->config->jobs.handler_timeout);
        else if (si->si_code == CLD_EXITED) {
                snprintf(reason, sizeof(reason), "exit status %d", si->si_status);
                if (si->si_status == 0)
                        status = JOB_SUCCEEDED;
        } else
                snprintf(reason, sizeof(reason), "killed by signal %d (%s)", si->si_status,
                         sigabbrev_np(si->si_status) ? sigabbrev_np(si->si_status) : "?");
        d[0] = (struct status_detail){ "reason", reason };
        if (custom_jobs_sanitize_output(r->output, r->output_len, out, sizeof(out), DETAIL_CHARS) > 0)
                d[1] = (struct status_detail){ "stdout", out };

        log_job(status == JOB_SUCCEEDED ? LOG_INFO : LOG_WARNING, r->job_id, HANDLER_NAME,
                "Job %s: handler %s finished: %s", r->job_id, r->operation, reason);
        ret = jobs_update(cj->otad->jobs, r->job_id, status, d, 0, NULL, NULL);
        if (ret < 0)
                log_job(LOG_ERR, r->job_id, HANDLER_NAME, "Job %s: failed to report %s: %s", r->job_id,
                        job_status_to_string(status), strerror(-ret));
}

static int on_child(sd_event_source *es, const siginfo_t *si, void *userdata) {
        struct run *r = userdata;

        /* What the handler wrote before it exited is in the pipes now;
         * don't wait for EOF, a grandchild may keep them open. */
        stream_drain(r, &r->out, false);
        stream_drain(r, &r->err, true);
        if (!r->cancelled)
                run_report(r, si);
        else
                log_job(LOG_INFO, r->job_id, HANDLER_NAME, "Job %s: cancelled handler %s is gone", r->job_id,
                        r->operation);
        /* Reaped already: unref must not kill a recycled pid. */
        sd_event_source_set_child_process_own(r->child, false);
        r->child = sd_event_source_disable_unref(r->child);
        run_remove(r);
        return 0;
}

static int on_kill_timer(sd_event_source *es, uint64_t usec, void *userdata) {
        struct run *r = userdata;

        log_job(LOG_WARNING, r->job_id, HANDLER_NAME, "Job %s: handler %s ignored SIGTERM, sending SIGKILL", r->job_id,
                r->operation);
        run_kill(r, SIGKILL);
        return 0;
}

static void run_terminate(struct run *r) {
        run_kill(r, SIGTERM);
        if (!r->kill_timer)
                (void) sd_event_add_time_relative(r->owner->otad->event, &r->kill_timer, CLOCK_MONOTONIC,
                                                  KILL_GRACE_USEC, 0, on_kill_timer, r);
}

static int on_timeout(sd_event_source *es, uint64_t usec, void *userdata) {
        struct run *r = userdata;

        r->timed_out = true;
        log_job(LOG_WARNING, r->job_id, HANDLER_NAME, "Job %s: handler %s timed out after %lld s, stopping it",
                r->job_id, r->operation, (long long) r->owner->otad->config->jobs.handler_timeout);
        run_terminate(r);
        return 0;
}

/* The handler's directory and file must be as trustworthy as otad itself:
 * owned by root and writable by nobody else. */
static int check_trusted(const struct stat *st, bool dir, const char *path, char *reason, size_t size) {
        if (dir ? !S_ISDIR(st->st_mode) : !S_ISREG(st->st_mode)) {
                snprintf(reason, size, "%s is not a %s", path, dir ? "directory" : "regular file");
                return -EPERM;
        }
        if (st->st_uid != 0 || (st->st_mode & (S_IWGRP | S_IWOTH))) {
                snprintf(reason, size, "%s must be owned by root and not writable by group or others", path);
                return -EPERM;
        }
        if (!dir && !(st->st_mode & S_IXUSR)) {
                snprintf(reason, size, "%s is not executable", path);
                return -EPERM;
        }
        return 0;
}

static void child_exec(const char *path, int in, int out, int err, const char *job_id, const char *thing) {
        sigset_t all;

        /* Our own process group: cancel and timeout kill it as a whole. */
        (void) setpgid(0, 0);
        for (int sig = 1; sig < NSIG; sig++)
                (void) signal(sig, SIG_DFL);
        sigemptyset(&all);
        (void) sigprocmask(SIG_SETMASK, &all, NULL);
        if (dup2(in, STDIN_FILENO) < 0 || dup2(out, STDOUT_FILENO) < 0 || dup2(err, STDERR_FILENO) < 0)
                _exit(127);
        /* Nothing else of ours: libmosquitto's socket, for one, is not
         * close-on-exec, and a handler must not hold the MQTT session. */
        (void) close_range(3, ~0U, 0);
        if (setenv("OTAD_JOB_ID", job_id, 1) < 0 || setenv("OTAD_THING_NAME", thing, 1) < 0)
                _exit(127);
        (void) chdir("/");
        execl(path, path, (char *) NULL);
        dprintf(STDERR_FILENO, "otad: cannot execute %s: %s\n", path, strerror(errno));
        _exit(127);
}

static int run_spawn(struct custom_jobs *cj, struct run *r, const char *path) {
        int in[2] = { -1, -1 }, out[2] = { -1, -1 }, err[2] = { -1, -1 };
        sd_event *e = cj->otad->event;
        int ret;

        if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) {
                ret = -errno;
                goto fail;
        }
        r->pid = fork();
        if (r->pid < 0) {
                ret = -errno;
                goto fail;
        }
        if (r->pid == 0)
                child_exec(path, in[0], out[1], err[1], r->job_id, cj->otad->config->mqtt.thing_name);
        (void) setpgid(r->pid, r->pid); /* no race with an early kill(-pid) */
        close(in[0]);
        close(out[1]);
        close(err[1]);
        in[0] = out[1] = err[1] = -1;
        (void) fcntl(in[1], F_SETFL, O_NONBLOCK);
        (void) fcntl(out[0], F_SETFL, O_NONBLOCK);
        (void) fcntl(err[0], F_SETFL, O_NONBLOCK);

        ret = sd_event_add_child(e, &r->child, r->pid, WEXITED, on_child, r);
        if (ret < 0) {
                (void) kill(-r->pid, SIGKILL);
                (void) waitpid(r->pid, NULL, 0);
                goto fail;
        }
        sd_event_source_set_child_process_own(r->child, true);
        ret = sd_event_add_io(e, &r->input, in[1], EPOLLOUT, on_stdin, r);
        if (ret < 0)
                goto fail;
        sd_event_source_set_io_fd_own(r->input, true);
        in[1] = -1;
        ret = sd_event_add_io(e, &r->out.source, out[0], EPOLLIN, on_stdout, r);
        if (ret < 0)
                goto fail;
        sd_event_source_set_io_fd_own(r->out.source, true);
        out[0] = -1;
        ret = sd_event_add_io(e, &r->err.source, err[0], EPOLLIN, on_stderr, r);
        if (ret < 0)
                goto fail;
        sd_event_source_set_io_fd_own(r->err.source, true);
        err[0] = -1;
        ret = sd_event_add_time_relative(e, &r->timeout, CLOCK_MONOTONIC,
                                         (uint64_t) cj->otad->config->jobs.handler_timeout * 1000000ULL, 0,
                                         on_timeout, r);
        if (ret < 0)
                goto fail;
        return 0;
fail:
        for (int i = 0; i < 2; i++) {
                closep(&in[i]);
                closep(&out[i]);
                closep(&err[i]);
        }
        return ret;
}

static bool custom_accepts(const cJSON *document, void *userdata) {
        struct custom_jobs *cj = userdata;

        /* afr_ota documents belong to the OTA handler (§2.3). */
        return cJSON_IsObject(document) && !cJSON_GetObjectItemCaseSensitive(document, "afr_ota") &&
               cJSON_GetObjectItemCaseSensitive(document, cj->otad->config->jobs.operation_key);
}

static int custom_start(const struct job *job, char *reason, size_t reason_size, void *userdata) {
        struct custom_jobs *cj = userdata;
        const struct otad_config *c = cj->otad->config;
        const cJSON *op = cJSON_GetObjectItemCaseSensitive(job->document, c->jobs.operation_key);
        _cleanup_free_ char *path = NULL;
        _cleanup_close_ int dirfd = -1;
        struct status_detail d[2] = { { NULL, NULL }, { NULL, NULL } };
        struct stat st;
        struct run *r;
        int ret;

        if (!cJSON_IsString(op)) {
                snprintf(reason, reason_size, "the job document's \"%s\" must be a string", c->jobs.operation_key);
                return -EINVAL;
        }
        if (!custom_jobs_operation_is_valid(op->valuestring)) {
                snprintf(reason, reason_size, "invalid operation name \"%.64s\": use [a-zA-Z0-9_.-], not starting with '.'",
                         op->valuestring);
                return -EINVAL;
        }
        dirfd = open(c->jobs.handler_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
        if (dirfd < 0 || fstat(dirfd, &st) < 0) {
                snprintf(reason, reason_size, "unknown operation \"%s\": handler directory %s: %s", op->valuestring,
                         c->jobs.handler_dir, strerror(errno));
                return -ENOENT;
        }
        ret = check_trusted(&st, true, c->jobs.handler_dir, reason, reason_size);
        if (ret < 0)
                return ret;
        if (fstatat(dirfd, op->valuestring, &st, AT_SYMLINK_NOFOLLOW) < 0) {
                snprintf(reason, reason_size, "unknown operation \"%s\": no handler in %s", op->valuestring,
                         c->jobs.handler_dir);
                return -ENOENT;
        }
        if (asprintf(&path, "%s/%s", c->jobs.handler_dir, op->valuestring) < 0) {
                path = NULL;
                return -ENOMEM;
        }
        ret = check_trusted(&st, false, path, reason, reason_size);
        if (ret < 0)
                return ret;

        r = calloc(1, sizeof(*r));
        if (!r)
                return -ENOMEM;
        r->owner = cj;
        r->job_id = strdup(job->id);
        r->operation = strdup(op->valuestring);
        r->document = cJSON_PrintUnformatted(job->document);
        if (!r->job_id || !r->operation || !r->document) {
                run_free(r);
                return -ENOMEM;
        }
        r->document_len = strlen(r->document);

        /* Tell the service first that we took the job (the reference agent
         * says nothing until much later, §2.4; we improve on it). */
        d[0] = (struct status_detail){ "operation", r->operation };
        ret = jobs_update(cj->otad->jobs, r->job_id, JOB_IN_PROGRESS, d, 0, NULL, NULL);
        if (ret < 0)
                log_job(LOG_WARNING, r->job_id, HANDLER_NAME, "Job %s: failed to report IN_PROGRESS: %s, continuing",
                        r->job_id, strerror(-ret));

        ret = run_spawn(cj, r, path);
        if (ret < 0) {
                snprintf(reason, reason_size, "failed to start %s: %s", path, strerror(-ret));
                run_free(r);
                return -EIO; /* FAILED: the document was fine */
        }
        r->next = cj->runs;
        cj->runs = r;
        log_job(LOG_INFO, r->job_id, HANDLER_NAME, "Job %s: started %s as process %d", r->job_id, path, (int) r->pid);
        return 0;
}

static struct run *run_find(struct custom_jobs *cj, const char *job_id) {
        for (struct run *r = cj->runs; r; r = r->next)
                if (!r->cancelled && strcmp(r->job_id, job_id) == 0)
                        return r;
        return NULL;
}

static void custom_cancel(const struct job *job, void *userdata) {
        struct custom_jobs *cj = userdata;
        struct run *r = run_find(cj, job->id);

        if (!r)
                return;
        r->cancelled = true;
        log_job(LOG_NOTICE, r->job_id, HANDLER_NAME, "Job %s: stopping handler %s (process group %d)", r->job_id,
                r->operation, (int) r->pid);
        run_terminate(r);
}

int custom_jobs_new(struct otad *otad, struct custom_jobs **ret) {
        struct custom_jobs *cj;
        int r;

        cj = calloc(1, sizeof(*cj));
        if (!cj)
                return log_error_errno(-ENOMEM, "Out of memory");
        cj->otad = otad;
        r = jobs_register_handler(otad->jobs, &(const struct job_handler){
                                                      .name = HANDLER_NAME,
                                                      .accepts = custom_accepts,
                                                      .start = custom_start,
                                                      .cancel = custom_cancel,
                                                      .userdata = cj,
                                              });
        if (r < 0) {
                free(cj);
                return log_error_errno(r, "Failed to register the custom job handler: %m");
        }
        *ret = cj;
        return 0;
}

void custom_jobs_free(struct custom_jobs *cj) {
        if (!cj)
                return;
        jobs_unregister_handler(cj->otad->jobs, HANDLER_NAME);
        while (cj->runs) {
                struct run *r = cj->runs;

                cj->runs = r->next;
                log_job(LOG_NOTICE, r->job_id, HANDLER_NAME, "Job %s: otad is stopping, killing handler %s", r->job_id,
                        r->operation);
                run_kill(r, SIGKILL);
                run_free(r);
        }
        free(cj);
}
