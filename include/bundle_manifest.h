/* SPDX-License-Identifier: MIT */
/*
 * bundle_manifest: the manifest of an update bundle, the small first file of
 * a bundle job that otad decides from before it downloads any payload. Owns
 * the manifest's JSON form (written by `otad bundle create`), its strict
 * parsing with every size bounded before anything is allocated, and the
 * decision whether a bundle may be installed here (compatible, version, size).
 * Never checks the manifest's signature (verify.c does, as for every job
 * file), never opens a file or the network, never logs: failures come back
 * as a sentence for the job's `detail`.
 *
 * Chain of trust: signature over the manifest file -> header_sha256 of the
 * payload's zchunk header -> that header's per-chunk SHA-256s (compressed
 * and uncompressed) -> image_sha256 of what the slot holds at the end.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BUNDLE_FORMAT_VERSION 1
/* What the manifest's "format" key says; anything else is not a bundle. */
#define BUNDLE_FORMAT_NAME "otad-bundle"
#define BUNDLE_PAYLOAD_FORMAT "zchunk"
/* The content-defined chunking otad's tool applies (bundle_chunker.h). */
#define BUNDLE_CHUNKING_NAME "gear64"

/* A manifest is a few hundred bytes per part; anything bigger is refused
 * before it is parsed. */
#define BUNDLE_MANIFEST_MAX (64 * 1024)
/* AWS IoT: a stream file holds at most 24 MiB (98,304 blocks of 256 B) and a
 * stream at most 50 files, one of which is the manifest (protocol.md §3.7). */
#define BUNDLE_PART_SIZE_MAX (24ULL * 1024 * 1024)
#define BUNDLE_PARTS_MAX 49
#define BUNDLE_PAYLOAD_SIZE_MAX (BUNDLE_PART_SIZE_MAX * BUNDLE_PARTS_MAX)
/* The zchunk header (lead, preface, index) is ~70 bytes per chunk; 8 MiB is
 * >100k chunks, more than a 2^40-byte image at the smallest chunks allowed. */
#define BUNDLE_HEADER_SIZE_MAX (8U * 1024 * 1024)
/* Bounds of one chunk, uncompressed: the decoder's buffers are this big. */
#define BUNDLE_CHUNK_SIZE_MIN 4096U
#define BUNDLE_CHUNK_SIZE_MAX (4U * 1024 * 1024)
/* 1 TiB: a bound that keeps every sum of sizes far from overflow. */
#define BUNDLE_IMAGE_SIZE_MAX (1ULL << 40)
#define BUNDLE_TEXT_MAX 128 /* compatible, version, part file names */

struct bundle_part {
        char *file;          /* the job file's name (filepath), [A-Za-z0-9._-] */
        uint64_t offset;     /* in the payload: the parts are its consecutive slices */
        uint64_t size;       /* 1..BUNDLE_PART_SIZE_MAX */
        uint8_t sha256[32];
};

struct bundle_chunking {
        char *algorithm;     /* BUNDLE_CHUNKING_NAME */
        uint32_t min_size;   /* no boundary before this many bytes */
        uint32_t mask_bits;  /* a boundary where the top mask_bits of the hash are 0 */
        uint32_t max_size;   /* a boundary after this many bytes at the latest */
};

struct bundle_manifest {
        unsigned format_version;
        char *compatible;
        char *version;

        uint64_t image_size;          /* the uncompressed image, what the slot receives */
        uint8_t image_sha256[32];     /* of those image_size bytes: the read-back check */

        char *payload_format;         /* BUNDLE_PAYLOAD_FORMAT */
        uint64_t payload_size;        /* sum of the parts */
        uint32_t header_size;         /* the zchunk lead + header, the payload's first bytes */
        uint8_t header_sha256[32];    /* SHA-256 of those header_size bytes */
        uint32_t chunk_size_max;      /* no chunk of the payload is larger, uncompressed */
        uint32_t chunk_count;         /* data chunks (zchunk's dict chunk not counted) */
        struct bundle_chunking chunking;

        struct bundle_part *parts;
        size_t n_parts;
};

/* Parses and validates a manifest. Strict: unknown keys, a missing key, a
 * wrong type, a number out of its bound, a malformed hex digest, parts that
 * are not consecutive slices of payload_size, or a header/image/chunk size
 * out of its bound are all -EBADMSG with the cause in err (may be NULL).
 * -EPROTONOSUPPORT for another format_version, -ENOMEM. */
int bundle_manifest_parse(const void *data, size_t size, struct bundle_manifest **ret,
                          char *err, size_t err_size);
void bundle_manifest_free(struct bundle_manifest *m);

/* The manifest as the JSON text `otad bundle create` writes (ends in "\n").
 * A new string in *ret. */
int bundle_manifest_format(const struct bundle_manifest *m, char **ret);

/* Which part holds payload byte offset; -ERANGE past the end. */
int bundle_manifest_part_at(const struct bundle_manifest *m, uint64_t offset, size_t *ret_index);

/* What this device accepts. */
struct bundle_policy {
        const char *compatible;       /* [update] compatible; empty or NULL: no bundle is compatible */
        const char *running_version;
        bool allow_downgrade;
        bool allow_same_version;
        uint64_t slot_size;           /* 0: unknown, not checked */
};

enum bundle_verdict {
        BUNDLE_ACCEPT,
        BUNDLE_INCOMPATIBLE,   /* compatible differs, or none configured */
        BUNDLE_DOWNGRADE,
        BUNDLE_SAME_VERSION,
        BUNDLE_TOO_LARGE,      /* the image does not fit the slot */
};

/* The decision and how the reference agent words it (protocol.md §2.4):
 * reason = "<word>: 0x%08x" when word is set, else "0x%08x: 0x%08x" of
 * (code, sub_code). detail is the sentence for statusDetails' "detail". */
struct bundle_decision {
        enum bundle_verdict verdict;
        const char *word;      /* "rejected", or NULL for the code: sub form */
        unsigned code;
        unsigned sub_code;
        char detail[256];
};

/* Decides from the manifest alone, before any payload byte is fetched:
 *   incompatible -> "0x0000000c: 0x00000004" (JobParserError,
 *                   NonConformingJobDoc: the job is not for this device)
 *   downgrade    -> "rejected: 0x0000000f"   (DowngradeNotAllowed)
 *   same version -> "rejected: 0x00000010"   (SameFirmwareVersion)
 *   too large    -> "0x000000e5: 0x0000001b" (RxFileTooLarge, EFBIG)
 * Versions compare as ota_version_compare() does. Never fails. */
void bundle_manifest_decide(const struct bundle_manifest *m, const struct bundle_policy *policy,
                            struct bundle_decision *ret);
const char *bundle_verdict_to_string(enum bundle_verdict v);

/* Lowercase hex of a SHA-256 (65 bytes with the NUL). */
void bundle_sha256_hex(const uint8_t sha256[static 32], char ret[static 65]);
