/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backoff.h"
#include "blockmap.h"
#include "clock.h"
#include "config.h"
#include "log.h"
#include "macro.h"
#include "mqtt.h"
#include "ranges.h"
#include "stream.h"
#include "stream_codec.h"

/* AWS caps one GetStream answer at 128 KiB and a block at 256..131072 bytes
 * (protocol.md §3.2, §3.7). */
#define REQUEST_BYTES_MAX 131072u
#define BLOCK_SIZE_MIN 256u
#define BLOCK_SIZE_MAX 131072u
#define REQUEST_BLOCKS_MAX (REQUEST_BYTES_MAX / BLOCK_SIZE_MIN)
/* With wanted ranges a request names up to a request's worth of wanted
 * blocks spread over this many blocks (a 1 KiB bitmap: "b" may be up to
 * 12287 bytes, §3.2; like the reference agent's whole-file bitmap with a
 * small "n"). Beyond it, sparse wants take one more request. */
#define REQUEST_SPAN_MAX 8192u
/* Progress records (download.h): the blocks written are recorded after
 * every request's worth of new blocks (128 KiB) or RECORD_USEC, without a
 * flush, so a kill -9 costs at most that plus the blocks in flight; the
 * target is synced and the record made durable every 1 MiB or second,
 * whichever comes first, which bounds what a power cut costs. */
#define RECORD_USEC (200 * USEC_PER_MSEC)
#define CHECKPOINT_BYTES (1u << 20)
#define CHECKPOINT_USEC USEC_PER_SEC
#define OFFLINE_POLL_USEC USEC_PER_SEC
#define BACKOFF_MIN_USEC USEC_PER_SEC
#define BACKOFF_MAX_USEC (30 * USEC_PER_SEC)

#define QUIET_MIN_USEC (250 * USEC_PER_MSEC)
/* After a restart, answers to the killed run's requests may still be on
 * their way (AWS delays what exceeds 512 KiB/s, up to a window's worth):
 * take them before asking for anything, as long as they keep coming. */
#define ADOPT_QUIET_USEC (300 * USEC_PER_MSEC)

/* One GetStream request in flight: the blocks it asked for. */
struct request_slot {
        bool active;
        uint64_t seq;         /* order of sending */
        uint64_t offset;      /* "o" */
        uint32_t n;           /* "n" */
        uint32_t span;        /* blocks the bitmap covers */
        uint64_t outstanding; /* asked-for blocks not yet received */
        uint64_t sent;        /* CLOCK_MONOTONIC usec */
        bool answered;        /* a block of it arrived */
        uint64_t deadline;    /* sent + request_timeout */
        uint8_t bitmap[REQUEST_SPAN_MAX / 8];
};

struct stream_download {
        struct otad *otad;
        struct mqtt_session *mqtt;
        unsigned file_id;
        char *stream_name;
        char *topic_get, *topic_data, *topic_rejected;
        struct download_file file; /* strings and wanted ranges owned */
        struct download_range *wanted; /* canonical (ranges.h); NULL: the whole file */
        size_t n_wanted;
        const struct download_ops *ops;
        void *userdata;

        struct mqtt_subscription *sub_data, *sub_rejected;
        bool data_ready, rejected_ready;

        struct blockmap *received; /* written to the target */
        struct blockmap *durable;  /* of those, synced before the last durable record */
        struct blockmap *inflight; /* asked for by an active slot */
        struct blockmap *want;     /* blocks holding wanted bytes; NULL: every block */
        uint64_t blocks_wanted;    /* blocks set in want, or all of them */
        uint64_t bytes_done;       /* wanted bytes in the received blocks */
        sd_id128_t boot_id;        /* the boot "received" is true in; null: unknown, durable records only */
        uint32_t block_size;
        uint32_t request_blocks;   /* blocks per request: 128 KiB / block size */
        unsigned generation;       /* block-size changes, carried in the client token */
        char token[16];

        struct request_slot *slots;
        unsigned window;
        uint64_t next_seq;
        uint64_t cursor;           /* where the next request window search starts */
        uint64_t next_send;        /* pacing: earliest time of the next request */
        uint64_t interval;         /* 1 s / max_requests_per_second, 0: unpaced */
        uint64_t timeout;          /* request_timeout */
        unsigned momentum, momentum_max;
        bool silent;               /* a timeout passed without any new block: probe with one request */
        uint64_t blocks_at_last_timeout;
        struct backoff backoff;
        uint64_t backoff_until;
        bool adopting;             /* resumed: taking answers to an earlier run's requests */
        uint64_t adopt_started;    /* when subscribed; 0: not yet */
        uint64_t adopt_until;      /* until then no request */
        bool offline;
        /* Tail loss: when the data goes quiet while requests are open, the
         * rest of them was lost; re-ask once after a few inter-block gaps
         * instead of waiting the full request_timeout. Re-armed by the
         * next new block, so a dead service still meets plain timeouts. */
        uint64_t last_block;       /* arrival of the last data message */
        uint64_t gap;              /* smoothed time between data messages */
        uint64_t latency;          /* smoothed request -> first block; 0: unknown */
        bool quiet_armed;

        /* New blocks not in any record yet, since when; and not durable yet. */
        uint64_t unrecorded_blocks, unrecorded_since, record_blocks;
        uint64_t undurable_blocks, undurable_since, checkpoint_blocks;
        bool save_failed_logged;

        sd_event_source *timer, *finish_source;
        bool finished;
        int result;
        char reason[256];

        struct stream_stats stats;
};

static void pump(struct stream_download *d);

/* ---- ending ------------------------------------------------------------ */

static int on_finish_event(sd_event_source *s, void *userdata) {
        struct stream_download *d = userdata;

        /* The owner may free d in finished(): touch nothing after it. */
        d->ops->finished(d->result, d->reason[0] ? d->reason : NULL, d->userdata);
        return 0;
}

/* Ends the transfer once; finished() runs from its own event so that the
 * owner may free us there, whatever stack we are on now. */
