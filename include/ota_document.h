/* SPDX-License-Identifier: MIT */
/*
 * ota_document: the FreeRTOS-style `afr_ota` job document (protocol.md §2.1,
 * §2.2) turned into checked values, including the multi-part convention for
 * images larger than one stream file. Owns the document's limits and the
 * human reason for refusing one; never opens a path, a URL or a certificate
 * named in it: those are untrusted text that configuration maps to things.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct cJSON cJSON;

/* As many files as an OTA update may have: CreateOTAUpdate's `files` and
 * CreateStream's take at most 50 (the AWS IoT service model; Jobs-lib's
 * parser stops at 10, AWS wins). An update bundle of the most parts a
 * stream holds uses all 50 (bundle_manifest.h). A bigger document is
 * refused rather than truncated. */
#define OTA_DOCUMENT_MAX_FILES 50
#define OTA_DOCUMENT_STREAM_NAME_MAX 128 /* CreateStream: [a-zA-Z0-9_-]{1,128} */
#define OTA_DOCUMENT_FILEPATH_MAX 1024
#define OTA_DOCUMENT_CERTFILE_MAX 256
#define OTA_DOCUMENT_URL_MAX 8192        /* presigned URLs with session tokens grow */
#define OTA_DOCUMENT_AUTH_SCHEME_MAX 64
#define OTA_DOCUMENT_SIGNATURE_MAX 384   /* decoded bytes; RSA-3072 like the reference agent */
#define OTA_DOCUMENT_IMAGE_NAME_MAX 128

enum {
        OTA_DOCUMENT_MQTT = 1 << 0,
        OTA_DOCUMENT_HTTP = 1 << 1,
};

/*
 * Multi-part images. A stream file holds at most 24 MB and the OTA Update
 * Manager caps a file at 16 MB, so one larger image travels as several
 * consecutive files[] entries. CreateOTAUpdate copies only fileName (as
 * `filepath`) and fileType of each file into the job document (its
 * `attributes` are never sent), so the convention lives in filepath where
 * both CreateOTAUpdate and hand-written CreateJob documents can carry it:
 *
 *     "filepath": "<image>#part=<offset>/<total>"
 *
 * <offset> is where this entry's bytes start in the image and <total> the
 * image's size, both decimal bytes. The entries of one image must be
 * consecutive in files[], start at offset 0, each start where the previous
 * one ended (offset + filesize), share <total>, fileType and the image name,
 * and the last must end exactly at <total>. Each part carries its own
 * signature over its own bytes. Without a "#part=" suffix an entry is an
 * image of its own (part_offset 0, image_size = filesize).
 */
struct ota_document_file {
        char *filepath;        /* as sent: untrusted text, never opened */
        char *image;           /* filepath without "#part=...": what a target matches */
        uint32_t filesize;     /* > 0 */
        unsigned fileid;       /* 0..255, "f" of GetStream */
        char *certfile;        /* NULL when absent or null */
        unsigned file_type;    /* 0..255, default 0 (firmware) */
        bool has_attr;
        uint32_t attr;
        /* The "sig-<hash>-<alg>" member: key as sent, and its two names so
         * verify can refuse an algorithm it lacks by name. All NULL and
         * signature_len 0 when the document has no (or a null) signature. */
        char *signature_key;
        char *signature_hash;  /* e.g. "sha256" */
        char *signature_alg;   /* e.g. "ecdsa" */
        char *signature;       /* base64 text as sent */
        uint8_t signature_der[OTA_DOCUMENT_SIGNATURE_MAX];
        size_t signature_len;
        char *update_data_url; /* NULL when absent or null */
        char *auth_scheme;     /* NULL when absent or null */
        /* Multi-part: where this entry sits in its image. */
        bool is_part;
        uint64_t part_offset;
        uint64_t image_size;
};

struct ota_document {
        unsigned protocols;   /* OTA_DOCUMENT_MQTT | OTA_DOCUMENT_HTTP */
        char *stream_name;    /* NULL unless given; required when MQTT is the only protocol */
        struct ota_document_file files[OTA_DOCUMENT_MAX_FILES];
        size_t n_files;
};

/* True when the job document has an "afr_ota" member: such jobs belong to
 * the OTA handler even when they turn out to be malformed. */
bool ota_document_is_afr_ota(const cJSON *job_document);

/* Parses job_document (the execution's "jobDocument" object). On failure
 * returns -EPROTONOSUPPORT when no listed protocol can be served (neither
 * MQTT nor HTTP, MQTT without a streamname, HTTP without URLs), -EINVAL for
 * anything else malformed (or -ENOMEM), writes a short reason such as
 * "files[0].filesize: not a positive integer" into reason (for the journal
 * and statusDetails) and leaves *ret untouched. Logs nothing. */
int ota_document_parse(const cJSON *job_document, struct ota_document **ret, char *reason,
                       size_t reason_size);
void ota_document_free(struct ota_document *doc);

