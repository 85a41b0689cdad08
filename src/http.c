/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>

#include <curl/curl.h>
#include <openssl/evp.h>
#include <systemd/sd-event.h>
#include <systemd/sd-id128.h>

#include "backoff.h"
#include "clock.h"
#include "config.h"
#include "fileio.h"
#include "http.h"
#include "log.h"
#include "macro.h"

/* Progress records (download.h). The bytes written are recorded every
 * RECORD_BYTES or RECORD_USEC without a flush: a kill -9 re-downloads at
 * most that plus what was on its way. Progress is made durable (target
 * sync + record with fsync) once a second when at least PERSIST_BYTES came
 * in, else every PERSIST_IDLE_USEC: a power cut re-downloads at most about
 * a second's worth (or 10 s on a slow link), and neither a fast link (a
 * sync per MiB costs 4/5 of the throughput on disk) nor a slow one (flash
 * wear) pays a sync per chunk. */
#define RECORD_BYTES (UINT64_C(256) << 10)
#define RECORD_USEC (200 * USEC_PER_MSEC)
#define PERSIST_BYTES (UINT64_C(1) << 20)
#define PERSIST_USEC (1 * USEC_PER_SEC)
#define PERSIST_IDLE_USEC (10 * USEC_PER_SEC)
#define PROGRESS_RESETS_RETRIES (UINT64_C(1) << 20)
#define BACKOFF_MIN_USEC (1 * USEC_PER_SEC)
#define BACKOFF_MAX_USEC (60 * USEC_PER_SEC)
/* Fresh URLs that brought no byte of progress before the job fails: a URL
 * S3 refuses right away three times is not going to start working. */
#define REFRESHES_WITHOUT_PROGRESS_MAX 3
/* No fresh URL this long after asking: ask again (counts as a refresh). */
#define NEED_URL_TIMEOUT_USEC (60 * USEC_PER_SEC)
/* S3's XML error bodies are small; more is not an error body. */
#define ERROR_BODY_MAX (64 * 1024)
#define RECORD_MAX 4096
#define RECORD_MAGIC "# otad HTTPS download progress\n"
#define CONNECT_TIMEOUT_S 30L
#define RECEIVE_BUFFER (128 * 1024L)

enum http_state {
        HTTP_WAITING,  /* attempt_timer armed: start, retry after backoff */
        HTTP_RUNNING,  /* a GET is in the multi handle */
        HTTP_NEED_URL, /* asked the owner for a fresh URL */
        HTTP_DONE,     /* finished() was called */
};

enum body_mode {
        BODY_UNCHECKED, /* no body byte seen yet for this response */
        BODY_WRITE,     /* a 200/206 we accepted: bytes go to the target */
        BODY_SWALLOW,   /* an error response: read and drop */
};

struct http_socket {
        curl_socket_t fd;
        sd_event_source *source;
        struct http_socket *next;
};

struct http_download {
        struct otad *otad;
        const struct download_ops *ops;
        void *userdata;

        char *job_id;
        unsigned file_index;
        uint64_t size;
        char signature_sha256[65];
        char *state_path; /* NULL: no progress record */

        char *url;     /* secret: never logged */
        char *url_log; /* scheme://host/path */

        CURLM *multi;
        CURL *easy;
        bool easy_added;
        struct http_socket *sockets;
        sd_event_source *curl_timer;
        sd_event_source *attempt_timer;
        enum http_state state;

        /* The current request. */
        uint64_t request_offset;
        enum body_mode body;
        bool have_content_range;
        uint64_t range_start;
        uint64_t range_total; /* UINT64_MAX: "*" */
        size_t error_body;
        int abort_error; /* a decision made inside a curl callback */
        char abort_reason[256];
        char curl_error[CURL_ERROR_SIZE];

        uint64_t offset;
        uint64_t persisted;    /* durable: synced, then recorded with fsync */
        uint64_t persisted_at; /* CLOCK_MONOTONIC usec */
        uint64_t recorded;     /* the record's count for this boot */
        uint64_t recorded_at;
        sd_id128_t boot_id;    /* null: unknown, durable records only */
        uint64_t offset_at_refresh;
        unsigned failures; /* consecutive attempts without progress */
        struct backoff backoff;
        unsigned refreshes_without_progress;
        long refused_code; /* the HTTP status that made us ask for a URL */
        struct http_download_stats stats;
};

static int sha256_hex(const void *data, size_t len, char out[static 65]) {
        static const char digits[] = "0123456789abcdef";
        uint8_t md[32];
        unsigned md_len = 0;

        if (EVP_Digest(data, len, md, &md_len, EVP_sha256(), NULL) != 1 || md_len != 32)
                return -EIO;
        for (size_t i = 0; i < 32; i++) {
                out[2 * i] = digits[md[i] >> 4];
                out[2 * i + 1] = digits[md[i] & 0xf];
        }
        out[64] = '\0';
        return 0;
}

