/* SPDX-License-Identifier: MIT */
/*
 * http-fetch: drives http.c alone on an sd-event loop, writing one file to a
 * plain file, for the HTTPS integration tests and the throughput figure.
 * Not installed.
 *
 * With --ranges FILE ("OFFSET LENGTH" per line) it fetches only those
 * wanted ranges and checks every write against download.h's contract.
 *
 * When the engine asks for a fresh URL it prints "need-url" on stdout and
 * reads the next line of stdin as the new URL. At the end it prints one line
 * "result=... key=value ..." and exits 0 on success, 1 on failure.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include <systemd/sd-event.h>

#include "config.h"
#include "download.h"
#include "fetch-ranges.h"
#include "fileio.h"
#include "http.h"
#include "log.h"
#include "macro.h"
#include "otad.h"

struct fetch {
        sd_event *event;
        int fd;
        int result;
        char reason[512];
        char line[8192];
        size_t line_len;
        struct http_download *download;
        unsigned syncs;
        bool no_sync; /* measure the transfer alone */
        struct write_check check;
        bool check_writes;
};

static int on_write(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct fetch *f = userdata;

        if (f->check_writes)
                write_check_add(&f->check, offset, len);
        return pwrite_all(f->fd, buf, len, offset);
}

static int on_sync(void *userdata) {
        struct fetch *f = userdata;
        f->syncs++;
        if (f->no_sync)
                return 0;
        return fdatasync(f->fd) < 0 ? -errno : 0;
}

static void on_need_fresh_url(void *userdata) {
        printf("need-url\n");
        fflush(stdout);
}

static void on_finished(int result, const char *reason, void *userdata) {
        struct fetch *f = userdata;
        f->result = result;
        snprintf(f->reason, sizeof(f->reason), "%s", reason ? reason : "");
        sd_event_exit(f->event, 0);
}

/* Lines on stdin are fresh URLs. */
static int on_stdin(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct fetch *f = userdata;
        ssize_t n = read(fd, f->line + f->line_len, sizeof(f->line) - 1 - f->line_len);
        if (n <= 0) {
                sd_event_source_set_enabled(s, SD_EVENT_OFF);
                return 0;
        }
        f->line_len += (size_t) n;
        f->line[f->line_len] = '\0';
        char *nl;
        while ((nl = strchr(f->line, '\n'))) {
                *nl = '\0';
                if (f->line[0]) {
                        int r = http_download_set_url(f->download, f->line);
                        if (r < 0)
                                fprintf(stderr, "http-fetch: set_url: %s\n", strerror(-r));
                }
                size_t used = (size_t) (nl + 1 - f->line);
                memmove(f->line, nl + 1, f->line_len - used + 1);
                f->line_len -= used;
        }
        return 0;
}

static const struct download_ops ops = {
        .write = on_write,
        .sync = on_sync,
        .need_fresh_url = on_need_fresh_url,
        .finished = on_finished,
};

static void usage(void) {
        fprintf(stderr, "usage: http-fetch --url URL --output FILE --size BYTES [--state PATH] [--job-id ID]\n"
                        "       [--signature TEXT] [--file-index N] [--ca-file PEM] [--low-speed-limit B/s]\n"
                        "       [--low-speed-time S] [--retries N] [--no-sync] [--verbose] [--ranges FILE]\n");
}

