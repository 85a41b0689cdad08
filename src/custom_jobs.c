/* SPDX-License-Identifier: MIT */
/*
 * Custom job handlers: {"operation":"NAME"} runs <handler_dir>/NAME through
 * child.c: no shell, its own process group, the job document on stdin,
 * OTAD_JOB_ID/OTAD_THING_NAME in the environment, stdout/stderr to the
 * journal line by line, a timeout (SIGTERM, SIGKILL after a grace).
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "child.h"
#include "config.h"
#include "custom_jobs.h"
#include "jobs.h"
#include "log.h"
#include "macro.h"
#include "subprocess.h"

#define HANDLER_NAME "custom"
#define DETAIL_CHARS 1024 /* AWS: statusDetails values ≤ 1024 characters (§1.5) */
#define OUTPUT_KEEP 8192  /* bytes of stdout kept for statusDetails */

struct run {
        struct custom_jobs *owner;
        char *job_id;
        char *operation;
        struct child *child;
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
        child_free(r->child); /* kills its process group if it still runs */
        free(r->job_id);
        free(r->operation);
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

static void run_report(struct run *r, int wait_status, bool timed_out) {
        struct custom_jobs *cj = r->owner;
        char reason[128], out[4 * DETAIL_CHARS + 1];
        struct status_detail d[3] = { { NULL, NULL }, { NULL, NULL }, { NULL, NULL } };
        enum job_status status = JOB_FAILED;
        const char *output;
        size_t output_len;
        int ret;

        child_describe_exit(wait_status, timed_out, (uint64_t) cj->otad->config->jobs.handler_timeout * USEC_PER_SEC,
                            reason, sizeof(reason));
        if (!timed_out && WIFEXITED(wait_status) && WEXITSTATUS(wait_status) == 0)
                status = JOB_SUCCEEDED;
        d[0] = (struct status_detail){ "reason", reason };
        output = child_output(r->child, &output_len);
        if (custom_jobs_sanitize_output(output, output_len, out, sizeof(out), DETAIL_CHARS) > 0)
                d[1] = (struct status_detail){ "stdout", out };

        log_job(status == JOB_SUCCEEDED ? LOG_INFO : LOG_WARNING, r->job_id, NULL,
                "Job %s: handler %s finished: %s", r->job_id, r->operation, reason);
        ret = jobs_update(cj->otad->jobs, r->job_id, status, d, 0, NULL, NULL);
        if (ret < 0)
                log_job_errno(LOG_ERR, ret, r->job_id, NULL, "Job %s: failed to report %s: %m", r->job_id,
                              job_status_to_string(status));
}

static void on_handler_exit(struct child *c, int wait_status, bool timed_out, void *userdata) {
        struct run *r = userdata;

        if (!r->cancelled)
                run_report(r, wait_status, timed_out);
        else
                log_job(LOG_INFO, r->job_id, NULL, "Job %s: cancelled handler %s is gone", r->job_id,
                        r->operation);
        run_remove(r);
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

/* The handler sees otad's environment without OTAD_*, and the two it is
 * documented to get. */
static int handler_env(const struct custom_jobs *cj, const char *job_id, char ***ret) {
        _cleanup_free_ char *id = NULL, *thing = NULL;

        if (asprintf(&id, "OTAD_JOB_ID=%s", job_id) < 0) {
                id = NULL;
                return -ENOMEM;
        }
        if (asprintf(&thing, "OTAD_THING_NAME=%s", cj->otad->config->mqtt.thing_name) < 0) {
                thing = NULL;
                return -ENOMEM;
        }
        return subprocess_env_new((char *const[]){ id, thing, NULL }, ret);
}

static int run_spawn(struct custom_jobs *cj, struct run *r, const char *path, const char *document) {
        char *argv[] = { (char *) path, NULL };
        char **envp = NULL;
        int ret;

        ret = handler_env(cj, r->job_id, &envp);
        if (ret < 0)
                return ret;
        ret = child_start(cj->otad->event, argv,
                          &(const struct child_options){
                                  .name = r->operation,
                                  .job_id = r->job_id,
                                  .envp = envp,
                                  .input = document,
                                  .input_size = strlen(document),
                                  .timeout_usec = (uint64_t) cj->otad->config->jobs.handler_timeout * USEC_PER_SEC,
                                  .log_output = true,
                                  .keep_output = OUTPUT_KEEP,
                          },
                          on_handler_exit, r, &r->child);
        subprocess_argv_free(envp);
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
        _cleanup_free_ char *document = NULL;
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
        document = cJSON_PrintUnformatted(job->document);
        if (!r->job_id || !r->operation || !document) {
                run_free(r);
                return -ENOMEM;
        }

        /* Tell the service first that we took the job (the reference agent
         * says nothing until much later, §2.4; we improve on it). */
        d[0] = (struct status_detail){ "operation", r->operation };
        ret = jobs_update(cj->otad->jobs, r->job_id, JOB_IN_PROGRESS, d, 0, NULL, NULL);
        if (ret < 0)
                log_job_errno(LOG_WARNING, ret, r->job_id, NULL,
                              "Job %s: failed to report IN_PROGRESS: %m, continuing", r->job_id);

        ret = run_spawn(cj, r, path, document);
        if (ret < 0) {
                errno = -ret;
                snprintf(reason, reason_size, "failed to start %s: %m", path);
                run_free(r);
                return -EIO; /* FAILED: the document was fine */
        }
        r->next = cj->runs;
        cj->runs = r;
        log_job(LOG_INFO, r->job_id, NULL, "Job %s: started %s as process %d", r->job_id, path,
                (int) child_pid(r->child));
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
        log_job(LOG_NOTICE, r->job_id, NULL, "Job %s: stopping handler %s (process group %d)", r->job_id,
                r->operation, (int) child_pid(r->child));
        child_terminate(r->child);
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
                log_job(LOG_NOTICE, r->job_id, NULL, "Job %s: otad is stopping, killing handler %s", r->job_id,
                        r->operation);
                run_free(r);
        }
        free(cj);
}