int http_url_for_log(const char *url, char **ret) {
        CURLU *u = curl_url();
        char *scheme = NULL, *host = NULL, *port = NULL, *path = NULL;
        int r = -EINVAL;

        if (!u)
                return -ENOMEM;
        if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
            curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
            curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
            curl_url_get(u, CURLUPART_PATH, &path, 0) != CURLUE_OK)
                goto out;
        (void) curl_url_get(u, CURLUPART_PORT, &port, 0); /* absent: default port */
        if (asprintf(ret, "%s://%s%s%s%s", scheme, host, port ? ":" : "", port ? port : "", path) < 0) {
                r = -ENOMEM;
                goto out;
        }
        r = 0;
out:
        curl_free(scheme);
        curl_free(host);
        curl_free(port);
        curl_free(path);
        curl_url_cleanup(u);
        return r;
}

/* The progress record: identity lines, the bytes written in boot boot_id
 * (true as long as that boot lasts), the bytes durable (synced before the
 * record said so: true after a power cut) and a SHA-256 over everything
 * before it, so a torn or edited record is recognised and the download
 * starts from 0 instead of trusting it. Version 1 had only offset=, always
 * durable. */
static int record_format(const char *job_id, unsigned file_index, uint64_t size, const char *sig_sha256,
                         const char *boot_id, uint64_t written, uint64_t offset, char **ret) {
        _cleanup_free_ char *body = NULL;
        char sum[65];
        int r;

        if (boot_id)
                r = asprintf(&body, RECORD_MAGIC "version=2\njob_id=%s\nfile_index=%u\nsize=%" PRIu64
                             "\nsignature_sha256=%s\nboot_id=%s\nwritten=%" PRIu64 "\noffset=%" PRIu64 "\n",
                             job_id, file_index, size, sig_sha256, boot_id, written, offset);
        else
                r = asprintf(&body, RECORD_MAGIC "version=1\njob_id=%s\nfile_index=%u\nsize=%" PRIu64
                             "\nsignature_sha256=%s\noffset=%" PRIu64 "\n",
                             job_id, file_index, size, sig_sha256, offset);
        if (r < 0)
                return -ENOMEM;
        r = sha256_hex(body, strlen(body), sum);
        if (r < 0)
                return r;
        if (asprintf(ret, "%schecksum=%s\n", body, sum) < 0)
                return -ENOMEM;
        return 0;
}

static bool parse_u64(const char *s, uint64_t *ret) {
        char *end;

        if (*s < '0' || *s > '9')
                return false;
        errno = 0;
        unsigned long long v = strtoull(s, &end, 10);
        if (errno != 0 || *end != '\0')
                return false;
        *ret = v;
        return true;
}

/* The value of "\nkey=" in text, up to the end of its line; NULL if none. */
static char *record_value(const char *text, const char *key) {
        _cleanup_free_ char *needle = NULL;
        const char *p;

        if (asprintf(&needle, "\n%s=", key) < 0)
                return NULL;
        p = strstr(text, needle);
        if (!p)
                return NULL;
        p += strlen(needle);
        return strndup(p, strcspn(p, "\n"));
}

/* What a record at path grants to this identity: *ret_offset the bytes to
 * resume from (written when the record was made in this boot, else
 * durable), *ret_durable the durable ones; both 0 when the record is
 * missing, damaged or about something else. Rather than trusting keys one
 * by one, the record this identity would have with the claimed values is
 * rebuilt and compared byte for byte: any difference in identity, format
 * or checksum means "not ours". */
static void record_resume_offset(const char *path, const char *job_id, unsigned file_index, uint64_t size,
                                 const char *sig_sha256, const char *boot_id, uint64_t *ret_offset,
                                 uint64_t *ret_durable) {
        _cleanup_free_ char *text = NULL, *want = NULL, *offset_text = NULL, *written_text = NULL,
                                    *boot_text = NULL;
        uint64_t offset = 0, written = 0;

        *ret_offset = *ret_durable = 0;
        if (!path || read_file_full(path, RECORD_MAX, &text, NULL) < 0)
                return;
        offset_text = record_value(text, "offset");
        if (!offset_text || !parse_u64(offset_text, &offset) || offset > size)
                return;
        written_text = record_value(text, "written");
        boot_text = record_value(text, "boot_id");
        if (written_text && boot_text) {
                if (!parse_u64(written_text, &written) || written > size || written < offset ||
                    record_format(job_id, file_index, size, sig_sha256, boot_text, written, offset, &want) < 0 ||
                    strcmp(text, want) != 0)
                        return;
                *ret_durable = offset;
                /* Another boot: the page cache that held the bytes written
                 * but not synced is gone (a power cut, or a reboot). */
                *ret_offset = boot_id && strcmp(boot_text, boot_id) == 0 ? written : offset;
                return;
        }
        if (record_format(job_id, file_index, size, sig_sha256, NULL, 0, offset, &want) < 0 || strcmp(text, want) != 0)
                return;
        *ret_offset = *ret_durable = offset;
}

static bool identity_storable(const char *s) {
        for (; *s; s++)
                if ((unsigned char) *s < 0x20 || *s == 0x7f)
                        return false;
        return true;
}

/* The running boot's id as text, "" when it cannot be read (then records
 * count durable bytes only). */
