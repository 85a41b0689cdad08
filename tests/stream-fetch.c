/* SPDX-License-Identifier: MIT */
/*
 * stream-fetch: src/stream.c alone, over a real MQTT session, for tests and
 * benchmarks. Fetches one stream file into a plain file (kept across runs,
 * so a second run resumes from the progress record), or only the wanted
 * ranges listed in --ranges FILE ("OFFSET LENGTH" per line), checking every
 * write against download.h's contract, and prints two result lines with
 * the transfer's figures:
 *   stream-fetch: result=0 reason= blocks_received=... block_size=...
 *   stream-fetch: bytes_wanted=... bytes_outside=0 bytes_twice=0
 * Not installed.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "download.h"
#include "fetch-ranges.h"
#include "fileio.h"
#include "log.h"
#include "macro.h"
#include "mqtt.h"
#include "otad.h"
#include "stream.h"

struct fetch {
        struct otad otad;
        int fd;
        struct stream_download *download;
        int result;
        uint64_t last_progress;
        struct write_check check;
};

static int fetch_write(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct fetch *f = userdata;

        write_check_add(&f->check, offset, len);
        return pwrite_all(f->fd, buf, len, offset);
}

static int fetch_sync(void *userdata) {
        struct fetch *f = userdata;

        return fdatasync(f->fd) < 0 ? -errno : 0;
}

static void fetch_progress(uint64_t done, uint64_t total, void *userdata) {
        struct fetch *f = userdata;

        /* Every 10 %: enough for a test to see it moving. */
        if (done == total || done * 10 / total != f->last_progress * 10 / total)
                fprintf(stderr, "stream-fetch: progress %" PRIu64 "/%" PRIu64 "\n", done, total);
        f->last_progress = done;
}

static void fetch_finished(int result, const char *reason, void *userdata) {
        struct fetch *f = userdata;
        struct stream_stats st;

        stream_download_get_stats(f->download, &st);
        printf("stream-fetch: result=%d reason=%s blocks_received=%" PRIu64 " blocks_resumed=%" PRIu64
               " duplicates=%" PRIu64 " bad_blocks=%" PRIu64 " requests=%" PRIu64 " timeouts=%" PRIu64
               " rejections=%" PRIu64 " block_size=%" PRIu32 "\n",
               result, reason ? reason : "", st.blocks_received, st.blocks_resumed, st.duplicates, st.bad_blocks,
               st.requests, st.timeouts, st.rejections, st.block_size);
        printf("stream-fetch: bytes_wanted=%" PRIu64 " bytes_resumed=%" PRIu64 " bytes_written=%" PRIu64
               " bytes_fetched=%" PRIu64 " bytes_on_wire=%" PRIu64 " request_bytes=%" PRIu64
               " blocks_unwanted=%" PRIu64 " writes=%" PRIu64 " bytes_outside=%" PRIu64 " bytes_twice=%" PRIu64 "\n",
               st.bytes_wanted, st.bytes_resumed, st.bytes_written, st.bytes_fetched, st.bytes_on_wire,
               st.request_bytes, st.blocks_unwanted, f->check.writes, f->check.bytes_outside, f->check.bytes_twice);
        fflush(stdout);
        f->result = result;
        stream_download_free(take_ptr(&f->download));
        sd_event_exit(f->otad.event, 0);
}

static const struct download_ops fetch_ops = {
        .write = fetch_write,
        .sync = fetch_sync,
        .progress = fetch_progress,
        .finished = fetch_finished,
};

static void help(void) {
        printf("Usage: stream-fetch -c CONFIG --stream ID --file-id N --size BYTES --out PATH\n"
               "                    [--job-id ID] [--signature B64] [--state PATH] [--ranges FILE]\n");
}