static void finish(struct stream_download *d, int result, const char *format, ...)
        __attribute__((format(printf, 3, 4)));

static void finish(struct stream_download *d, int result, const char *format, ...) {
        int r;

        if (d->finished)
                return;
        d->finished = true;
        d->result = result;
        if (format) {
                va_list ap;

                errno = result < 0 ? -result : 0; /* for %m */
                va_start(ap, format);
                vsnprintf(d->reason, sizeof d->reason, format, ap);
                va_end(ap);
        }
        d->timer = sd_event_source_disable_unref(d->timer);
        /* Like the reference agent, stop listening once the file is closed. */
        mqtt_unsubscribe(d->sub_data);
        mqtt_unsubscribe(d->sub_rejected);
        d->sub_data = d->sub_rejected = NULL;

        /* The figures, once; the owner reports what the result means. */
        if (d->wanted)
                log_job(LOG_INFO, d->file.job_id, "download",
                        "Stream file %u %s: %" PRIu64 " of %" PRIu64 " wanted bytes written, %" PRIu64
                        " resumed; %" PRIu64 " bytes in %" PRIu64 " new blocks, %" PRIu64 " bytes of data messages; %" PRIu64
                        " duplicates, %" PRIu64 " bad, %" PRIu64 " unwanted, %" PRIu64 " requests, %" PRIu64
                        " timeouts, %" PRIu64 " rejections%s%s",
                        d->file_id, result == 0 ? "complete" : "stopped", d->stats.bytes_written,
                        d->stats.bytes_wanted, d->stats.bytes_resumed, d->stats.bytes_fetched,
                        d->stats.blocks_received, d->stats.bytes_on_wire, d->stats.duplicates, d->stats.bad_blocks,
                        d->stats.blocks_unwanted, d->stats.requests, d->stats.timeouts, d->stats.rejections,
                        d->reason[0] ? ": " : "", d->reason);
        else
                log_job(LOG_INFO, d->file.job_id, "download",
                        "Stream file %u %s: %" PRIu64 " new blocks, %" PRIu64 " resumed, %" PRIu64 " duplicates, %" PRIu64
                        " bad, %" PRIu64 " requests, %" PRIu64 " timeouts, %" PRIu64 " rejections%s%s",
                        d->file_id, result == 0 ? "complete" : "stopped", d->stats.blocks_received,
                        d->stats.blocks_resumed, d->stats.duplicates, d->stats.bad_blocks, d->stats.requests,
                        d->stats.timeouts, d->stats.rejections, d->reason[0] ? ": " : "", d->reason);

        r = sd_event_add_defer(d->otad->event, &d->finish_source, on_finish_event, d);
        if (r < 0) {
                /* Cannot defer: call it now rather than never. */
                log_error_errno(r, "Failed to schedule the end of the stream transfer: %m");
                d->ops->finished(d->result, d->reason[0] ? d->reason : NULL, d->userdata);
        }
}

/* ---- persistence ------------------------------------------------------- */

/* Records the blocks written. durable: sync the target first and make the
 * record durable too (data before the record that counts it, download.h);
 * else the record survives a kill, and counts for this boot only. */
static int record_progress(struct stream_download *d, bool durable) {
        int r;

        if (durable) {
                if (d->undurable_blocks == 0 && d->undurable_since == 0 && d->unrecorded_blocks == 0)
                        return 0;
                r = d->ops->sync(d->userdata);
                if (r < 0) {
                        finish(d, r, "failed to sync the target: %m");
                        return r;
                }
                /* Both at d->block_size: shrink_blocks() remaps both. */
                (void) blockmap_assign(d->durable, d->received);
                d->undurable_blocks = 0;
                d->undurable_since = 0;
        } else if (d->unrecorded_blocks == 0 || sd_id128_is_null(d->boot_id))
                return 0;
        d->unrecorded_blocks = 0;
        d->unrecorded_since = 0;
        if (!d->file.state_path)
                return 0;
        r = blockmap_save(d->received, d->durable, d->boot_id, &d->file, d->file.state_path, durable);
        if (r < 0 && !d->save_failed_logged) {
                /* Only resuming suffers; the download goes on. */
                log_job_errno(LOG_WARNING, r, d->file.job_id, "download",
                              "Failed to save download progress to %s: %m, continuing without", d->file.state_path);
                d->save_failed_logged = true;
        }
        return 0;
}

/* The record a kill or a power cut would resume from, brought up to date
 * when enough came in or time passed. */
static int record_due(struct stream_download *d, uint64_t now) {
        if (d->undurable_blocks >= d->checkpoint_blocks ||
            (d->undurable_since && now >= d->undurable_since + CHECKPOINT_USEC))
                return record_progress(d, true);
        if (d->unrecorded_blocks >= d->record_blocks ||
            (d->unrecorded_since && now >= d->unrecorded_since + RECORD_USEC))
                return record_progress(d, false);
        return 0;
}

/* ---- the request window ------------------------------------------------ */

/* Gives up on a request: its blocks that did not come become requestable. */
static void slot_release(struct stream_download *d, struct request_slot *s) {
        for (uint32_t k = 0; k < s->span; k++)
                if (s->bitmap[k >> 3] & (1u << (k & 7)))
                        blockmap_clear(d->inflight, s->offset + k);
        s->active = false;
}

static void release_all(struct stream_download *d) {
        for (unsigned i = 0; i < d->window; i++)
                if (d->slots[i].active)
                        slot_release(d, &d->slots[i]);
}

static unsigned active_slots(const struct stream_download *d) {
        unsigned n = 0;

        for (unsigned i = 0; i < d->window; i++)
                n += d->slots[i].active;
        return n;
}

/* The next wanted block that is neither received nor asked for, searching
 * from the cursor and wrapping once; blockmap_blocks() when there is none. */
static uint64_t next_wanted(struct stream_download *d) {
        uint64_t n = blockmap_blocks(d->received), i;

        i = blockmap_wanted_next(d->want, d->received, d->inflight, d->cursor);
        if (i < n)
                return i;
        i = blockmap_wanted_next(d->want, d->received, d->inflight, 0);
        return i < d->cursor ? i : n;
}

