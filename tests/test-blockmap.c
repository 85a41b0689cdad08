/* SPDX-License-Identifier: MIT */
/*
 * The block map: accounting, the GetStream bitmaps of protocol.md §3.4
 * (whole windows, and sparse ones for wanted ranges), re-mapping to smaller
 * blocks, and the progress file: round trip, another job's, file's or
 * wanted set's record (-ESTALE), torn and corrupted files (-EBADMSG).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blockmap.h"
#include "download.h"
#include "fileio.h"
#include "macro.h"
#include "tap.h"

static const char *SIG = "MEQCIF2QDvww1G/kpRGZ8FYvQrok1bSZvXjXefRk7sqNcyPTAiB4dvGt8fozIY5NC0vUDJ2MY42ZERYEcrbwA4n6q7vrBg==";
static const sd_id128_t BOOT = { .bytes = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 } };

static void test_accounting(void) {
        struct blockmap *m;

        tap_is_int(blockmap_new(0, 4096, &m), -EINVAL, "empty file refused");
        tap_is_int(blockmap_new(10000, 0, &m), -EINVAL, "zero block size refused");
        tap_is_int(blockmap_new(10000, 4096, &m), 0, "10000 bytes at 4096");
        tap_is_int((long long) blockmap_blocks(m), 3, "3 blocks");
        tap_is_int(blockmap_block_length(m, 0), 4096, "block 0 full");
        tap_is_int(blockmap_block_length(m, 2), 1808, "last block is the remainder");
        tap_is_int(blockmap_block_length(m, 3), 0, "no block 3");
        tap_ok(blockmap_set(m, 1), "block 1 new");
        tap_ok(!blockmap_set(m, 1), "block 1 again is a duplicate");
        tap_ok(!blockmap_set(m, 3), "block 3 out of range refused");
        tap_is_int((long long) blockmap_count(m), 1, "count 1");
        tap_is_int((long long) blockmap_missing_next(m, 0), 0, "next missing from 0");
        tap_is_int((long long) blockmap_missing_next(m, 1), 2, "next missing from 1");
        blockmap_set(m, 0);
        blockmap_set(m, 2);
        tap_ok(blockmap_complete(m), "complete");
        tap_is_int((long long) blockmap_missing_next(m, 0), 3, "nothing missing");
        blockmap_clear(m, 2);
        blockmap_clear(m, 2);
        tap_is_int((long long) blockmap_count(m), 2, "clear counts once");
        blockmap_free(m);

        /* The 24 MB stream limit at 256-byte blocks, filled in a scrambled order. */
        tap_is_int(blockmap_new(98304ull * 256, 256, &m), 0, "98304 blocks");
        for (uint64_t k = 0; k < 98304; k++)
                blockmap_set(m, (k * 40501) % 98304);
        tap_ok(blockmap_complete(m) && blockmap_count(m) == 98304, "all 98304 set");
        blockmap_clear(m, 77777);
        tap_is_int((long long) blockmap_missing_next(m, 0), 77777, "the one missing block is found");
        blockmap_free(m);

        /* No artificial cap: a 4 GiB part at 256-byte blocks. */
        tap_is_int(blockmap_new(4294967295ull, 256, &m), 0, "16M blocks");
        tap_ok(blockmap_set(m, blockmap_blocks(m) - 1) && blockmap_block_length(m, blockmap_blocks(m) - 1) == 255,
               "last of 16M blocks");
        blockmap_free(m);
}

static bool bytes_are(const uint8_t *got, size_t n, const char *want) {
        return memcmp(got, want, n) == 0;
}