static void boot_id_text(sd_id128_t *ret_id, char ret[static SD_ID128_STRING_MAX]) {
        if (sd_id128_get_boot(ret_id) < 0)
                *ret_id = SD_ID128_NULL;
        if (sd_id128_is_null(*ret_id))
                ret[0] = '\0';
        else
                sd_id128_to_string(*ret_id, ret);
}

uint64_t http_progress_resume_offset(const struct download_file *file) {
        char sig[65], boot[SD_ID128_STRING_MAX];
        const char *s = file->signature ? file->signature : "";
        uint64_t offset, durable;
        sd_id128_t id;

        if (!file->state_path || !file->job_id || !identity_storable(file->job_id) ||
            sha256_hex(s, strlen(s), sig) < 0)
                return 0;
        boot_id_text(&id, boot);
        record_resume_offset(file->state_path, file->job_id, file->file_index, file->size, sig,
                             boot[0] ? boot : NULL, &offset, &durable);
        return offset;
}

/* A record of written bytes (in this boot) and durable ones. sync: the
 * record itself durable too; else it survives a kill, not a power cut. */
static int record_write(struct http_download *d, uint64_t written, uint64_t durable, bool sync) {
        _cleanup_free_ char *text = NULL;
        char boot[SD_ID128_STRING_MAX] = "";
        int r;

        if (!d->state_path)
                return 0;
        if (!sd_id128_is_null(d->boot_id))
                sd_id128_to_string(d->boot_id, boot);
        else
                written = durable;
        r = record_format(d->job_id, d->file_index, d->size, d->signature_sha256, boot[0] ? boot : NULL, written,
                          durable, &text);
        if (r < 0)
                return r;
        if (sync)
                return write_file_atomic(d->state_path, text, strlen(text), 0600);
        return write_file_replace(d->state_path, text, strlen(text), 0600);
}

static uint64_t now_usec(struct http_download *d) {
        uint64_t now = 0;
        (void) sd_event_now(d->otad->event, CLOCK_MONOTONIC, &now);
        return now;
}

/* Data reaches the target and is synced before the record that counts it
 * as durable (download.h). */
static int progress_save(struct http_download *d) {
        int r;

        if (d->offset == d->persisted && d->offset == d->recorded)
                return 0;
        if (d->offset > d->persisted && d->ops->sync) {
                r = d->ops->sync(d->userdata);
                if (r < 0)
                        return r;
        }
        r = record_write(d, d->offset, d->offset, true);
        if (r < 0)
                return r;
        d->persisted = d->recorded = d->offset;
        d->persisted_at = d->recorded_at = now_usec(d);
        d->stats.persisted = d->persisted;
        return 0;
}

/* What a kill -9 would resume from, without a sync: the bytes written are
 * with the kernel (download_ops.write), the record says so for this boot. */
static int progress_record(struct http_download *d) {
        int r;

        if (d->offset == d->recorded || sd_id128_is_null(d->boot_id))
                return 0;
        r = record_write(d, d->offset, d->persisted, false);
        if (r < 0)
                return r;
        d->recorded = d->offset;
        d->recorded_at = now_usec(d);
        return 0;
}

/* The bytes are back at 0 (the server ignored Range, or the object is not
 * the one the record was for): a record that counts none of them. */
static int progress_reset(struct http_download *d) {
        int r;

        d->offset = 0;
        d->stats.restarts++;
        r = record_write(d, 0, 0, true);
        if (r < 0)
                return r;
        d->persisted = d->recorded = 0;
        d->stats.persisted = 0;
        return 0;
}

/* Ends the transfer. The owner may free d in finished(), so callers return
 * right after this without touching d. */
static void finish(struct http_download *d, int result, const char *reason) {
        if (d->state == HTTP_DONE)
                return;
        d->state = HTTP_DONE;
        if (d->attempt_timer)
                (void) sd_event_source_set_enabled(d->attempt_timer, SD_EVENT_OFF);
        if (result < 0)
                log_full(LOG_ERR, result, &(const struct log_fields){ .job_id = d->job_id, .stage = "download" },
                         "HTTPS download of %s failed at %" PRIu64 "/%" PRIu64 " bytes: %s",
                         d->url_log, d->offset, d->size, reason);
        else
                log_job(LOG_INFO, d->job_id, "download",
                        "HTTPS download of %s complete: %" PRIu64 " bytes, %u requests, %u retries, %u fresh URLs",
                        d->url_log, d->size, d->stats.requests, d->stats.retries, d->stats.url_refreshes);
        d->ops->finished(result, reason, d->userdata);
}

/* finish() with a reason formatted like a log line: %m names -error. */
__attribute__((format(printf, 3, 4)))
static void finish_errno(struct http_download *d, int error, const char *format, ...) {
        char reason[512];
        va_list ap;

        errno = error < 0 ? -error : error;
        va_start(ap, format);
        vsnprintf(reason, sizeof(reason), format, ap);
        va_end(ap);
        finish(d, error, reason);
}

static int arm_attempt_timer(struct http_download *d, uint64_t delay_usec) {
        int r = sd_event_source_set_time(d->attempt_timer, now_usec(d) + delay_usec);
        if (r < 0)
                return r;
        return sd_event_source_set_enabled(d->attempt_timer, SD_EVENT_ONESHOT);
}