static bool anything_to_request(const struct stream_download *d) {
        return blockmap_count(d->received) + blockmap_count(d->inflight) < d->blocks_wanted;
}

static bool all_received(const struct stream_download *d) {
        return blockmap_count(d->received) == d->blocks_wanted;
}

/* Wanted bytes in the blocks set in m. */
static uint64_t wanted_bytes_in(const struct stream_download *d, const struct blockmap *m) {
        uint64_t bytes = 0, n = blockmap_blocks(m);

        for (uint64_t i = blockmap_wanted_next(m, NULL, NULL, 0); i < n; i = blockmap_wanted_next(m, NULL, NULL, i + 1)) {
                uint64_t start = i * d->block_size;

                bytes += d->wanted ? ranges_bytes_in(d->wanted, d->n_wanted, start,
                                                     start + blockmap_block_length(m, i))
                                   : blockmap_block_length(m, i);
        }
        return bytes;
}

static void report_progress(struct stream_download *d) {
        if (!d->ops->progress)
                return;
        if (d->wanted)
                d->ops->progress(d->bytes_done, d->stats.bytes_wanted, d->userdata);
        else
                d->ops->progress(blockmap_count(d->received), blockmap_blocks(d->received), d->userdata);
}

/* Publishes one request for the missing blocks of the next window. Returns
 * 1 when sent, 0 when there is nothing to ask for, <0 on errors. */
static int send_request(struct stream_download *d, struct request_slot *s, uint64_t now) {
        uint8_t msg[128 + REQUEST_SPAN_MAX / 8];
        uint64_t start, wanted, total = blockmap_blocks(d->received);
        uint32_t n, span;
        int len, r;

        start = next_wanted(d);
        if (start >= total)
                return 0;

        memset(s, 0, sizeof *s);
        if (d->want) {
                /* Up to a request's worth of wanted blocks, however far
                 * apart; "n" caps how many of the bitmap's blocks come back
                 * (§3.2), as the reference agent's whole-file bitmap does. */
                span = (uint32_t) (total - start < REQUEST_SPAN_MAX ? total - start : REQUEST_SPAN_MAX);
                wanted = blockmap_request_sparse(d->want, d->received, d->inflight, start, span, d->request_blocks,
                                                 s->bitmap, &span);
                n = (uint32_t) wanted;
        } else {
                n = (uint32_t) (total - start < d->request_blocks ? total - start : d->request_blocks);
                wanted = blockmap_request_bitmap(d->received, d->inflight, start, n, s->bitmap);
                /* "n" is exactly the window up to the last block asked for. */
                while (n > 0 && !(s->bitmap[(n - 1) >> 3] & (1u << ((n - 1) & 7))))
                        n--;
                span = n;
        }

        len = stream_encode_request(&(struct stream_request){
                                            .client_token = d->token,
                                            .file_id = d->file_id,
                                            .block_size = d->block_size,
                                            .offset = (uint32_t) start,
                                            .bitmap = s->bitmap,
                                            .bitmap_len = (span + 7) / 8,
                                            .n_blocks = n,
                                    },
                                    msg, sizeof msg);
        if (len < 0)
                return len;

        /* QoS 0 like the reference agent: a lost request is a timeout. */
        r = mqtt_publish(d->mqtt, d->topic_get, msg, (size_t) len, 0);
        if (r < 0)
                return r;

        s->active = true;
        s->seq = d->next_seq++;
        s->offset = start;
        s->n = n;
        s->span = span;
        s->outstanding = wanted;
        s->sent = now;
        s->deadline = now + d->timeout;
        for (uint32_t k = 0; k < span; k++)
                if (s->bitmap[k >> 3] & (1u << (k & 7)))
                        blockmap_set(d->inflight, start + k);
        d->cursor = start + span;
        d->stats.requests++;
        d->stats.request_bytes += (uint64_t) len;
        d->momentum++;
        log_debug("GetStream %s file %u: o=%" PRIu64 " n=%" PRIu32 " (%" PRIu64 " blocks)", d->topic_get,
                  d->file_id, start, n, wanted);
        return 1;
}

/* backoff.h's policy, reset by the next new block. Returns the delay. */
static uint64_t back_off(struct stream_download *d, uint64_t now) {
        uint64_t delay = backoff_next(&d->backoff);

        d->backoff_until = now + delay;
        return delay;
}

static void fill_window(struct stream_download *d, uint64_t now) {
        unsigned limit = d->silent ? 1 : d->window;

        if (d->adopting) {
                if (d->adopt_until == 0 || now < d->adopt_until)
                        return;
                d->adopting = false;
        }
        while (!d->finished && active_slots(d) < limit && now >= d->next_send && now >= d->backoff_until &&
               anything_to_request(d)) {
                struct request_slot *s = NULL;
                int r;

                for (unsigned i = 0; i < d->window && !s; i++)
                        if (!d->slots[i].active)
                                s = &d->slots[i];

                /* The momentum rule (§6.3): requests in a row without a new block. */
                if (d->momentum >= d->momentum_max) {
                        finish(d, -ETIMEDOUT, "no new block after %u requests", d->momentum);
                        return;
                }

                r = send_request(d, s, now);
                if (r == -ENOTCONN) {
                        /* Offline: wait for the session to come back. */
                        d->offline = true;
                        return;
                }
                if (r == -EINVAL || r == -EMSGSIZE) {
                        finish(d, r, "failed to send a GetStream request to %s: %m", d->topic_get);
                        return;
                }
                if (r < 0) {
                        /* Anything else (out of memory, a socket error the
                         * session is about to notice) may pass: retry later. */
                        log_job_errno(LOG_NOTICE, r, d->file.job_id, "download",
                                      "Failed to send a GetStream request to %s: %m, retrying", d->topic_get);
                        back_off(d, now);
                        return;
                }
                if (r == 0)
                        return;
                d->next_send = (d->next_send > now ? d->next_send : now) + d->interval;
        }
}

