/* SPDX-License-Identifier: MIT */
/*
 * The command backend: the job file is staged in
 * <[state] directory>/.<target>-<job>.otad-image; once verified, the program
 * of [target.NAME] command= (split on blanks, no shell) runs with the staged
 * file's path as its last argument, and this environment:
 *
 *   OTAD_JOB_ID     the AWS IoT job id
 *   OTAD_IMAGE      the staged file's path (also the last argument)
 *   OTAD_TARGET     the [target.NAME] name
 *   OTAD_FILE_SIZE  the image size in bytes
 *   OTAD_SLOT       the bootname of the inactive slot of the target's
 *                   slot_class, when such an A/B pair is configured
 *   OTAD_VERSION    the running version ([update] version, else VERSION_ID
 *                   of [update] os_release), when known
 *
 * Exit status 0 is success; anything else fails the job with "exit status N"
 * (or "killed by signal N"). Every line the program prints on stdout or
 * stderr goes to the journal at info level with the job id. The program
 * runs inside the event loop (a child source and two pipe sources), since
 * an installer such as `rauc install` may take minutes. The staged file is
 * removed once the program has finished, whatever its result.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <systemd/sd-event.h>

#include "backends.h"
#include "config.h"
#include "fileio.h"
#include "log.h"
#include "macro.h"
#include "otad.h"
#include "slot.h"
#include "subprocess.h"

extern char **environ;

#define LINE_MAX_LEN 4096

struct output {
        int fd; /* -1 at EOF */
        sd_event_source *source;
        char buf[LINE_MAX_LEN];
        size_t len;
};

struct command_installer {
        struct partial_file staged;
        char *program; /* argv[0], for log lines */
        pid_t pid;     /* 0 when not running */
        sd_event_source *child;
        struct output out[2]; /* stdout, stderr */
        bool exited;
        int wait_status;
};

static struct command_installer *command_data(struct installer *in) {
        return in->data;
}

static int command_begin(struct installer *in, uint64_t size, bool resume) {
        const struct otad_config *config = in->otad->config;
        struct command_installer *d = command_data(in);
        _cleanup_free_ char *name = NULL;
        int r;

        if (!in->target->command || !*in->target->command)
                return installer_fail(in, -EINVAL, "type=command needs command=");
        if (!config->state.directory || !*config->state.directory)
                return installer_fail(in, -EINVAL, "type=command stages the image in [state] directory=, which is not set");
        if (!d) {
                d = calloc(1, sizeof(*d));
                if (!d)
                        return -ENOMEM;
                d->staged.fd = d->out[0].fd = d->out[1].fd = -1;
                in->data = d;
        }
        r = installer_private_name(in, "otad-image", &name);
        if (r < 0)
                return r;
        r = partial_file_open(&d->staged, config->state.directory, name, size, resume, 0700);
        if (r < 0)
                return installer_fail(in, r, "cannot stage the image in %s/%s: %m", config->state.directory, name);
        return 0;
}

static int command_write(struct installer *in, uint64_t offset, const void *buf, size_t len) {
        struct command_installer *d = command_data(in);
        int r;

        if (!d)
                return -EBADF;
        r = partial_file_write(&d->staged, offset, buf, len);
        if (r < 0)
                return installer_fail(in, r, "cannot write %s: %m", d->staged.path);
        return 0;
}

static int command_sync(struct installer *in) {
        struct command_installer *d = command_data(in);
        int r;

        if (!d)
                return -EBADF;
        r = partial_file_sync(&d->staged);
        if (r < 0)
                return installer_fail(in, r, "cannot sync %s: %m", d->staged.path);
        return 0;
}

static int command_read(struct installer *in, uint64_t offset, void *buf, size_t len) {
        struct command_installer *d = command_data(in);

        if (!d)
                return -EBADF;
        return partial_file_read(&d->staged, offset, buf, len);
}