static int schedule_attempt(struct http_download *d, uint64_t delay_usec) {
        d->state = HTTP_WAITING;
        return arm_attempt_timer(d, delay_usec);
}

static int start_request(struct http_download *d) {
        char range[48];
        CURLMcode mc;

        d->request_offset = d->offset;
        d->body = BODY_UNCHECKED;
        d->have_content_range = false;
        d->range_start = 0;
        d->range_total = UINT64_MAX;
        d->error_body = 0;
        d->abort_error = 0;
        d->abort_reason[0] = '\0';
        d->curl_error[0] = '\0';

        /* Always ask for a range, also from 0: the 206's Content-Range then
         * tells the object's size before a byte is written. */
        snprintf(range, sizeof(range), "%" PRIu64 "-", d->offset);
        if (curl_easy_setopt(d->easy, CURLOPT_URL, d->url) != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_RANGE, range) != CURLE_OK)
                return -ENOMEM;
        mc = curl_multi_add_handle(d->multi, d->easy);
        if (mc != CURLM_OK)
                return mc == CURLM_OUT_OF_MEMORY ? -ENOMEM : -EIO;
        d->easy_added = true;
        d->state = HTTP_RUNNING;
        d->stats.requests++;
        log_job(LOG_DEBUG, d->job_id, "download", "GET %s Range: bytes=%s", d->url_log, range);
        return 0;
}

static void ask_for_fresh_url(struct http_download *d, long code);

static int on_attempt_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct http_download *d = userdata;
        int r;

        if (d->state == HTTP_NEED_URL) {
                /* The owner's job refresh got lost: ask again (bounded). */
                ask_for_fresh_url(d, d->refused_code);
                return 0;
        }

        if (d->offset == d->size) {
                /* A record said everything is there (and it was synced
                 * before the record was written). */
                finish(d, 0, "complete");
                return 0;
        }
        r = start_request(d);
        if (r < 0)
                finish_errno(d, r, "failed to start the HTTPS request for %s: %m", d->url_log);
        return 0;
}

static void retry_or_fail(struct http_download *d, int error, const char *what) {
        char reason[512];
        int r;

        /* A request that moved the download on substantially starts the
         * budget afresh; a server trickling a few bytes per connection does
         * not, or it could keep us retrying for the whole file. */
        if (d->offset >= d->request_offset + PROGRESS_RESETS_RETRIES) {
                d->failures = 0;
                backoff_reset(&d->backoff);
        }
        d->failures++;
        if (d->failures > (unsigned) d->otad->config->ota.http_retries) {
                snprintf(reason, sizeof(reason), "%s (gave up after %u retries)", what, d->failures - 1);
                finish(d, error, reason);
                return;
        }

        uint64_t delay = backoff_next(&d->backoff);
        d->stats.retries++;
        log_full(LOG_WARNING, 0, &(const struct log_fields){ .job_id = d->job_id, .stage = "download" },
                 "HTTPS download of %s interrupted at %" PRIu64 "/%" PRIu64 " bytes: %s; retry %u/%" PRId64
                 " in %" PRIu64 " ms",
                 d->url_log, d->offset, d->size, what, d->failures, d->otad->config->ota.http_retries,
                 delay / USEC_PER_MSEC);
        r = schedule_attempt(d, delay);
        if (r < 0)
                finish_errno(d, r, "failed to schedule a retry: %m");
}

static void ask_for_fresh_url(struct http_download *d, long code) {
        char reason[512];
        int r;

        if (d->offset > d->offset_at_refresh)
                d->refreshes_without_progress = 0;
        d->offset_at_refresh = d->offset;
        if (++d->refreshes_without_progress > REFRESHES_WITHOUT_PROGRESS_MAX) {
                snprintf(reason, sizeof(reason),
                         "HTTPS server refused %s with HTTP %ld after %u fresh URLs in a row brought no byte "
                         "(expected 206 for a presigned URL the job just handed out)",
                         d->url_log, code, REFRESHES_WITHOUT_PROGRESS_MAX);
                finish(d, -EACCES, reason);
                return;
        }
        d->state = HTTP_NEED_URL;
        d->refused_code = code;
        d->stats.url_refreshes++;
        r = arm_attempt_timer(d, NEED_URL_TIMEOUT_USEC);
        if (r < 0) {
                finish_errno(d, r, "failed to arm the fresh-URL timeout: %m");
                return;
        }
        log_job(LOG_NOTICE, d->job_id, "download",
                "HTTPS server refused %s with HTTP %ld (expired presigned URL?) at %" PRIu64 "/%" PRIu64
                " bytes, asking for a fresh URL",
                d->url_log, code, d->offset, d->size);
        d->ops->need_fresh_url(d->userdata);
}

static bool tls_trust_error(CURLcode res) {
        return res == CURLE_PEER_FAILED_VERIFICATION || res == CURLE_SSL_CACERT_BADFILE ||
               res == CURLE_SSL_ISSUER_ERROR || res == CURLE_SSL_PINNEDPUBKEYNOTMATCH;
}

/* One request ended: decide what comes next. Every path ends in finish(),
 * a scheduled attempt or a fresh-URL request. */