int main(int argc, char *argv[]) {
        enum { ARG_STREAM = 0x100, ARG_FILE_ID, ARG_SIZE, ARG_OUT, ARG_JOB_ID, ARG_SIGNATURE, ARG_STATE, ARG_RANGES };
        static const struct option options[] = {
                { "config", required_argument, NULL, 'c' },
                { "stream", required_argument, NULL, ARG_STREAM },
                { "file-id", required_argument, NULL, ARG_FILE_ID },
                { "size", required_argument, NULL, ARG_SIZE },
                { "out", required_argument, NULL, ARG_OUT },
                { "job-id", required_argument, NULL, ARG_JOB_ID },
                { "signature", required_argument, NULL, ARG_SIGNATURE },
                { "state", required_argument, NULL, ARG_STATE },
                { "ranges", required_argument, NULL, ARG_RANGES },
                { "help", no_argument, NULL, 'h' },
                { NULL, 0, NULL, 0 },
        };
        const char *config_path = NULL, *stream = NULL, *out = NULL, *ranges_path = NULL;
        _cleanup_free_ struct download_range *wanted = NULL;
        struct download_file file = { .job_id = "stream-fetch" };
        struct fetch f = { .fd = -1, .result = -EINTR };
        unsigned file_id = 0;
        sigset_t mask;
        int c, r;

        while ((c = getopt_long(argc, argv, "c:h", options, NULL)) >= 0)
                switch (c) {
                case 'c':
                        config_path = optarg;
                        break;
                case ARG_STREAM:
                        stream = optarg;
                        break;
                case ARG_FILE_ID:
                        file_id = (unsigned) strtoul(optarg, NULL, 10);
                        break;
                case ARG_SIZE:
                        file.size = strtoull(optarg, NULL, 10);
                        break;
                case ARG_OUT:
                        out = optarg;
                        break;
                case ARG_JOB_ID:
                        file.job_id = optarg;
                        break;
                case ARG_SIGNATURE:
                        file.signature = optarg;
                        break;
                case ARG_STATE:
                        file.state_path = optarg;
                        break;
                case ARG_RANGES:
                        ranges_path = optarg;
                        break;
                case 'h':
                        help();
                        return EXIT_SUCCESS;
                default:
                        return EXIT_FAILURE;
                }
        if (!config_path || !stream || !out || file.size == 0) {
                help();
                return EXIT_FAILURE;
        }
        if (ranges_path) {
                r = ranges_file_read(ranges_path, &wanted, &file.n_wanted);
                if (r < 0) {
                        fprintf(stderr, "stream-fetch: %s: %s\n", ranges_path, strerror(-r));
                        return EXIT_FAILURE;
                }
                file.wanted = wanted;
        }
        if (write_check_init(&f.check, file.wanted, file.n_wanted, file.size) < 0)
                return EXIT_FAILURE;

        log_open();
        r = config_load(config_path, &f.otad.config);
        if (r < 0)
                return EXIT_FAILURE;
        log_set_max_level(f.otad.config->log.level);

        /* Not truncated: a rerun resumes into the same bytes. */
        f.fd = open(out, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (f.fd < 0) {
                fprintf(stderr, "stream-fetch: %s: %s\n", out, strerror(errno));
                return EXIT_FAILURE;
        }

        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigprocmask(SIG_BLOCK, &mask, NULL);

        r = sd_event_default(&f.otad.event);
        if (r >= 0)
                r = sd_event_add_signal(f.otad.event, NULL, SIGTERM, NULL, NULL);
        if (r >= 0)
                r = sd_event_add_signal(f.otad.event, NULL, SIGINT, NULL, NULL);
        if (r >= 0)
                r = mqtt_session_new(&f.otad, &f.otad.mqtt);
        if (r >= 0)
                r = mqtt_session_start(f.otad.mqtt);
        if (r >= 0)
                r = stream_download_new(&f.otad, stream, file_id, &file, &fetch_ops, &f, &f.download);
        if (r < 0) {
                fprintf(stderr, "stream-fetch: failed to start: %s\n", strerror(-r));
                return EXIT_FAILURE;
        }

        r = sd_event_loop(f.otad.event);

        stream_download_free(f.download);
        mqtt_session_free(f.otad.mqtt);
        sd_event_unref(f.otad.event);
        config_free(f.otad.config);
        close(f.fd);
        free(f.check.seen);
        return r >= 0 && f.result == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