/* VERSION_ID= of an os-release file, unquoted. */
static char *os_release_version(const char *path) {
        _cleanup_free_ char *data = NULL;
        char *save = NULL;

        if (!path || read_file_full(path, 64 * 1024, &data, NULL) < 0)
                return NULL;
        for (char *line = strtok_r(data, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
                size_t len;

                if (strncmp(line, "VERSION_ID=", 11) != 0)
                        continue;
                line += 11;
                len = strlen(line);
                if (len >= 2 && (line[0] == '"' || line[0] == '\'') && line[len - 1] == line[0]) {
                        line[len - 1] = '\0';
                        line++;
                }
                return strdup(line);
        }
        return NULL;
}

static void strv_free(char **v) {
        subprocess_argv_free(v);
}

static int strv_push(char ***v, size_t *n, char *s) {
        char **grown;

        if (!s)
                return -ENOMEM;
        grown = realloc(*v, (*n + 2) * sizeof(char *));
        if (!grown) {
                free(s);
                return -ENOMEM;
        }
        *v = grown;
        (*v)[(*n)++] = s;
        (*v)[*n] = NULL;
        return 0;
}

static char *env_entry(const char *name, const char *value) {
        char *s;

        return asprintf(&s, "%s=%s", name, value) < 0 ? NULL : s;
}

/* This process's environment without OTAD_* (so that nothing inherited can
 * pose as ours), plus the documented variables. */
static int build_env(struct installer *in, char ***ret) {
        const struct otad_config *config = in->otad->config;
        struct command_installer *d = command_data(in);
        const struct config_slot *pair[2], *inactive;
        const char *class = in->target->slot_class && *in->target->slot_class ? in->target->slot_class : "rootfs";
        _cleanup_free_ char *version = NULL;
        char size[32];
        char **v = NULL;
        size_t n = 0;
        int r = 0;

        for (char **e = environ; e && *e && r >= 0; e++)
                if (strncmp(*e, "OTAD_", 5) != 0)
                        r = strv_push(&v, &n, strdup(*e));
        snprintf(size, sizeof(size), "%llu", (unsigned long long) d->staged.size);
        if (r >= 0)
                r = strv_push(&v, &n, env_entry("OTAD_JOB_ID", in->job_id));
        if (r >= 0)
                r = strv_push(&v, &n, env_entry("OTAD_IMAGE", d->staged.path));
        if (r >= 0)
                r = strv_push(&v, &n, env_entry("OTAD_TARGET", in->target->name));
        if (r >= 0)
                r = strv_push(&v, &n, env_entry("OTAD_FILE_SIZE", size));
        if (r >= 0 && slot_class_pair(config, class, pair) >= 0 && slot_inactive(config, class, NULL, &inactive) >= 0 &&
            inactive->bootname)
                r = strv_push(&v, &n, env_entry("OTAD_SLOT", inactive->bootname));
        if (config->update.version && *config->update.version)
                version = strdup(config->update.version);
        else
                version = os_release_version(config->update.os_release);
        if (r >= 0 && version)
                r = strv_push(&v, &n, env_entry("OTAD_VERSION", version));
        if (r < 0) {
                strv_free(v);
                return r;
        }
        if (!v) /* an empty environment still needs its terminating NULL */
                v = calloc(1, sizeof(char *));
        if (!v)
                return -ENOMEM;
        *ret = v;
        return 0;
}

static void output_line(struct installer *in, struct output *o, bool all) {
        struct command_installer *d = command_data(in);
        size_t start = 0;

        for (size_t i = 0; i < o->len; i++) {
                if (o->buf[i] != '\n')
                        continue;
                log_job(LOG_INFO, in->job_id, "activate", "%s: %.*s", d->program, (int) (i - start), o->buf + start);
                start = i + 1;
        }
        /* a full buffer without newline, or what is left at EOF, is a line too */
        if (start < o->len && (all || (start == 0 && o->len == sizeof(o->buf)))) {
                log_job(LOG_INFO, in->job_id, "activate", "%s: %.*s", d->program, (int) (o->len - start),
                        o->buf + start);
                start = o->len;
        }
        memmove(o->buf, o->buf + start, o->len - start);
        o->len -= start;
}

static void output_close(struct output *o) {
        o->source = sd_event_source_disable_unref(o->source);
        if (o->fd >= 0)
                close(o->fd);
        o->fd = -1;
}

/* Reads what is there; closes at EOF or error. */
static void output_drain(struct installer *in, struct output *o) {
        while (o->fd >= 0) {
                ssize_t n = read(o->fd, o->buf + o->len, sizeof(o->buf) - o->len);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && errno == EAGAIN)
                        return;
                if (n <= 0) {
                        output_line(in, o, true);
                        output_close(o);
                        return;
                }
                o->len += (size_t) n;
                output_line(in, o, false);
        }
}