static void request_done(struct http_download *d, CURLcode res) {
        char what[CURL_ERROR_SIZE + 512];
        long code = 0;
        int r;

        (void) curl_easy_getinfo(d->easy, CURLINFO_RESPONSE_CODE, &code);
        curl_multi_remove_handle(d->multi, d->easy);
        d->easy_added = false;

        /* Whatever happens next, keep what was received. A decision made
         * inside a callback (e.g. a failed write) is the cause to report
         * even when saving fails too. */
        r = progress_save(d);
        if (d->abort_error < 0) {
                finish(d, d->abort_error, d->abort_reason);
                return;
        }
        if (r < 0) {
                finish_errno(d, r, "failed to save download progress to %s: %m", d->state_path);
                return;
        }
        /* protocol.md §4: 400/403/404 mean the presigned URL stopped working. */
        if (code == 400 || code == 403 || code == 404) {
                ask_for_fresh_url(d, code);
                return;
        }
        if (code == 416) {
                if (d->request_offset == 0) {
                        snprintf(what, sizeof(what),
                                 "server has no bytes at offset 0 (HTTP 416), the job's filesize is %" PRIu64
                                 " bytes; the object and the job document disagree", d->size);
                        finish(d, -EMSGSIZE, what);
                        return;
                }
                /* Our offset is past the server's end: the object is not
                 * the one the record was for. Start again at 0. */
                r = progress_reset(d);
                if (r < 0) {
                        finish_errno(d, r, "failed to save download progress to %s: %m", d->state_path);
                        return;
                }
                snprintf(what, sizeof(what), "server has no bytes from %" PRIu64 " on (HTTP 416), below filesize %" PRIu64,
                         d->request_offset, d->size);
                retry_or_fail(d, -EPROTO, what);
                return;
        }
        if (res == CURLE_OK && (code == 200 || code == 206)) {
                if (d->offset == d->size) {
                        finish(d, 0, "complete");
                        return;
                }
                snprintf(what, sizeof(what), "body ended at %" PRIu64 " of %" PRIu64 " bytes", d->offset, d->size);
                retry_or_fail(d, -EPIPE, what);
                return;
        }
        if (code >= 300 && code != 408 && code != 429 && code < 500) {
                snprintf(what, sizeof(what), "HTTPS server answered HTTP %ld, expected 200 or 206", code);
                finish(d, -EPROTO, what);
                return;
        }
        if (tls_trust_error(res)) {
                snprintf(what, sizeof(what), "server certificate not trusted (checked against %s): %s",
                         d->otad->config->ota.http_ca_file && d->otad->config->ota.http_ca_file[0]
                                 ? d->otad->config->ota.http_ca_file
                                 : "the system's CA certificates",
                         d->curl_error[0] ? d->curl_error : curl_easy_strerror(res));
                finish(d, -EKEYREJECTED, what);
                return;
        }
        if (code >= 400)
                snprintf(what, sizeof(what), "HTTPS server answered HTTP %ld, expected 200 or 206", code);
        else
                snprintf(what, sizeof(what), "%s", d->curl_error[0] ? d->curl_error : curl_easy_strerror(res));
        retry_or_fail(d, res == CURLE_OPERATION_TIMEDOUT ? -ETIMEDOUT : -EIO, what);
}

static void check_multi_info(struct http_download *d) {
        CURLMsg *msg;
        int left;

        while ((msg = curl_multi_info_read(d->multi, &left))) {
                if (msg->msg == CURLMSG_DONE && msg->easy_handle == d->easy && d->easy_added) {
                        /* d may be gone after this. One easy handle, so
                         * there is nothing else to read. */
                        request_done(d, msg->data.result);
                        return;
                }
        }
}

static int on_curl_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct http_download *d = userdata;
        int flags = 0, running = 0;

        if (revents & EPOLLIN)
                flags |= CURL_CSELECT_IN;
        if (revents & EPOLLOUT)
                flags |= CURL_CSELECT_OUT;
        if (revents & (EPOLLERR | EPOLLHUP))
                flags |= CURL_CSELECT_ERR;
        (void) curl_multi_socket_action(d->multi, fd, flags, &running);
        check_multi_info(d);
        return 0;
}

static int on_curl_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct http_download *d = userdata;
        int running = 0;

        (void) curl_multi_socket_action(d->multi, CURL_SOCKET_TIMEOUT, 0, &running);
        check_multi_info(d);
        return 0;
}

/* CURLMOPT_SOCKETFUNCTION: curl tells which sockets to watch for what. */
static int curl_socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp) {
        struct http_download *d = userp;
        struct http_socket *sock = socketp;
        uint32_t events = 0;
        int r;

        if (what == CURL_POLL_REMOVE) {
                if (!sock)
                        return 0;
                for (struct http_socket **p = &d->sockets; *p; p = &(*p)->next)
                        if (*p == sock) {
                                *p = sock->next;
                                break;
                        }
                sd_event_source_disable_unref(sock->source);
                free(sock);
                curl_multi_assign(d->multi, fd, NULL);
                return 0;
        }

        if (what == CURL_POLL_IN || what == CURL_POLL_INOUT)
                events |= EPOLLIN;
        if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT)
                events |= EPOLLOUT;

        if (sock)
                return sd_event_source_set_io_events(sock->source, events) < 0 ? -1 : 0;

        sock = calloc(1, sizeof(*sock));
        if (!sock)
                return -1;
        r = sd_event_add_io(d->otad->event, &sock->source, fd, events, on_curl_io, d);
        if (r < 0) {
                free(sock);
                return -1;
        }
        sock->fd = fd;
        sock->next = d->sockets;
        d->sockets = sock;
        curl_multi_assign(d->multi, fd, sock);
        return 0;
}

