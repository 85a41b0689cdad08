/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
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
#include "byteranges.h"
#include "clock.h"
#include "config.h"
#include "fileio.h"
#include "http.h"
#include "log.h"
#include "macro.h"
#include "ranges.h"

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
/* Wanted ranges. A request names at most SPANS_MAX ranges in at most
 * RANGE_HEADER_MAX characters: Apache serves up to 200 ranges (MaxRanges)
 * and servers take header lines of 8 KiB (nginx, Apache, S3); half of each
 * leaves room for the rest of the request. */
#define SPANS_MAX 100
#define RANGE_HEADER_MAX 4000
/* Before a response has shown them, what one more part of a multipart
 * answer costs (its delimiter and headers, ~100 bytes from nginx, and
 * "a-b," in the request), and what one more request costs (its line with
 * the presigned URL, headers, and the response's headers; refined by
 * measurement from the first response on). A gap shorter than that is
 * cheaper fetched than split off. */
#define PART_OVERHEAD_ESTIMATE 128
#define REQUEST_OVERHEAD_ESTIMATE 512

enum http_state {
        HTTP_WAITING,  /* attempt_timer armed: start, retry after backoff */
        HTTP_RUNNING,  /* a GET is in the multi handle */
        HTTP_NEED_URL, /* asked the owner for a fresh URL */
        HTTP_DONE,     /* finished() was called */
};

enum body_mode {
        BODY_UNCHECKED, /* no body byte seen yet for this response */
        BODY_WRITE,     /* a 200/206 we accepted: bytes go to the target */
        BODY_MULTIPART, /* a 206 multipart/byteranges: parts go to the target */
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

        /* What to fetch: the wanted ranges (canonical), or the whole file
         * as the one range [0, size) when none were given. */
        struct download_range *wanted;
        size_t n_wanted;
        bool ranges;           /* wanted ranges were given */
        char ranges_sha256[65]; /* their identity in the record */
        uint64_t wanted_total;
        size_t next_range;     /* the range offset is in; n_wanted when all are written */
        uint64_t done;         /* wanted bytes below offset */
        bool url_one_range;    /* the URL is S3's, which serves one range per GET */
        bool server_one_range; /* the server showed it does not serve several */
        uint64_t part_overhead;    /* measured bytes of one more multipart part */
        uint64_t request_overhead; /* measured bytes of one more request */

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
        uint64_t request_done;   /* done when it was sent */
        struct download_range spans[SPANS_MAX]; /* ranges mode: what it asked for */
        size_t n_spans;
        char range[RANGE_HEADER_MAX + 1];
        enum body_mode body;
        bool have_content_range;
        uint64_t range_start;
        uint64_t range_end;   /* last byte + 1 */
        uint64_t range_total; /* UINT64_MAX: "*" */
        bool multipart;       /* Content-Type: multipart/byteranges, with this boundary */
        char boundary[BYTERANGES_BOUNDARY_MAX + 1];
        struct byteranges parts;
        uint64_t body_pos;    /* file offset of the next body byte (BODY_WRITE) */
        uint64_t body_end;    /* what the response said it holds */
        bool retry_at_once;   /* stopped to ask again differently, not a failure */
        size_t error_body;
        int abort_error; /* a decision made inside a curl callback */
        char abort_reason[256];
        char curl_error[CURL_ERROR_SIZE];