static uint64_t quiet_period(const struct stream_download *d) {
        uint64_t q = 4 * d->gap;

        if (q < QUIET_MIN_USEC)
                q = QUIET_MIN_USEC;
        return q < d->timeout / 2 ? q : d->timeout / 2;
}

/* When an open request counts as lost: no data message for a few gaps (a
 * link still busy with earlier requests is not quiet), and for one not yet
 * answered also a few measured round trips since it was sent. */
static uint64_t quiet_deadline(const struct stream_download *d, const struct request_slot *s) {
        uint64_t link = d->last_block + quiet_period(d), rtt;

        if (s->answered)
                return link;
        if (d->latency == 0)
                return UINT64_MAX;
        rtt = 4 * d->latency > QUIET_MIN_USEC ? 4 * d->latency : QUIET_MIN_USEC;
        rtt = s->sent + (rtt < d->timeout / 2 ? rtt : d->timeout / 2);
        return rtt > link ? rtt : link;
}

static void expire_requests(struct stream_download *d, uint64_t now) {
        bool expired = false, quiet = false;

        if (d->quiet_armed && !d->silent)
                for (unsigned i = 0; i < d->window; i++) {
                        struct request_slot *s = &d->slots[i];

                        if (s->active && quiet_deadline(d, s) <= now) {
                                slot_release(d, s);
                                quiet = true;
                        }
                }
        if (quiet)
                d->quiet_armed = false;

        for (unsigned i = 0; i < d->window; i++) {
                struct request_slot *s = &d->slots[i];

                if (!s->active || s->deadline > now)
                        continue;
                slot_release(d, s);
                d->stats.timeouts++;
                expired = true;
        }
        if (!expired)
                return;
        /* Silence since the last timeout: probe with one request at a time
         * rather than repeating the whole window into the void. */
        if (d->stats.blocks_received == d->blocks_at_last_timeout)
                d->silent = true;
        d->blocks_at_last_timeout = d->stats.blocks_received;
}

/* ---- the clock ----------------------------------------------------------- */

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        pump(userdata);
        return 0;
}

static void schedule(struct stream_download *d, uint64_t now) {
        uint64_t next = UINT64_MAX;
        int r;

        if (d->finished)
                return;
        for (unsigned i = 0; i < d->window; i++) {
                const struct request_slot *s = &d->slots[i];

                if (!s->active)
                        continue;
                if (s->deadline < next)
                        next = s->deadline;
                if (d->quiet_armed && !d->silent && quiet_deadline(d, s) < next)
                        next = quiet_deadline(d, s);
        }
        if (d->offline)
                next = now + OFFLINE_POLL_USEC < next ? now + OFFLINE_POLL_USEC : next;
        else if (d->data_ready && d->rejected_ready && anything_to_request(d) &&
                 active_slots(d) < (d->silent ? 1u : d->window)) {
                uint64_t t = d->next_send > d->backoff_until ? d->next_send : d->backoff_until;

                if (d->adopting && d->adopt_until > t)
                        t = d->adopt_until;

                next = t < next ? t : next;
        }
        if (d->undurable_since && d->undurable_since + CHECKPOINT_USEC < next)
                next = d->undurable_since + CHECKPOINT_USEC;
        if (d->unrecorded_since && !sd_id128_is_null(d->boot_id) && d->unrecorded_since + RECORD_USEC < next)
                next = d->unrecorded_since + RECORD_USEC;
        if (next == UINT64_MAX) {
                sd_event_source_set_enabled(d->timer, SD_EVENT_OFF);
                return;
        }
        r = sd_event_source_set_time(d->timer, next);
        if (r >= 0)
                r = sd_event_source_set_enabled(d->timer, SD_EVENT_ONESHOT);
        if (r < 0)
                finish(d, r, "failed to arm the stream timer: %m");
}

/* Everything that may happen after an event: timeouts, reconnects,
 * checkpoints, completion, new requests, and the next wake-up. */
static void pump(struct stream_download *d) {
        uint64_t now = clock_now_usec();

        if (d->finished)
                return;

        if (record_due(d, now) < 0)
                return;

        if (all_received(d)) {
                if (record_progress(d, true) < 0)
                        return;
                finish(d, 0, NULL);
                return;
        }

        if (!d->data_ready || !d->rejected_ready) {
                schedule(d, now);
                return;
        }

        if (d->offline) {
                if (!mqtt_session_is_connected(d->mqtt)) {
                        schedule(d, now);
                        return;
                }
                /* Back online: whatever was in flight is lost; ask again. */
                log_job(LOG_INFO, d->file.job_id, "download", "Connected again, re-requesting missing blocks");
                d->offline = false;
                release_all(d);
        }

        expire_requests(d, now);
        fill_window(d, now);
        schedule(d, now);
}

/* ---- incoming messages --------------------------------------------------- */

static struct request_slot *slot_of_block(struct stream_download *d, uint64_t index) {
        for (unsigned i = 0; i < d->window; i++) {
                struct request_slot *s = &d->slots[i];
                uint64_t k = index - s->offset;

                if (s->active && index >= s->offset && k < s->span && (s->bitmap[k >> 3] & (1u << (k & 7))))
                        return s;
        }
        return NULL;
}

/* §6.4, improved: what is wrong with a block, NULL when nothing is. A bad
 * block is dropped and asked for again later, never written, never fatal. */
static const char *block_problem(const struct stream_download *d, const struct stream_block *b) {
        if (b->file_id != d->file_id)
                return "for another file id";
        if (b->index >= blockmap_blocks(d->received))
                return "index beyond the file";
        if (b->length != b->payload_len)
                return "l differs from the payload length";
        if (b->length != blockmap_block_length(d->received, b->index))
                return "wrong size for this block (an older block size?)";
        return NULL;
}

/* Whether b answers a request of ours at the current block size: the
 * service echoes the client token (§3.3), which changes with the block
 * size. Without a token only while the block size never changed. */
