/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <systemd/sd-event.h>
#include <systemd/sd-id128.h>
#include <unistd.h>

#include "blockmap.h"
#include "bundle_install.h"
#include "bundle_manifest.h"
#include "clock.h"
#include "config.h"
#include "delta.h"
#include "download.h"
#include "fileio.h"
#include "installer.h"
#include "log.h"
#include "macro.h"
#include "ota_document.h"
#include "payload_decoder.h"
#include "transfer.h"
#include "worker.h"

#define CHUNK_MAP_FILE "bundle.chunks"
/* The chunk map's identity in blockmap's record: no files[] index is this
 * big, so a file's record can never pass for it. */
#define CHUNK_MAP_INDEX 0xffffu
/* The target is synced and the map made durable at least this often (what
 * a power cut may cost), and the map of chunks written in this boot is
 * recorded this often without a sync (what a kill -9 may cost). */
#define SYNC_USEC USEC_PER_SEC
#define SYNC_BYTES (8U << 20)
#define RECORD_USEC (200 * USEC_PER_MSEC)
/* Chunks being assembled from fetched bytes: what is in flight, a few
 * windows of blocks across a few chunks. More means the transfer delivers
 * bytes of far more chunks at once than it ever should. */
#define PENDING_MAX (64U << 20)
/* A chunk whose bytes do not match its checksum is fetched again, up to
 * this many passes over the misfits. */
#define REFETCH_PASSES 3

enum phase {
        PHASE_HEADER, /* fetching the payload's header */
        PHASE_SCAN,   /* looking for the bundle's chunks on the device (worker) */
        PHASE_COPY,   /* copying those found from the active slot (worker) */
        PHASE_FETCH,  /* fetching the rest */
        PHASE_ENDED,  /* finished() is due */
};

struct pending {
        uint32_t index;
        uint32_t received;
        uint32_t size;
        uint8_t *buf;
};

struct bundle_install {
        struct otad *otad;
        struct bundle_install_params p;
        char *job_id;
        const struct bundle_install_ops *ops;
        void *userdata;
        enum phase phase;
        sd_event_source *step;   /* runs the next phase outside callbacks */
        int result;
        char reason[320];

        struct payload_decoder *decoder;
        struct delta_plan *plan;
        uint8_t *header;
        uint64_t header_received;
        uint64_t *chunk_start;   /* payload offset of each chunk, and the end */
        uint32_t n_chunks;

        struct blockmap *written, *durable;
        sd_id128_t boot_id;
        char *map_path;
        char identity[65];       /* the map is this payload's: its header's SHA-256 */
        struct download_file map_file;
        uint64_t last_sync_usec, last_record_usec, unsynced_bytes;

        /* One pass of fetching: absolute payload ranges, part by part. */
        struct download_range *ranges;
        size_t n_ranges;
        size_t part;
        unsigned passes;
        struct transfer *transfer;
        struct pending *pending;
        size_t n_pending;
        uint64_t pending_bytes;
        uint32_t *misfits;       /* chunks to fetch again */
        size_t n_misfits;
        uint64_t remaining;      /* payload bytes of chunks not in the target yet */

        struct worker *worker;
        bool resumed;            /* an earlier run's chunk map was found */
        int source_fd;           /* the active slot, read-only */
        uint64_t source_size;

        struct bundle_install_stats stats;
};

static void schedule(struct bundle_install *b) {
        (void) sd_event_source_set_enabled(b->step, SD_EVENT_ONESHOT);
}

/* Ends the install; finished() follows from the loop. */
static void fail(struct bundle_install *b, int error, const char *format, ...) __attribute__((format(printf, 3, 4)));
static void fail(struct bundle_install *b, int error, const char *format, ...) {
        va_list ap;

        if (b->phase == PHASE_ENDED)
                return;
        va_start(ap, format);
        errno = error < 0 ? -error : error; /* for %m */
        vsnprintf(b->reason, sizeof(b->reason), format, ap);
        va_end(ap);
        b->result = error < 0 ? error : -error;
        b->phase = PHASE_ENDED;
        schedule(b);
}

static void report(struct bundle_install *b) {
        b->stats.done_bytes = b->stats.payload_bytes - b->remaining -
                              (b->header ? b->p.manifest->header_size - b->header_received : 0);
        b->ops->progress(&b->stats, b->userdata);
}

