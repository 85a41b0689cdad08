/* SPDX-License-Identifier: MIT */
/*
 * blockmap: which blocks of one file have arrived, and its record for
 * resuming after a restart or power cut. Owns the bitmap, the request
 * bitmaps derived from it (protocol.md §3.4, LSB-first relative to "o") and
 * the progress file format; never touches the data itself. The record holds
 * two maps, as download.h explains: the blocks written (true while this boot
 * lasts) and the blocks durable (synced before the record counted them).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <systemd/sd-id128.h>

struct blockmap;
struct download_file;
struct download_range;

/* A map of ceil(file_size / block_size) blocks, none received. No cap
 * beyond memory: a 24 MB stream file at 256-byte blocks is 98304 blocks,
 * larger parts simply have more. -EINVAL for a zero size or block size. */
int blockmap_new(uint64_t file_size, uint32_t block_size, struct blockmap **ret);
void blockmap_free(struct blockmap *m);
/* A map whose set blocks are those holding at least one byte of the
 * ranges (canonical, include/ranges.h): the blocks a transfer of only those
 * ranges fetches. */
int blockmap_new_covering(uint64_t file_size, uint32_t block_size, const struct download_range *ranges, size_t n,
                          struct blockmap **ret);
/* A new map with m's blocks; NULL when out of memory. */
struct blockmap *blockmap_copy(const struct blockmap *m);
/* m takes from's blocks; -EINVAL unless both have the same file and block
 * size. */
int blockmap_assign(struct blockmap *m, const struct blockmap *from);

uint64_t blockmap_blocks(const struct blockmap *m);
uint32_t blockmap_block_size(const struct blockmap *m);
uint64_t blockmap_file_size(const struct blockmap *m);
/* Bytes in block index: block_size, or the remainder for the last block. */
uint32_t blockmap_block_length(const struct blockmap *m, uint64_t index);

bool blockmap_test(const struct blockmap *m, uint64_t index);
/* Returns true when the block was not set before (a new block). */
bool blockmap_set(struct blockmap *m, uint64_t index);
void blockmap_clear(struct blockmap *m, uint64_t index);
void blockmap_clear_all(struct blockmap *m);
uint64_t blockmap_count(const struct blockmap *m);
bool blockmap_complete(const struct blockmap *m);
/* Every block set in sub is set in m (same file and block size). */
bool blockmap_is_subset(const struct blockmap *sub, const struct blockmap *m);
/* Clears the blocks of m that are not set in with; -EINVAL unless both
 * have the same file and block size. */
int blockmap_intersect(struct blockmap *m, const struct blockmap *with);

/* The first block at or after from that is not set, blockmap_blocks() when
 * there is none. */
uint64_t blockmap_missing_next(const struct blockmap *m, uint64_t from);

/* The first block at or after from that is set in want (any block when
 * want is NULL) and set neither in have nor in skip (either may be NULL;
 * want and have not both); blockmap_blocks() when there is none. */
uint64_t blockmap_wanted_next(const struct blockmap *want, const struct blockmap *have, const struct blockmap *skip,
                              uint64_t from);

/* The GetStream bitmap for the window [offset, offset + n): bit k (byte
 * k >> 3, mask 1 << (k & 7)) is set when block offset + k exists, is
 * missing from m and, when skip is not NULL, not set in skip (e.g. blocks
 * already requested). buf holds (n + 7) / 8 bytes. Returns the number of
 * blocks asked for. */
uint64_t blockmap_request_bitmap(const struct blockmap *m, const struct blockmap *skip, uint64_t offset,
                                 uint32_t n, uint8_t *buf);
/* A GetStream bitmap for sparse wants: bit k set for up to max_blocks
 * blocks offset + k (k < span) that are set in want, missing from have and
 * not set in skip (may be NULL). buf holds (span + 7) / 8 bytes.
 * *ret_span: the bitmap's length in blocks, up to the last bit set. Returns
 * the number of bits set. */
uint64_t blockmap_request_sparse(const struct blockmap *want, const struct blockmap *have,
                                 const struct blockmap *skip, uint64_t offset, uint32_t span, uint32_t max_blocks,
                                 uint8_t *buf, uint32_t *ret_span);

/* The same file at another block size, conservatively: a new block counts
 * as received only when every byte of it was in received old blocks
 * (after a BlockSizeOutOfBounds rejection forced smaller blocks). */
int blockmap_remap(const struct blockmap *m, uint32_t block_size, struct blockmap **ret);

/* Persists the record for file at path, with a header naming the job, file
 * index, file size, block size, a hash of the signature and, with wanted
 * ranges, a hash of those (include/ranges.h), and a checksum over it all. written: the blocks handed to the target, true as long as
 * boot_id is the running boot; durable: the blocks the target synced before
 * this call, a subset of written (-EINVAL otherwise; both at one block
 * size). sync: make the record itself durable (path.tmp, fsync, rename,
 * fsync of the directory); else it is only renamed into place, which
 * survives the process being killed but not necessarily a power cut. */
int blockmap_save(const struct blockmap *written, const struct blockmap *durable, sd_id128_t boot_id,
                  const struct download_file *file, const char *path, bool sync);
/* Loads what blockmap_save() wrote. *ret: the written map when the record
 * was saved in boot_id, else the durable one (the page cache that held the
 * rest did not survive a reboot or power cut). *ret_durable (may be NULL):
 * the durable map. The maps keep the block size they were saved with (remap
 * them when it differs). -ENOENT: nothing saved. -ESTALE: saved for another
 * job, file index, size, signature or set of wanted ranges (a record of the
 * whole file is not one of some ranges, nor the reverse): discard it.
 * -EBADMSG: torn or corrupt. Nothing is set on failure. */
int blockmap_load(const char *path, const struct download_file *file, sd_id128_t boot_id, struct blockmap **ret,
                  struct blockmap **ret_durable);
