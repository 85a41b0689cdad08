/* SPDX-License-Identifier: MIT */
/*
 * ranges: the wanted byte ranges of a job file (download.h) and how the two
 * transports cover them: the set's identity for progress records, the
 * blocks that hold them for MQTT streams (and the block size that wastes
 * little at their edges), and the spans of coalesced HTTP Range requests.
 * Pure computation on sorted arrays: no I/O, no state, no allocation but
 * the copy ranges_normalize() returns.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "download.h"

#define RANGES_HASH_SIZE 32

/* Checks in[0..n) against download_file's rules (sorted, none empty, none
 * overlapping, all within file_size) and returns a copy with touching
 * ranges merged: the canonical form every other function expects. *ret is
 * never NULL on success, also for n == 0 (an empty set is not "the whole
 * file"). -EINVAL when a rule is broken, -ENOMEM. */
int ranges_normalize(const struct download_range *in, size_t n, uint64_t file_size, struct download_range **ret,
                     size_t *ret_n);

uint64_t ranges_total(const struct download_range *r, size_t n);

/* SHA-256 over the canonical set (u64 offset, u64 length, little-endian,
 * per range; touching ranges of a valid set merged first, so any valid form
 * of a set gives its canonical hash): what a progress record names to say
 * which set it counts.
 * -ENOMEM when OpenSSL cannot allocate. */
int ranges_hash(const struct download_range *r, size_t n, uint8_t ret[RANGES_HASH_SIZE]);

/* The first range that ends after offset (n when none does). */
size_t ranges_find(const struct download_range *r, size_t n, uint64_t offset);

/* Wanted bytes in [start, end). */
uint64_t ranges_bytes_in(const struct download_range *r, size_t n, uint64_t start, uint64_t end);

/* ---- MQTT streams ---------------------------------------------------------- */

/* Blocks of block_size holding at least one wanted byte, and their bytes
 * (the file's last block may be short): what a stream transfer fetches. */
void ranges_cover(const struct download_range *r, size_t n, uint64_t file_size, uint32_t block_size,
                  uint64_t *ret_blocks, uint64_t *ret_bytes);

/* What one stream block costs beyond its payload: the CBOR keys of a data
 * message (§8.4: 24 bytes with "c":"rdy") and the MQTT PUBLISH header with
 * its topic ($aws/things/<thing>/streams/<AFR_OTA-uuid>/data/cbor, ~95
 * bytes for typical names). */
#define RANGES_BLOCK_FRAMING 120u
/* Smaller blocks than this make a transfer publish-bound under AWS IoT's
 * 100 publishes/s (protocol.md §7): 4 KiB blocks carry at most 400 KiB/s
 * of the 512 KiB/s a connection gets, 2 KiB ones half of that. */
#define RANGES_BLOCK_SIZE_FLOOR 4096u

/* The block size to fetch r in: the largest power of two from max_block_size
 * down to RANGES_BLOCK_SIZE_FLOOR whose blocks, framing included, cost at
 * most 1/8 more than the wanted bytes; the floor (or max_block_size when
 * that is smaller) when none does. tests/bench/bench_ranges.py measures why. */
uint32_t ranges_stream_block_size(const struct download_range *r, size_t n, uint64_t file_size,
                                  uint32_t max_block_size);

/* ---- HTTP Range requests ----------------------------------------------------- */

struct ranges_request_limits {
        uint64_t gap_max;  /* a gap shorter than this is fetched along rather than split off */
        size_t spans_max;  /* ranges per request; 1 for a server that takes one */
        size_t header_max; /* characters of the Range value after "bytes=" */
};

/* The spans of the next request for the wanted bytes at or after from:
 * ranges coalesced over gaps shorter than gap_max, at most spans_max of
 * them, whose Range value fits header_max. Returns how many it wrote to
 * spans (room for spans_max), 0 when nothing is wanted from there on. */
size_t ranges_plan_request(const struct download_range *r, size_t n, uint64_t from,
                           const struct ranges_request_limits *limits, struct download_range *spans);

/* "a-b,c-d" (RFC 9110 §14.1.2: inclusive last byte), the Range value after
 * "bytes=". Returns its length, -ENOBUFS when it does not fit in size. */
int ranges_format(const struct download_range *spans, size_t n, char *buf, size_t size);