static bool block_is_current(const struct stream_download *d, const struct stream_block *b) {
        if (!b->client_token)
                return d->generation == 0;
        return b->client_token_len == strlen(d->token) && memcmp(b->client_token, d->token, b->client_token_len) == 0;
}

/* A well-formed block of the current block size whose length is not what
 * the job's filesize makes it: the service sends block_size bytes until the
 * stream file ends, so the stream file is longer or shorter than filesize.
 * No request can change that: fail now rather than by momentum. */
static bool block_size_disagrees(struct stream_download *d, const struct stream_block *b) {
        uint64_t expected = blockmap_block_length(d->received, b->index);

        if (b->file_id != d->file_id || b->index >= blockmap_blocks(d->received) || b->length != b->payload_len ||
            b->length == expected || b->length > d->block_size || !block_is_current(d, b))
                return false;
        if (b->length > expected)
                finish(d, -EBADMSG,
                       "stream file %u holds more than the job's filesize of %" PRIu64 " bytes: block %" PRIu64
                       " is %" PRIu64 " bytes, expected %" PRIu64 "; the stream and the job document disagree",
                       d->file_id, d->file.size, b->index, b->length, expected);
        else
                finish(d, -EBADMSG,
                       "stream file %u holds fewer bytes than the job's filesize of %" PRIu64 " bytes: block %" PRIu64
                       " is %" PRIu64 " bytes, expected %" PRIu64 " (the stream file ends at byte %" PRIu64
                       "); the stream and the job document disagree",
                       d->file_id, d->file.size, b->index, b->length, expected,
                       b->index * (uint64_t) d->block_size + b->length);
        return true;
}

/* Writes what of block b is wanted: all of it for the whole file, else its
 * intersection with each wanted range (download.h: never a byte outside). */
static int write_block(struct stream_download *d, const struct stream_block *b, uint64_t *ret_written) {
        uint64_t start = b->index * (uint64_t) d->block_size, end = start + b->payload_len, written = 0;
        int r;

        if (!d->wanted) {
                r = d->ops->write(start, b->payload, b->payload_len, d->userdata);
                if (r < 0)
                        return r;
                *ret_written = b->payload_len;
                return 0;
        }
        for (size_t i = ranges_find(d->wanted, d->n_wanted, start); i < d->n_wanted && d->wanted[i].offset < end;
             i++) {
                uint64_t a = d->wanted[i].offset > start ? d->wanted[i].offset : start;
                uint64_t z = d->wanted[i].offset + d->wanted[i].length < end ? d->wanted[i].offset + d->wanted[i].length
                                                                              : end;

                r = d->ops->write(a, b->payload + (a - start), (size_t) (z - a), d->userdata);
                if (r < 0)
                        return r;
                written += z - a;
        }
        *ret_written = written;
        return 0;
}

static void on_data(const char *topic, const uint8_t *payload, size_t len, void *userdata) {
        struct stream_download *d = userdata;
        struct stream_block b;
        struct request_slot *s;
        const char *problem;
        uint64_t now, written;
        int r;

        if (d->finished)
                return;
        d->stats.bytes_on_wire += len;

        if (stream_decode_block(payload, len, &b) < 0) {
                d->stats.bad_blocks++;
                log_debug("Dropping a message on %s: not a valid CBOR data message", topic);
                return;
        }
        if (block_size_disagrees(d, &b))
                return;
        problem = block_problem(d, &b);
        if (problem) {
                d->stats.bad_blocks++;
                log_debug("Dropping stream block %" PRIu64 " of file %u: %s", b.index, d->file_id, problem);
                return;
        }
        now = clock_now_usec();
        if (d->last_block) {
                uint64_t g = now - d->last_block;

                /* EWMA 1/8, ignoring pauses that are not inter-block gaps. */
                if (g < d->timeout)
                        d->gap = d->gap - d->gap / 8 + g / 8;
        }
        d->last_block = now;

        if (blockmap_test(d->received, b.index)) {
                /* No request for duplicates: that is how storms start (§9.4). */
                d->stats.duplicates++;
                return;
        }
        if (d->want && !blockmap_test(d->want, b.index)) {
                /* Valid, but no wanted byte is in it: never written. */
                d->stats.blocks_unwanted++;
                return;
        }

        r = write_block(d, &b, &written);
        if (r < 0) {
                finish(d, r, "failed to write block %" PRIu64 " (%zu bytes at offset %" PRIu64 ") to the target: %m",
                       b.index, b.payload_len, b.index * (uint64_t) d->block_size);
                return;
        }

        blockmap_set(d->received, b.index);
        blockmap_clear(d->inflight, b.index);
        d->stats.blocks_received++;
        d->stats.bytes_fetched += b.payload_len;
        d->stats.bytes_written += written;
        d->bytes_done += written;
        if (d->adopting && d->adopt_until) {
                uint64_t until = now + ADOPT_QUIET_USEC, limit = d->adopt_started + d->timeout;

                d->adopt_until = until < limit ? until : limit;
        }
        d->momentum = 0;
        d->silent = false;
        d->quiet_armed = true;
        backoff_reset(&d->backoff);

        s = slot_of_block(d, b.index);
        if (s) {
                uint64_t k = b.index - s->offset;

                s->bitmap[k >> 3] &= (uint8_t) ~(1u << (k & 7));
                if (!s->answered) {
                        uint64_t l = now - s->sent;

                        s->answered = true;
                        d->latency = d->latency ? d->latency - d->latency / 8 + l / 8 : l;
                }
                if (--s->outstanding == 0)
                        s->active = false;
                /* Requests are answered in order: when blocks of a request
                 * two sends later arrive, what is still missing from an
                 * older one was lost; ask again now rather than at the
                 * timeout. One request of slack tolerates reordering. */
                for (unsigned i = 0; i < d->window; i++)
                        if (d->slots[i].active && d->slots[i].seq + 2 <= s->seq)
                                slot_release(d, &d->slots[i]);
        }

        if (d->unrecorded_since == 0)
                d->unrecorded_since = now;
        if (d->undurable_since == 0)
                d->undurable_since = now;
        d->unrecorded_blocks++;
        d->undurable_blocks++;
        if (record_due(d, now) < 0)
                return;

        report_progress(d);
        pump(d);
}

