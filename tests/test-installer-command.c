/* SPDX-License-Identifier: MIT */
/* Unit tests of the command installer: a script in a temp dir gets the
 * staged image as its last argument and the documented environment, runs
 * inside a real sd-event loop, its output reaches the log, exit 0 succeeds,
 * exit 3 fails with "exit status 3", and the staged image is removed. A
 * program that hangs fails at [target.NAME] timeout= with its whole
 * process group gone; one that writes more than a pipe holds while the
 * loop is busy gets it all through; freeing stops a running one. */
#include <systemd/sd-event.h>
#include <signal.h>
#include <time.h>

#include "installer-test-util.h"
#include "installer.h"
#include "otad.h"

#define IMAGE_SIZE (64 * 1024 + 3)

static char *dir;

struct result {
        bool done;
        int r;
        int calls;
};

static void on_done(struct installer *in, int r, void *userdata) {
        struct result *res = userdata;

        res->done = true;
        res->r = r;
        res->calls++;
}

/* Runs the loop until the activation reports, at most ~10 s. */
static void run_until_done(sd_event *e, struct result *res) {
        for (int i = 0; i < 1000 && !res->done; i++)
                (void) sd_event_run(e, 10 * 1000);
}

static char *read_text(const char *path) {
        char *s = NULL;

        if (read_file_full(path, 1 << 20, &s, NULL) < 0)
                return NULL;
        return s;
}

static bool env_has(const char *env, const char *line) {
        char *needle = xprintf("\n%s\n", line);
        char *hay = xprintf("\n%s", env ? env : "");
        bool found = strstr(hay, needle) != NULL;

        free(needle);
        free(hay);
        return found;
}

/* True once pid is gone or a zombie, within seconds. */
static bool process_gone(pid_t pid, int seconds) {
        for (int i = 0; i < seconds * 100; i++) {
                char path[64], *stat = NULL, *end;

                snprintf(path, sizeof(path), "/proc/%d/stat", (int) pid);
                if (read_file_full(path, 4096, &stat, NULL) < 0)
                        return true;
                end = strrchr(stat, ')');
                if (end && end[1] == ' ' && end[2] == 'Z') {
                        free(stat);
                        return true;
                }
                free(stat);
                (void) usleep(10 * 1000);
        }
        return false;
}

