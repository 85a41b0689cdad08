/* SPDX-License-Identifier: MIT */
/*
 * delta-plan: the adaptive update's device side alone (delta.c), for
 * benchmarks: plans a bundle against an active slot image (and optionally
 * a target's current content), and with --install OUT also carries it out:
 * copies the reused chunks into OUT, "fetches" the rest from the bundle's
 * local part files through the plan's fetch ranges into the payload
 * decoder, fdatasyncs and checks OUT against the manifest's image SHA-256.
 * With --target, chunks already in that file at their offsets are kept:
 * then --install must name the same file (a resume).
 *
 *   delta-plan [--offset-lookup] [--target FILE] [--ranges FILE] [--install OUT] MANIFEST ACTIVE
 *
 * Prints one line of key=value figures (scan and copy times, bytes, peak
 * RssAnon sampled during the work); --ranges writes the payload ranges to
 * fetch, one "offset length" a line. Not installed.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "bundle_manifest.h"
#include "clock.h"
#include "delta.h"
#include "fileio.h"
#include "macro.h"
#include "payload_decoder.h"

static inline void EVP_MD_CTX_freep(EVP_MD_CTX **p) { EVP_MD_CTX_free(*p); }

struct file {
        int fd;
        unsigned calls;
};

static unsigned long rss_max_kib;

static void sample_rss(void) {
        char line[256];
        unsigned long v = 0;
        FILE *f = fopen("/proc/self/status", "re");

        if (!f)
                return;
        while (fgets(line, sizeof(line), f))
                if (sscanf(line, "RssAnon: %lu kB", &v) == 1)
                        break;
        fclose(f);
        if (v > rss_max_kib)
                rss_max_kib = v;
}

static int file_read(uint64_t offset, void *buf, size_t len, void *userdata) {
        struct file *f = userdata;

        if (++f->calls % 8 == 0)
                sample_rss();
        return pread_all(f->fd, buf, len, offset);
}

static int file_write(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct file *f = userdata;

        if (++f->calls % 64 == 0)
                sample_rss();
        return pwrite_all(f->fd, buf, len, offset);
}

static int source_of(const char *path, struct file *f, struct delta_source *ret) {
        struct stat st;

        f->fd = open(path, O_RDONLY | O_CLOEXEC);
        if (f->fd < 0 || fstat(f->fd, &st) < 0)
                return -errno;
        *ret = (struct delta_source) { file_read, f, (uint64_t) st.st_size };
        return 0;
}

/* Payload bytes [offset, offset + len) from the part files in dir. */
static int read_payload(const struct bundle_manifest *m, const int *fds, uint64_t offset, uint8_t *buf, size_t len) {
        while (len > 0) {
                size_t i;
                uint64_t in_part, n;
                int r = bundle_manifest_part_at(m, offset, &i);

                if (r < 0)
                        return r;
                in_part = offset - m->parts[i].offset;
                n = m->parts[i].size - in_part < len ? m->parts[i].size - in_part : len;
                r = pread_all(fds[i], buf, (size_t) n, in_part);
                if (r < 0)
                        return r;
                buf += n;
                len -= (size_t) n;
                offset += n;
        }
        return 0;
}

static double cpu_seconds(void) {
        struct rusage ru;

        getrusage(RUSAGE_SELF, &ru);
        return (double) ru.ru_utime.tv_sec + (double) ru.ru_utime.tv_usec / 1e6 + (double) ru.ru_stime.tv_sec +
               (double) ru.ru_stime.tv_usec / 1e6;
}