/* CURLMOPT_TIMERFUNCTION: one timer for all of curl's timeouts. */
static int curl_timer_cb(CURLM *multi, long timeout_ms, void *userp) {
        struct http_download *d = userp;
        uint64_t when;
        int r;

        if (timeout_ms < 0)
                return d->curl_timer && sd_event_source_set_enabled(d->curl_timer, SD_EVENT_OFF) < 0 ? -1 : 0;

        when = now_usec(d) + (uint64_t) timeout_ms * USEC_PER_MSEC;
        if (!d->curl_timer) {
                r = sd_event_add_time(d->otad->event, &d->curl_timer, CLOCK_MONOTONIC, when, USEC_PER_MSEC,
                                      on_curl_timer, d);
                return r < 0 ? -1 : 0;
        }
        if (sd_event_source_set_time(d->curl_timer, when) < 0 ||
            sd_event_source_set_enabled(d->curl_timer, SD_EVENT_ONESHOT) < 0)
                return -1;
        return 0;
}

__attribute__((format(printf, 3, 4)))
static size_t abort_body(struct http_download *d, int error, const char *format, ...) {
        va_list ap;

        errno = error < 0 ? -error : error; /* for %m */
        va_start(ap, format);
        vsnprintf(d->abort_reason, sizeof(d->abort_reason), format, ap);
        va_end(ap);
        d->abort_error = error;
        return 0; /* anything but the length makes curl stop with CURLE_WRITE_ERROR */
}

/* The first body byte of a response: decide whether its bytes are ours. */
static size_t check_response(struct http_download *d) {
        long code = 0;
        curl_off_t length = -1;
        int r;

        (void) curl_easy_getinfo(d->easy, CURLINFO_RESPONSE_CODE, &code);
        if (code != 200 && code != 206) {
                d->body = BODY_SWALLOW;
                return 1;
        }
        if (code == 206) {
                if (!d->have_content_range)
                        return abort_body(d, -EPROTO, "server answered 206 without a valid Content-Range, expected "
                                          "one for bytes %" PRIu64 "- of %" PRIu64, d->request_offset, d->size);
                if (d->range_total != UINT64_MAX && d->range_total != d->size)
                        return abort_body(d, -EMSGSIZE, "server has %" PRIu64 " bytes, filesize is %" PRIu64
                                          "; the object and the job document disagree", d->range_total, d->size);
                if (d->range_start != d->request_offset)
                        return abort_body(d, -EPROTO, "asked for bytes from %" PRIu64 ", the server sent them from %" PRIu64,
                                          d->request_offset, d->range_start);
                d->body = BODY_WRITE;
                return 1;
        }

        (void) curl_easy_getinfo(d->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length);
        if (length >= 0 && (uint64_t) length != d->size)
                return abort_body(d, -EMSGSIZE, "server has %" PRId64 " bytes, filesize is %" PRIu64
                                  "; the object and the job document disagree", (int64_t) length, d->size);
        if (d->request_offset > 0) {
                /* A 200 to a Range request: the server ignored the range and
                 * sends the file from byte 0. Count nothing of before until
                 * it is written again. */
                log_job(LOG_NOTICE, d->job_id, "download",
                        "HTTPS server ignored Range for %s, downloading again from 0", d->url_log);
                d->request_offset = 0;
                r = progress_reset(d);
                if (r < 0)
                        return abort_body(d, r, "failed to save download progress to %s: %m", d->state_path);
        }
        d->body = BODY_WRITE;
        return 1;
}

static size_t curl_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata) {
        struct http_download *d = userdata;
        size_t len = size * nmemb;
        int r;

        if (d->body == BODY_UNCHECKED && check_response(d) == 0)
                return 0;
        if (d->body == BODY_SWALLOW) {
                d->error_body += len;
                return d->error_body > ERROR_BODY_MAX ? 0 : len;
        }

        if (len > d->size - d->offset)
                return abort_body(d, -EMSGSIZE, "server sent more than filesize (%" PRIu64
                                  " bytes); the object and the job document disagree", d->size);
        r = d->ops->write(d->offset, ptr, len, d->userdata);
        if (r < 0)
                return abort_body(d, r, "failed to write %zu bytes at offset %" PRIu64 " to the target: %m", len,
                                  d->offset);
        d->offset += len;
        d->stats.offset = d->offset;
        d->stats.bytes_received += len;
        if (d->ops->progress)
                d->ops->progress(d->offset, d->size, d->userdata);

        uint64_t now = now_usec(d), since = now - d->persisted_at;
        r = 0;
        if ((since >= PERSIST_USEC && d->offset - d->persisted >= PERSIST_BYTES) || since >= PERSIST_IDLE_USEC)
                r = progress_save(d);
        else if (d->offset - d->recorded >= RECORD_BYTES || now - d->recorded_at >= RECORD_USEC)
                r = progress_record(d);
        if (r < 0)
                return abort_body(d, r, "failed to save download progress to %s: %m", d->state_path);
        return len;
}