static void maybe_complete(struct installer *in) {
        struct command_installer *d = command_data(in);
        installer_activate_done_t done = in->activate_done;
        char what[64];
        int r = 0;

        if (!d->exited || d->out[0].fd >= 0 || d->out[1].fd >= 0)
                return;
        d->pid = 0;
        d->child = sd_event_source_disable_unref(d->child);
        partial_file_remove(&d->staged);
        subprocess_describe_status(d->wait_status, what, sizeof(what));
        if (WIFEXITED(d->wait_status) && WEXITSTATUS(d->wait_status) == 0)
                log_milestone(LOG_INFO, OTAD_MID_SLOT_ACTIVATED, in->job_id, "activate", "[target.%s]: %s installed the image",
                              in->target->name, d->program);
        else
                r = installer_fail(in, -EIO, "%s failed: %s", d->program, what);
        /* last: the callback may free in */
        if (done)
                done(in, r, in->activate_userdata);
}

static int on_output(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct installer *in = userdata;
        struct command_installer *d = command_data(in);
        struct output *o = fd == d->out[0].fd ? &d->out[0] : &d->out[1];

        output_drain(in, o);
        maybe_complete(in);
        return 0;
}

static int on_child(sd_event_source *s, const siginfo_t *si, void *userdata) {
        struct installer *in = userdata;
        struct command_installer *d = command_data(in);

        d->exited = true;
        if (si->si_code == CLD_EXITED)
                d->wait_status = (si->si_status & 0xff) << 8;
        else
                d->wait_status = si->si_status & 0x7f; /* WIFSIGNALED form */
        /* a grandchild that kept our pipes open must not hold up the result:
         * take what is there now and stop listening */
        for (size_t i = 0; i < ELEMENTSOF(d->out); i++) {
                output_drain(in, &d->out[i]);
                if (d->out[i].fd >= 0) {
                        output_line(in, &d->out[i], true);
                        output_close(&d->out[i]);
                }
        }
        maybe_complete(in);
        return 0;
}

