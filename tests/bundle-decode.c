/* SPDX-License-Identifier: MIT */
/*
 * bundle-decode: the payload decoder alone, as the daemon will drive it, for
 * benchmarks: reads a bundle directory's parts in stream-block-sized reads,
 * feeds them to payload_decoder and writes the image into OUT (a file or a
 * block device) at its offsets, fdatasync at the end. Prints one line:
 *   bundle-decode: result=0 bytes=N seconds=S cpu=C rss_anon_max_kib=K
 * rss_anon_max_kib is the largest RssAnon of /proc/self/status seen after
 * each chunk (private memory, what grows if anything grows with the image).
 * Not installed.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "bundle_manifest.h"
#include "fileio.h"
#include "macro.h"
#include "payload_decoder.h"

#define BLOCK (128 * 1024) /* the largest GetStream block */

struct out {
        int fd;
        unsigned long rss_max_kib;
        unsigned chunks;
};

static unsigned long rss_anon_kib(void) {
        char line[256];
        unsigned long v = 0;
        FILE *f = fopen("/proc/self/status", "re");

        if (!f)
                return 0;
        while (fgets(line, sizeof(line), f))
                if (sscanf(line, "RssAnon: %lu kB", &v) == 1)
                        break;
        fclose(f);
        return v;
}

static int out_write(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct out *o = userdata;
        unsigned long rss;

        if (++o->chunks % 16 == 0 && (rss = rss_anon_kib()) > o->rss_max_kib)
                o->rss_max_kib = rss;
        return pwrite_all(o->fd, buf, len, offset);
}

static double now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

int main(int argc, char *argv[]) {
        struct bundle_manifest *m = NULL;
        struct payload_decoder *d = NULL;
        struct out o = { .fd = -1 };
        _cleanup_free_ char *text = NULL;
        _cleanup_free_ uint8_t *buf = malloc(BLOCK);
        struct rusage ru;
        char err[256], path[4096];
        size_t size;
        double t0;
        int r;

        if (argc != 3) {
                fprintf(stderr, "usage: bundle-decode MANIFEST OUT\n");
                return 2;
        }
        if (read_file_full(argv[1], BUNDLE_MANIFEST_MAX, &text, &size) < 0 ||
            bundle_manifest_parse(text, size, &m, err, sizeof(err)) < 0) {
                fprintf(stderr, "bundle-decode: bad manifest %s\n", argv[1]);
                return 1;
        }
        o.fd = open(argv[2], O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (o.fd < 0 || !buf || payload_decoder_new(m, out_write, &o, &d) < 0) {
                perror("bundle-decode");
                return 1;
        }
        t0 = now();
        o.rss_max_kib = rss_anon_kib();
        r = 0;
        for (size_t i = 0; i < m->n_parts && r >= 0; i++) {
                const char *slash = strrchr(argv[1], '/');
                int fd;

                snprintf(path, sizeof(path), "%.*s%s", slash ? (int) (slash - argv[1] + 1) : 0, argv[1],
                         m->parts[i].file);
                fd = open(path, O_RDONLY | O_CLOEXEC);
                if (fd < 0) {
                        perror(path);
                        return 1;
                }
                for (uint64_t off = 0; off < m->parts[i].size && r >= 0; off += BLOCK) {
                        size_t len = m->parts[i].size - off < BLOCK ? (size_t) (m->parts[i].size - off) : BLOCK;
                        r = pread_all(fd, buf, len, off);
                        if (r >= 0)
                                r = payload_decoder_feed(d, buf, len);
                }
                close(fd);
        }
        if (r >= 0 && !payload_decoder_finished(d))
                r = -EPIPE;
        if (r >= 0 && fdatasync(o.fd) < 0)
                r = -errno;
        getrusage(RUSAGE_SELF, &ru);
        if (rss_anon_kib() > o.rss_max_kib)
                o.rss_max_kib = rss_anon_kib();
        printf("bundle-decode: result=%d bytes=%llu seconds=%.3f cpu=%.3f rss_anon_max_kib=%lu error=%s\n", r,
               (unsigned long long) m->image_size, now() - t0,
               (double) ru.ru_utime.tv_sec + (double) ru.ru_utime.tv_usec / 1e6 + (double) ru.ru_stime.tv_sec +
                       (double) ru.ru_stime.tv_usec / 1e6,
               o.rss_max_kib, payload_decoder_error(d));
        payload_decoder_free(d);
        bundle_manifest_free(m);
        close(o.fd);
        return r < 0 ? 1 : 0;
}