/* "bytes 100-199/1000" or "bytes * /1000" without the space (RFC 9110 §14.4). */
static void parse_content_range(struct http_download *d, const char *v, size_t len) {
        char buf[128];
        char *p, *end;

        if (len >= sizeof(buf))
                return;
        memcpy(buf, v, len);
        buf[len] = '\0';
        buf[strcspn(buf, "\r\n")] = '\0';
        p = buf + strspn(buf, " \t");
        if (strncasecmp(p, "bytes ", 6) != 0)
                return;
        p += 6;
        if (*p == '*') {
                p++;
        } else {
                if (*p < '0' || *p > '9')
                        return;
                d->range_start = strtoull(p, &end, 10);
                if (*end != '-')
                        return;
                p = end + 1;
                if (*p < '0' || *p > '9')
                        return;
                (void) strtoull(p, &end, 10);
                p = end;
        }
        if (*p != '/')
                return;
        p++;
        if (*p == '*')
                d->range_total = UINT64_MAX;
        else {
                if (*p < '0' || *p > '9')
                        return;
                errno = 0;
                d->range_total = strtoull(p, &end, 10);
                if (errno != 0 || (*end != '\0' && *end != ' ' && *end != '\t'))
                        return;
        }
        d->have_content_range = true;
}

static size_t curl_header_cb(char *buffer, size_t size, size_t nitems, void *userdata) {
        struct http_download *d = userdata;
        size_t len = size * nitems;
        static const char cr[] = "content-range:";

        if (len >= 5 && memcmp(buffer, "HTTP/", 5) == 0) {
                /* A new response (after a redirect or 100): forget the last. */
                d->have_content_range = false;
                d->range_start = 0;
                d->range_total = UINT64_MAX;
        } else if (len > sizeof(cr) - 1 && strncasecmp(buffer, cr, sizeof(cr) - 1) == 0)
                parse_content_range(d, buffer + sizeof(cr) - 1, len - (sizeof(cr) - 1));
        return len;
}

static int easy_setup(struct http_download *d) {
        const struct otad_config *c = d->otad->config;
        CURL *e = d->easy;
        bool ok = true;

#define SET(opt, val) ok = ok && curl_easy_setopt(e, opt, val) == CURLE_OK
        SET(CURLOPT_NOSIGNAL, 1L);
        SET(CURLOPT_PROTOCOLS_STR, "https");
        SET(CURLOPT_REDIR_PROTOCOLS_STR, "https");
        SET(CURLOPT_FOLLOWLOCATION, 1L);
        SET(CURLOPT_MAXREDIRS, 3L);
        SET(CURLOPT_SSL_VERIFYPEER, 1L);
        SET(CURLOPT_SSL_VERIFYHOST, 2L);
        SET(CURLOPT_SSLVERSION, (long) CURL_SSLVERSION_TLSv1_2);
        if (c->ota.http_ca_file && c->ota.http_ca_file[0])
                SET(CURLOPT_CAINFO, c->ota.http_ca_file);
        SET(CURLOPT_CONNECTTIMEOUT, CONNECT_TIMEOUT_S);
        /* A stalled transfer is aborted and retried from where it stopped. */
        SET(CURLOPT_LOW_SPEED_LIMIT, (long) c->ota.http_low_speed_limit);
        SET(CURLOPT_LOW_SPEED_TIME, (long) c->ota.http_low_speed_time);
        SET(CURLOPT_TCP_KEEPALIVE, 1L);
        SET(CURLOPT_BUFFERSIZE, RECEIVE_BUFFER);
        SET(CURLOPT_HTTP_CONTENT_DECODING, 0L);
        SET(CURLOPT_USERAGENT, "otad/" OTAD_VERSION);
        SET(CURLOPT_ERRORBUFFER, d->curl_error);
        SET(CURLOPT_WRITEFUNCTION, curl_write_cb);
        SET(CURLOPT_WRITEDATA, d);
        SET(CURLOPT_HEADERFUNCTION, curl_header_cb);
        SET(CURLOPT_HEADERDATA, d);
#undef SET
        return ok ? 0 : -EINVAL;
}

/* -EINVAL for anything but https://: presigned S3 URLs are, and a plain or
 * local URL would skip the server's authentication. */
static int url_check(const char *url, char **ret_log) {
        if (!url || strncasecmp(url, "https://", 8) != 0) {
                log_error("Refusing download URL: only https:// URLs are accepted");
                return -EINVAL;
        }
        return http_url_for_log(url, ret_log);
}