/* the chunk map */

static int save_map(struct bundle_install *b, bool sync) {
        int r;

        if (sync) {
                r = b->p.target->ops->sync(b->p.target);
                if (r < 0)
                        return r;
                r = blockmap_assign(b->durable, b->written);
                if (r < 0)
                        return r;
                b->unsynced_bytes = 0;
                b->last_sync_usec = clock_now_usec();
        }
        b->last_record_usec = clock_now_usec();
        r = blockmap_save(b->written, b->durable, b->boot_id, &b->map_file, b->map_path, sync);
        if (r < 0)
                /* Guards no action: it only costs chunks fetched again after
                 * a restart. */
                log_job_errno(LOG_WARNING, r, b->job_id, "download", "Failed to record the chunks written in %s: %m, ignoring",
                              b->map_path);
        return 0;
}

static int checkpoint(struct bundle_install *b) {
        uint64_t now = clock_now_usec();

        if (now - b->last_sync_usec >= SYNC_USEC || b->unsynced_bytes >= SYNC_BYTES)
                return save_map(b, true);
        if (!sd_id128_is_null(b->boot_id) && now - b->last_record_usec >= RECORD_USEC)
                return save_map(b, false);
        return 0;
}

void bundle_install_forget(const struct otad_config *config) {
        _cleanup_free_ char *path = NULL;

        if (asprintf(&path, "%s/%s", config->state.directory, CHUNK_MAP_FILE) >= 0)
                (void) unlink(path);
}

/* The chunks an earlier run of this install wrote: in place, not fetched
 * again. Written ones count only in the boot that wrote them. */
static int load_map(struct bundle_install *b) {
        struct blockmap *loaded = NULL, *loaded_durable = NULL;
        int r;

        r = blockmap_new(b->n_chunks, 1, &b->written);
        if (r >= 0)
                r = blockmap_new(b->n_chunks, 1, &b->durable);
        if (r < 0)
                return r;
        r = blockmap_load(b->map_path, &b->map_file, b->boot_id, &loaded, &loaded_durable);
        if (r == -ENOENT)
                return 0;
        /* Another payload's record (the last update's): this install
         * starts now, nothing in the target is its own. A record that
         * cannot be read may be this install's, torn: the target may hold
         * its chunks, and the scan looks there. */
        b->resumed = r != -ESTALE;
        if (r < 0 || blockmap_blocks(loaded) != b->n_chunks) {
                log_job(LOG_NOTICE, b->job_id, "download", "Not resuming from %s: %s", b->map_path,
                        r == -ESTALE ? "it is another payload's" : "it cannot be read");
                blockmap_free(loaded);
                blockmap_free(loaded_durable);
                return 0;
        }
        for (uint32_t i = 0; i < b->n_chunks; i++)
                if (blockmap_test(loaded, i)) {
                        struct payload_chunk c;

                        blockmap_set(b->written, i);
                        (void) delta_plan_set_in_place(b->plan, i);
                        if (payload_decoder_chunk(b->decoder, i, &c) >= 0)
                                b->remaining -= c.payload_size;
                        b->stats.chunks_resumed++;
                        b->stats.chunks_done++;
                }
        blockmap_free(loaded);
        /* What a power cut from now on keeps: what was synced before. */
        r = blockmap_assign(b->durable, loaded_durable);
        blockmap_free(loaded_durable);
        return r;
}

/* bytes: the decoder's output, the transfer's input */

static int on_decoded(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct bundle_install *b = userdata;
        int r;

        r = b->p.target->ops->write(b->p.target, offset, buf, len);
        if (r < 0)
                return r;
        b->unsynced_bytes += len;
        return 0;
}

static uint32_t chunk_containing(const struct bundle_install *b, uint64_t offset) {
        uint32_t lo = 0, hi = b->n_chunks;

        /* The last chunk starting at or before offset. */
        while (hi - lo > 1) {
                uint32_t mid = lo + (hi - lo) / 2;

                if (b->chunk_start[mid] <= offset)
                        lo = mid;
                else
                        hi = mid;
        }
        return lo;
}