int main(void) {
        static unsigned char image[IMAGE_SIZE];
        char *script, *fail_script, *hang_script, *pidfile, *extra, *envfile, *copy, *staged, *line;
        struct otad_config *c;
        struct otad o = { 0 };
        struct installer *in = NULL;
        struct result res = { 0 };
        sd_event *e = NULL;
        char *env;
        struct stat st;

        dir = make_scratch("test-installer-command");
        script = xprintf("%s/install.sh", dir);
        fail_script = xprintf("%s/fail.sh", dir);
        envfile = xprintf("%s/env.out", dir);
        copy = xprintf("%s/image.copy", dir);
        line = xprintf("#!/bin/sh\nenv > '%s'\necho \"args: $*\" >> '%s'\ncp \"$2\" '%s'\n"
                       "echo installing from stdout\necho complaining on stderr >&2\nprintf 'no newline at the end'\nexit 0\n",
                       envfile, envfile, copy);
        write_bytes(script, line, strlen(line));
        chmod(script, 0755);
        free(line);
        line = xprintf("#!/bin/sh\necho about to fail\nexit 3\n");
        write_bytes(fail_script, line, strlen(line));
        chmod(fail_script, 0755);
        free(line);

        /* hangs, and leaves a grandchild that ignores SIGTERM holding stdout */
        hang_script = xprintf("%s/hang.sh", dir);
        pidfile = xprintf("%s/hang.pid", dir);
        line = xprintf("#!/bin/sh\n(trap '' TERM; exec sleep 300) &\necho $$ $! > '%s'\nsleep 300\n", pidfile);
        write_bytes(hang_script, line, strlen(line));
        chmod(hang_script, 0755);
        free(line);

        extra = xprintf("[update]\nversion = 1.2.3\nbooted_slot = A\n\n"
                        "[target.app]\ntype = command\ncommand = %s --flag\n\n"
                        "[target.bad]\ntype = command\ncommand = %s\n\n"
                        "[target.hang]\ntype = command\ncommand = %s\ntimeout = 1\n\n"
                        "[slot.rootfs.a]\ndevice = /dev/null\nbootname = A\n\n"
                        "[slot.rootfs.b]\ndevice = /dev/null\nbootname = B\n",
                        script, fail_script, hang_script);
        c = load_config(dir, extra);
        tap_ok(c != NULL, "config loads");
        if (!c)
                return tap_done();
        tap_ok(sd_event_default(&e) >= 0, "sd_event_default");
        o.config = c;
        o.event = e;
        fill_pattern(image, sizeof(image), 5);
        setenv("OTAD_IMAGE", "/inherited/must/not/leak", 1);

        /* success */
        tap_is_int(installer_new(&o, &c->targets[0], "job-cmd", &in), 0, "installer_new(command)");
        installer_set_activate_done(in, on_done, &res);
        tap_is_int(in->ops->begin(in, IMAGE_SIZE, false), 0, "begin stages in the state directory");
        staged = xprintf("%s/state/.app-job-cmd.otad-image", dir);
        tap_ok(stat(staged, &st) == 0, "staged file %s", staged);
        tap_is_int(in->ops->write(in, 4096, image + 4096, IMAGE_SIZE - 4096), 0, "write the tail first");
        tap_is_int(in->ops->write(in, 0, image, 4096), 0, "then the head");
        tap_is_int(in->ops->finish(in), 0, "finish");
        {
                static unsigned char back[IMAGE_SIZE];

                tap_is_int(in->ops->read(in, 0, back, IMAGE_SIZE), 0, "read back the staged image");
                tap_ok(memcmp(back, image, IMAGE_SIZE) == 0, "staged image equals the image");
        }
        tap_is_int(in->ops->activate(in), -EINPROGRESS, "activate: -EINPROGRESS (runs in the event loop)");
        tap_ok(!res.done, "not done before the loop runs");
        run_until_done(e, &res);
        tap_ok(res.done && res.calls == 1, "completion called once");
        tap_is_int(res.r, 0, "exit 0: success");
        env = read_text(envfile);
        tap_ok(env_has(env, "OTAD_JOB_ID=job-cmd"), "OTAD_JOB_ID");
        line = xprintf("OTAD_IMAGE=%s", staged);
        tap_ok(env_has(env, line), "OTAD_IMAGE is the staged path");
        free(line);
        tap_ok(env_has(env, "OTAD_TARGET=app"), "OTAD_TARGET");
        line = xprintf("OTAD_FILE_SIZE=%d", IMAGE_SIZE);
        tap_ok(env_has(env, line), "OTAD_FILE_SIZE");
        free(line);
        tap_ok(env_has(env, "OTAD_SLOT=B"), "OTAD_SLOT is the inactive slot");
        tap_ok(env_has(env, "OTAD_VERSION=1.2.3"), "OTAD_VERSION is the running version");
        tap_ok(env && !strstr(env, "/inherited/must/not/leak"), "an inherited OTAD_IMAGE does not leak through");
        line = xprintf("args: --flag %s", staged);
        tap_ok(env_has(env, line), "argv: configured words, then the staged path");
        free(line);
        free(env);
        {
                char *got = NULL;
                size_t size = 0;

                tap_ok(read_file_full(copy, IMAGE_SIZE + 1, &got, &size) == 0 && size == IMAGE_SIZE &&
                       memcmp(got, image, IMAGE_SIZE) == 0, "the program read the whole image");
                free(got);
        }
        tap_ok(stat(staged, &st) < 0, "the staged image is removed after the program finished");
        installer_free(in);
        in = NULL;
        free(staged);

        /* failure: exit 3 */
        res = (struct result){ 0 };
        tap_is_int(installer_new(&o, &c->targets[1], "job-bad", &in), 0, "installer_new for the failing command");
        installer_set_activate_done(in, on_done, &res);
        tap_is_int(in->ops->begin(in, 10, false), 0, "begin");
        tap_is_int(in->ops->write(in, 0, "0123456789", 10), 0, "write");
        tap_is_int(in->ops->finish(in), 0, "finish");
        tap_is_int(in->ops->activate(in), -EINPROGRESS, "activate");
        run_until_done(e, &res);
        tap_ok(res.done && res.r < 0, "exit 3: failure (r=%d)", res.r);
        tap_ok(in->reason && strstr(in->reason, "exit status 3"), "reason: %s", in->reason ? in->reason : "(none)");
        installer_free(in);
        in = NULL;

        /* a program that cannot be started */
        free(c->targets[1].command);
        c->targets[1].command = xprintf("%s/does-not-exist", dir);
        res = (struct result){ 0 };
        tap_is_int(installer_new(&o, &c->targets[1], "job-missing", &in), 0, "installer_new for a missing program");
        installer_set_activate_done(in, on_done, &res);
        tap_ok(in->ops->begin(in, 1, false) == 0 && in->ops->write(in, 0, "x", 1) == 0, "one byte staged");
        tap_ok(in->ops->activate(in) == -ENOENT && !res.done, "a missing program: -ENOENT at once, no completion");
        installer_free(in);
        in = NULL;

        /* a program that hangs gets [target.NAME] timeout=, and its whole
         * process group goes */
        res = (struct result){ 0 };
        tap_is_int(installer_new(&o, &c->targets[2], "job-hang", &in), 0, "installer_new for a hanging command");
        installer_set_activate_done(in, on_done, &res);
        tap_ok(in->ops->begin(in, 1, false) == 0 && in->ops->write(in, 0, "x", 1) == 0, "one byte staged");
        tap_is_int(in->ops->activate(in), -EINPROGRESS, "activate a program that hangs, timeout = 1");
        run_until_done(e, &res);
        tap_ok(res.done && res.r < 0, "it fails (r=%d)", res.r);
        tap_ok(in->reason && strstr(in->reason, "timed out after 1 s"), "the reason names the timeout: %s",
               in->reason ? in->reason : "(none)");
        {
                char *pids = read_text(pidfile);
                int leader = 0, grandchild = 0;

                if (!pids || sscanf(pids, "%d %d", &leader, &grandchild) != 2)
                        leader = grandchild = 0;
                tap_ok(leader > 0 && grandchild > 0, "the program ran: %d %d", leader, grandchild);
                tap_ok(leader > 0 && process_gone(leader, 5), "the program is gone");
                tap_ok(grandchild > 0 && process_gone(grandchild, 5),
                       "its grandchild that ignores SIGTERM is gone too");
                if (grandchild > 0)
                        (void) kill(grandchild, SIGKILL);
                free(pids);
        }
        installer_free(in);
        in = NULL;

        /* A program that writes more than a pipe holds while the loop is
         * busy elsewhere must block on its stdout, not see EAGAIN: the
         * non-blocking end is ours only. */
        free(c->targets[1].command);
        c->targets[1].command = xprintf("%s/chatty.sh", dir);
        line = xprintf("#!/bin/sh\nhead -c 100000 /dev/zero | tr '\\0' x\n");
        write_bytes(c->targets[1].command, line, strlen(line));
        chmod(c->targets[1].command, 0755);
        free(line);
        res = (struct result){ 0 };
        tap_is_int(installer_new(&o, &c->targets[1], "job-chatty", &in), 0, "installer_new for a chatty command");
        installer_set_activate_done(in, on_done, &res);
        tap_ok(in->ops->begin(in, 1, false) == 0 && in->ops->write(in, 0, "x", 1) == 0, "one byte staged");
        tap_is_int(in->ops->activate(in), -EINPROGRESS, "activate a program writing 100 kB to stdout (a pipe holds 64 KiB)");
        (void) usleep(1000 * 1000); /* the loop is not running: the pipe fills up */
        run_until_done(e, &res);
        tap_ok(res.done && res.r == 0, "its output all got through (r=%d, reason: %s)", res.r,
               in->reason ? in->reason : "none");
        installer_free(in);
        in = NULL;

        /* freeing during a long run stops the program (a script: "sleep 30"
         * itself would get the image path as a third argument and exit at
         * once, sometimes within the 50 ms below) */
        free(c->targets[1].command);
        c->targets[1].command = xprintf("%s/long.sh", dir);
        line = xprintf("#!/bin/sh\nexec sleep 30\n");
        write_bytes(c->targets[1].command, line, strlen(line));
        chmod(c->targets[1].command, 0755);
        free(line);
        res = (struct result){ 0 };
        tap_is_int(installer_new(&o, &c->targets[1], "job-long", &in), 0, "installer_new for a long command");
        installer_set_activate_done(in, on_done, &res);
        tap_ok(in->ops->begin(in, 1, false) == 0 && in->ops->write(in, 0, "x", 1) == 0, "one byte staged");
        tap_is_int(in->ops->activate(in), -EINPROGRESS, "activate sleep 30");
        (void) sd_event_run(e, 50 * 1000);
        {
                time_t t0 = time(NULL);

                installer_free(in);
                tap_ok(time(NULL) - t0 < 6, "installer_free stops the running program");
        }
        tap_ok(!res.done, "no completion after free");

        sd_event_unref(e);
        config_free(c);
        remove_scratch(dir);
        free(dir);
        free(script);
        free(fail_script);
        free(hang_script);
        free(pidfile);
        free(extra);
        free(envfile);
        free(copy);
        return tap_done();
}