void http_download_free(struct http_download *d) {
        if (!d)
                return;
        sd_event_source_disable_unref(d->attempt_timer);
        if (d->multi && d->easy && d->easy_added)
                curl_multi_remove_handle(d->multi, d->easy);
        if (d->easy)
                curl_easy_cleanup(d->easy);
        if (d->multi)
                curl_multi_cleanup(d->multi);
        /* Sockets curl did not say goodbye to during cleanup. */
        while (d->sockets) {
                struct http_socket *s = d->sockets;
                d->sockets = s->next;
                sd_event_source_disable_unref(s->source);
                free(s);
        }
        sd_event_source_disable_unref(d->curl_timer);
        free(d->job_id);
        free(d->state_path);
        free(d->url);
        free(d->url_log);
        free(d);
        curl_global_cleanup();
}

static inline void http_download_freep(struct http_download **d) {
        http_download_free(*d);
}

int http_download_new(struct otad *otad, const char *url, const struct download_file *file,
                      const struct download_ops *ops, void *userdata, struct http_download **ret) {
        _cleanup_(http_download_freep) struct http_download *d = NULL;
        const char *sig = file->signature ? file->signature : "";
        int r;

        if (file->size == 0 || !file->job_id || !ops || !ops->write || !ops->finished || !ops->need_fresh_url)
                return -EINVAL;

        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
                return -EIO;
        d = calloc(1, sizeof(*d));
        if (!d) {
                curl_global_cleanup();
                return -ENOMEM;
        }
        d->otad = otad;
        d->ops = ops;
        d->userdata = userdata;
        d->backoff = BACKOFF_INIT(BACKOFF_MIN_USEC, BACKOFF_MAX_USEC);
        d->file_index = file->file_index;
        d->size = file->size;
        d->stats.size = file->size;

        r = url_check(url, &d->url_log);
        if (r < 0)
                return r;
        d->url = strdup(url);
        d->job_id = strdup(file->job_id);
        if (!d->url || !d->job_id)
                return -ENOMEM;
        if (file->state_path) {
                if (identity_storable(file->job_id)) {
                        d->state_path = strdup(file->state_path);
                        if (!d->state_path)
                                return -ENOMEM;
                } else
                        log_job(LOG_WARNING, d->job_id, "download",
                                "Job id has control characters, download progress will not be saved");
        }
        r = sha256_hex(sig, strlen(sig), d->signature_sha256);
        if (r < 0)
                return r;

        d->multi = curl_multi_init();
        d->easy = curl_easy_init();
        if (!d->multi || !d->easy)
                return -ENOMEM;
        if (curl_multi_setopt(d->multi, CURLMOPT_SOCKETFUNCTION, curl_socket_cb) != CURLM_OK ||
            curl_multi_setopt(d->multi, CURLMOPT_SOCKETDATA, d) != CURLM_OK ||
            curl_multi_setopt(d->multi, CURLMOPT_TIMERFUNCTION, curl_timer_cb) != CURLM_OK ||
            curl_multi_setopt(d->multi, CURLMOPT_TIMERDATA, d) != CURLM_OK)
                return -EINVAL;
        r = easy_setup(d);
        if (r < 0)
                return r;

        r = sd_event_add_time(otad->event, &d->attempt_timer, CLOCK_MONOTONIC, 0, USEC_PER_MSEC,
                              on_attempt_timer, d);
        if (r < 0)
                return r;

        char boot[SD_ID128_STRING_MAX];

        boot_id_text(&d->boot_id, boot);
        if (d->state_path)
                record_resume_offset(d->state_path, d->job_id, d->file_index, d->size, d->signature_sha256,
                                     boot[0] ? boot : NULL, &d->offset, &d->persisted);
        d->recorded = d->offset;
        d->persisted_at = d->recorded_at = now_usec(d);
        d->offset_at_refresh = d->offset;
        d->stats.offset = d->stats.resumed_from = d->offset;
        d->stats.persisted = d->persisted;
        if (d->offset > 0)
                log_job(LOG_INFO, d->job_id, "download",
                        "Resuming HTTPS download of %s at %" PRIu64 "/%" PRIu64 " bytes (%" PRIu64 " of them synced)",
                        d->url_log, d->offset, d->size, d->persisted);
        else {
                /* A record for anything else must not survive to be
                 * mistaken for ours later. */
                r = record_write(d, 0, 0, true);
                if (r < 0)
                        return r;
        }

        r = schedule_attempt(d, 0);
        if (r < 0)
                return r;
        *ret = take_ptr(&d);
        return 0;
}

int http_download_set_url(struct http_download *d, const char *url) {
        _cleanup_free_ char *copy = NULL, *log_form = NULL;
        int r;

        if (d->state == HTTP_DONE)
                return -ESTALE;
        r = url_check(url, &log_form);
        if (r < 0)
                return r;
        copy = strdup(url);
        if (!copy)
                return -ENOMEM;
        free(d->url);
        free(d->url_log);
        d->url = take_ptr(&copy);
        d->url_log = take_ptr(&log_form);

        if (d->state == HTTP_NEED_URL)
                return schedule_attempt(d, 0);
        return 0;
}

void http_download_get_stats(const struct http_download *d, struct http_download_stats *ret) {
        *ret = d->stats;
        ret->offset = d->offset;
        ret->persisted = d->persisted;
}