static void test_request_bitmap(void) {
        struct blockmap *m, *skip;
        uint8_t buf[64];

        /* The reference agent's whole-file bitmaps (§3.4). */
        blockmap_new(10000, 4096, &m);
        tap_is_int((long long) blockmap_request_bitmap(m, NULL, 0, 4, buf), 3, "fresh: 3 blocks wanted");
        tap_ok(buf[0] == 0x07, "fresh bitmap 07");
        blockmap_set(m, 0);
        blockmap_request_bitmap(m, NULL, 0, 4, buf);
        tap_ok(buf[0] == 0x06, "after block 0: 06");
        blockmap_free(m);

        blockmap_new(285 * 4096, 4096, &m);
        for (int i = 0; i < 10; i++)
                blockmap_set(m, i);
        tap_is_int((long long) blockmap_request_bitmap(m, NULL, 0, 288, buf), 275, "285 blocks, 10 done: 275 wanted");
        tap_ok(buf[0] == 0x00 && buf[1] == 0xfc && buf[2] == 0xff && buf[34] == 0xff && buf[35] == 0x1f,
               "36-byte bitmap 00 fc ff .. 1f");
        blockmap_free(m);

        /* The AWS example: blocks 20, 21, 24, 43 with o=20 -> 13 00 80. */
        blockmap_new(64 * 256, 256, &m);
        for (int i = 0; i < 64; i++)
                if (i != 20 && i != 21 && i != 24 && i != 43)
                        blockmap_set(m, i);
        tap_is_int((long long) blockmap_request_bitmap(m, NULL, 20, 24, buf), 4, "o=20: 4 wanted");
        tap_ok(bytes_are(buf, 3, "\x13\x00\x80"), "o=20 bitmap 13 00 80");

        /* Blocks already in flight are skipped. */
        blockmap_new(64 * 256, 256, &skip);
        blockmap_set(skip, 21);
        tap_is_int((long long) blockmap_request_bitmap(m, skip, 20, 24, buf), 3, "skip: 3 wanted");
        tap_ok(bytes_are(buf, 3, "\x11\x00\x80"), "skip bitmap 11 00 80");
        /* A window past the end asks for nothing beyond it. */
        tap_is_int((long long) blockmap_request_bitmap(m, NULL, 40, 32, buf), 1, "window past the end");
        tap_ok(bytes_are(buf, 4, "\x08\x00\x00\x00"), "window past the end bitmap");
        blockmap_free(skip);
        blockmap_free(m);
}

/* Wanted ranges: the blocks that hold them, and bitmaps naming exactly
 * those that are missing, sparse across a window (§3.4: LSB-first, byte 0
 * first, bit 0 = block "o"). */
static void test_sparse_bitmap(void) {
        /* The AWS example's blocks 20, 21, 24, 43 of 256 bytes as ranges:
         * one byte of 20, the end of 21 and the start of 22 would add 22. */
        static const struct download_range aws[] = {
                { .offset = 20 * 256 + 7, .length = 1 },
                { .offset = 21 * 256, .length = 256 },
                { .offset = 24 * 256 + 255, .length = 1 },
                { .offset = 43 * 256, .length = 10 },
        };
        static const struct download_range across[] = { { .offset = 21 * 256 + 200, .length = 100 } };
        struct blockmap *want, *have, *skip;
        uint8_t buf[1024];
        uint32_t span = 0;

        tap_is_int(blockmap_new_covering(64 * 256, 256, aws, ELEMENTSOF(aws), &want), 0, "covering map");
        tap_ok(blockmap_count(want) == 4 && blockmap_test(want, 20) && blockmap_test(want, 21) &&
                       blockmap_test(want, 24) && blockmap_test(want, 43),
               "the blocks holding wanted bytes: 20, 21, 24, 43");
        blockmap_new(64 * 256, 256, &have);
        tap_is_int((long long) blockmap_request_sparse(want, have, NULL, 20, 44, 32, buf, &span), 4,
                   "o=20: 4 blocks asked for");
        tap_ok(span == 24 && bytes_are(buf, 3, "\x13\x00\x80"), "o=20 bitmap 13 00 80, 24 blocks long (span %u)",
               span);
        tap_is_int((long long) blockmap_wanted_next(want, have, NULL, 0), 20, "first wanted: 20");
        tap_is_int((long long) blockmap_wanted_next(want, have, NULL, 25), 43, "next wanted from 25: 43");
        tap_is_int((long long) blockmap_wanted_next(want, have, NULL, 44), 64, "none from 44: blocks()");

        /* Received and in-flight blocks are left out; n caps the count. */
        blockmap_set(have, 20);
        blockmap_new(64 * 256, 256, &skip);
        blockmap_set(skip, 24);
        tap_is_int((long long) blockmap_request_sparse(want, have, skip, 21, 43, 32, buf, &span), 2,
                   "received and in-flight blocks skipped");
        tap_ok(span == 23 && bytes_are(buf, 3, "\x01\x00\x40"), "o=21 bitmap 01 00 40");
        tap_is_int((long long) blockmap_request_sparse(want, have, NULL, 21, 43, 1, buf, &span), 1,
                   "max_blocks 1: one block");
        tap_ok(span == 1 && buf[0] == 0x01, "and the bitmap ends with it");
        tap_is_int((long long) blockmap_request_sparse(want, have, NULL, 21, 3, 32, buf, &span), 1,
                   "a span of 3 does not reach block 24");
        tap_is_int((long long) blockmap_wanted_next(NULL, have, skip, 20), 21, "no want: any missing block");

        /* A range across a block edge wants both blocks. */
        blockmap_free(want);
        tap_is_int(blockmap_new_covering(64 * 256, 256, across, 1, &want), 0, "covering a block edge");
        tap_ok(blockmap_count(want) == 2 && blockmap_test(want, 21) && blockmap_test(want, 22), "blocks 21 and 22");

        /* Records hold wanted blocks only: intersect after a remap. */
        blockmap_set(have, 22);
        blockmap_set(have, 40);
        tap_is_int(blockmap_intersect(have, want), 0, "intersect");
        tap_ok(blockmap_count(have) == 1 && blockmap_test(have, 22), "only the wanted block stays");
        tap_ok(blockmap_is_subset(have, want) && !blockmap_is_subset(want, have), "subset");
        blockmap_free(skip);
        blockmap_new(64 * 256, 512, &skip);
        tap_is_int(blockmap_intersect(have, skip), -EINVAL, "intersect across block sizes: -EINVAL");
        tap_ok(!blockmap_is_subset(have, skip), "no subset across block sizes");
        static const struct download_range outside[] = { { .offset = 64 * 256, .length = 1 } };
        struct blockmap *none = NULL;
        tap_is_int(blockmap_new_covering(64 * 256, 256, outside, 1, &none), -EINVAL, "a range past the file");
        blockmap_free(skip);
        blockmap_free(want);
        blockmap_free(have);
}