static void set_token(struct stream_download *d) {
        /* "rdy" like the reference agent; after a block-size change the
         * generation is appended so that late rejections of older requests
         * can be told apart. */
        if (d->generation == 0)
                snprintf(d->token, sizeof d->token, "rdy");
        else
                snprintf(d->token, sizeof d->token, "rdy%u", d->generation);
}

static int shrink_blocks(struct stream_download *d) {
        struct blockmap *received = NULL, *durable = NULL, *inflight = NULL, *want = NULL;
        uint32_t size = d->block_size / 2;
        int r;

        r = blockmap_remap(d->received, size, &received);
        if (r < 0)
                goto fail;
        r = blockmap_remap(d->durable, size, &durable);
        if (r < 0)
                goto fail;
        if (d->want) {
                /* A half of a received block is received; a half without a
                 * wanted byte is not wanted, and records hold wanted blocks
                 * only. */
                r = blockmap_new_covering(d->file.size, size, d->wanted, d->n_wanted, &want);
                if (r < 0)
                        goto fail;
                (void) blockmap_intersect(received, want);
                (void) blockmap_intersect(durable, want);
        }
        r = blockmap_new(blockmap_file_size(d->received), size, &inflight);
        if (r < 0)
                goto fail;
        for (unsigned i = 0; i < d->window; i++)
                d->slots[i].active = false;
        blockmap_free(d->received);
        blockmap_free(d->durable);
        blockmap_free(d->inflight);
        blockmap_free(d->want);
        d->received = received;
        d->durable = durable;
        d->inflight = inflight;
        d->want = want;
        d->blocks_wanted = want ? blockmap_count(want) : blockmap_blocks(received);
        d->block_size = size;
        d->stats.block_size = size;
        d->request_blocks = d->record_blocks = REQUEST_BYTES_MAX / size;
        d->checkpoint_blocks = CHECKPOINT_BYTES / size;
        d->cursor = 0;
        d->generation++;
        set_token(d);
        /* The record at the old size stays valid until the next checkpoint
         * replaces it with this (conservative) one. */
        if (d->undurable_since == 0)
                d->undurable_since = clock_now_usec();
        return 0;

fail:
        blockmap_free(received);
        blockmap_free(durable);
        blockmap_free(want);
        return r;
}

static void on_rejected(const char *topic, const uint8_t *payload, size_t len, void *userdata) {
        struct stream_download *d = userdata;
        struct stream_rejection rej;
        const char *c;
        int r;

        if (d->finished)
                return;
        if (stream_decode_rejection(payload, len, &rej) < 0) {
                log_debug("Ignoring an undecodable message on %s", topic);
                return;
        }
        d->stats.rejections++;
        c = rej.code;

        if (strcmp(c, "BlockSizeOutOfBounds") == 0) {
                if (rej.client_token[0] && strcmp(rej.client_token, d->token) != 0)
                        return; /* about a request at an older block size */
                if (d->block_size / 2 < BLOCK_SIZE_MIN) {
                        finish(d, -EPROTO, "stream rejected: %s: %s (%u-byte blocks, and AWS takes no smaller than %u)",
                               c, rej.message, d->block_size, BLOCK_SIZE_MIN);
                        return;
                }
                log_job(LOG_WARNING, d->file.job_id, "download",
                        "Stream %s refused %u-byte blocks (%s), retrying with %u", d->topic_get, d->block_size,
                        rej.message, d->block_size / 2);
                r = shrink_blocks(d);
                if (r < 0) {
                        finish(d, r, "failed to change the block size to %u bytes: %m", d->block_size / 2);
                        return;
                }
        } else if (strcmp(c, "RequestThrottled") == 0 || strcmp(c, "InternalError") == 0 ||
                   strcmp(c, "BlockCountLimitExceeded") == 0 || strcmp(c, "BlockBitmapLimitExceeded") == 0) {
                /* Transient or a limit: back off, then ask again for what is
                 * missing; the momentum rule bounds how long. */
                uint64_t now = clock_now_usec();

                /* Rejections of requests sent before this back-off began
                 * are the same news: do not double it again for them. */
                if (now >= d->backoff_until) {
                        uint64_t delay = back_off(d, now);

                        log_job(LOG_NOTICE, d->file.job_id, "download",
                                "Stream request rejected: %s: %s, retrying in %" PRIu64 " ms", c, rej.message,
                                delay / USEC_PER_MSEC);
                }
                release_all(d);
        } else {
                /* ResourceNotFound, Unauthorized, VersionMismatch,
                 * ETagMismatch and anything else: asking again cannot help. */
                char expected[192] = "";

                r = strcmp(c, "ResourceNotFound") == 0                                    ? -ENOENT
                    : strcmp(c, "Unauthorized") == 0                                      ? -EACCES
                    : strcmp(c, "VersionMismatch") == 0 || strcmp(c, "ETagMismatch") == 0 ? -ESTALE
                                                                                          : -EPROTO;
                /* What the service could not match, from what we asked. */
                if (r == -ENOENT)
                        snprintf(expected, sizeof expected,
                                 " (the job names file %u of stream %s, which the service does not have)", d->file_id,
                                 d->stream_name);
                else if (r == -EACCES)
                        snprintf(expected, sizeof expected, " (the stream's role cannot read the file it names)");
                else if (r == -ESTALE)
                        snprintf(expected, sizeof expected, " (the stream or its file changed during the download)");
                else if (strcmp(c, "InvalidRequest") == 0 || strcmp(c, "OffsetOutOfBounds") == 0)
                        snprintf(expected, sizeof expected,
                                 " (blocks of %u bytes up to block %" PRIu64 " for the job's filesize of %" PRIu64
                                 " bytes: does stream file %u hold fewer bytes than that?)",
                                 d->block_size, blockmap_blocks(d->received) - 1, d->file.size, d->file_id);
                finish(d, r, "stream rejected: %s: %s%s", c, rej.message, expected);
                return;
        }
        pump(d);
}

