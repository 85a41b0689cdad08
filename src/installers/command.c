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
 *   OTAD_VERSION    the running version as otad compares versions
 *                   ([update] version, else VERSION_ID of [update]
 *                   os_release, else 0)
 *
 * Exit status 0 is success; anything else fails the job with "exit status N"
 * (or "killed by signal N (NAME)"), and so does running longer than
 * [target.NAME] timeout= ("timed out after N s": its process group gets
 * SIGTERM, SIGKILL 5 s later). Every line the program prints goes to the
 * journal with the job id. The program runs inside the event loop
 * (child.h), since an installer such as `rauc install` may take minutes.
 * The staged file is removed once the program has finished, whatever its
 * result.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include <systemd/sd-event.h>

#include "backends.h"
#include "child.h"
#include "config.h"
#include "log.h"
#include "macro.h"
#include "otad.h"
#include "slot.h"
#include "subprocess.h"
#include "version.h"

struct command_installer {
        struct partial_file staged;
        char *program; /* argv[0], for the failure reason */
        struct child *child; /* NULL when not running */
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
                d->staged.fd = -1;
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

/* otad's environment without OTAD_*, plus the documented variables. */
static int build_env(struct installer *in, char ***ret) {
        const struct otad_config *config = in->otad->config;
        struct command_installer *d = command_data(in);
        const struct config_slot *pair[2], *inactive;
        const char *class = in->target->slot_class && *in->target->slot_class ? in->target->slot_class : "rootfs";
        _cleanup_free_ char *version = NULL;
        char size[32];
        char **extra = NULL;
        size_t n = 0;
        int r;

        snprintf(size, sizeof(size), "%llu", (unsigned long long) d->staged.size);
        r = version_running(config, &version);
        if (r >= 0)
                r = strv_push(&extra, &n, env_entry("OTAD_JOB_ID", in->job_id));
        if (r >= 0)
                r = strv_push(&extra, &n, env_entry("OTAD_IMAGE", d->staged.path));
        if (r >= 0)
                r = strv_push(&extra, &n, env_entry("OTAD_TARGET", in->target->name));
        if (r >= 0)
                r = strv_push(&extra, &n, env_entry("OTAD_FILE_SIZE", size));
        if (r >= 0 && slot_class_pair(config, class, pair) >= 0 && slot_inactive(config, class, NULL, &inactive) >= 0 &&
            inactive->bootname)
                r = strv_push(&extra, &n, env_entry("OTAD_SLOT", inactive->bootname));
        if (r >= 0)
                r = strv_push(&extra, &n, env_entry("OTAD_VERSION", version));
        if (r >= 0)
                r = subprocess_env_new(extra, ret);
        subprocess_argv_free(extra);
        return r;
}

static void on_program_exit(struct child *child, int wait_status, bool timed_out, void *userdata) {
        struct installer *in = userdata;
        struct command_installer *d = command_data(in);
        installer_activate_done_t done = in->activate_done;
        char what[64];
        int r = 0;

        child_free(d->child);
        d->child = NULL;
        partial_file_remove(&d->staged);
        child_describe_exit(wait_status, timed_out, (uint64_t) in->target->timeout * USEC_PER_SEC, what, sizeof(what));
        if (!timed_out && WIFEXITED(wait_status) && WEXITSTATUS(wait_status) == 0)
                log_milestone(LOG_INFO, OTAD_MID_SLOT_ACTIVATED, in->job_id, "activate", "[target.%s]: %s installed the image",
                              in->target->name, d->program);
        else
                r = installer_fail(in, timed_out ? -ETIMEDOUT : -EIO, "%s failed: %s", d->program, what);
        /* last: the callback may free in */
        if (done)
                done(in, r, in->activate_userdata);
}

static int command_activate(struct installer *in) {
        struct command_installer *d = command_data(in);
        char **argv = NULL, **envp = NULL;
        size_t n = 0;
        int r;

        if (!d || d->staged.fd < 0)
                return -EBADF;
        if (d->child)
                return -EBUSY;
        if (!in->activate_done || !in->otad->event)
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
        r = child_start(in->otad->event, argv,
                        &(const struct child_options){
                                .job_id = in->job_id,
                                .stage = "activate",
                                .envp = envp,
                                .timeout_usec = (uint64_t) in->target->timeout * USEC_PER_SEC,
                                .log_output = true,
                        },
                        on_program_exit, in, &d->child);
        if (r < 0) {
                r = installer_fail(in, r, "cannot start %s: %m", argv[0]);
                goto out;
        }
        log_job(LOG_INFO, in->job_id, "activate", "[target.%s]: running %s %s as process %d", in->target->name,
                in->target->command, d->staged.path, (int) child_pid(d->child));
        r = -EINPROGRESS;
out:
        subprocess_argv_free(argv);
        subprocess_argv_free(envp);
        return r;
}

static void command_free(struct installer *in) {
        struct command_installer *d = command_data(in);

        if (!d)
                return;
        child_free(d->child);
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
        child_free(d->child);
        d->child = NULL;
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