static void test_remap(void) {
        struct blockmap *m, *half, *back;

        blockmap_new(10000, 4096, &m);
        blockmap_set(m, 0);
        blockmap_set(m, 2);
        tap_is_int(blockmap_remap(m, 2048, &half), 0, "remap 4096 -> 2048");
        tap_is_int((long long) blockmap_blocks(half), 5, "5 blocks of 2048");
        tap_ok(blockmap_test(half, 0) && blockmap_test(half, 1) && !blockmap_test(half, 2) &&
               !blockmap_test(half, 3) && blockmap_test(half, 4), "received bytes carried over exactly");
        blockmap_clear(half, 1);
        tap_is_int(blockmap_remap(half, 4096, &back), 0, "remap 2048 -> 4096");
        tap_ok(!blockmap_test(back, 0) && !blockmap_test(back, 1) && blockmap_test(back, 2) &&
               blockmap_count(back) == 1, "partly received blocks count as missing");
        blockmap_free(back);
        blockmap_free(half);

        /* Unaligned: 3000-byte blocks to 256. */
        tap_is_int(blockmap_remap(m, 3000, &back), 0, "remap 4096 -> 3000");
        tap_ok(blockmap_test(back, 0) && !blockmap_test(back, 1) && !blockmap_test(back, 2) && blockmap_test(back, 3),
               "only blocks wholly inside received bytes (0..4095, 8192..9999)");
        blockmap_free(back);
        blockmap_free(m);
}

