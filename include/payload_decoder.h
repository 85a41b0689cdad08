/* SPDX-License-Identifier: MIT */
/*
 * payload_decoder: turns a bundle's payload (a zchunk file) into image bytes
 * at their offsets, checking everything on the way. Owns the zchunk header
 * (checked against the manifest's header_sha256 before a byte of it is
 * parsed), the chunk index, each chunk's two checksums (SHA-256 of the
 * compressed bytes, then of the decompressed ones: zchunk's "uncompressed
 * checksums" extension), zstd decompression into a buffer bounded by the
 * manifest (no decompression bomb), and the resume point.
 * Never touches a slot, a file or the network, never logs: it is fed bytes
 * and hands image bytes to the write callback it was given; errors come back
 * as a negative errno with a sentence in payload_decoder_error().
 *
 * Memory: two buffers of chunk_size_max (compressed and decompressed), the
 * zstd context, and the index: the header bytes plus a table, ~100 bytes per
 * chunk (0.13 % of the image at the tool's ~80 KiB average chunk). Nothing
 * grows with what has been decoded.
 *
 * Use:
 *   payload_decoder_new(manifest, write, userdata, &d)
 *   payload_decoder_feed(d, bytes, n) ...  (payload bytes in order, from 0;
 *                                           any split, e.g. 4 KiB stream blocks)
 *   payload_decoder_finished(d) -> true once every chunk was written
 * then the caller reads the slot back and compares with the manifest's
 * image_sha256 (verify_sha256()): that proves the bytes the slot holds.
 *
 * Resume after kill -9 or a power cut: persist payload_decoder_progress()
 * (next_chunk) only after the bytes the write callback received for chunks
 * before it are durable (installer sync). On restart:
 *   payload_decoder_new(...)
 *   payload_decoder_feed(d, header bytes, header_size)   (fetched again, or
 *                                    kept by the caller: payload_decoder_header())
 *   payload_decoder_seek(d, next_chunk, &payload_offset)
 *   fetch from payload_offset and feed as before.
 * A chunk is written whole or not counted, so re-writing from next_chunk
 * is always correct.
 *
 * Out of order (the adaptive-update issue: chunks found elsewhere, arbitrary
 * ranges fetched): after the header, payload_decoder_put_chunk() takes one
 * whole compressed chunk by index, and payload_decoder_chunk() describes any
 * chunk (offsets, sizes, both checksums).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct bundle_manifest;
struct payload_decoder;

/* Receives len decoded, verified image bytes for offset. Called once per
 * chunk, with the whole chunk. 0 or a negative errno, which stops the
 * decoder and comes back from feed()/put_chunk() as is. */
typedef int (*payload_write_fn)(uint64_t offset, const void *buf, size_t len, void *userdata);

struct payload_chunk {
        uint32_t index;           /* 0..chunk_count-1 (zchunk's dict chunk excluded) */
        uint64_t payload_offset;  /* where its compressed bytes start in the payload */
        uint32_t payload_size;    /* compressed size */
        uint64_t image_offset;    /* where its bytes go in the image */
        uint32_t image_size;      /* uncompressed size */
        uint8_t sha256[32];       /* of the compressed bytes */
        uint8_t sha256_uncompressed[32]; /* of the image bytes: what the adaptive
                                          * update matches the active slot with */
        bool stored;              /* stored uncompressed (zchunk: digest all zero) */
};

struct payload_progress {
        uint32_t next_chunk;      /* chunks before it are written */
        uint64_t payload_offset;  /* where next_chunk starts (= payload_size when done) */
        uint64_t image_offset;    /* image bytes written before it */
};

/* The manifest must stay alive as long as the decoder. */
int payload_decoder_new(const struct bundle_manifest *m, payload_write_fn write, void *userdata,
                        struct payload_decoder **ret);
void payload_decoder_free(struct payload_decoder *d);

/* Consumes the next len payload bytes. Returns 0 when all were taken, or:
 *   -EBADMSG   the header's SHA-256 is not the manifest's, or a chunk does not
 *              match its checksum (payload_decoder_error() says which): the
 *              data is not this bundle's; the caller may re-fetch from
 *              payload_decoder_progress().payload_offset and feed again
 *   -EPROTO    the header is not a zchunk file otad accepts (flags, hash
 *              types, dictionary, sizes that disagree with the manifest)
 *   -EFBIG     bytes beyond payload_size
 *   the write callback's error
 * After an error feed() returns -ESTALE until payload_decoder_seek(). */
int payload_decoder_feed(struct payload_decoder *d, const void *buf, size_t len);

/* Positions the decoder at chunk index (its first byte is the next one
 * feed() expects) and returns that payload offset; index == chunk_count is
 * the end. Clears an error. Before the header is done only index 0 is valid
 * (start again, header first): -EAGAIN otherwise; -ERANGE past the end. */
int payload_decoder_seek(struct payload_decoder *d, uint32_t index, uint64_t *ret_payload_offset);

/* One whole compressed chunk, by index, in any order; verified, decompressed
 * and written like feed() does. Same errors. Does not move feed()'s position. */
int payload_decoder_put_chunk(struct payload_decoder *d, uint32_t index, const void *buf, size_t len);

bool payload_decoder_header_done(const struct payload_decoder *d);
/* Every chunk up to the end was written (through feed, in order). */
bool payload_decoder_finished(const struct payload_decoder *d);
void payload_decoder_progress(const struct payload_decoder *d, struct payload_progress *ret);

/* The index: chunk_count() is 0 until the header is done. */
uint32_t payload_decoder_chunk_count(const struct payload_decoder *d);
int payload_decoder_chunk(const struct payload_decoder *d, uint32_t index, struct payload_chunk *ret);

/* The verified header bytes (header_size), for a caller that keeps them for
 * resume instead of fetching them again; NULL before the header is done. */
const void *payload_decoder_header(const struct payload_decoder *d, size_t *ret_size);

/* Why the last call failed; "" when none did. */
const char *payload_decoder_error(const struct payload_decoder *d);
