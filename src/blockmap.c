/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <openssl/sha.h>
#include <stdlib.h>
#include <string.h>

#include "blockmap.h"
#include "download.h"
#include "fileio.h"
#include "macro.h"
#include "ranges.h"

struct blockmap {
        uint64_t file_size;
        uint32_t block_size;
        uint64_t n_blocks;
        uint64_t count;
        uint8_t *bits; /* LSB-first: block i is bit i & 7 of byte i >> 3 */
        size_t n_bytes;
};

int blockmap_new(uint64_t file_size, uint32_t block_size, struct blockmap **ret) {
        struct blockmap *m;

        if (file_size == 0 || block_size == 0)
                return -EINVAL;
        m = calloc(1, sizeof *m);
        if (!m)
                return -ENOMEM;
        m->file_size = file_size;
        m->block_size = block_size;
        m->n_blocks = file_size / block_size + (file_size % block_size != 0);
        m->n_bytes = (size_t) ((m->n_blocks + 7) / 8);
        m->bits = calloc(1, m->n_bytes);
        if (!m->bits) {
                free(m);
                return -ENOMEM;
        }
        *ret = m;
        return 0;
}

int blockmap_new_covering(uint64_t file_size, uint32_t block_size, const struct download_range *ranges, size_t n,
                          struct blockmap **ret) {
        struct blockmap *m;
        int r;

        r = blockmap_new(file_size, block_size, &m);
        if (r < 0)
                return r;
        for (size_t i = 0; i < n; i++) {
                uint64_t first, last;

                if (ranges[i].length == 0 || ranges[i].offset >= file_size ||
                    ranges[i].length > file_size - ranges[i].offset) {
                        blockmap_free(m);
                        return -EINVAL;
                }
                first = ranges[i].offset / block_size;
                last = (ranges[i].offset + ranges[i].length - 1) / block_size;
                for (uint64_t b = first; b <= last; b++)
                        blockmap_set(m, b);
        }
        *ret = m;
        return 0;
}

void blockmap_free(struct blockmap *m) {
        if (!m)
                return;
        free(m->bits);
        free(m);
}

struct blockmap *blockmap_copy(const struct blockmap *m) {
        struct blockmap *c;

        if (blockmap_new(m->file_size, m->block_size, &c) < 0)
                return NULL;
        memcpy(c->bits, m->bits, m->n_bytes);
        c->count = m->count;
        return c;
}

int blockmap_assign(struct blockmap *m, const struct blockmap *from) {
        if (m->file_size != from->file_size || m->block_size != from->block_size)
                return -EINVAL;
        memcpy(m->bits, from->bits, m->n_bytes);
        m->count = from->count;
        return 0;
}

uint64_t blockmap_blocks(const struct blockmap *m) {
        return m->n_blocks;
}

uint32_t blockmap_block_size(const struct blockmap *m) {
        return m->block_size;
}

uint64_t blockmap_file_size(const struct blockmap *m) {
        return m->file_size;
}

uint32_t blockmap_block_length(const struct blockmap *m, uint64_t index) {
        if (index + 1 < m->n_blocks)
                return m->block_size;
        if (index + 1 == m->n_blocks)
                return (uint32_t) (m->file_size - index * m->block_size);
        return 0;
}

bool blockmap_test(const struct blockmap *m, uint64_t index) {
        return index < m->n_blocks && (m->bits[index >> 3] & (1u << (index & 7)));
}

bool blockmap_set(struct blockmap *m, uint64_t index) {
        if (index >= m->n_blocks || blockmap_test(m, index))
                return false;
        m->bits[index >> 3] |= (uint8_t) (1u << (index & 7));
        m->count++;
        return true;
}

void blockmap_clear(struct blockmap *m, uint64_t index) {
        if (!blockmap_test(m, index))
                return;
        m->bits[index >> 3] &= (uint8_t) ~(1u << (index & 7));
        m->count--;
}

void blockmap_clear_all(struct blockmap *m) {
        memset(m->bits, 0, m->n_bytes);
        m->count = 0;
}

uint64_t blockmap_count(const struct blockmap *m) {
        return m->count;
}

bool blockmap_complete(const struct blockmap *m) {
        return m->count == m->n_blocks;
}

static uint8_t wanted_byte(const struct blockmap *want, const struct blockmap *have, const struct blockmap *skip,
                           size_t i) {
        uint8_t b = want ? want->bits[i] : 0xff;

        if (have)
                b &= (uint8_t) ~have->bits[i];
        if (skip)
                b &= (uint8_t) ~skip->bits[i];
        return b;
}