        /* Every wanted byte below offset is written; offset is the next
         * one to write (size once all are). The whole file: the bytes
         * written from 0 on, as one contiguous run. */
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
 * durable. Version 3 is a record of wanted ranges: ranges_sha256= names
 * the set, and written= and offset= are the offsets below which every
 * wanted byte is written, or durable. */
static int record_format(const char *job_id, unsigned file_index, uint64_t size, const char *sig_sha256,
                         const char *ranges_sha256, const char *boot_id, uint64_t written, uint64_t offset,
                         char **ret) {
        _cleanup_free_ char *body = NULL;
        char sum[65];
        int r;

        if (ranges_sha256 && boot_id)
                r = asprintf(&body, RECORD_MAGIC "version=3\njob_id=%s\nfile_index=%u\nsize=%" PRIu64
                             "\nsignature_sha256=%s\nranges_sha256=%s\nboot_id=%s\nwritten=%" PRIu64
                             "\noffset=%" PRIu64 "\n",
                             job_id, file_index, size, sig_sha256, ranges_sha256, boot_id, written, offset);
        else if (ranges_sha256)
                r = asprintf(&body, RECORD_MAGIC "version=3\njob_id=%s\nfile_index=%u\nsize=%" PRIu64
                             "\nsignature_sha256=%s\nranges_sha256=%s\noffset=%" PRIu64 "\n",
                             job_id, file_index, size, sig_sha256, ranges_sha256, offset);
        else if (boot_id)
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
                                 const char *sig_sha256, const char *ranges_sha256, const char *boot_id,
                                 uint64_t *ret_offset, uint64_t *ret_durable) {
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
                    record_format(job_id, file_index, size, sig_sha256, ranges_sha256, boot_text, written, offset,
                                  &want) < 0 ||
                    strcmp(text, want) != 0)
                        return;
                *ret_durable = offset;
                /* Another boot: the page cache that held the bytes written
                 * but not synced is gone (a power cut, or a reboot). */
                *ret_offset = boot_id && strcmp(boot_text, boot_id) == 0 ? written : offset;
                return;
        }
        if (record_format(job_id, file_index, size, sig_sha256, ranges_sha256, NULL, 0, offset, &want) < 0 ||
            strcmp(text, want) != 0)
                return;
        *ret_offset = *ret_durable = offset;
}