static void on_subscribed(bool granted, void *userdata, bool *ready, const char *which) {
        struct stream_download *d = userdata;

        if (d->finished)
                return;
        if (!granted) {
                finish(d, -EACCES, "subscription to the stream's %s topic refused", which);
                return;
        }
        /* Also after a reconnect without a stored session: whatever was in
         * flight went nowhere. */
        if (*ready)
                release_all(d);
        *ready = true;
        if (d->adopting && d->adopt_started == 0 && d->data_ready && d->rejected_ready) {
                d->adopt_started = clock_now_usec();
                d->adopt_until = d->adopt_started + ADOPT_QUIET_USEC;
        }
        pump(d);
}

static void on_data_subscribed(bool granted, void *userdata) {
        struct stream_download *d = userdata;

        on_subscribed(granted, userdata, &d->data_ready, "data");
}

static void on_rejected_subscribed(bool granted, void *userdata) {
        struct stream_download *d = userdata;

        on_subscribed(granted, userdata, &d->rejected_ready, "rejected");
}

/* ---- life cycle ---------------------------------------------------------- */

static int load_progress(struct stream_download *d, uint32_t block_size) {
        struct blockmap *m = NULL, *durable = NULL;
        uint64_t undurable;
        int r;

        /* Unknown boot: records count durable blocks only. */
        r = sd_id128_get_boot(&d->boot_id);
        if (r < 0) {
                log_job_errno(LOG_WARNING, r, d->file.job_id, "download",
                              "Failed to read the boot id: %m; recording progress only when synced");
                d->boot_id = SD_ID128_NULL;
        }

        if (d->file.state_path) {
                r = blockmap_load(d->file.state_path, &d->file, d->boot_id, &m, &durable);
                if (r == -ESTALE || r == -EBADMSG)
                        log_job(LOG_INFO, d->file.job_id, "download", "Discarding progress record %s: %s",
                                d->file.state_path,
                                r == -EBADMSG ? "damaged"
                                : d->wanted   ? "it belongs to another job, file or set of wanted ranges"
                                              : "it belongs to another job or file");
                else if (r < 0 && r != -ENOENT)
                        log_job_errno(LOG_WARNING, r, d->file.job_id, "download",
                                      "Failed to read progress record %s: %m, starting over", d->file.state_path);
                else if (r == 0 && (blockmap_block_size(m) < BLOCK_SIZE_MIN || blockmap_block_size(m) > BLOCK_SIZE_MAX)) {
                        log_job(LOG_INFO, d->file.job_id, "download",
                                "Discarding progress record %s: its %u-byte blocks are outside %u..%u",
                                d->file.state_path, blockmap_block_size(m), BLOCK_SIZE_MIN, BLOCK_SIZE_MAX);
                        blockmap_free(m);
                        blockmap_free(durable);
                        m = durable = NULL;
                }
        }
        if (m && d->wanted) {
                r = blockmap_new_covering(d->file.size, blockmap_block_size(m), d->wanted, d->n_wanted, &d->want);
                if (r < 0) {
                        blockmap_free(m);
                        blockmap_free(durable);
                        return r;
                }
                if (!blockmap_is_subset(m, d->want)) {
                        /* Same set, blocks outside it: not a record we wrote. */
                        log_job(LOG_INFO, d->file.job_id, "download",
                                "Discarding progress record %s: it counts blocks outside the wanted ranges",
                                d->file.state_path);
                        blockmap_free(m);
                        blockmap_free(durable);
                        blockmap_free(d->want);
                        m = durable = NULL;
                        d->want = NULL;
                }
        }
        if (!m) {
                r = blockmap_new(d->file.size, block_size, &m);
                if (r < 0)
                        return r;
                if (d->wanted) {
                        r = blockmap_new_covering(d->file.size, block_size, d->wanted, d->n_wanted, &d->want);
                        if (r < 0) {
                                blockmap_free(m);
                                return r;
                        }
                }
        }
        /* A record keeps its block size: it may be smaller than configured
         * (or than chosen for the ranges) because the service refused
         * bigger blocks. */
        d->received = m;
        d->durable = durable ? durable : blockmap_copy(m);
        if (!d->durable)
                return -ENOMEM;
        d->block_size = blockmap_block_size(m);
        d->blocks_wanted = d->want ? blockmap_count(d->want) : blockmap_blocks(m);
        d->stats.blocks_resumed = blockmap_count(m);
        /* A record of this job: a run before us may have left requests
         * whose answers are still coming. */
        d->adopting = durable != NULL;
        /* What an earlier run wrote but did not sync: sync it soon, so
         * that a power cut from now on does not cost it. */
        undurable = blockmap_count(d->received) - blockmap_count(d->durable);
        if (undurable > 0) {
                d->undurable_blocks = undurable;
                d->undurable_since = clock_now_usec();
        }
        r = blockmap_new(d->file.size, d->block_size, &d->inflight);
        if (r < 0)
                return r;
        d->bytes_done = d->stats.bytes_resumed = wanted_bytes_in(d, d->received);
        return 0;
}