uint64_t blockmap_wanted_next(const struct blockmap *want, const struct blockmap *have, const struct blockmap *skip,
                              uint64_t from) {
        uint64_t n = have ? have->n_blocks : want->n_blocks;

        for (uint64_t i = from; i < n;) {
                uint8_t b = wanted_byte(want, have, skip, (size_t) (i >> 3)) >> (i & 7);

                if (b == 0) {
                        /* Nothing in the rest of this byte: the next one. */
                        i = (i | 7) + 1;
                        continue;
                }
                i += (uint64_t) __builtin_ctz(b);
                return i < n ? i : n;
        }
        return n;
}

bool blockmap_is_subset(const struct blockmap *sub, const struct blockmap *m) {
        if (sub->file_size != m->file_size || sub->block_size != m->block_size)
                return false;
        for (size_t i = 0; i < m->n_bytes; i++)
                if (sub->bits[i] & ~m->bits[i])
                        return false;
        return true;
}

int blockmap_intersect(struct blockmap *m, const struct blockmap *with) {
        if (m->file_size != with->file_size || m->block_size != with->block_size)
                return -EINVAL;
        m->count = 0;
        for (size_t i = 0; i < m->n_bytes; i++) {
                m->bits[i] &= with->bits[i];
                m->count += (uint64_t) __builtin_popcount(m->bits[i]);
        }
        return 0;
}

uint64_t blockmap_missing_next(const struct blockmap *m, uint64_t from) {
        for (uint64_t i = from; i < m->n_blocks;) {
                /* Whole bytes of received blocks are skipped at once. */
                if ((i & 7) == 0 && m->bits[i >> 3] == 0xff) {
                        i += 8;
                        continue;
                }
                if (!blockmap_test(m, i))
                        return i;
                i++;
        }
        return m->n_blocks;
}

uint64_t blockmap_request_bitmap(const struct blockmap *m, const struct blockmap *skip, uint64_t offset,
                                 uint32_t n, uint8_t *buf) {
        uint64_t wanted = 0;

        memset(buf, 0, ((size_t) n + 7) / 8);
        for (uint32_t k = 0; k < n; k++) {
                uint64_t i = offset + k;

                if (i >= m->n_blocks)
                        break;
                if (blockmap_test(m, i) || (skip && blockmap_test(skip, i)))
                        continue;
                buf[k >> 3] |= (uint8_t) (1u << (k & 7));
                wanted++;
        }
        return wanted;
}

uint64_t blockmap_request_sparse(const struct blockmap *want, const struct blockmap *have,
                                 const struct blockmap *skip, uint64_t offset, uint32_t span, uint32_t max_blocks,
                                 uint8_t *buf, uint32_t *ret_span) {
        uint64_t wanted = 0, i = offset;
        uint32_t used = 0;

        memset(buf, 0, ((size_t) span + 7) / 8);
        while (wanted < max_blocks) {
                i = blockmap_wanted_next(want, have, skip, i);
                if (i >= have->n_blocks || i - offset >= span)
                        break;
                buf[(i - offset) >> 3] |= (uint8_t) (1u << ((i - offset) & 7));
                used = (uint32_t) (i - offset + 1);
                wanted++;
                i++;
        }
        *ret_span = used;
        return wanted;
}

int blockmap_remap(const struct blockmap *m, uint32_t block_size, struct blockmap **ret) {
        struct blockmap *n;
        int r;

        r = blockmap_new(m->file_size, block_size, &n);
        if (r < 0)
                return r;
        for (uint64_t j = 0; j < n->n_blocks; j++) {
                uint64_t start = j * block_size;
                uint64_t end = start + blockmap_block_length(n, j); /* exclusive */
                bool all = true;

                for (uint64_t i = start / m->block_size; i <= (end - 1) / m->block_size; i++)
                        if (!blockmap_test(m, i)) {
                                all = false;
                                break;
                        }
                if (all)
                        blockmap_set(n, j);
        }
        *ret = n;
        return 0;
}

/* ---- the progress file -------------------------------------------------
 *
 * All integers little-endian:
 *   "OTADBMP2"        magic and format version
 *   u32 block_size, u64 file_size, u64 n_blocks, u32 file_index
 *   32 bytes          SHA-256 of the signature text (zeros: none)
 *   u16 + bytes       job id
 *   16 bytes          boot id the written map is true in
 *   u32 + bytes       written map, ceil(n_blocks / 8) bytes
 *   bytes             durable map, as many bytes, a subset of the written one
 *   32 bytes          SHA-256 of everything above
 * Version 1 ("OTADBMP1") had one map after the job id, no boot id: it was
 * written only after the data was synced, so it is read as the durable map.
 * Version 3 ("OTADBMP3") is version 2 with, after the signature's hash, 32
 * bytes of ranges_hash() of the wanted ranges: a record of only those
 * ranges' blocks. A transfer of the whole file still writes version 2.
 * The block size is part of the header but not of the identity: a map saved
 * at another block size is still this file's progress.
 */