int main(int argc, char *argv[]) {
        static const struct option options[] = {
                { "offset-lookup", no_argument, NULL, 'o' },
                { "target", required_argument, NULL, 't' },
                { "ranges", required_argument, NULL, 'r' },
                { "install", required_argument, NULL, 'i' },
                {}
        };
        const char *target_path = NULL, *ranges_path = NULL, *install_path = NULL;
        struct bundle_manifest *m = NULL;
        struct payload_decoder *d = NULL;
        struct delta_plan *p = NULL;
        struct delta_scan_options so = {};
        struct file active = { .fd = -1 }, target = { .fd = -1 }, out = { .fd = -1 };
        _cleanup_free_ char *text = NULL, *dir = NULL;
        _cleanup_free_ uint8_t *header = NULL, *chunk = NULL;
        _cleanup_free_ int *fds = NULL;
        const struct delta_stats *s;
        uint64_t t0, scan_usec, copy_usec = 0, fetch_usec = 0, verify_usec = 0;
        char err[256] = "", line[512];
        double cpu_scan;
        size_t size;
        int c, r;

        while ((c = getopt_long(argc, argv, "", options, NULL)) >= 0)
                switch (c) {
                case 'o': so.offset_lookup = true; break;
                case 't': target_path = optarg; break;
                case 'r': ranges_path = optarg; break;
                case 'i': install_path = optarg; break;
                default: return 2;
                }
        if (argc - optind != 2) {
                fprintf(stderr, "usage: delta-plan [--offset-lookup] [--target FILE] [--ranges FILE] "
                                "[--install OUT] MANIFEST ACTIVE\n");
                return 2;
        }
        /* Chunks found in the target are left where they are: the install
         * must write into that very file. */
        if (install_path && target_path && strcmp(install_path, target_path) != 0) {
                fprintf(stderr, "delta-plan: --install writes into the --target it looked in: give the same file\n");
                return 2;
        }
        if (read_file_full(argv[optind], BUNDLE_MANIFEST_MAX, &text, &size) < 0 ||
            bundle_manifest_parse(text, size, &m, err, sizeof(err)) < 0) {
                fprintf(stderr, "delta-plan: bad manifest %s: %s\n", argv[optind], err);
                return 1;
        }
        {
                _cleanup_free_ char *copy = strdup(argv[optind]);
                dir = copy ? strdup(dirname(copy)) : NULL;
        }
        fds = calloc(m->n_parts, sizeof(int));
        header = malloc(m->header_size);
        chunk = malloc(2 * (size_t) m->chunk_size_max + 4096);
        if (!dir || !fds || !header || !chunk)
                return 1;
        for (size_t i = 0; i < m->n_parts; i++) {
                char path[4096];

                snprintf(path, sizeof(path), "%s/%s", dir, m->parts[i].file);
                fds[i] = open(path, O_RDONLY | O_CLOEXEC);
                if (fds[i] < 0) {
                        perror(path);
                        return 1;
                }
        }
        if (install_path) {
                out.fd = open(install_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
                if (out.fd < 0 || ftruncate(out.fd, (off_t) m->image_size) < 0) {
                        perror(install_path);
                        return 1;
                }
        }
        /* The header first, as the device fetches it before it plans. */
        if (read_payload(m, fds, 0, header, m->header_size) < 0 ||
            payload_decoder_new(m, file_write, &out, &d) < 0 || payload_decoder_feed(d, header, m->header_size) < 0 ||
            delta_plan_new(m, d, &p) < 0) {
                fprintf(stderr, "delta-plan: header: %s\n", d ? payload_decoder_error(d) : "");
                return 1;
        }
        if (source_of(argv[optind + 1], &active, &so.active) < 0) {
                perror(argv[optind + 1]);
                return 1;
        }
        if (target_path && source_of(target_path, &target, &so.target) < 0) {
                perror(target_path);
                return 1;
        }
        sample_rss();
        t0 = clock_now_usec();
        r = delta_scan(p, &so);
        scan_usec = clock_now_usec() - t0;
        cpu_scan = cpu_seconds();
        sample_rss();
        if (r < 0) {
                fprintf(stderr, "delta-plan: scan failed: %s\n", strerror(-r));
                return 1;
        }

        if (install_path) {
                struct delta_copy_options co = { .active = so.active, .write = file_write, .write_userdata = &out };
                _cleanup_free_ struct delta_range *ranges = NULL;
                _cleanup_(EVP_MD_CTX_freep) EVP_MD_CTX *md = EVP_MD_CTX_new();
                uint8_t digest[32];
                size_t n = 0;

                t0 = clock_now_usec();
                r = delta_copy(p, &co);
                if (r < 0) {
                        fprintf(stderr, "delta-plan: copy failed: %s\n", strerror(-r));
                        return 1;
                }
                copy_usec = clock_now_usec() - t0;
                /* The "fetch": whole chunks of the ranges, from the parts. */
                t0 = clock_now_usec();
                if (delta_plan_fetch_ranges(p, 0, m->payload_size, &ranges, &n) < 0)
                        return 1;
                for (size_t i = 0; i < n; i++)
                        for (uint64_t off = ranges[i].offset; off < ranges[i].offset + ranges[i].length;) {
                                struct delta_chunk dc;
                                uint32_t index;

                                if (delta_plan_chunk_at_payload(p, off, &index) < 0 ||
                                    delta_plan_chunk(p, index, &dc) < 0 ||
                                    read_payload(m, fds, off, chunk, dc.payload_size) < 0 ||
                                    payload_decoder_put_chunk(d, index, chunk, dc.payload_size) < 0) {
                                        fprintf(stderr, "delta-plan: fetched chunk at %llu: %s\n",
                                                (unsigned long long) off, payload_decoder_error(d));
                                        return 1;
                                }
                                off += dc.payload_size;
                        }
                if (fdatasync(out.fd) < 0)
                        return 1;
                fetch_usec = clock_now_usec() - t0;
                /* The read-back that decides. */
                t0 = clock_now_usec();
                if (!md || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1)
                        return 1;
                for (uint64_t off = 0; off < m->image_size;) {
                        size_t len = m->image_size - off < 2 * (size_t) m->chunk_size_max
                                             ? (size_t) (m->image_size - off)
                                             : 2 * (size_t) m->chunk_size_max;

                        if (pread_all(out.fd, chunk, len, off) < 0)
                                return 1;
                        EVP_DigestUpdate(md, chunk, len);
                        off += len;
                }
                EVP_DigestFinal_ex(md, digest, NULL);
                verify_usec = clock_now_usec() - t0;
                if (memcmp(digest, m->image_sha256, 32) != 0) {
                        fprintf(stderr, "delta-plan: the installed image does not match the manifest\n");
                        return 1;
                }
        }

        if (ranges_path) {
                _cleanup_free_ struct delta_range *ranges = NULL;
                _cleanup_fclose_ FILE *f = fopen(ranges_path, "we");
                size_t n = 0;

                if (!f || delta_plan_fetch_ranges(p, 0, m->payload_size, &ranges, &n) < 0)
                        return 1;
                for (size_t i = 0; i < n; i++)
                        fprintf(f, "%llu %llu\n", (unsigned long long) ranges[i].offset,
                                (unsigned long long) ranges[i].length);
        }

        s = delta_plan_stats(p);
        delta_stats_format(s, line, sizeof(line));
        fprintf(stderr, "%s\n", line);
        printf("delta-plan: chunks=%u in_place=%u in_place_bytes=%llu active=%u active_bytes=%llu same_offset=%u "
               "by_offset=%u fetch=%u "
               "fetch_payload_bytes=%llu fetch_image_bytes=%llu payload_bytes=%llu header_bytes=%u "
               "target_read=%llu active_read=%llu scan_s=%.3f scan_cpu_s=%.3f copy_s=%.3f copied_bytes=%llu "
               "fetch_s=%.3f verify_s=%.3f rss_anon_max_kib=%lu read_errors=%u copy_errors=%u fallback=%s\n",
               s->chunks, s->in_place_chunks, (unsigned long long) s->in_place_bytes, s->active_chunks,
               (unsigned long long) s->active_bytes, s->active_same_offset_chunks,
               s->active_offset_lookup_chunks, s->fetch_chunks, (unsigned long long) s->fetch_payload_bytes,
               (unsigned long long) s->fetch_image_bytes, (unsigned long long) s->payload_bytes, m->header_size,
               (unsigned long long) s->target_read_bytes, (unsigned long long) s->active_read_bytes,
               (double) scan_usec / 1e6, cpu_scan, (double) copy_usec / 1e6, (unsigned long long) s->copied_bytes,
               (double) fetch_usec / 1e6, (double) verify_usec / 1e6, rss_max_kib, s->read_errors,
               s->copy_read_errors + s->copy_mismatches, s->fallback[0] ? "yes" : "no");
        delta_plan_free(p);
        payload_decoder_free(d);
        bundle_manifest_free(m);
        return 0;
}
