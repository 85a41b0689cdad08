/* SPDX-License-Identifier: MIT */
/* child: real programs run from a real sd-event loop. Their output reaches
 * the log line by line (long lines split, invalid bytes escaped) and is
 * kept for the caller; exit statuses are reported once; at the deadline,
 * at exit and at free() the whole process group goes, grandchildren that
 * ignore SIGTERM and hold the pipes included; nothing is left behind: no
 * process, no zombie, no fd. */
#include <dirent.h>
#include <signal.h>
#include <systemd/sd-event.h>
#include <sys/wait.h>

#include "child.h"
#include "clock.h"
#include "installer-test-util.h"
#include "subprocess.h"

struct result {
        int calls;
        int status;
        bool timed_out;
        uint64_t at; /* when on_exit ran */
        char *output;
        bool free_in_callback;
};

static void on_exit_cb(struct child *c, int status, bool timed_out, void *userdata) {
        struct result *res = userdata;

        res->calls++;
        res->status = status;
        res->timed_out = timed_out;
        res->at = clock_now_usec();
        free(res->output);
        res->output = strdup(child_output(c, NULL));
        if (res->free_in_callback)
                child_free(c);
}

/* Runs the loop until on_exit, at most seconds. */
static void run_until_exit(sd_event *e, struct result *res, int seconds) {
        uint64_t until = clock_now_usec() + (uint64_t) seconds * USEC_PER_SEC;

        while (res->calls == 0 && clock_now_usec() < until)
                (void) sd_event_run(e, 100 * USEC_PER_MSEC);
}

static int count_fds(void) {
        DIR *d = opendir("/proc/self/fd");
        struct dirent *de;
        int n = 0;

        if (!d)
                return -1;
        while ((de = readdir(d)))
                if (de->d_name[0] != '.')
                        n++;
        closedir(d);
        return n - 1; /* the DIR's own fd */
}

/* The state letter of /proc/pid/stat, 0 when there is no such process. */
static char process_state(pid_t pid) {
        char path[64], *stat = NULL, *end, state = 0;

        snprintf(path, sizeof(path), "/proc/%d/stat", (int) pid);
        if (read_file_full(path, 4096, &stat, NULL) < 0)
                return 0;
        end = strrchr(stat, ')');
        if (end && end[1] == ' ')
                state = end[2];
        free(stat);
        return state;
}

/* Processes of group pgid that are not zombies (a zombie is dead; init
 * reaps the orphans among them). */
static int group_alive(pid_t pgid) {
        DIR *d = opendir("/proc");
        struct dirent *de;
        int n = 0;

        if (!d)
                return -1;
        while ((de = readdir(d))) {
                char path[300], *stat = NULL, *end;
                char state;
                int ppid, group;

                if (de->d_name[0] < '0' || de->d_name[0] > '9')
                        continue;
                snprintf(path, sizeof(path), "/proc/%s/stat", de->d_name);
                if (read_file_full(path, 4096, &stat, NULL) < 0)
                        continue;
                end = strrchr(stat, ')');
                if (end && sscanf(end + 1, " %c %d %d", &state, &ppid, &group) == 3 && group == pgid &&
                    state != 'Z')
                        n++;
                free(stat);
        }
        closedir(d);
        return n;
}

/* True once no process of the group is alive, within seconds: SIGKILL is
 * delivered at once, but the exit itself takes a moment on a loaded
 * machine. */
static bool group_gone(pid_t pgid, int seconds) {
        for (int i = 0; i < seconds * 100; i++) {
                if (group_alive(pgid) == 0)
                        return true;
                (void) usleep(10 * 1000);
        }
        return false;
}

/* The log goes to stderr here; this puts it into a file for a while. */
static char *dir;
static int saved_stderr = -1;
static char *log_path;