#define MAGIC_V1 "OTADBMP1"
#define MAGIC "OTADBMP2"
#define MAGIC_RANGES "OTADBMP3"
#define HASH_LEN SHA256_DIGEST_LENGTH
#define BOOT_ID_LEN 16
#define JOB_ID_MAX 1024

struct buffer {
        uint8_t *data;
        size_t len, pos;
};

static void put_le(struct buffer *b, uint64_t v, size_t bytes) {
        for (size_t i = 0; i < bytes; i++)
                b->data[b->len++] = (uint8_t) (v >> (8 * i));
}

static void put_raw(struct buffer *b, const void *p, size_t n) {
        memcpy(b->data + b->len, p, n);
        b->len += n;
}

static bool get_le(struct buffer *b, size_t bytes, uint64_t *v) {
        if (b->len - b->pos < bytes)
                return false;
        *v = 0;
        for (size_t i = 0; i < bytes; i++)
                *v |= (uint64_t) b->data[b->pos++] << (8 * i);
        return true;
}

static const uint8_t *get_raw(struct buffer *b, size_t n) {
        const uint8_t *p;

        if (b->len - b->pos < n)
                return NULL;
        p = b->data + b->pos;
        b->pos += n;
        return p;
}

static void signature_hash(const struct download_file *file, uint8_t out[HASH_LEN]) {
        memset(out, 0, HASH_LEN);
        if (file->signature)
                SHA256((const uint8_t *) file->signature, strlen(file->signature), out);
}

int blockmap_save(const struct blockmap *written, const struct blockmap *durable, sd_id128_t boot_id,
                  const struct download_file *file, const char *path, bool sync) {
        _cleanup_free_ uint8_t *data = NULL;
        size_t job_len = file->job_id ? strlen(file->job_id) : 0;
        uint8_t sig[HASH_LEN], ranges[HASH_LEN];
        bool with_ranges = file->wanted != NULL;
        struct buffer b;
        int r;

        if (job_len > JOB_ID_MAX || written->file_size != durable->file_size ||
            written->block_size != durable->block_size || !blockmap_is_subset(durable, written))
                return -EINVAL;
        if (with_ranges) {
                r = ranges_hash(file->wanted, file->n_wanted, ranges);
                if (r < 0)
                        return r;
        }
        data = malloc(8 + 4 + 8 + 8 + 4 + 2 * HASH_LEN + 2 + job_len + BOOT_ID_LEN + 4 + 2 * written->n_bytes + HASH_LEN);
        if (!data)
                return -ENOMEM;
        b = (struct buffer){ .data = data };

        put_raw(&b, with_ranges ? MAGIC_RANGES : MAGIC, 8);
        put_le(&b, written->block_size, 4);
        put_le(&b, written->file_size, 8);
        put_le(&b, written->n_blocks, 8);
        put_le(&b, file->file_index, 4);
        signature_hash(file, sig);
        put_raw(&b, sig, HASH_LEN);
        if (with_ranges)
                put_raw(&b, ranges, HASH_LEN);
        put_le(&b, job_len, 2);
        if (job_len > 0)
                put_raw(&b, file->job_id, job_len);
        put_raw(&b, boot_id.bytes, BOOT_ID_LEN);
        put_le(&b, written->n_bytes, 4);
        put_raw(&b, written->bits, written->n_bytes);
        put_raw(&b, durable->bits, durable->n_bytes);
        SHA256(b.data, b.len, b.data + b.len);
        b.len += HASH_LEN;

        /* Without sync the record survives the process dying, not a power
         * cut; the boot id tells its reader which of the two happened. */
        return sync ? write_file_atomic(path, b.data, b.len, 0600) : write_file_replace(path, b.data, b.len, 0600);
}

static int map_from_bits(uint64_t file_size, uint64_t block_size, uint64_t n_blocks, const uint8_t *bits,
                         uint64_t n_bytes, struct blockmap **ret) {
        struct blockmap *m = NULL;
        int r;

        if (block_size == 0 || block_size > UINT32_MAX)
                return -EBADMSG;
        r = blockmap_new(file_size, (uint32_t) block_size, &m);
        if (r < 0)
                return r;
        if (n_blocks != m->n_blocks || n_bytes != m->n_bytes) {
                blockmap_free(m);
                return -EBADMSG;
        }
        memcpy(m->bits, bits, n_bytes);
        /* Bits beyond the last block would make count lie. */
        if ((m->n_blocks & 7) && (m->bits[m->n_bytes - 1] >> (m->n_blocks & 7))) {
                blockmap_free(m);
                return -EBADMSG;
        }
        for (size_t i = 0; i < m->n_bytes; i++)
                m->count += (uint64_t) __builtin_popcount(m->bits[i]);
        *ret = m;
        return 0;
}