int main(int argc, char **argv) {
        static const struct option options[] = {
                { "url", required_argument, NULL, 'u' },
                { "output", required_argument, NULL, 'o' },
                { "size", required_argument, NULL, 's' },
                { "state", required_argument, NULL, 'S' },
                { "job-id", required_argument, NULL, 'j' },
                { "signature", required_argument, NULL, 'g' },
                { "file-index", required_argument, NULL, 'i' },
                { "ca-file", required_argument, NULL, 'c' },
                { "low-speed-limit", required_argument, NULL, 'l' },
                { "low-speed-time", required_argument, NULL, 't' },
                { "retries", required_argument, NULL, 'r' },
                { "verbose", no_argument, NULL, 'v' },
                { "no-sync", no_argument, NULL, 'n' },
                { "ranges", required_argument, NULL, 'R' },
                { NULL, 0, NULL, 0 },
        };
        struct otad_config config = {
                .ota = {
                        .http_low_speed_limit = 1024,
                        .http_low_speed_time = 30,
                        .http_retries = 5,
                        .http_ca_file = (char *) "",
                },
        };
        struct download_file file = { .job_id = "http-fetch", .signature = "" };
        struct fetch f = { .fd = -1, .result = -EINPROGRESS };
        const char *url = NULL, *output = NULL, *ranges_path = NULL;
        _cleanup_free_ struct download_range *wanted = NULL;
        struct http_download_stats st;
        struct timespec t0, t1;
        sd_event_source *in = NULL;
        int c, r;

        log_open();
        while ((c = getopt_long(argc, argv, "", options, NULL)) >= 0) {
                switch (c) {
                case 'u': url = optarg; break;
                case 'o': output = optarg; break;
                case 's': file.size = strtoull(optarg, NULL, 10); break;
                case 'S': file.state_path = optarg; break;
                case 'j': file.job_id = optarg; break;
                case 'g': file.signature = optarg; break;
                case 'i': file.file_index = (unsigned) strtoul(optarg, NULL, 10); break;
                case 'c': config.ota.http_ca_file = optarg; break;
                case 'l': config.ota.http_low_speed_limit = strtoll(optarg, NULL, 10); break;
                case 't': config.ota.http_low_speed_time = strtoll(optarg, NULL, 10); break;
                case 'r': config.ota.http_retries = strtoll(optarg, NULL, 10); break;
                case 'v': log_set_max_level(LOG_DEBUG); break;
                case 'n': f.no_sync = true; break;
                case 'R': ranges_path = optarg; break;
                default: usage(); return 2;
                }
        }
        if (!url || !output || file.size == 0) {
                usage();
                return 2;
        }
        if (ranges_path) {
                r = ranges_file_read(ranges_path, &wanted, &file.n_wanted);
                if (r < 0) {
                        fprintf(stderr, "http-fetch: %s: %s\n", ranges_path, strerror(-r));
                        return 1;
                }
                file.wanted = wanted;
                /* A bit per byte: for the tests' files, not the throughput
                 * figure of whole files. */
                if (write_check_init(&f.check, file.wanted, file.n_wanted, file.size) < 0)
                        return 1;
                f.check_writes = true;
        }

        f.fd = open(output, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (f.fd < 0) {
                fprintf(stderr, "http-fetch: %s: %s\n", output, strerror(errno));
                return 1;
        }
        r = sd_event_default(&f.event);
        if (r < 0)
                return 1;
        struct otad otad = { .event = f.event, .config = &config };

        printf("resume_offset=%" PRIu64 "\n", http_progress_resume_offset(&file));
        fflush(stdout);

        clock_gettime(CLOCK_MONOTONIC, &t0);
        r = http_download_new(&otad, url, &file, &ops, &f, &f.download);
        if (r < 0) {
                fprintf(stderr, "http-fetch: http_download_new: %s\n", strerror(-r));
                return 1;
        }
        (void) sd_event_add_io(f.event, &in, STDIN_FILENO, EPOLLIN, on_stdin, &f);
        r = sd_event_loop(f.event);
        clock_gettime(CLOCK_MONOTONIC, &t1);

        http_download_get_stats(f.download, &st);
        double secs = (double) (t1.tv_sec - t0.tv_sec) + (double) (t1.tv_nsec - t0.tv_nsec) / 1e9;
        printf("result=%d offset=%" PRIu64 " resumed_from=%" PRIu64 " bytes_received=%" PRIu64
               " requests=%u retries=%u url_refreshes=%u restarts=%u syncs=%u seconds=%.3f mib_per_s=%.1f"
               " bytes_wanted=%" PRIu64 " bytes_resumed=%" PRIu64 " bytes_written=%" PRIu64 " header_bytes=%" PRIu64
               " request_bytes=%" PRIu64 " multipart_overhead=%" PRIu64 " ranges_requested=%" PRIu64
               " multi_range_fallbacks=%u one_range_per_request=%d writes=%" PRIu64 " bytes_outside=%" PRIu64
               " bytes_twice=%" PRIu64 " reason=%s\n",
               f.result, st.offset, st.resumed_from, st.bytes_received, st.requests, st.retries, st.url_refreshes,
               st.restarts, f.syncs, secs, secs > 0 ? (double) st.bytes_received / 1048576.0 / secs : 0.0,
               st.bytes_wanted, st.bytes_resumed, st.bytes_written, st.header_bytes, st.request_bytes,
               st.multipart_overhead, st.ranges_requested, st.multi_range_fallbacks, st.one_range_per_request,
               f.check.writes, f.check.bytes_outside, f.check.bytes_twice, f.reason);
        fflush(stdout);

        http_download_free(f.download);
        sd_event_source_disable_unref(in);
        sd_event_unref(f.event);
        close(f.fd);
        free(f.check.seen);
        return f.result == 0 ? 0 : 1;
}