static struct pending *pending_for(struct bundle_install *b, uint32_t index) {
        struct pending *p;
        uint32_t size = (uint32_t) (b->chunk_start[index + 1] - b->chunk_start[index]);

        for (size_t i = 0; i < b->n_pending; i++)
                if (b->pending[i].index == index)
                        return &b->pending[i];
        if (b->pending_bytes + size > PENDING_MAX)
                return NULL;
        p = realloc(b->pending, (b->n_pending + 1) * sizeof(*p));
        if (!p)
                return NULL;
        b->pending = p;
        p = &b->pending[b->n_pending];
        *p = (struct pending){ .index = index, .size = size, .buf = malloc(size) };
        if (!p->buf)
                return NULL;
        b->n_pending++;
        b->pending_bytes += size;
        return p;
}

static void pending_drop(struct bundle_install *b, struct pending *p) {
        b->pending_bytes -= p->size;
        free(p->buf);
        *p = b->pending[--b->n_pending];
}

/* A chunk's bytes are all here: the decoder checks, decompresses and
 * writes it. */
static int chunk_complete(struct bundle_install *b, struct pending *p) {
        uint32_t index = p->index, size = p->size;
        uint32_t *misfits;
        int r;

        r = payload_decoder_put_chunk(b->decoder, index, p->buf, p->size);
        pending_drop(b, p);
        if (r == -EBADMSG) {
                log_job(LOG_WARNING, b->job_id, "download", "Chunk %u of the payload: %s; fetching it again", index,
                        payload_decoder_error(b->decoder));
                misfits = realloc(b->misfits, (b->n_misfits + 1) * sizeof(*misfits));
                if (!misfits)
                        return -ENOMEM;
                b->misfits = misfits;
                b->misfits[b->n_misfits++] = index;
                b->stats.chunks_refetched++;
                return 0;
        }
        if (r < 0)
                return r;
        blockmap_set(b->written, index);
        b->remaining -= size;
        b->stats.chunks_fetched++;
        b->stats.chunks_done++;
        r = checkpoint(b);
        if (r < 0)
                return r;
        report(b);
        return 0;
}

static int on_payload(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct bundle_install *b = userdata;
        const uint8_t *p = buf;
        int r;

        b->stats.fetched_bytes += len;
        if (b->phase == PHASE_HEADER) {
                /* Wanted ranges never reach past the header here. */
                if (offset + len > b->p.manifest->header_size)
                        return -ERANGE;
                memcpy(b->header + offset, buf, len);
                b->header_received += len;
                return 0;
        }
        while (len > 0) {
                uint32_t index = chunk_containing(b, offset);
                struct pending *pc = pending_for(b, index);
                uint64_t start = b->chunk_start[index];
                size_t n;

                if (!pc)
                        return -ENOBUFS;
                n = (size_t) (start + pc->size - offset) < len ? (size_t) (start + pc->size - offset) : len;
                memcpy(pc->buf + (offset - start), p, n);
                pc->received += (uint32_t) n;
                if (pc->received == pc->size) {
                        r = chunk_complete(b, pc);
                        if (r < 0)
                                return r;
                }
                offset += n;
                p += n;
                len -= n;
        }
        return 0;
}

static int on_sync(void *userdata) {
        struct bundle_install *b = userdata;

        /* A transfer's own record is not what resumes an install (the
         * chunk map is), but the target gets synced all the same. */
        return b->p.target->ops->sync(b->p.target);
}

/* fetching, part by part */

static void on_transfer_progress(uint64_t done_units, uint64_t total_units, uint64_t done_bytes, void *userdata) {
        struct bundle_install *b = userdata;

        if (b->phase == PHASE_HEADER)
                report(b);
}

static void on_transfer_need_url(void *userdata) {
        struct bundle_install *b = userdata;

        b->ops->need_fresh_url(b->userdata);
}

static void on_transfer_finished(int result, const char *reason, void *userdata) {
        struct bundle_install *b = userdata;
        unsigned file = b->p.part_files[b->part];

        if (result < 0) {
                char why[256];

                snprintf(why, sizeof(why), "%s", reason && *reason ? reason : "");
                transfer_free(b->transfer);
                b->transfer = NULL;
                if (*why)
                        fail(b, result, "part %zu (files[%u]): %s", b->part, file, why);
                else
                        fail(b, result, "part %zu (files[%u]): %m", b->part, file);
                return;
        }
        transfer_free(b->transfer);
        b->transfer = NULL;
        /* Bytes of a chunk that the part did not finish are in the next
         * part: the assembler keeps them. */
        b->part++;
        schedule(b);
}