static void capture_log(void) {
        int fd = open(log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

        saved_stderr = dup(STDERR_FILENO);
        dup2(fd, STDERR_FILENO);
        close(fd);
}

static char *captured_log(void) {
        char *text = NULL;

        dup2(saved_stderr, STDERR_FILENO);
        close(saved_stderr);
        if (read_file_full(log_path, 1 << 20, &text, NULL) < 0)
                return strdup("");
        fputs(text, stderr); /* still there for whoever reads the test's output */
        return text;
}

/* Starts sh -c script. */
static int start_sh(sd_event *e, const char *script, const struct child_options *opts, struct result *res,
                    struct child **ret) {
        char *argv[] = { (char *) "/bin/sh", (char *) "-c", (char *) script, NULL };

        free(res->output);
        *res = (struct result){ .free_in_callback = res->free_in_callback };
        return child_start(e, argv, opts, on_exit_cb, res, ret);
}

static void test_output(sd_event *e) {
        struct result res = { .free_in_callback = true };
        struct child *c = NULL;
        char *log, *want;
        static char long_line[3100];
        pid_t pid;

        capture_log();
        tap_is_int(start_sh(e,
                            "printf 'one\\ntwo\\n'; echo complaint >&2; printf 'tab\\there\\r\\n';"
                            "printf '\\033[31mred \\377 \\302\\205 caf\\303\\251\\n'; printf 'no newline'",
                            &(const struct child_options){ .name = "lines", .job_id = "job-1", .stage = "test",
                                                          .log_output = true, .keep_output = 64 },
                            &res, &c),
                   0, "start a program that prints lines");
        pid = child_pid(c);
        run_until_exit(e, &res, 10);
        log = captured_log();
        tap_is_int(res.calls, 1, "on_exit once");
        tap_ok(WIFEXITED(res.status) && WEXITSTATUS(res.status) == 0, "exit status 0");
        tap_ok(!res.timed_out, "not timed out");
        tap_is_str(res.output, "one\ntwo\ntab\there\r\n\033[31mred \377 \302\205 caf\303\251\nno newline",
                   "stdout kept as it was, stderr not");
        want = xprintf("[job-1 test] lines[%d]: one\n", (int) pid);
        tap_ok(strstr(log, want) != NULL, "a stdout line logged with job id, stage, name and pid");
        free(want);
        want = xprintf("otad: warning: [job-1 test] lines[%d] (stderr): complaint\n", (int) pid);
        tap_ok(strstr(log, want) != NULL, "a stderr line logged as a warning");
        free(want);
        tap_ok(strstr(log, "]: tab\there\n") != NULL, "a tab stays, CRLF ends a line");
        tap_ok(strstr(log, "]: \\x1b[31mred \\xff \\xc2\\x85 caf\303\251\n") != NULL,
               "escape, invalid byte and C1 control written as \\xNN, UTF-8 kept");
        tap_ok(strstr(log, "]: no newline\n") != NULL, "the last line without newline");
        free(log);
        tap_ok(process_state(pid) == 0, "the program is reaped");

        /* 3000 bytes: lines of 1024, 1024, 952; a 2-byte character that
         * would straddle the split goes to the next line whole */
        memset(long_line, 'a', 3000);
        capture_log();
        tap_is_int(start_sh(e, "head -c 3000 /dev/zero | tr '\\0' a; echo; "
                               "head -c 1023 /dev/zero | tr '\\0' b; printf '\\303\\251 after\\n'",
                            &(const struct child_options){ .log_output = true }, &res, &c),
                   0, "start a program that prints long lines");
        pid = child_pid(c);
        run_until_exit(e, &res, 10);
        log = captured_log();
        tap_is_str(res.output, "", "nothing kept when keep_output is 0");
        {
                char *l1 = xprintf("sh[%d]: %.1024s\n", (int) pid, long_line);
                char *l3 = xprintf("sh[%d]: %.952s\n", (int) pid, long_line);
                char *bs = xprintf("sh[%d]: %.1023s\n", (int) pid, long_line);
                char *after = xprintf("sh[%d]: \303\251 after\n", (int) pid);
                char *at = strstr(log, l1);

                memset(bs + strlen(bs) - 1024, 'b', 1023);
                tap_ok(at && strstr(at + strlen(l1), l1), "3000 bytes: two lines of 1024 bytes");
                tap_ok(strstr(log, l3) != NULL, "then one of 952");
                tap_ok(strstr(log, bs) != NULL, "a 2-byte character at byte 1024 does not end the line");
                tap_ok(strstr(log, after) != NULL, "it starts the next line whole");
                free(l1);
                free(l3);
                free(bs);
                free(after);
        }
        free(log);
        free(res.output);
}

static void test_statuses(sd_event *e) {
        struct result res = { .free_in_callback = true };
        struct child *c = NULL;
        char what[64];

        tap_is_int(start_sh(e, "exit 3", NULL, &res, &c), 0, "start exit 3");
        run_until_exit(e, &res, 10);
        tap_ok(res.calls == 1 && WIFEXITED(res.status) && WEXITSTATUS(res.status) == 3, "exit status 3 reported");
        child_describe_exit(res.status, res.timed_out, 0, what, sizeof(what));
        tap_is_str(what, "exit status 3", "described");

        tap_is_int(start_sh(e, "kill -9 $$", NULL, &res, &c), 0, "start kill -9 $$");
        run_until_exit(e, &res, 10);
        tap_ok(res.calls == 1 && WIFSIGNALED(res.status) && WTERMSIG(res.status) == SIGKILL, "signal 9 reported");
        child_describe_exit(res.status, res.timed_out, 0, what, sizeof(what));
        tap_is_str(what, "killed by signal 9 (KILL)", "described");

        child_describe_exit(SIGTERM, true, 30 * USEC_PER_SEC, what, sizeof(what));
        tap_is_str(what, "timed out after 30 s", "a timeout described in seconds");
        child_describe_exit(SIGTERM, true, 1500 * USEC_PER_MSEC, what, sizeof(what));
        tap_is_str(what, "timed out after 1500 ms", "and in milliseconds when not whole");

        {
                char *argv[] = { (char *) "/nonexistent/program", NULL };
                char *noexec = xprintf("%s/not-executable", dir);
                char *argv2[] = { noexec, NULL };

                write_bytes(noexec, "#!/bin/sh\n", 10);
                free(res.output);
                res = (struct result){ 0 };
                tap_is_int(child_start(e, argv, NULL, on_exit_cb, &res, &c), -ENOENT, "a missing program: -ENOENT");
                tap_is_int(child_start(e, argv2, NULL, on_exit_cb, &res, &c), -EACCES,
                           "a program that is not executable: -EACCES");
                (void) sd_event_run(e, 100 * USEC_PER_MSEC);
                tap_is_int(res.calls, 0, "no on_exit for a program that did not start");
                free(noexec);
        }
        free(res.output);
}

/* What a program inherits: fds 0-2 only, no blocked or ignored signal, "/",
 * the environment it is given, stdin. */
static void test_inheritance(sd_event *e) {
        struct result res = { .free_in_callback = true };
        struct child *c = NULL;
        int leaked = open("/dev/null", O_RDONLY); /* not close-on-exec, as libmosquitto's socket */
        char *env[] = { (char *) "FOO=bar", (char *) "PATH=/usr/bin:/bin", NULL };
        static char big[1 << 20];
        sigset_t block;

        /* no pipeline: the shell would hold the pipe's ends while ls looks */
        tap_is_int(start_sh(e, "ls /proc/$$/fd", &(const struct child_options){ .keep_output = 256 }, &res, &c), 0,
                   "start ls /proc/$$/fd");
        run_until_exit(e, &res, 10);
        tap_is_str(res.output, "0\n1\n2\n", "the program holds fds 0, 1 and 2 only");
        close(leaked);

        sigemptyset(&block);
        sigaddset(&block, SIGTERM);
        sigprocmask(SIG_BLOCK, &block, NULL);
        signal(SIGUSR1, SIG_IGN);
        tap_is_int(start_sh(e, "exec grep -E '^Sig(Blk|Ign)' /proc/self/status",
                            &(const struct child_options){ .keep_output = 256 }, &res, &c),
                   0, "start grep Sig /proc/self/status");
        run_until_exit(e, &res, 10);
        {
                unsigned long long blocked = ~0ULL, ignored = ~0ULL;

                char *state = strdup(res.output ? res.output : "(none)");

                /* One TAP line: the two lines of /proc/self/status joined. */
                for (char *nl = state ? strchr(state, '\n') : NULL; nl; nl = strchr(nl, '\n'))
                        *nl = ' ';
                tap_ok(res.output && sscanf(res.output, "SigBlk: %llx SigIgn: %llx", &blocked, &ignored) == 2,
                       "its signal state: %s", state ? state : "?");
                free(state);
                tap_ok(blocked == 0, "no signal blocked, whatever otad blocked");
                /* glibc's posix_spawn leaves its own two internal signals (32
                 * and 33, below SIGRTMIN) ignored; a program that uses them
                 * sets its handlers */
                tap_ok((ignored & ~(3ULL << 31)) == 0, "no signal ignored, whatever otad ignored");
        }
        sigprocmask(SIG_UNBLOCK, &block, NULL);
        signal(SIGUSR1, SIG_DFL);

        tap_is_int(start_sh(e, "echo \"$FOO $(pwd) ${HOME:-nohome}\"",
                            &(const struct child_options){ .envp = env, .keep_output = 256 }, &res, &c),
                   0, "start with an environment of its own");
        run_until_exit(e, &res, 10);
        tap_is_str(res.output, "bar / nohome\n", "the environment given, and / as working directory");

        tap_is_int(start_sh(e, "cat",
                            &(const struct child_options){ .input = "the document", .input_size = 12,
                                                          .keep_output = 256 },
                            &res, &c),
                   0, "start cat with input");
        run_until_exit(e, &res, 10);
        tap_is_str(res.output, "the document", "input on stdin, then EOF");

        tap_is_int(start_sh(e, "cat; echo done", &(const struct child_options){ .keep_output = 256 }, &res, &c), 0,
                   "start cat without input");
        run_until_exit(e, &res, 10);
        tap_is_str(res.output, "done\n", "stdin is /dev/null without input");

        memset(big, 'x', sizeof(big));
        tap_is_int(start_sh(e, "exit 0", &(const struct child_options){ .input = big, .input_size = sizeof(big) },
                            &res, &c),
                   0, "start a program that does not read 1 MiB of input");
        run_until_exit(e, &res, 10);
        tap_ok(res.calls == 1 && WIFEXITED(res.status) && WEXITSTATUS(res.status) == 0,
               "it exits 0, and so does not otad (SIGPIPE ignored)");
        free(res.output);
}

/* The group lives as long as the program. */
static void test_groups(sd_event *e) {
        struct result res = { 0 };
        struct child *c = NULL;
        uint64_t start;
        pid_t pid, grandchild = 0;

        /* A grandchild that ignores SIGTERM and holds stdout, a program
         * that dies of SIGTERM: the deadline takes them all. */
        start = clock_now_usec();
        tap_is_int(start_sh(e, "(trap '' TERM; exec sleep 300) & echo $!; sleep 300",
                            &(const struct child_options){ .timeout_usec = 1 * USEC_PER_SEC,
                                                          .kill_grace_usec = 500 * USEC_PER_MSEC,
                                                          .log_output = true, .keep_output = 64 },
                            &res, &c),
                   0, "start a program that hangs with a grandchild that ignores SIGTERM");
        pid = child_pid(c);
        run_until_exit(e, &res, 20);
        tap_ok(res.calls == 1 && res.timed_out, "on_exit says it timed out");
        tap_ok(WIFSIGNALED(res.status) && WTERMSIG(res.status) == SIGTERM, "the program died of SIGTERM");
        tap_ok(res.at - start >= 1 * USEC_PER_SEC, "not before the deadline (%.2f s)",
               (double) (res.at - start) / USEC_PER_SEC);
        if (!res.output || sscanf(res.output, "%d", &grandchild) != 1)
                grandchild = 0;
        tap_ok(grandchild > 0, "the grandchild's pid: %d", (int) grandchild);
        tap_ok(group_gone(pid, 5), "no process of its group is left, without free()");
        tap_ok(grandchild > 0 && (process_state(grandchild) == 0 || process_state(grandchild) == 'Z'),
               "the grandchild that ignored SIGTERM is gone");
        (void) sd_event_run(e, 0);
        tap_ok(process_state(pid) == 0, "the program is reaped, no zombie");
        child_free(c);

        /* A program that ignores SIGTERM too: SIGKILL after the grace. */
        start = clock_now_usec();
        tap_is_int(start_sh(e, "trap '' TERM; sleep 300 & sleep 300",
                            &(const struct child_options){ .timeout_usec = 1 * USEC_PER_SEC,
                                                          .kill_grace_usec = 500 * USEC_PER_MSEC },
                            &res, &c),
                   0, "start a program that ignores SIGTERM");
        pid = child_pid(c);
        run_until_exit(e, &res, 20);
        tap_ok(res.calls == 1 && res.timed_out && WIFSIGNALED(res.status) && WTERMSIG(res.status) == SIGKILL,
               "timed out, SIGKILL after the grace");
        tap_ok(res.at - start >= 1500 * USEC_PER_MSEC, "not before deadline + grace (%.2f s)",
               (double) (res.at - start) / USEC_PER_SEC);
        tap_ok(group_gone(pid, 5), "no process of its group is left");
        child_free(c);

        /* A program that exits at once, leaving a grandchild that holds
         * stdout: reported at once, the grandchild killed. */
        start = clock_now_usec();
        tap_is_int(start_sh(e, "(exec sleep 300) & echo $!", &(const struct child_options){ .keep_output = 64 }, &res,
                            &c),
                   0, "start a program that leaves a grandchild behind");
        pid = child_pid(c);
        run_until_exit(e, &res, 20);
        tap_ok(res.calls == 1 && WIFEXITED(res.status) && WEXITSTATUS(res.status) == 0, "exit status 0");
        tap_ok(res.at - start < 5 * USEC_PER_SEC, "reported without waiting for the grandchild's end of the pipe");
        tap_ok(group_gone(pid, 5), "what it left in its group is killed");
        child_free(c);

        /* child_terminate: as a cancelled job. */
        tap_is_int(start_sh(e, "sleep 300", NULL, &res, &c), 0, "start sleep 300");
        pid = child_pid(c);
        (void) sd_event_run(e, 100 * USEC_PER_MSEC);
        child_terminate(c);
        run_until_exit(e, &res, 20);
        tap_ok(res.calls == 1 && !res.timed_out && WIFSIGNALED(res.status) && WTERMSIG(res.status) == SIGTERM,
               "terminated: SIGTERM, not timed out");
        tap_ok(group_gone(pid, 5), "its group is gone");
        child_free(c);

        /* free() while it runs, a grandchild that ignores SIGTERM holding
         * the pipes: everything goes, nothing waits. */
        tap_is_int(start_sh(e, "(trap '' TERM; exec sleep 300) & trap '' TERM; echo $!; sleep 300",
                            &(const struct child_options){ .log_output = true, .timeout_usec = 60 * USEC_PER_SEC },
                            &res, &c),
                   0, "start a program and a grandchild that ignore SIGTERM");
        pid = child_pid(c);
        for (int i = 0; i < 50 && group_alive(pid) < 3; i++)
                (void) sd_event_run(e, 100 * USEC_PER_MSEC);
        tap_is_int(group_alive(pid), 3, "the program, its sleep and the grandchild run");
        start = clock_now_usec();
        child_free(c);
        tap_ok(clock_now_usec() - start < 1 * USEC_PER_SEC, "child_free returns at once (%.3f s)",
               (double) (clock_now_usec() - start) / USEC_PER_SEC);
        tap_ok(process_state(pid) == 0, "the program is reaped by child_free, no zombie");
        tap_ok(group_gone(pid, 5), "no process of its group is left");
        (void) sd_event_run(e, 100 * USEC_PER_MSEC);
        tap_is_int(res.calls, 0, "no on_exit after child_free");
        free(res.output);
}

int main(void) {
        sd_event *e = NULL;
        struct result warm = { .free_in_callback = true };
        struct child *c = NULL;
        int fds_before;


        dir = make_scratch("test-child");
        log_path = xprintf("%s/log", dir);
        /* as otad (mqtt.c): writing to a program that exited must not kill us */
        signal(SIGPIPE, SIG_IGN);
        tap_ok(sd_event_default(&e) >= 0, "sd_event_default");
        child_free(NULL);

        /* the loop sets up what it keeps for all children (and a timerfd
         * for deadlines) on first use */
        tap_is_int(start_sh(e, "true", &(const struct child_options){ .timeout_usec = 10 * USEC_PER_SEC }, &warm, &c),
                   0, "start true");
        run_until_exit(e, &warm, 10);
        free(warm.output);
        fds_before = count_fds();

        test_output(e);
        test_statuses(e);
        test_inheritance(e);
        test_groups(e);

        tap_is_int(count_fds(), fds_before, "no fd leaked");
        sd_event_unref(e);
        remove_scratch(dir);
        free(dir);
        free(log_path);
        return tap_done();
}
