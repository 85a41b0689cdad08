/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <systemd/sd-journal.h>
#include <unistd.h>

#include "log.h"
#include "macro.h"

static int max_level = LOG_INFO;
static int use_journal;

static const char *const level_names[] = {
        [LOG_EMERG] = "emerg",   [LOG_ALERT] = "alert",  [LOG_CRIT] = "crit",
        [LOG_ERR] = "err",       [LOG_WARNING] = "warning", [LOG_NOTICE] = "notice",
        [LOG_INFO] = "info",     [LOG_DEBUG] = "debug",
};

/* systemd sets JOURNAL_STREAM=<dev>:<inode> of the stream it connected to
 * stdout/stderr; only when our stderr still is that stream do we own a
 * journal connection (otherwise stderr was redirected and the user wants
 * plain lines there). */
static int stderr_is_journal(void) {
        const char *e = getenv("JOURNAL_STREAM");
        unsigned long long dev, ino;
        struct stat st;

        if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2)
                return 0;
        if (fstat(STDERR_FILENO, &st) < 0)
                return 0;
        return (unsigned long long) st.st_dev == dev && (unsigned long long) st.st_ino == ino;
}

void log_open(void) {
        use_journal = stderr_is_journal();
}

void log_set_max_level(int level) {
        max_level = level;
}

int log_get_max_level(void) {
        return max_level;
}

int log_level_from_string(const char *s) {
        for (size_t i = 0; i < ELEMENTSOF(level_names); i++)
                if (level_names[i] && strcasecmp(level_names[i], s) == 0)
                        return (int) i;
        if (strcasecmp(s, "error") == 0)
                return LOG_ERR;
        if (strcasecmp(s, "warn") == 0)
                return LOG_WARNING;
        return -EINVAL;
}

const char *log_level_to_string(int level) {
        if (level < 0 || (size_t) level >= ELEMENTSOF(level_names))
                return NULL;
        return level_names[level];
}

static void log_to_journal(int level, const struct log_fields *f, const char *message) {
        char prio[sizeof("PRIORITY=") + 2];
        _cleanup_free_ char *msg = NULL, *mid = NULL, *job = NULL, *stage = NULL, *slot = NULL;
        struct iovec iov[7];
        size_t n = 0;

        snprintf(prio, sizeof(prio), "PRIORITY=%d", level);
        iov[n++] = (struct iovec){ prio, strlen(prio) };
        iov[n++] = (struct iovec){ (char *) "SYSLOG_IDENTIFIER=otad", strlen("SYSLOG_IDENTIFIER=otad") };
        if (asprintf(&msg, "MESSAGE=%s", message) < 0)
                return;
        iov[n++] = (struct iovec){ msg, strlen(msg) };
        if (f && f->message_id && asprintf(&mid, "MESSAGE_ID=%s", f->message_id) >= 0)
                iov[n++] = (struct iovec){ mid, strlen(mid) };
        if (f && f->job_id && asprintf(&job, "OTAD_JOB_ID=%s", f->job_id) >= 0)
                iov[n++] = (struct iovec){ job, strlen(job) };
        if (f && f->stage && asprintf(&stage, "OTAD_STAGE=%s", f->stage) >= 0)
                iov[n++] = (struct iovec){ stage, strlen(stage) };
        if (f && f->slot && asprintf(&slot, "OTAD_SLOT=%s", f->slot) >= 0)
                iov[n++] = (struct iovec){ slot, strlen(slot) };
        sd_journal_sendv(iov, (int) n);
}

/* Plain lines carry the same text; the job and stage go in front so that a
 * grep for the job id finds every line of it. */
static void log_to_stderr(int level, const struct log_fields *f, const char *message) {
        char context[256] = "";

        if (f && (f->job_id || f->stage || f->slot))
                snprintf(context, sizeof(context), "[%s%s%s%s%s] ",
                         f->job_id ? f->job_id : "",
                         f->job_id && f->stage ? " " : "", f->stage ? f->stage : "",
                         (f->job_id || f->stage) && f->slot ? " slot " : (f->slot ? "slot " : ""),
                         f->slot ? f->slot : "");
        fprintf(stderr, "otad: %s: %s%s\n", log_level_to_string(level), context, message);
}

int log_fullv(int level, int error, const struct log_fields *fields, const char *format, va_list ap) {
        int saved_errno = errno;
        char message[2048];

        if (error < 0)
                error = -error;
        if (level > max_level) {
                errno = saved_errno;
                return -error;
        }
        errno = error; /* for %m */
        vsnprintf(message, sizeof(message), format, ap);
        if (use_journal)
                log_to_journal(level, fields, message);
        else
                log_to_stderr(level, fields, message);
        errno = saved_errno;
        return -error;
}

int log_full(int level, int error, const struct log_fields *fields, const char *format, ...) {
        va_list ap;
        int r;

        va_start(ap, format);
        r = log_fullv(level, error, fields, format, ap);
        va_end(ap);
        return r;
}