static const struct transfer_ops transfer_ops = {
        .progress = on_transfer_progress,
        .need_fresh_url = on_transfer_need_url,
        .finished = on_transfer_finished,
};

/* Starts the transfer of the next part holding wanted bytes; false when no
 * part is left. */
static bool fetch_next_part(struct bundle_install *b) {
        const struct bundle_manifest *m = b->p.manifest;

        for (; b->part < m->n_parts; b->part++) {
                const struct bundle_part *part = &m->parts[b->part];
                _cleanup_free_ struct download_range *rel = NULL;
                size_t n = 0;
                int r;

                for (size_t i = 0; i < b->n_ranges; i++) {
                        uint64_t s = b->ranges[i].offset, e = s + b->ranges[i].length;
                        struct download_range *grown;

                        if (e <= part->offset || s >= part->offset + part->size)
                                continue;
                        s = s > part->offset ? s : part->offset;
                        e = e < part->offset + part->size ? e : part->offset + part->size;
                        grown = realloc(rel, (n + 1) * sizeof(*rel));
                        if (!grown) {
                                fail(b, -ENOMEM, "out of memory");
                                return true;
                        }
                        rel = grown;
                        rel[n++] = (struct download_range){ s - part->offset, e - s };
                }
                if (n == 0)
                        continue;
                /* This install's chunk map is what resumes it: an older
                 * record of the part's transfer would skip bytes that the
                 * assembler never kept. */
                transfer_forget_progress(b->otad->config, b->p.part_files[b->part]);
                r = transfer_start(b->otad, b->p.doc, b->p.protocol, b->p.part_files[b->part],
                                   &(const struct transfer_sink){ .write = on_payload, .sync = on_sync,
                                                                  .userdata = b, .base = part->offset },
                                   rel, n, b->job_id, &transfer_ops, b, &b->transfer);
                if (r < 0)
                        fail(b, r, "cannot start fetching part %zu (files[%u]): %m", b->part, b->p.part_files[b->part]);
                return true;
        }
        return false;
}

static void set_ranges(struct bundle_install *b, struct download_range *ranges, size_t n) {
        free(b->ranges);
        b->ranges = ranges;
        b->n_ranges = n;
        b->part = 0;
}

/* the phases */

static int read_source(uint64_t offset, void *buf, size_t len, void *userdata) {
        struct bundle_install *b = userdata;

        return pread_all(b->source_fd, buf, len, offset);
}

static int write_target(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct bundle_install *b = userdata;

        return b->p.target->ops->write(b->p.target, offset, buf, len);
}

static bool is_cancelled(void *userdata) {
        return worker_cancelled(userdata);
}

static int read_target(uint64_t offset, void *buf, size_t len, void *userdata) {
        struct bundle_install *b = userdata;

        return b->p.target->ops->read(b->p.target, offset, buf, len);
}

static int scan_in_thread(struct worker *w, void *arg) {
        struct bundle_install *b = arg;

        /* After a restart the target holds chunks written since the map
         * last became durable (a power cut): one read of it finds them.
         * On a first install it would only save writes, not bytes on the
         * wire, so it is not worth reading a whole slot for. Looking at
         * each missing chunk's own offset in the active slot finds a few
         * hundred bytes a release (tests/bench/bench_delta.py): off. */
        return delta_scan(b->plan, &(const struct delta_scan_options){
                                           .active = { .read = read_source, .userdata = b, .size = b->source_size },
                                           .target = { .read = b->resumed ? read_target : NULL, .userdata = b,
                                                       .size = b->p.manifest->image_size },
                                           .cancelled = is_cancelled,
                                           .cancel_userdata = w,
                                   });
}

