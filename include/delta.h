/* SPDX-License-Identifier: MIT */
/*
 * delta: the device-side half of an adaptive update: which chunks of a
 * bundle's image the device already holds, and copying those into the slot
 * being written, so that only the rest of the payload is fetched. Owns the
 * plan (per chunk: already in the target at its own offset, copy from the
 * active slot at offset X, or fetch its payload bytes), the scan that makes
 * it and the copier. Never touches the network, a slot by name, the
 * lifecycle's record or the log: it reads and writes through the callbacks
 * it is given, and says why it fell back in its stats.
 *
 * Where chunks are found (delta_scan), cheapest result first:
 *  1. the target (the inactive slot), each chunk at its own image offset:
 *     what an interrupted install already wrote (resume), or what the older
 *     image the slot still holds has in common with the new one. Found
 *     there, a chunk costs neither a copy nor a fetch. Optional: a full read
 *     of the target.
 *  2. the active slot, cut with bundle_chunker at the manifest's parameters
 *     (the way `otad bundle create` cut the new image), the SHA-256 of each
 *     piece looked up among the bundle's uncompressed checksums: a file that
 *     moved is found wherever it now sits.
 *  3. the active slot at each still missing chunk's own image offset: the
 *     few chunks whose boundaries the content-defined cut did not reproduce
 *     right after a change. Reads only what is still missing.
 * Everything else is fetched.
 *
 * Trust: a match is a SHA-256 of the image bytes equal to the one in the
 * payload header, which the signed manifest vouches for (header_sha256).
 * delta_copy() hashes every chunk again right before it writes it, so a
 * slot that changed since the scan or a read error turns that chunk into a
 * fetch, never into a wrong byte; the read-back of the whole image against
 * the manifest's image_sha256 remains the last word.
 *
 * Threads: delta_scan() and delta_copy() block for as long as it takes to
 * read a slot (minutes on an SD card): run them in a worker (worker.h) and
 * pass its cancellation check; they poll it between reads. Everything else
 * is quick and belongs on the loop. The plan is owned by whoever holds it;
 * the loop does not touch it while a worker runs on it.
 *
 * Memory: the copied index (~90 bytes a chunk, 0.1 % of the image at the
 * tool's ~80 KiB average chunk), one read block (DELTA_BLOCK_SIZE) while
 * scanning, one chunk buffer (chunk_size_max) while copying. Nothing grows
 * with the size of the slots.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct bundle_manifest;
struct payload_decoder;
struct delta_plan;

/* Large sequential reads: the scan's rate is what the storage streams. */
#define DELTA_BLOCK_SIZE (4U * 1024 * 1024)

/* Exactly len bytes at offset, or a negative errno. */
typedef int (*delta_read_fn)(uint64_t offset, void *buf, size_t len, void *userdata);
/* Writes len bytes of the image at offset into the target (the installer's
 * write); 0 or a negative errno. */
typedef int (*delta_write_fn)(uint64_t offset, const void *buf, size_t len, void *userdata);
/* true once the work should stop (worker_cancelled()). */
typedef bool (*delta_cancelled_fn)(void *userdata);

/* A slot to read from: bytes [0, size). read NULL: not available. */
struct delta_source {
        delta_read_fn read;
        void *userdata;
        uint64_t size;
};

enum delta_action {
        DELTA_FETCH,      /* fetch payload bytes [payload_offset, +payload_size) */
        DELTA_COPY,       /* copy image_size bytes from the active slot at source_offset */
        DELTA_IN_PLACE,   /* the target already holds it at image_offset */
        DELTA_COPIED,     /* delta_copy() wrote it */
};

/* Why a chunk is fetched. */
enum delta_reason {
        DELTA_REASON_NONE,            /* not fetched */
        DELTA_REASON_NOT_FOUND,       /* new in this image */
        DELTA_REASON_FALLBACK,        /* the whole plan fell back (stats.fallback says why) */
        DELTA_REASON_NO_CHECKSUM,     /* the index has no uncompressed checksum for it */
        DELTA_REASON_COPY_READ_ERROR, /* found, but reading it for the copy failed */
        DELTA_REASON_COPY_MISMATCH,   /* found, but its bytes changed before the copy */
};

struct delta_chunk {
        uint32_t index;
        enum delta_action action;
        enum delta_reason reason;
        uint64_t source_offset;   /* DELTA_COPY, DELTA_COPIED: in the active slot */
        uint64_t image_offset;
        uint32_t image_size;
        uint64_t payload_offset;
        uint32_t payload_size;
};

struct delta_stats {
        uint32_t chunks;                 /* in the bundle */
        uint64_t image_bytes;
        uint64_t payload_bytes;          /* the payload's chunks, without its header */