int blockmap_load(const char *path, const struct download_file *file, sd_id128_t boot_id, struct blockmap **ret,
                  struct blockmap **ret_durable) {
        _cleanup_free_ char *raw = NULL;
        struct blockmap *written = NULL, *durable = NULL;
        uint64_t block_size, file_size, n_blocks, file_index, job_len, n_bytes;
        uint8_t sum[HASH_LEN], sig[HASH_LEN], ranges[HASH_LEN];
        const uint8_t *magic, *saved_sig, *saved_ranges = NULL, *job, *saved_boot = NULL, *bits, *durable_bits;
        struct buffer b;
        size_t size;
        bool same, v1, v3;
        int r;

        /* 16M blocks (4 GiB at 256 bytes) is two 2 MiB bitmaps; allow more. */
        r = read_file_full(path, 64u << 20, &raw, &size);
        if (r == -EFBIG)
                return -EBADMSG;
        if (r < 0)
                return r;
        if (size < 8 + HASH_LEN)
                return -EBADMSG;
        SHA256((const uint8_t *) raw, size - HASH_LEN, sum);
        if (memcmp(sum, raw + size - HASH_LEN, HASH_LEN) != 0)
                return -EBADMSG;

        b = (struct buffer){ .data = (uint8_t *) raw, .len = size - HASH_LEN };
        magic = get_raw(&b, 8);
        if (!magic ||
            (memcmp(magic, MAGIC, 8) != 0 && memcmp(magic, MAGIC_V1, 8) != 0 && memcmp(magic, MAGIC_RANGES, 8) != 0))
                return -EBADMSG;
        v1 = memcmp(magic, MAGIC_V1, 8) == 0;
        v3 = memcmp(magic, MAGIC_RANGES, 8) == 0;
        if (!get_le(&b, 4, &block_size) || !get_le(&b, 8, &file_size) || !get_le(&b, 8, &n_blocks) ||
            !get_le(&b, 4, &file_index) || !(saved_sig = get_raw(&b, HASH_LEN)) ||
            (v3 && !(saved_ranges = get_raw(&b, HASH_LEN))) || !get_le(&b, 2, &job_len) ||
            !(job = get_raw(&b, job_len)) || (!v1 && !(saved_boot = get_raw(&b, BOOT_ID_LEN))) ||
            !get_le(&b, 4, &n_bytes) || !(bits = get_raw(&b, n_bytes)))
                return -EBADMSG;
        durable_bits = v1 ? bits : get_raw(&b, n_bytes);
        if (!durable_bits || b.pos != b.len)
                return -EBADMSG;

        signature_hash(file, sig);
        same = file_index == file->file_index && file_size == file->size && memcmp(saved_sig, sig, HASH_LEN) == 0 &&
               job_len == (file->job_id ? strlen(file->job_id) : 0) && memcmp(job, file->job_id ? file->job_id : "", job_len) == 0;
        /* A record of some ranges is not one of the whole file, nor the
         * reverse, nor one of other ranges. */
        if (same && (file->wanted != NULL) != v3)
                same = false;
        if (same && v3) {
                r = ranges_hash(file->wanted, file->n_wanted, ranges);
                if (r < 0)
                        return r;
                same = memcmp(saved_ranges, ranges, HASH_LEN) == 0;
        }
        if (!same)
                return -ESTALE;

        r = map_from_bits(file_size, block_size, n_blocks, bits, n_bytes, &written);
        if (r < 0)
                return r;
        r = map_from_bits(file_size, block_size, n_blocks, durable_bits, n_bytes, &durable);
        if (r < 0 || !blockmap_is_subset(durable, written)) {
                blockmap_free(written);
                blockmap_free(durable);
                return r < 0 ? r : -EBADMSG;
        }

        /* Another boot: the page cache that held the blocks written but not
         * synced is gone (a power cut, or a reboot we cannot tell from one). */
        if (!saved_boot || sd_id128_is_null(boot_id) || memcmp(saved_boot, boot_id.bytes, BOOT_ID_LEN) != 0) {
                blockmap_free(written);
                written = blockmap_copy(durable);
                if (!written) {
                        blockmap_free(durable);
                        return -ENOMEM;
                }
        }
        *ret = written;
        if (ret_durable)
                *ret_durable = durable;
        else
                blockmap_free(durable);
        return 0;
}