static int copy_in_thread(struct worker *w, void *arg) {
        struct bundle_install *b = arg;
        int r;

        r = delta_copy(b->plan, &(const struct delta_copy_options){
                                        .active = { .read = read_source, .userdata = b, .size = b->source_size },
                                        .write = write_target,
                                        .write_userdata = b,
                                        .cancelled = is_cancelled,
                                        .cancel_userdata = w,
                                });
        /* What was copied counts once it is on the device: a sync of up to
         * a whole slot belongs in the thread too. */
        if (r >= 0)
                r = b->p.target->ops->sync(b->p.target);
        return r;
}

static void start_fetching(struct bundle_install *b);

static void on_copied(int result, void *userdata) {
        struct bundle_install *b = userdata;
        const struct delta_stats *s = delta_plan_stats(b->plan);

        b->worker = NULL;
        if (result < 0) {
                fail(b, result, "cannot copy the chunks found in the active slot into the target: %m");
                return;
        }
        for (uint32_t i = 0; i < b->n_chunks; i++) {
                struct delta_chunk c;

                if (delta_plan_chunk(b->plan, i, &c) >= 0 && c.action == DELTA_COPIED && !blockmap_test(b->written, i)) {
                        blockmap_set(b->written, i);
                        b->remaining -= c.payload_size;
                        b->stats.chunks_reused++;
                        b->stats.chunks_done++;
                        b->stats.reused_bytes += c.image_size;
                }
        }
        b->unsynced_bytes = 0; /* the thread synced it */
        if (save_map(b, true) < 0) {
                fail(b, -EIO, "cannot sync the target after copying chunks into it");
                return;
        }
        delta_stats_format(s, b->stats.delta, sizeof(b->stats.delta));
        start_fetching(b);
}

static void on_scanned(int result, void *userdata) {
        struct bundle_install *b = userdata;
        const struct delta_stats *s = delta_plan_stats(b->plan);
        int r;

        b->worker = NULL;
        if (result < 0) {
                fail(b, result, "cannot look for the bundle's chunks on the device: %m");
                return;
        }
        /* Chunks the scan found already in the target count as written. */
        for (uint32_t i = 0; i < b->n_chunks; i++) {
                struct delta_chunk c;

                if (delta_plan_chunk(b->plan, i, &c) >= 0 && c.action == DELTA_IN_PLACE &&
                    !blockmap_test(b->written, i)) {
                        blockmap_set(b->written, i);
                        b->remaining -= c.payload_size;
                        b->stats.chunks_resumed++;
                        b->stats.chunks_done++;
                }
        }
        delta_stats_format(s, b->stats.delta, sizeof(b->stats.delta));
        log_job(LOG_INFO, b->job_id, "download", "Chunks found on the device: %s", b->stats.delta);
        if (s->active_chunks == 0) {
                start_fetching(b);
                return;
        }
        b->phase = PHASE_COPY;
        r = worker_start(b->otad->event, copy_in_thread, b, on_copied, b, &b->worker);
        if (r < 0)
                fail(b, r, "cannot start copying chunks: %m");
}

static void start_fetching(struct bundle_install *b) {
        struct delta_range *dr = NULL;
        size_t n = 0;
        int r;

        b->phase = PHASE_FETCH;
        /* delta_range and download_range are the same layout (delta.h). */
        r = delta_plan_fetch_ranges(b->plan, 0, b->p.manifest->payload_size, &dr, &n);
        if (r < 0) {
                fail(b, r, "cannot plan what to fetch: %m");
                return;
        }
        set_ranges(b, (struct download_range *) dr, n);
        b->stats.to_fetch_bytes = delta_plan_stats(b->plan)->fetch_payload_bytes;
        log_job(LOG_INFO, b->job_id, "download",
                "Fetching %" PRIu64 " of the payload's %" PRIu64 " bytes (%u of %u chunks; %u written before, %u copied from the active slot)",
                b->stats.to_fetch_bytes, b->p.manifest->payload_size, delta_plan_stats(b->plan)->fetch_chunks,
                b->n_chunks, b->stats.chunks_resumed, b->stats.chunks_reused);
        report(b);
        schedule(b);
}