int stream_download_new(struct otad *otad, const char *stream_name, unsigned file_id,
                        const struct download_file *file, const struct download_ops *ops, void *userdata,
                        struct stream_download **ret) {
        const struct otad_config *c = otad->config;
        struct stream_download *d;
        int64_t block_size = c->ota.block_size;
        int r;

        if (!stream_name || !*stream_name || file_id > 255 || file->size == 0 || !ops || !ops->write ||
            !ops->sync || !ops->finished || !otad->mqtt)
                return -EINVAL;
        if (block_size < BLOCK_SIZE_MIN || block_size > BLOCK_SIZE_MAX)
                block_size = 4096;

        d = calloc(1, sizeof *d);
        if (!d)
                return -ENOMEM;
        d->otad = otad;
        d->mqtt = otad->mqtt;
        d->file_id = file_id;
        d->ops = ops;
        d->userdata = userdata;
        d->file = *file;
        d->file.job_id = file->job_id ? strdup(file->job_id) : NULL;
        d->file.signature = file->signature ? strdup(file->signature) : NULL;
        d->file.state_path = file->state_path ? strdup(file->state_path) : NULL;
        d->file.wanted = NULL;
        d->file.n_wanted = 0;
        if ((file->job_id && !d->file.job_id) || (file->signature && !d->file.signature) ||
            (file->state_path && !d->file.state_path)) {
                r = -ENOMEM;
                goto fail;
        }
        if (file->wanted) {
                r = ranges_normalize(file->wanted, file->n_wanted, file->size, &d->wanted, &d->n_wanted);
                if (r < 0)
                        goto fail;
                /* The record names this set (blockmap.h). */
                d->file.wanted = d->wanted;
                d->file.n_wanted = d->n_wanted;
                /* The configured size is the largest the device takes; the
                 * ranges decide how much of it pays at their edges. */
                block_size = ranges_stream_block_size(d->wanted, d->n_wanted, file->size, (uint32_t) block_size);
        }
        d->stats.bytes_wanted = d->wanted ? ranges_total(d->wanted, d->n_wanted) : file->size;
        d->stream_name = strdup(stream_name);
        if (!d->stream_name || asprintf(&d->topic_get, "streams/%s/get/cbor", stream_name) < 0 ||
            asprintf(&d->topic_data, "streams/%s/data/cbor", stream_name) < 0 ||
            asprintf(&d->topic_rejected, "streams/%s/rejected/cbor", stream_name) < 0) {
                r = -ENOMEM;
                goto fail;
        }

        d->window = c->ota.window > 0 ? (unsigned) c->ota.window : 1;
        /* 0: no pacing, for brokers other than AWS IoT (and benchmarks). */
        d->interval = c->ota.max_requests_per_second > 0 ? USEC_PER_SEC / (uint64_t) c->ota.max_requests_per_second : 0;
        d->backoff = BACKOFF_INIT(BACKOFF_MIN_USEC, BACKOFF_MAX_USEC);
        d->timeout = (uint64_t) (c->ota.request_timeout > 0 ? c->ota.request_timeout : 10) * USEC_PER_SEC;
        d->momentum_max = c->ota.momentum > 0 ? (unsigned) c->ota.momentum : 32;
        /* The first window goes out before any block can arrive: a window
         * wider than the momentum limit would end every transfer there. */
        if (d->momentum_max < d->window)
                d->momentum_max = d->window;
        d->slots = calloc(d->window, sizeof *d->slots);
        if (!d->slots) {
                r = -ENOMEM;
                goto fail;
        }

        r = load_progress(d, (uint32_t) block_size);
        if (r < 0)
                goto fail;
        d->stats.block_size = d->block_size;
        d->request_blocks = d->record_blocks = REQUEST_BYTES_MAX / d->block_size;
        d->checkpoint_blocks = CHECKPOINT_BYTES / d->block_size;
        if (d->block_size != (uint32_t) block_size)
                d->generation = 1; /* resumed at a size the service forced on us */
        set_token(d);

        r = sd_event_add_time(otad->event, &d->timer, CLOCK_MONOTONIC, UINT64_MAX, 1000, on_timer, d);
        if (r < 0)
                goto fail;
        sd_event_source_set_enabled(d->timer, SD_EVENT_OFF);

        if (d->wanted) {
                uint64_t cover_blocks, cover_bytes;

                ranges_cover(d->wanted, d->n_wanted, d->file.size, d->block_size, &cover_blocks, &cover_bytes);
                log_job(LOG_INFO, d->file.job_id, "download",
                        "Fetching %zu ranges of stream %s file %u: %" PRIu64 " of %" PRIu64 " bytes, in %" PRIu64
                        " blocks of %u (%" PRIu64 " bytes), %" PRIu64 " of them already received",
                        d->n_wanted, stream_name, file_id, d->stats.bytes_wanted, d->file.size, cover_blocks,
                        d->block_size, cover_bytes, blockmap_count(d->received));
        } else
                log_job(LOG_INFO, d->file.job_id, "download",
                        "Fetching stream %s file %u: %" PRIu64 " bytes in %" PRIu64 " blocks of %u, %" PRIu64
                        " already received", stream_name, file_id, d->file.size, blockmap_blocks(d->received),
                        d->block_size, blockmap_count(d->received));

        if (all_received(d)) {
                /* Everything arrived before a restart: nothing to fetch,
                 * but perhaps to sync (download_ops.finished promises it). */
                if (record_progress(d, true) < 0) {
                        *ret = d;
                        return 0;
                }
                finish(d, 0, NULL);
                *ret = d;
                return 0;
        }

        /* Subscribe first and request only once the broker confirmed (§3.1). */
        r = mqtt_subscribe(d->mqtt, d->topic_data, 0, on_data, on_data_subscribed, d, &d->sub_data);
        if (r < 0)
                goto fail;
        r = mqtt_subscribe(d->mqtt, d->topic_rejected, 0, on_rejected, on_rejected_subscribed, d, &d->sub_rejected);
        if (r < 0)
                goto fail;

        report_progress(d);
        *ret = d;
        return 0;

fail:
        stream_download_free(d);
        return r;
}

void stream_download_free(struct stream_download *d) {
        if (!d)
                return;
        mqtt_unsubscribe(d->sub_data);
        mqtt_unsubscribe(d->sub_rejected);
        sd_event_source_disable_unref(d->timer);
        sd_event_source_disable_unref(d->finish_source);
        blockmap_free(d->received);
        blockmap_free(d->durable);
        blockmap_free(d->inflight);
        blockmap_free(d->want);
        free(d->wanted);
        free(d->slots);
        free(d->stream_name);
        free(d->topic_get);
        free(d->topic_data);
        free(d->topic_rejected);
        free((char *) d->file.job_id);
        free((char *) d->file.signature);
        free((char *) d->file.state_path);
        free(d);
}

void stream_download_get_stats(const struct stream_download *d, struct stream_stats *ret) {
        *ret = d->stats;
}