static void test_persistence(const char *dir) {
        _cleanup_free_ char *path = NULL, *tmp = NULL, *raw = NULL;
        struct download_file file = { .job_id = "AFR_OTA-job1", .file_index = 1, .size = 1000000, .signature = SIG };
        struct download_file other;
        struct blockmap *m, *loaded = NULL;
        size_t size;
        int bad = 0;

        if (asprintf(&path, "%s/progress", dir) < 0 || asprintf(&tmp, "%s/progress.tmp", dir) < 0)
                abort();
        file.state_path = path;

        tap_is_int(blockmap_load(path, &file, BOOT, &loaded, NULL), -ENOENT, "nothing saved yet: -ENOENT");

        blockmap_new(file.size, 4096, &m);
        for (uint64_t i = 0; i < blockmap_blocks(m); i += 3)
                blockmap_set(m, i);
        tap_is_int(blockmap_save(m, m, BOOT, &file, path, true), 0, "save");
        tap_ok(access(tmp, F_OK) < 0, "no .tmp left behind");
        tap_is_int(blockmap_load(path, &file, BOOT, &loaded, NULL), 0, "load");
        tap_ok(loaded && blockmap_count(loaded) == blockmap_count(m) && blockmap_block_size(loaded) == 4096 &&
               blockmap_test(loaded, 3) && !blockmap_test(loaded, 4), "same blocks after load");
        blockmap_free(loaded);
        loaded = NULL;

        /* A stale tmp from a crash mid-save does not matter. */
        tap_is_int(write_file_atomic(tmp, "garbage", 7, 0600), 0, "a stale .tmp left by a crash");
        tap_is_int(blockmap_load(path, &file, BOOT, &loaded, NULL), 0, "stale .tmp ignored");
        blockmap_free(loaded);
        loaded = NULL;

        other = file;
        other.job_id = "AFR_OTA-job2";
        tap_is_int(blockmap_load(path, &other, BOOT, &loaded, NULL), -ESTALE, "another job: -ESTALE");
        other = file;
        other.file_index = 0;
        tap_is_int(blockmap_load(path, &other, BOOT, &loaded, NULL), -ESTALE, "another file index: -ESTALE");
        other = file;
        other.size = 1000001;
        tap_is_int(blockmap_load(path, &other, BOOT, &loaded, NULL), -ESTALE, "another size: -ESTALE");
        other = file;
        other.signature = "MEUCIQ==";
        tap_is_int(blockmap_load(path, &other, BOOT, &loaded, NULL), -ESTALE, "another signature: -ESTALE");
        other = file;
        other.signature = NULL;
        tap_is_int(blockmap_load(path, &other, BOOT, &loaded, NULL), -ESTALE, "unsigned vs signed: -ESTALE");
        tap_ok(loaded == NULL, "ret untouched on failure");

        /* Torn writes: every truncation, and every single flipped byte. */
        tap_is_int(read_file_full(path, 1 << 20, &raw, &size), 0, "read the record back");
        for (size_t k = 0; k < size; k++) {
                int fd = open(path, O_WRONLY | O_TRUNC);

                if (fd < 0 || write(fd, raw, k) != (ssize_t) k)
                        abort();
                close(fd);
                if (blockmap_load(path, &file, BOOT, &loaded, NULL) != -EBADMSG)
                        bad++;
        }
        tap_ok(bad == 0, "all %zu truncations: -EBADMSG (%d not)", size, bad);
        bad = 0;
        for (size_t k = 0; k < size; k++) {
                raw[k] ^= 0x20;
                if (write_file_atomic(path, raw, size, 0600) < 0 ||
                    blockmap_load(path, &file, BOOT, &loaded, NULL) != -EBADMSG)
                        bad++;
                raw[k] ^= 0x20;
        }
        tap_ok(bad == 0, "all %zu flipped bytes: -EBADMSG (%d not)", size, bad);

        /* After a block-size change the record keeps its block size. */
        blockmap_free(m);
        blockmap_new(file.size, 1024, &m);
        blockmap_set(m, 976);
        tap_is_int(blockmap_save(m, m, BOOT, &file, path, true), 0, "save at 1024");
        tap_ok(blockmap_load(path, &file, BOOT, &loaded, NULL) == 0 && blockmap_block_size(loaded) == 1024 &&
               blockmap_test(loaded, 976) && blockmap_block_length(loaded, 976) == 1000000 - 976 * 1024,
               "loaded at 1024 with the short last block");
        blockmap_free(loaded);
        blockmap_free(m);
        unlink(path);
        unlink(tmp);
}

/* A record of wanted ranges names the set: one of another set, or of the
 * whole file, is not resumed; nor is a whole-file record for ranges. */
static void test_ranges_identity(const char *dir) {
        _cleanup_free_ char *path = NULL;
        static const struct download_range set[] = { { .offset = 0, .length = 100 }, { .offset = 100, .length = 50 },
                                                      { .offset = 5000, .length = 10 } };
        static const struct download_range merged[] = { { .offset = 0, .length = 150 },
                                                        { .offset = 5000, .length = 10 } };
        static const struct download_range other[] = { { .offset = 0, .length = 150 },
                                                       { .offset = 5000, .length = 11 } };
        struct download_file file = { .job_id = "AFR_OTA-job1", .size = 100000, .signature = SIG,
                                      .wanted = set, .n_wanted = ELEMENTSOF(set) };
        struct download_file f2;
        struct blockmap *m, *loaded = NULL;
        _cleanup_free_ char *raw = NULL;

        if (asprintf(&path, "%s/progress3", dir) < 0)
                abort();
        file.state_path = path;
        blockmap_new_covering(file.size, 4096, set, ELEMENTSOF(set), &m);
        tap_is_int(blockmap_save(m, m, BOOT, &file, path, true), 0, "save a record of ranges");
        tap_ok(read_file_full(path, 1 << 20, &raw, NULL) == 0 && memcmp(raw, "OTADBMP3", 8) == 0, "version 3");
        tap_ok(blockmap_load(path, &file, BOOT, &loaded, NULL) == 0 && blockmap_count(loaded) == 2, "same set: resumed");
        blockmap_free(loaded);
        loaded = NULL;
        f2 = file;
        f2.wanted = merged;
        f2.n_wanted = ELEMENTSOF(merged);
        tap_ok(blockmap_load(path, &f2, BOOT, &loaded, NULL) == 0, "the same set in merged form: resumed");
        blockmap_free(loaded);
        loaded = NULL;
        f2.wanted = other;
        tap_is_int(blockmap_load(path, &f2, BOOT, &loaded, NULL), -ESTALE, "another set: -ESTALE");
        f2.wanted = NULL;
        f2.n_wanted = 0;
        tap_is_int(blockmap_load(path, &f2, BOOT, &loaded, NULL), -ESTALE, "the whole file: -ESTALE");
        f2.wanted = set;
        f2.n_wanted = 0;
        tap_is_int(blockmap_load(path, &f2, BOOT, &loaded, NULL), -ESTALE, "the empty set: -ESTALE");

        /* A whole-file record (version 2, as before) is no record of ranges. */
        f2 = file;
        f2.wanted = NULL;
        f2.n_wanted = 0;
        blockmap_free(m);
        blockmap_new(file.size, 4096, &m);
        blockmap_set(m, 0);
        tap_is_int(blockmap_save(m, m, BOOT, &f2, path, true), 0, "save a whole-file record");
        free(raw);
        raw = NULL;
        tap_ok(read_file_full(path, 1 << 20, &raw, NULL) == 0 && memcmp(raw, "OTADBMP2", 8) == 0,
               "still version 2");
        tap_is_int(blockmap_load(path, &file, BOOT, &loaded, NULL), -ESTALE, "for ranges: -ESTALE");
        tap_ok(loaded == NULL, "ret untouched");
        blockmap_free(m);
        unlink(path);
}