static int open_source(struct bundle_install *b) {
        _cleanup_close_ int fd = -1;
        struct stat st;
        uint64_t size;

        if (!b->p.active)
                return -ENODEV;
        fd = open(b->p.active->device, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0 || fstat(fd, &st) < 0)
                return -errno;
        if (S_ISBLK(st.st_mode)) {
                if (ioctl(fd, BLKGETSIZE64, &size) < 0)
                        return -errno;
        } else if (S_ISREG(st.st_mode))
                size = (uint64_t) st.st_size;
        else
                return -ENOTBLK;
        b->source_fd = take_fd(&fd);
        b->source_size = size;
        return 0;
}

/* The header is here: it tells the chunks, the plan says which to fetch. */
static void header_done(struct bundle_install *b) {
        int r;

        r = payload_decoder_feed(b->decoder, b->header, b->p.manifest->header_size);
        free(b->header);
        b->header = NULL;
        if (r < 0) {
                fail(b, r, "the payload's header: %s", payload_decoder_error(b->decoder));
                return;
        }
        b->n_chunks = payload_decoder_chunk_count(b->decoder);
        b->chunk_start = calloc((size_t) b->n_chunks + 1, sizeof(*b->chunk_start));
        if (!b->chunk_start) {
                fail(b, -ENOMEM, "out of memory for the chunk index");
                return;
        }
        for (uint32_t i = 0; i < b->n_chunks; i++) {
                struct payload_chunk c;

                r = payload_decoder_chunk(b->decoder, i, &c);
                if (r < 0) {
                        fail(b, r, "the payload's chunk %u: %m", i);
                        return;
                }
                b->chunk_start[i] = c.payload_offset;
                b->chunk_start[i + 1] = c.payload_offset + c.payload_size;
        }
        b->stats.chunks = b->n_chunks;
        b->map_file.size = b->n_chunks; /* a map of chunks, one "byte" each */
        b->remaining = b->p.manifest->payload_size - b->p.manifest->header_size;
        r = delta_plan_new(b->p.manifest, b->decoder, &b->plan);
        if (r >= 0)
                r = load_map(b);
        if (r < 0) {
                fail(b, r, "cannot plan the install: %m");
                return;
        }
        r = open_source(b);
        if (r < 0 || delta_plan_stats(b->plan)->fallback[0]) {
                if (r < 0)
                        log_job_errno(LOG_NOTICE, r, b->job_id, "download",
                                      "Not looking for chunks on the device: the active slot cannot be read: %m");
                start_fetching(b);
                return;
        }
        b->phase = PHASE_SCAN;
        r = worker_start(b->otad->event, scan_in_thread, b, on_scanned, b, &b->worker);
        if (r < 0)
                fail(b, r, "cannot start looking for chunks: %m");
}

/* Every chunk is in the target: the misfits get their passes, then the
 * target is synced and the install ends. */
static void fetch_pass_done(struct bundle_install *b) {
        struct download_range *ranges;
        int r;

        if (b->n_pending > 0) {
                fail(b, -EPROTO, "the transfer ended with %zu chunk(s) incomplete", b->n_pending);
                return;
        }
        if (b->n_misfits > 0) {
                if (++b->passes > REFETCH_PASSES) {
                        fail(b, -EBADMSG, "%zu chunk(s) still do not match their checksums after %u fetches: "
                             "the payload the service sends is not the bundle the manifest describes",
                             b->n_misfits, REFETCH_PASSES + 1);
                        return;
                }
                size_t n = b->n_misfits;

                ranges = calloc(n, sizeof(*ranges));
                if (!ranges) {
                        fail(b, -ENOMEM, "out of memory");
                        return;
                }
                for (size_t i = 0; i < n; i++)
                        ranges[i] = (struct download_range){
                                b->chunk_start[b->misfits[i]],
                                b->chunk_start[b->misfits[i] + 1] - b->chunk_start[b->misfits[i]],
                        };
                /* Sorted, as transfers want them. */
                for (size_t i = 1; i < n; i++)
                        for (size_t k = i; k > 0 && ranges[k - 1].offset > ranges[k].offset; k--) {
                                struct download_range t = ranges[k];

                                ranges[k] = ranges[k - 1];
                                ranges[k - 1] = t;
                        }
                b->n_misfits = 0;
                set_ranges(b, ranges, n);
                schedule(b);
                return;
        }
        r = save_map(b, true);
        if (r < 0) {
                fail(b, r, "cannot sync the target: %m");
                return;
        }
        b->result = 0;
        b->phase = PHASE_ENDED;
        report(b);
        schedule(b);
}

