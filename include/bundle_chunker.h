/* SPDX-License-Identifier: MIT */
/*
 * bundle_chunker: where `otad bundle create` cuts the image into chunks,
 * content-defined so that the same bytes give the same chunks wherever they
 * sit in the image (a file that moved when the file system was rebuilt).
 * The parameters travel in the manifest, so a device can cut its active slot
 * the same way (the adaptive-update issue) with this very code: one pass,
 * a shift and an add per byte, no state but 8 bytes.
 * Owns the boundary rule only; never reads a file, never allocates.
 *
 * The rule ("gear64"): h = (h << 1) + gear[byte] over the chunk's bytes,
 * starting from h = 0 at the chunk's first byte; a chunk ends after the byte
 * where, with at least min_size bytes in the chunk, the top mask_bits bits of
 * h are zero, or after max_size bytes. gear[] is fixed: 256 values of
 * SplitMix64 from seed 0 (bundle_chunker.c), never to change for "gear64".
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

struct bundle_chunking;

/* The tool's defaults: ~16 KiB + 64 KiB average, at most 256 KiB. */
#define BUNDLE_CHUNK_MIN_DEFAULT (16U * 1024)
#define BUNDLE_CHUNK_MASK_BITS_DEFAULT 16U
#define BUNDLE_CHUNK_MAX_DEFAULT (256U * 1024)

struct bundle_chunker {
        uint64_t hash;
        uint32_t len;        /* bytes in the current chunk so far */
        uint32_t min_size, max_size;
        uint64_t mask;
};

/* -EINVAL for parameters outside BUNDLE_CHUNK_SIZE_MIN..MAX, min > max, or
 * mask_bits outside 8..30. */
int bundle_chunker_init(struct bundle_chunker *c, const struct bundle_chunking *params);
/* Scans buf; returns how many of its bytes belong to the current chunk: len
 * when the chunk goes on past buf, less (≥ 1) when a boundary falls inside
 * it, after which the chunker has started a new chunk. */
size_t bundle_chunker_scan(struct bundle_chunker *c, const uint8_t *buf, size_t len);