static int command_activate(struct installer *in) {
        struct command_installer *d = command_data(in);
        sd_event *event = in->otad->event;
        char **argv = NULL, **envp = NULL;
        int pipes[2][2] = { { -1, -1 }, { -1, -1 } };
        size_t n = 0;
        sigset_t chld;
        int r;

        if (!d || d->staged.fd < 0)
                return -EBADF;
        if (d->pid > 0)
                return -EBUSY;
        if (!in->activate_done || !event)
                return -EINVAL;
        r = partial_file_sync(&d->staged);
        if (r < 0)
                return installer_fail(in, r, "cannot sync %s: %m", d->staged.path);
        partial_file_close(&d->staged); /* the program gets the path, not our fd */

        r = subprocess_split_command(in->target->command, &argv);
        if (r < 0)
                return installer_fail(in, r, "cannot parse command=%s", in->target->command);
        while (argv[n])
                n++;
        r = strv_push(&argv, &n, strdup(d->staged.path));
        if (r >= 0) {
                free(d->program);
                d->program = strdup(argv[0]);
                r = d->program ? 0 : -ENOMEM;
        }
        if (r >= 0)
                r = build_env(in, &envp);
        if (r < 0)
                goto out;

        /* sd-event watches children only with SIGCHLD blocked; the child
         * gets an empty mask back (subprocess_start) */
        sigemptyset(&chld);
        sigaddset(&chld, SIGCHLD);
        if (sigprocmask(SIG_BLOCK, &chld, NULL) < 0) {
                r = -errno;
                goto out;
        }
        for (size_t i = 0; i < 2; i++)
                if (pipe2(pipes[i], O_CLOEXEC | O_NONBLOCK) < 0) {
                        r = -errno;
                        goto out;
                }
        r = subprocess_start(argv, envp, pipes[0][1], pipes[1][1], &d->pid);
        if (r < 0) {
                r = installer_fail(in, r, "cannot start %s: %m", argv[0]);
                goto out;
        }
        for (size_t i = 0; i < 2; i++) {
                close(pipes[i][1]);
                pipes[i][1] = -1;
                d->out[i].fd = pipes[i][0];
                d->out[i].len = 0;
                pipes[i][0] = -1;
        }
        d->exited = false;
        r = sd_event_add_child(event, &d->child, d->pid, WEXITED, on_child, in);
        for (size_t i = 0; r >= 0 && i < 2; i++)
                r = sd_event_add_io(event, &d->out[i].source, d->out[i].fd, EPOLLIN, on_output, in);
        if (r < 0) {
                /* cannot watch it: do not leave it running unobserved */
                (void) kill(d->pid, SIGKILL);
                (void) waitpid(d->pid, NULL, 0);
                d->pid = 0;
                d->child = sd_event_source_disable_unref(d->child);
                output_close(&d->out[0]);
                output_close(&d->out[1]);
                r = installer_fail(in, r, "cannot watch %s: %m", argv[0]);
                goto out;
        }
        log_job(LOG_INFO, in->job_id, "activate", "[target.%s]: running %s %s", in->target->name,
                in->target->command, d->staged.path);
        r = -EINPROGRESS;
out:
        for (size_t i = 0; i < 2; i++)
                for (size_t j = 0; j < 2; j++)
                        if (pipes[i][j] >= 0)
                                close(pipes[i][j]);
        strv_free(argv);
        strv_free(envp);
        return r;
}

/* Stops a running program: SIGTERM, up to 5 s for it to go, then SIGKILL. */
static void stop_child(struct command_installer *d) {
        struct timespec tick = { .tv_sec = 0, .tv_nsec = 10 * 1000 * 1000 };

        if (d->pid <= 0)
                return;
        d->child = sd_event_source_disable_unref(d->child);
        (void) kill(d->pid, SIGTERM);
        for (int i = 0; i < 500; i++) {
                pid_t w = waitpid(d->pid, NULL, WNOHANG);

                if (w == d->pid || (w < 0 && errno == ECHILD)) {
                        d->pid = 0;
                        return;
                }
                nanosleep(&tick, NULL);
        }
        (void) kill(d->pid, SIGKILL);
        (void) waitpid(d->pid, NULL, 0);
        d->pid = 0;
}

static void command_free(struct installer *in) {
        struct command_installer *d = command_data(in);

        if (!d)
                return;
        stop_child(d);
        output_close(&d->out[0]);
        output_close(&d->out[1]);
        partial_file_close(&d->staged);
        free(d->staged.path);
        free(d->program);
        free(d);
        in->data = NULL;
}

static void command_abort(struct installer *in) {
        struct command_installer *d = command_data(in);

        if (!d) {
                installer_remove_private_file(in, in->otad->config->state.directory, "otad-image");
                return;
        }
        stop_child(d);
        partial_file_remove(&d->staged);
}

const struct installer_ops installer_command_ops = {
        .name = "command",
        .begin = command_begin,
        .write = command_write,
        .sync = command_sync,
        .finish = command_sync,
        .read = command_read,
        .activate = command_activate,
        .abort = command_abort,
        .free = command_free,
};