static int on_step(sd_event_source *s, void *userdata) {
        struct bundle_install *b = userdata;

        switch (b->phase) {
        case PHASE_HEADER:
                if (b->transfer)
                        return 0;
                if (!fetch_next_part(b)) {
                        if (b->header_received != b->p.manifest->header_size)
                                fail(b, -EPROTO, "the payload's header ended after %" PRIu64 " of %" PRIu32 " bytes",
                                     b->header_received, b->p.manifest->header_size);
                        else
                                header_done(b);
                }
                return 0;
        case PHASE_FETCH:
                if (b->transfer)
                        return 0;
                if (!fetch_next_part(b))
                        fetch_pass_done(b);
                return 0;
        case PHASE_ENDED:
                b->ops->finished(b->result, b->result < 0 ? b->reason : NULL, b->userdata);
                return 0;
        default:
                return 0;
        }
}

int bundle_install_start(struct otad *otad, const struct bundle_install_params *params,
                         const struct bundle_install_ops *ops, void *userdata, struct bundle_install **ret) {
        const struct bundle_manifest *m;
        struct bundle_install *b;
        struct download_range *header;
        int r;

        assert_return(otad && params && params->manifest && params->target && params->part_files && ops && ret,
                      -EINVAL);
        m = params->manifest;
        b = calloc(1, sizeof(*b));
        if (!b)
                return -ENOMEM;
        b->otad = otad;
        b->p = *params;
        b->ops = ops;
        b->userdata = userdata;
        b->source_fd = -1;
        b->phase = PHASE_HEADER;
        b->stats.payload_bytes = m->payload_size;
        b->remaining = m->payload_size - m->header_size;
        b->job_id = strdup(params->job_id);
        b->header = malloc(m->header_size);
        header = calloc(1, sizeof(*header));
        if (!b->job_id || !b->header || !header) {
                free(header);
                r = -ENOMEM;
                goto fail;
        }
        *header = (struct download_range){ 0, m->header_size };
        set_ranges(b, header, 1);
        bundle_sha256_hex(m->header_sha256, b->identity);
        if (asprintf(&b->map_path, "%s/%s", otad->config->state.directory, CHUNK_MAP_FILE) < 0) {
                r = -ENOMEM;
                goto fail;
        }
        b->map_file = (struct download_file){ .job_id = b->job_id, .file_index = CHUNK_MAP_INDEX,
                                              .size = 0, .signature = b->identity, .state_path = b->map_path };
        if (sd_id128_get_boot(&b->boot_id) < 0)
                b->boot_id = SD_ID128_NULL; /* durable records only */
        b->last_sync_usec = b->last_record_usec = clock_now_usec();
        r = payload_decoder_new(m, on_decoded, b, &b->decoder);
        if (r < 0)
                goto fail;
        r = sd_event_add_defer(otad->event, &b->step, on_step, b);
        if (r < 0)
                goto fail;
        *ret = b;
        return 0;
fail:
        bundle_install_free(b);
        return r;
}

void bundle_install_free(struct bundle_install *b) {
        if (!b)
                return;
        worker_free(b->worker);
        transfer_free(b->transfer);
        sd_event_source_disable_unref(b->step);
        while (b->n_pending > 0)
                pending_drop(b, &b->pending[0]);
        free(b->pending);
        free(b->misfits);
        free(b->ranges);
        free(b->header);
        free(b->chunk_start);
        delta_plan_free(b->plan);
        payload_decoder_free(b->decoder);
        blockmap_free(b->written);
        blockmap_free(b->durable);
        if (b->source_fd >= 0)
                close(b->source_fd);
        free(b->map_path);
        free(b->job_id);
        free(b);
}

void bundle_install_set_url(struct bundle_install *b, const struct ota_document *doc) {
        unsigned file;

        if (!b || !b->transfer || b->part >= b->p.manifest->n_parts)
                return;
        file = b->p.part_files[b->part];
        if (file < doc->n_files && doc->files[file].update_data_url)
                (void) transfer_set_url(b->transfer, doc->files[file].update_data_url);
}

void bundle_install_get_stats(const struct bundle_install *b, struct bundle_install_stats *ret) {
        *ret = b->stats;
}