/* The hex identity of a set of wanted ranges; -EINVAL for an invalid set. */
static int ranges_identity(const struct download_file *file, char ret[static 65]) {
        _cleanup_free_ struct download_range *canonical = NULL;
        static const char digits[] = "0123456789abcdef";
        uint8_t hash[RANGES_HASH_SIZE];
        size_t n;
        int r;

        r = ranges_normalize(file->wanted, file->n_wanted, file->size, &canonical, &n);
        if (r < 0)
                return r;
        r = ranges_hash(canonical, n, hash);
        if (r < 0)
                return r;
        for (size_t i = 0; i < RANGES_HASH_SIZE; i++) {
                ret[2 * i] = digits[hash[i] >> 4];
                ret[2 * i + 1] = digits[hash[i] & 0xf];
        }
        ret[64] = '\0';
        return 0;
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
        char sig[65], ranges[65], boot[SD_ID128_STRING_MAX];
        const char *s = file->signature ? file->signature : "";
        uint64_t offset, durable;
        sd_id128_t id;

        if (!file->state_path || !file->job_id || !identity_storable(file->job_id) ||
            sha256_hex(s, strlen(s), sig) < 0 || (file->wanted && ranges_identity(file, ranges) < 0))
                return 0;
        boot_id_text(&id, boot);
        record_resume_offset(file->state_path, file->job_id, file->file_index, file->size, sig,
                             file->wanted ? ranges : NULL, boot[0] ? boot : NULL, &offset, &durable);
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
        r = record_format(d->job_id, d->file_index, d->size, d->signature_sha256,
                          d->ranges ? d->ranges_sha256 : NULL, boot[0] ? boot : NULL, written, durable, &text);
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
/* Moves the mark to offset: every wanted byte below it counts as written. */
static void seek_to(struct http_download *d, uint64_t offset) {
        d->next_range = ranges_find(d->wanted, d->n_wanted, offset);
        if (d->next_range == d->n_wanted) {
                d->offset = d->size;
                d->done = d->wanted_total;
                return;
        }
        d->offset = offset > d->wanted[d->next_range].offset ? offset : d->wanted[d->next_range].offset;
        d->done = ranges_bytes_in(d->wanted, d->n_wanted, 0, d->offset);
}

static int progress_reset(struct http_download *d) {
        int r;

        seek_to(d, 0);
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
        if (result < 0 && d->ranges)
                log_full(LOG_ERR, result, &(const struct log_fields){ .job_id = d->job_id, .stage = "download" },
                         "HTTPS download of %s failed at %" PRIu64 "/%" PRIu64 " wanted bytes: %s",
                         d->url_log, d->done, d->wanted_total, reason);
        else if (result < 0)
                log_full(LOG_ERR, result, &(const struct log_fields){ .job_id = d->job_id, .stage = "download" },
                         "HTTPS download of %s failed at %" PRIu64 "/%" PRIu64 " bytes: %s",
                         d->url_log, d->offset, d->size, reason);
        else if (d->ranges)
                log_job(LOG_INFO, d->job_id, "download",
                        "HTTPS download of %s complete: %" PRIu64 " wanted bytes of %" PRIu64 " in %zu ranges (%" PRIu64
                        " resumed); %" PRIu64 " body and %" PRIu64 " header bytes received, %" PRIu64
                        " sent, in %u requests (%s), %u retries, %u fresh URLs",
                        d->url_log, d->wanted_total, d->size, d->n_wanted, d->stats.bytes_resumed,
                        d->stats.bytes_received, d->stats.header_bytes, d->stats.request_bytes, d->stats.requests,
                        d->url_one_range || d->server_one_range ? "one range each" : "several ranges each",
                        d->stats.retries, d->stats.url_refreshes);
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

static bool one_range_per_request(const struct http_download *d) {
        return d->url_one_range || d->server_one_range;
}

/* The wanted bytes from offset on, as the next request's ranges: several
 * per request where the server serves them, coalesced over gaps cheaper to
 * fetch than to split off (what a part, or a request, costs in bytes). */
static int plan_ranges(struct http_download *d) {
        struct ranges_request_limits limits = {
                .gap_max = one_range_per_request(d) ? d->request_overhead : d->part_overhead,
                .spans_max = one_range_per_request(d) ? 1 : SPANS_MAX,
                .header_max = RANGE_HEADER_MAX,
        };
        int r;

        d->n_spans = ranges_plan_request(d->wanted, d->n_wanted, d->offset, &limits, d->spans);
        if (d->n_spans == 0)
                return -EINVAL; /* nothing left: callers check offset == size first */
        r = ranges_format(d->spans, d->n_spans, d->range, sizeof d->range);
        return r < 0 ? r : 0;
}

static uint64_t request_end(const struct http_download *d) {
        return d->spans[d->n_spans - 1].offset + d->spans[d->n_spans - 1].length;
}

static int start_request(struct http_download *d) {
        CURLMcode mc;
        int r;

        d->request_offset = d->offset;
        d->request_done = d->done;
        d->body = BODY_UNCHECKED;
        d->have_content_range = false;
        d->range_start = 0;
        d->range_end = 0;
        d->range_total = UINT64_MAX;
        d->multipart = false;
        d->retry_at_once = false;
        d->error_body = 0;
        d->abort_error = 0;
        d->abort_reason[0] = '\0';
        d->curl_error[0] = '\0';

        if (d->ranges) {
                r = plan_ranges(d);
                if (r < 0)
                        return r;
        } else {
                /* Always ask for a range, also from 0: the 206's
                 * Content-Range then tells the object's size before a byte
                 * is written. */
                snprintf(d->range, sizeof(d->range), "%" PRIu64 "-", d->offset);
                d->spans[0] = (struct download_range){ .offset = d->offset, .length = d->size - d->offset };
                d->n_spans = 1;
        }
        if (curl_easy_setopt(d->easy, CURLOPT_URL, d->url) != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_RANGE, d->range) != CURLE_OK)
                return -ENOMEM;
        mc = curl_multi_add_handle(d->multi, d->easy);
        if (mc != CURLM_OK)
                return mc == CURLM_OUT_OF_MEMORY ? -ENOMEM : -EIO;
        d->easy_added = true;
        d->state = HTTP_RUNNING;
        d->stats.requests++;
        d->stats.ranges_requested += d->n_spans;
        log_job(LOG_DEBUG, d->job_id, "download", "GET %s Range: bytes=%s", d->url_log, d->range);
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
        if (d->done >= d->request_done + PROGRESS_RESETS_RETRIES) {
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
                 "HTTPS download of %s interrupted at %" PRIu64 "/%" PRIu64 " %sbytes: %s; retry %u/%" PRId64
                 " in %" PRIu64 " ms",
                 d->url_log, d->ranges ? d->done : d->offset, d->ranges ? d->wanted_total : d->size,
                 d->ranges ? "wanted " : "", what, d->failures, d->otad->config->ota.http_retries,
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

/* What a request cost beyond its body, for the statistics and for what a
 * gap may cost before it is split off. */
static void account_request(struct http_download *d) {
        long request = 0, headers = 0;

        (void) curl_easy_getinfo(d->easy, CURLINFO_REQUEST_SIZE, &request);
        (void) curl_easy_getinfo(d->easy, CURLINFO_HEADER_SIZE, &headers);
        d->stats.request_bytes += (uint64_t) (request > 0 ? request : 0);
        d->stats.header_bytes += (uint64_t) (headers > 0 ? headers : 0);
        if (d->ranges && request > 0 && headers > 0)
                d->request_overhead = (uint64_t) request + (uint64_t) headers;
        if (d->ranges && d->body == BODY_MULTIPART && d->parts.parts > 0) {
                /* The part delimiters and headers, and "a-b," in the request. */
                uint64_t per_part = d->parts.other_bytes / d->parts.parts + strlen(d->range) / d->n_spans;

                d->stats.multipart_overhead += d->parts.other_bytes;
                d->part_overhead = per_part > PART_OVERHEAD_ESTIMATE / 4 ? per_part : PART_OVERHEAD_ESTIMATE / 4;
        }
}

/* A complete 200/206 to a request for wanted ranges, with wanted bytes
 * still to come: the next request, at once on the same connection, unless
 * this one brought nothing it asked for. */
static void ranges_response_done(struct http_download *d) {
        char what[512];
        int r;

        if (d->body == BODY_MULTIPART && !byteranges_complete(&d->parts)) {
                snprintf(what, sizeof(what), "multipart/byteranges body ended before its last part, at %" PRIu64
                         "/%" PRIu64 " wanted bytes", d->done, d->wanted_total);
                retry_or_fail(d, -EPIPE, what);
                return;
        }
        if (d->offset < request_end(d) && d->n_spans > 1 && !d->server_one_range) {
                /* 206 with one part, or fewer parts than asked for. */
                d->server_one_range = true;
                d->stats.multi_range_fallbacks++;
                log_job(LOG_NOTICE, d->job_id, "download",
                        "HTTPS server of %s answered a request for %zu ranges with less: asking for one range per "
                        "request", d->url_log, d->n_spans);
        }
        if (d->done == d->request_done) {
                snprintf(what, sizeof(what), "server answered Range: bytes=%.64s%s without a wanted byte", d->range,
                         strlen(d->range) > 64 ? "..." : "");
                retry_or_fail(d, -EPROTO, what);
                return;
        }
        d->failures = 0;
        backoff_reset(&d->backoff);
        r = schedule_attempt(d, 0);
        if (r < 0)
                finish_errno(d, r, "failed to schedule the next request: %m");
}

/* One request ended: decide what comes next. Every path ends in finish(),
 * a scheduled attempt or a fresh-URL request. */
static void request_done(struct http_download *d, CURLcode res) {
        char what[CURL_ERROR_SIZE + 512];
        long code = 0;
        int r;

        (void) curl_easy_getinfo(d->easy, CURLINFO_RESPONSE_CODE, &code);
        account_request(d);
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
        if (d->ranges && d->offset == d->size) {
                /* Every wanted byte is written and synced, however the
                 * response ended (we may have stopped reading it). */
                finish(d, 0, "complete");
                return;
        }
        if (d->retry_at_once) {
                /* Not a failure: the server showed what it serves. */
                r = schedule_attempt(d, 0);
                if (r < 0)
                        finish_errno(d, r, "failed to schedule the next request: %m");
                return;
        }
        /* protocol.md §4: 400/403/404 mean the presigned URL stopped working. */
        if (code == 400 || code == 403 || code == 404) {
                ask_for_fresh_url(d, code);
                return;
        }
        if (code == 416 && d->ranges) {
                snprintf(what, sizeof(what),
                         "server has none of bytes %.64s%s (HTTP 416), within the job's filesize of %" PRIu64
                         " bytes; the object and the job document disagree", d->range,
                         strlen(d->range) > 64 ? "..." : "", d->size);
                finish(d, -EMSGSIZE, what);
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
                if (d->ranges) {
                        ranges_response_done(d);
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

/* Stops this response without failing: the request is sent again at once,
 * as what the response showed asks (one range per request from now on). */
static size_t abort_retry(struct http_download *d, const char *format, ...) __attribute__((format(printf, 2, 3)));

static size_t abort_retry(struct http_download *d, const char *format, ...) {
        char why[256];
        va_list ap;

        va_start(ap, format);
        vsnprintf(why, sizeof why, format, ap);
        va_end(ap);
        d->server_one_range = true;
        d->retry_at_once = true;
        d->stats.multi_range_fallbacks++;
        log_job(LOG_NOTICE, d->job_id, "download", "HTTPS server of %s %s: asking for one range per request",
                d->url_log, why);
        return 0; /* curl stops with CURLE_WRITE_ERROR */
}

/* Body bytes [pos, pos + len) of the file: writes the wanted ones at or
 * after the mark and moves it. -ERANGE when they start beyond it: the
 * server skipped wanted bytes (a part missing or out of order), and what
 * comes is not written, so that every wanted byte is written once. */
static int take(struct http_download *d, uint64_t pos, const uint8_t *buf, size_t len) {
        uint64_t end = pos + len;
        int r;

        if (d->next_range < d->n_wanted && pos > d->offset)
                return -ERANGE;
        while (d->next_range < d->n_wanted && d->offset < end) {
                const struct download_range *w = &d->wanted[d->next_range];
                uint64_t w_end = w->offset + w->length, stop = w_end < end ? w_end : end;

                if (stop > d->offset) {
                        r = d->ops->write(d->offset, buf + (d->offset - pos), (size_t) (stop - d->offset), d->userdata);
                        if (r < 0)
                                return r;
                        d->stats.bytes_written += stop - d->offset;
                        d->done += stop - d->offset;
                        d->offset = stop;
                }
                if (d->offset < w_end)
                        break;
                d->next_range++;
                d->offset = d->next_range < d->n_wanted ? d->wanted[d->next_range].offset : d->size;
        }
        return 0;
}

static int on_part_data(uint64_t offset, const void *buf, size_t len, void *userdata) {
        return take(userdata, offset, buf, len);
}

/* The first body byte of a response to a request for wanted ranges. */
static size_t check_ranges_response(struct http_download *d, long code) {
        curl_off_t length = -1;

        if (code == 206 && d->multipart) {
                byteranges_init(&d->parts, d->boundary, d->size);
                d->body = BODY_MULTIPART;
                return 1;
        }
        if (code == 206) {
                if (!d->have_content_range)
                        return abort_body(d, -EPROTO, "server answered 206 without a valid Content-Range, expected "
                                          "one for bytes %" PRIu64 "-%" PRIu64 " of %" PRIu64, d->offset,
                                          request_end(d) - 1, d->size);
                if (d->range_total != UINT64_MAX && d->range_total != d->size)
                        return abort_body(d, -EMSGSIZE, "server has %" PRIu64 " bytes, filesize is %" PRIu64
                                          "; the object and the job document disagree", d->range_total, d->size);
                if (d->range_start > d->offset) {
                        if (d->n_spans > 1)
                                return abort_retry(d, "answered %zu ranges with bytes from %" PRIu64, d->n_spans,
                                                   d->range_start);
                        return abort_body(d, -EPROTO, "asked for bytes from %" PRIu64 ", the server sent them from %" PRIu64,
                                          d->offset, d->range_start);
                }
                d->body_pos = d->range_start;
                d->body_end = d->range_end;
                d->body = BODY_WRITE;
                return 1;
        }

        (void) curl_easy_getinfo(d->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length);
        if (length >= 0 && (uint64_t) length != d->size)
                return abort_body(d, -EMSGSIZE, "server has %" PRId64 " bytes, filesize is %" PRIu64
                                  "; the object and the job document disagree", (int64_t) length, d->size);
        /* 200: the server ignored Range. Asked for several ranges, that is
         * what S3 does (it serves one per GET): stop before the whole
         * object comes, and ask for one. Asked for one, it serves no
         * ranges at all: the wanted bytes are taken from the whole body as
         * it passes. */
        if (d->n_spans > 1)
                return abort_retry(d, "answered a request for %zu ranges with the whole object (HTTP 200)",
                                   d->n_spans);
        log_job(LOG_NOTICE, d->job_id, "download",
                "HTTPS server ignored Range for %s, taking the wanted bytes from the whole object", d->url_log);
        d->body_pos = 0;
        d->body_end = d->size;
        d->body = BODY_WRITE;
        return 1;
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
        if (d->ranges)
                return check_ranges_response(d, code);
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
                d->body_pos = d->offset;
                d->body_end = d->size;
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
        d->body_pos = 0;
        d->body_end = d->size;
        d->body = BODY_WRITE;
        return 1;
}

/* Records what a kill or a power cut would resume from, when due. */
static int progress_due(struct http_download *d) {
        uint64_t now = now_usec(d), since = now - d->persisted_at;

        if ((since >= PERSIST_USEC && d->offset - d->persisted >= PERSIST_BYTES) || since >= PERSIST_IDLE_USEC)
                return progress_save(d);
        if (d->offset - d->recorded >= RECORD_BYTES || now - d->recorded_at >= RECORD_USEC)
                return progress_record(d);
        return 0;
}

static size_t curl_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata) {
        struct http_download *d = userdata;
        size_t len = size * nmemb;
        uint64_t before = d->done;
        int r;

        if (d->body == BODY_UNCHECKED && check_response(d) == 0) {
                /* Refused (e.g. a 200 to a request for several ranges):
                 * what curl read of it still came over the wire. */
                if (d->ranges)
                        d->stats.bytes_received += len;
                return 0;
        }
        if (d->body == BODY_SWALLOW) {
                d->error_body += len;
                return d->error_body > ERROR_BODY_MAX ? 0 : len;
        }
        d->stats.bytes_received += len;

        if (d->body == BODY_MULTIPART) {
                r = byteranges_feed(&d->parts, ptr, len, on_part_data, d);
                if (r == -ERANGE)
                        return abort_retry(d, "left out or reordered parts of a multipart/byteranges answer");
                if (r == -EBADMSG)
                        return abort_retry(d, "sent a malformed multipart/byteranges body");
                if (r == -EMSGSIZE)
                        return abort_body(d, r, "server has %" PRIu64 " bytes, filesize is %" PRIu64
                                          "; the object and the job document disagree",
                                          d->parts.complete_length, d->size);
                if (r < 0)
                        return abort_body(d, r, "failed to write the wanted bytes at offset %" PRIu64
                                          " to the target: %m", d->offset);
        } else {
                if (len > d->body_end - d->body_pos) {
                        if (!d->ranges || d->body_end == d->size)
                                return abort_body(d, -EMSGSIZE, "server sent more than filesize (%" PRIu64
                                                  " bytes); the object and the job document disagree", d->size);
                        return abort_body(d, -EPROTO, "server sent more than its Content-Range (bytes %" PRIu64
                                          "-%" PRIu64 ")", d->range_start, d->range_end - 1);
                }
                r = take(d, d->body_pos, (const uint8_t *) ptr, len);
                if (r < 0)
                        return abort_body(d, r, "failed to write %zu bytes at offset %" PRIu64 " to the target: %m",
                                          len, d->body_pos);
                d->body_pos += len;
                /* Every wanted byte is in, the rest of a whole object (a
                 * server that ignores Range) is not needed: stop reading. */
                if (d->ranges && d->offset == d->size && d->body_pos < d->body_end) {
                        if (d->ops->progress)
                                d->ops->progress(d->done, d->wanted_total, d->userdata);
                        return 0;
                }
        }
        d->stats.offset = d->offset;
        if (d->done != before && d->ops->progress)
                d->ops->progress(d->done, d->wanted_total, d->userdata);

        r = progress_due(d);
        if (r < 0)
                return abort_body(d, r, "failed to save download progress to %s: %m", d->state_path);
        return len;
}

static size_t curl_header_cb(char *buffer, size_t size, size_t nitems, void *userdata) {
        struct http_download *d = userdata;
        size_t len = size * nitems;
        static const char cr[] = "content-range:", ct[] = "content-type:";

        if (len >= 5 && memcmp(buffer, "HTTP/", 5) == 0) {
                /* A new response (after a redirect or 100): forget the last. */
                d->have_content_range = false;
                d->range_start = d->range_end = 0;
                d->range_total = UINT64_MAX;
                d->multipart = false;
        } else if (len > sizeof(cr) - 1 && strncasecmp(buffer, cr, sizeof(cr) - 1) == 0) {
                uint64_t first, last, complete;

                /* "bytes 100-199/1000", the total may be unknown (RFC 9110 §14.4). */
                if (byteranges_content_range(buffer + sizeof(cr) - 1, len - (sizeof(cr) - 1), &first, &last,
                                             &complete) == 0) {
                        d->have_content_range = true;
                        d->range_start = first;
                        d->range_end = last + 1;
                        d->range_total = complete;
                }
        } else if (len > sizeof(ct) - 1 && strncasecmp(buffer, ct, sizeof(ct) - 1) == 0)
                d->multipart = byteranges_boundary(buffer + sizeof(ct) - 1, len - (sizeof(ct) - 1), d->boundary) == 0;
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

/* Whether url is S3's: a host under amazonaws.com, or a query signed the
 * way S3 presigns (SigV4 X-Amz-Signature/X-Amz-Credential, or SigV2's
 * AWSAccessKeyId), as an S3-compatible store signs it too. S3 "doesn't
 * support retrieving multiple ranges of data per GET request" (GetObject,
 * Range) and answers several with 200 and the whole object; asking it for
 * several would cost a connection and whatever arrived before it is cut. */
static bool url_serves_one_range(const char *url) {
        static const char *const params[] = { "X-Amz-Signature=", "X-Amz-Credential=", "AWSAccessKeyId=" };
        CURLU *u = curl_url();
        char *host = NULL, *query = NULL;
        bool s3 = false;

        if (!u)
                return true; /* no memory to tell: the choice that works everywhere */
        if (curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK) {
                if (curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK && host) {
                        size_t n = strlen(host);

                        s3 = (n >= 14 && strcasecmp(host + n - 14, ".amazonaws.com") == 0) ||
                             (n >= 17 && strcasecmp(host + n - 17, ".amazonaws.com.cn") == 0);
                }
                if (curl_url_get(u, CURLUPART_QUERY, &query, 0) == CURLUE_OK && query)
                        for (size_t i = 0; i < ELEMENTSOF(params); i++) {
                                const char *p = strstr(query, params[i]);

                                if (p && (p == query || p[-1] == '&'))
                                        s3 = true;
                        }
        }
        curl_free(host);
        curl_free(query);
        curl_url_cleanup(u);
        return s3;
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
        free(d->wanted);
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
        if (file->wanted) {
                r = ranges_normalize(file->wanted, file->n_wanted, file->size, &d->wanted, &d->n_wanted);
                if (r < 0)
                        return r;
                r = ranges_identity(file, d->ranges_sha256);
                if (r < 0)
                        return r;
                d->ranges = true;
        } else {
                /* The whole file is the one range wanted. */
                d->wanted = malloc(sizeof *d->wanted);
                if (!d->wanted)
                        return -ENOMEM;
                d->wanted[0] = (struct download_range){ .offset = 0, .length = d->size };
                d->n_wanted = 1;
        }
        d->wanted_total = ranges_total(d->wanted, d->n_wanted);
        d->url_one_range = url_serves_one_range(url);
        d->part_overhead = PART_OVERHEAD_ESTIMATE;
        d->request_overhead = strlen(url) + REQUEST_OVERHEAD_ESTIMATE;

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

        uint64_t resume = 0;

        boot_id_text(&d->boot_id, boot);
        if (d->state_path)
                record_resume_offset(d->state_path, d->job_id, d->file_index, d->size, d->signature_sha256,
                                     d->ranges ? d->ranges_sha256 : NULL, boot[0] ? boot : NULL, &resume,
                                     &d->persisted);
        seek_to(d, resume);
        d->recorded = d->offset;
        d->persisted_at = d->recorded_at = now_usec(d);
        d->offset_at_refresh = d->offset;
        d->stats.offset = d->stats.resumed_from = d->offset;
        d->stats.persisted = d->persisted;
        d->stats.bytes_wanted = d->wanted_total;
        d->stats.bytes_resumed = d->done;
        if (d->done > 0 && d->ranges)
                log_job(LOG_INFO, d->job_id, "download",
                        "Resuming HTTPS download of %zu ranges of %s at offset %" PRIu64 ": %" PRIu64 "/%" PRIu64
                        " wanted bytes (synced up to offset %" PRIu64 ")",
                        d->n_wanted, d->url_log, d->offset, d->done, d->wanted_total, d->persisted);
        else if (d->done > 0)
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
        d->url_one_range = url_serves_one_range(d->url);

        if (d->state == HTTP_NEED_URL)
                return schedule_attempt(d, 0);
        return 0;
}

void http_download_get_stats(const struct http_download *d, struct http_download_stats *ret) {
        *ret = d->stats;
        ret->offset = d->offset;
        ret->persisted = d->persisted;
        ret->one_range_per_request = d->ranges && one_range_per_request(d);
}