        uint32_t in_place_chunks;        /* found in the target at their own offset */
        uint64_t in_place_bytes;
        uint32_t active_chunks;          /* found in the active slot (to copy, or copied) */
        uint64_t active_bytes;
        uint32_t active_same_offset_chunks; /* of those: at their own image offset */
        uint32_t active_offset_lookup_chunks; /* of those: found by look-up 3 only */
        uint32_t fetch_chunks;           /* still to fetch */
        uint64_t fetch_image_bytes;
        uint64_t fetch_payload_bytes;    /* what goes over the wire, before framing */

        uint64_t target_read_bytes;      /* look-up 1 */
        uint64_t target_usec;
        uint64_t active_read_bytes;      /* look-ups 2 and 3 */
        uint64_t active_usec;
        uint32_t read_errors;            /* scan reads that failed (regions skipped) */

        uint32_t copy_read_errors;       /* chunks fetched instead, by reason */
        uint32_t copy_mismatches;
        uint64_t copied_bytes;
        uint64_t copy_usec;

        /* Why nothing is reused ("" when something could be): no readable
         * active slot, a bundle without uncompressed checksums, chunking
         * otad does not know. */
        char fallback[160];
};

/* A plan with every chunk to fetch, from the payload header the decoder
 * has verified (payload_decoder_header_done()). The index is copied: the
 * decoder may be used (or freed) while the plan is scanned. A bundle whose
 * chunking this otad cannot reproduce, or whose index lacks uncompressed
 * checksums, gives a plan that stays "fetch everything", with the reason in
 * stats.fallback. -EAGAIN before the header is done, -ENOMEM. */
int delta_plan_new(const struct bundle_manifest *m, const struct payload_decoder *d, struct delta_plan **ret);
void delta_plan_free(struct delta_plan *p);

struct delta_scan_options {
        struct delta_source active;      /* the booted slot, read-only; read NULL: none readable */
        struct delta_source target;      /* the slot being written, for look-up 1; read NULL: skipped */
        bool offset_lookup;              /* look-up 3 */
        delta_cancelled_fn cancelled;    /* NULL: never */
        void *cancel_userdata;
};

/* Look-ups 1-3 (blocking; see above). A read error skips that region (the
 * chunks there are fetched) and is counted; the first read of the active
 * slot failing makes it a fallback. Scanning again after a resume is fine:
 * only chunks still to fetch are looked for. Returns 0 (also when it fell
 * back: the plan is valid, with more to fetch), -ECANCELED, -ENOMEM. */
int delta_scan(struct delta_plan *p, const struct delta_scan_options *o);

struct delta_copy_options {
        struct delta_source active;
        delta_write_fn write;
        void *write_userdata;
        delta_cancelled_fn cancelled;
        void *cancel_userdata;
};

/* Copies every DELTA_COPY chunk from the active slot into the target, in
 * image order, each read whole, hashed and compared before it is written.
 * A read error or a mismatch makes that chunk DELTA_FETCH with its reason
 * (counted in stats). Blocking. 0, -ECANCELED (chunks copied so far stay
 * DELTA_COPIED: calling it again goes on), the write callback's error
 * (the target is not writable: the update fails), -ENOMEM. The caller syncs
 * the target before it counts the copies as durable. */
int delta_copy(struct delta_plan *p, const struct delta_copy_options *o);

/* Marks the chunk as in the target at its own offset because the caller
 * knows it is (an earlier run of this install wrote it and synced it, or
 * this run fetched it). -ERANGE for an index outside the plan. */
int delta_plan_set_in_place(struct delta_plan *p, uint32_t index);

uint32_t delta_plan_chunk_count(const struct delta_plan *p);
int delta_plan_chunk(const struct delta_plan *p, uint32_t index, struct delta_chunk *ret);
/* The chunk whose compressed bytes start at payload_offset; -ENOENT if none. */
int delta_plan_chunk_at_payload(const struct delta_plan *p, uint64_t payload_offset, uint32_t *ret_index);
const struct delta_stats *delta_plan_stats(const struct delta_plan *p);

/* Bytes [offset, offset + length). Same layout as download_range. */
struct delta_range {
        uint64_t offset;
        uint64_t length;
};

/* The payload bytes still to fetch (DELTA_FETCH chunks) within
 * [from, from + size) (one part of the payload, say), relative to from,
 * ascending, touching ranges merged. *ret is NULL when *ret_n is 0. */
int delta_plan_fetch_ranges(const struct delta_plan *p, uint64_t from, uint64_t size, struct delta_range **ret,
                            size_t *ret_n);

/* Marks the chunk whose image bytes are SHA-256 md and len long as present
 * in the active slot at source_offset (what the scan does for each piece it
 * cuts); for `otad bundle create --previous`, which knows an older bundle's
 * chunks without its image. Returns how many chunks it resolved. */
uint32_t delta_plan_match(struct delta_plan *p, const uint8_t md[static 32], uint32_t len, uint64_t source_offset);

/* One line for the journal and `otad status`: what is reused from where,
 * what is fetched, how long the scan took and at what rate, why it fell
 * back. */
void delta_stats_format(const struct delta_stats *s, char *buf, size_t size);