/* What each of kill -9 and a power cut leaves a resuming run (download.h). */
static void test_written_and_durable(const char *dir) {
        _cleanup_free_ char *path = NULL;
        struct download_file file = { .job_id = "AFR_OTA-job1", .file_index = 0, .size = 100000, .signature = SIG };
        struct blockmap *written, *durable, *loaded = NULL, *loaded_durable = NULL;
        const sd_id128_t other_boot = { .bytes = { 9, 9, 9 } };

        if (asprintf(&path, "%s/progress2", dir) < 0)
                abort();
        file.state_path = path;
        blockmap_new(file.size, 1000, &written);
        blockmap_new(file.size, 1000, &durable);
        for (uint64_t i = 0; i < 40; i++)
                blockmap_set(written, i);
        for (uint64_t i = 0; i < 10; i++)
                blockmap_set(durable, i);

        tap_is_int(blockmap_save(durable, written, BOOT, &file, path, false), -EINVAL,
                   "durable blocks that were not written: -EINVAL");
        tap_is_int(blockmap_save(written, durable, BOOT, &file, path, false), 0, "save without sync");
        tap_is_int(blockmap_load(path, &file, BOOT, &loaded, &loaded_durable), 0, "load in the same boot");
        tap_ok(loaded && blockmap_count(loaded) == 40 && blockmap_test(loaded, 39) && loaded_durable &&
               blockmap_count(loaded_durable) == 10, "same boot (a kill -9): the written blocks count");
        blockmap_free(loaded);
        blockmap_free(loaded_durable);
        loaded = loaded_durable = NULL;

        tap_is_int(blockmap_load(path, &file, other_boot, &loaded, &loaded_durable), 0, "load in another boot");
        tap_ok(loaded && blockmap_count(loaded) == 10 && !blockmap_test(loaded, 10) && loaded_durable &&
               blockmap_count(loaded_durable) == 10, "another boot (a power cut): only the synced blocks count");
        blockmap_free(loaded);
        blockmap_free(loaded_durable);
        loaded = NULL;

        tap_is_int(blockmap_load(path, &file, SD_ID128_NULL, &loaded, NULL), 0, "load without a boot id");
        tap_ok(loaded && blockmap_count(loaded) == 10, "unknown boot: only the synced blocks count");
        blockmap_free(loaded);
        loaded = NULL;

        tap_ok(blockmap_assign(durable, written) == 0 && blockmap_count(durable) == 40, "assign");
        blockmap_free(written);
        blockmap_new(file.size, 2000, &written);
        tap_is_int(blockmap_assign(durable, written), -EINVAL, "assign across block sizes: -EINVAL");
        blockmap_free(written);
        blockmap_free(durable);
        unlink(path);
}

int main(void) {
        char dir[] = "/tmp/test-blockmap-XXXXXX";

        if (!mkdtemp(dir))
                abort();
        test_accounting();
        test_request_bitmap();
        test_sparse_bitmap();
        test_remap();
        test_persistence(dir);
        test_ranges_identity(dir);
        test_written_and_durable(dir);
        rmdir(dir);
        return tap_done();
}
