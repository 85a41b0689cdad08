/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "bundle_manifest.h"
#include "macro.h"
#include "version.h"

static inline void cJSONp(cJSON **p) { cJSON_Delete(*p); }

__attribute__((format(printf, 4, 5)))
static int fail(char *err, size_t err_size, int error, const char *format, ...) {
        va_list ap;

        if (err && err_size > 0) {
                va_start(ap, format);
                vsnprintf(err, err_size, format, ap);
                va_end(ap);
        }
        return error;
}

void bundle_sha256_hex(const uint8_t sha256[static 32], char ret[static 65]) {
        static const char digits[] = "0123456789abcdef";

        for (size_t i = 0; i < 32; i++) {
                ret[2 * i] = digits[sha256[i] >> 4];
                ret[2 * i + 1] = digits[sha256[i] & 0xf];
        }
        ret[64] = '\0';
}

static int hex_value(char c) {
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        return -1; /* uppercase too: one spelling per digest */
}

/* Every key of an object must be one of keys, each at most once, and all of
 * them present: a manifest has no optional fields. */
static int check_keys(const cJSON *obj, const char *where, const char *const *keys, size_t n_keys,
                      char *err, size_t err_size) {
        unsigned seen = 0;
        const cJSON *item;

        if (!cJSON_IsObject(obj))
                return fail(err, err_size, -EBADMSG, "%s is not an object", where);
        cJSON_ArrayForEach(item, obj) {
                size_t i;

                for (i = 0; i < n_keys; i++)
                        if (item->string && strcmp(item->string, keys[i]) == 0)
                                break;
                if (i == n_keys)
                        return fail(err, err_size, -EBADMSG, "%s has an unknown key \"%s\"", where,
                                    item->string ? item->string : "");
                if (seen & (1U << i))
                        return fail(err, err_size, -EBADMSG, "%s has \"%s\" twice", where, keys[i]);
                seen |= 1U << i;
        }
        for (size_t i = 0; i < n_keys; i++)
                if (!(seen & (1U << i)))
                        return fail(err, err_size, -EBADMSG, "%s lacks \"%s\"", where, keys[i]);
        return 0;
}

static int get_uint(const cJSON *obj, const char *key, uint64_t lo, uint64_t hi, uint64_t *ret,
                    char *err, size_t err_size) {
        const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
        double v;

        if (!cJSON_IsNumber(item))
                return fail(err, err_size, -EBADMSG, "\"%s\" is not a number", key);
        v = item->valuedouble;
        /* Bounds first: the cast below is defined only in range. */
        if (!(v >= (double) lo && v <= (double) hi) || (double) (uint64_t) v != v)
                return fail(err, err_size, -EBADMSG, "\"%s\" is not a whole number in %llu..%llu", key,
                            (unsigned long long) lo, (unsigned long long) hi);
        *ret = (uint64_t) v;
        return 0;
}

static int get_u32(const cJSON *obj, const char *key, uint32_t lo, uint32_t hi, uint32_t *ret,
                   char *err, size_t err_size) {
        uint64_t v;
        int r = get_uint(obj, key, lo, hi, &v, err, err_size);

        if (r >= 0)
                *ret = (uint32_t) v;
        return r;
}

static int get_sha256(const cJSON *obj, const char *key, uint8_t ret[static 32], char *err, size_t err_size) {
        const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
        const char *s = cJSON_GetStringValue(item);

        if (!s || strlen(s) != 64)
                return fail(err, err_size, -EBADMSG, "\"%s\" is not 64 hex digits", key);
        for (size_t i = 0; i < 32; i++) {
                int hi = hex_value(s[2 * i]), lo = hex_value(s[2 * i + 1]);

                if (hi < 0 || lo < 0)
                        return fail(err, err_size, -EBADMSG, "\"%s\" is not 64 lowercase hex digits", key);
                ret[i] = (uint8_t) (hi << 4 | lo);
        }
        return 0;
}

/* Names, versions and compatible strings: printable, no spaces or quotes,
 * so they can appear in a statusDetails value and a log line as they are. */
static bool text_ok(const char *s, bool file_name) {
        size_t len = strlen(s);

        if (len == 0 || len > BUNDLE_TEXT_MAX)
                return false;
        if (file_name && s[0] == '.')
                return false;
        for (const char *p = s; *p; p++) {
                char c = *p;
                bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                          c == '.' || c == '_' || c == '-' || (!file_name && (c == '+' || c == ':' || c == '~'));
                if (!ok)
                        return false;
        }
        return true;
}

static int get_text(const cJSON *obj, const char *key, bool file_name, char **ret, char *err, size_t err_size) {
        const char *s = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(obj, key));

        if (!s)
                return fail(err, err_size, -EBADMSG, "\"%s\" is not a string", key);
        if (!text_ok(s, file_name))
                return fail(err, err_size, -EBADMSG, "\"%s\" must be 1-%d characters of %s", key, BUNDLE_TEXT_MAX,
                            file_name ? "[A-Za-z0-9._-], not starting with '.'" : "[A-Za-z0-9._:+~-]");
        *ret = strdup(s);
        return *ret ? 0 : -ENOMEM;
}

static int parse_chunking(const cJSON *obj, struct bundle_chunking *c, char *err, size_t err_size) {
        static const char *const keys[] = { "algorithm", "min_size", "mask_bits", "max_size" };
        int r;

        r = check_keys(obj, "payload.chunking", keys, ELEMENTSOF(keys), err, err_size);
        if (r < 0)
                return r;
        r = get_text(obj, "algorithm", false, &c->algorithm, err, err_size);
        if (r < 0)
                return r;
        if (strcmp(c->algorithm, BUNDLE_CHUNKING_NAME) != 0)
                return fail(err, err_size, -EBADMSG, "unknown chunking \"%s\"", c->algorithm);
        if ((r = get_u32(obj, "min_size", BUNDLE_CHUNK_SIZE_MIN, BUNDLE_CHUNK_SIZE_MAX, &c->min_size, err,
                         err_size)) < 0 ||
            (r = get_u32(obj, "mask_bits", 8, 30, &c->mask_bits, err, err_size)) < 0 ||
            (r = get_u32(obj, "max_size", BUNDLE_CHUNK_SIZE_MIN, BUNDLE_CHUNK_SIZE_MAX, &c->max_size, err,
                         err_size)) < 0)
                return r;
        if (c->min_size > c->max_size)
                return fail(err, err_size, -EBADMSG, "chunking min_size %u exceeds max_size %u", c->min_size,
                            c->max_size);
        return 0;
}

static int parse_parts(const cJSON *arr, struct bundle_manifest *m, char *err, size_t err_size) {
        static const char *const keys[] = { "file", "size", "sha256" };
        const cJSON *item;
        uint64_t offset = 0;
        int n, r;

        if (!cJSON_IsArray(arr))
                return fail(err, err_size, -EBADMSG, "\"parts\" is not an array");
        n = cJSON_GetArraySize(arr);
        if (n < 1 || n > BUNDLE_PARTS_MAX)
                return fail(err, err_size, -EBADMSG, "%d parts, a bundle has 1-%d", n, BUNDLE_PARTS_MAX);
        m->parts = calloc((size_t) n, sizeof(*m->parts));
        if (!m->parts)
                return -ENOMEM;

        cJSON_ArrayForEach(item, arr) {
                struct bundle_part *p = &m->parts[m->n_parts];
                char where[32];

                snprintf(where, sizeof(where), "parts[%zu]", m->n_parts);
                r = check_keys(item, where, keys, ELEMENTSOF(keys), err, err_size);
                if (r < 0)
                        return r;
                m->n_parts++;
                if ((r = get_text(item, "file", true, &p->file, err, err_size)) < 0 ||
                    (r = get_uint(item, "size", 1, BUNDLE_PART_SIZE_MAX, &p->size, err, err_size)) < 0 ||
                    (r = get_sha256(item, "sha256", p->sha256, err, err_size)) < 0)
                        return r;
                for (size_t i = 0; i + 1 < m->n_parts; i++)
                        if (strcmp(m->parts[i].file, p->file) == 0)
                                return fail(err, err_size, -EBADMSG, "part file %s is listed twice", p->file);
                p->offset = offset;
                offset += p->size;
        }
        if (offset != m->payload_size)
                return fail(err, err_size, -EBADMSG, "parts add up to %llu bytes, the payload is %llu",
                            (unsigned long long) offset, (unsigned long long) m->payload_size);
        return 0;
}

static int parse_payload(const cJSON *obj, struct bundle_manifest *m, char *err, size_t err_size) {
        static const char *const keys[] = { "format", "size", "header_size", "header_sha256",
                                            "chunk_count", "chunk_size_max", "chunking" };
        uint64_t v;
        int r;

        r = check_keys(obj, "payload", keys, ELEMENTSOF(keys), err, err_size);
        if (r < 0)
                return r;
        r = get_text(obj, "format", false, &m->payload_format, err, err_size);
        if (r < 0)
                return r;
        if (strcmp(m->payload_format, BUNDLE_PAYLOAD_FORMAT) != 0)
                return fail(err, err_size, -EBADMSG, "unknown payload format \"%s\"", m->payload_format);
        if ((r = get_uint(obj, "size", 1, BUNDLE_PAYLOAD_SIZE_MAX, &m->payload_size, err, err_size)) < 0 ||
            (r = get_uint(obj, "header_size", 1, BUNDLE_HEADER_SIZE_MAX, &v, err, err_size)) < 0)
                return r;
        m->header_size = (uint32_t) v;
        if ((r = get_sha256(obj, "header_sha256", m->header_sha256, err, err_size)) < 0 ||
            (r = get_u32(obj, "chunk_count", 1, UINT32_MAX, &m->chunk_count, err, err_size)) < 0 ||
            (r = get_u32(obj, "chunk_size_max", BUNDLE_CHUNK_SIZE_MIN, BUNDLE_CHUNK_SIZE_MAX, &m->chunk_size_max,
                         err, err_size)) < 0)
                return r;
        if (m->header_size >= m->payload_size)
                return fail(err, err_size, -EBADMSG, "header_size %u leaves no data in a %llu-byte payload",
                            m->header_size, (unsigned long long) m->payload_size);
        return parse_chunking(cJSON_GetObjectItemCaseSensitive(obj, "chunking"), &m->chunking, err, err_size);
}

int bundle_manifest_parse(const void *data, size_t size, struct bundle_manifest **ret, char *err, size_t err_size) {
        static const char *const keys[] = { "format", "format_version", "compatible", "version",
                                            "image", "payload", "parts" };
        static const char *const image_keys[] = { "size", "sha256" };
        _cleanup_(cJSONp) cJSON *root = NULL;
        struct bundle_manifest *m = NULL;
        const char *format;
        const cJSON *fv;
        int r;

        if (size > BUNDLE_MANIFEST_MAX)
                return fail(err, err_size, -EBADMSG, "manifest is %zu bytes, at most %d", size, BUNDLE_MANIFEST_MAX);
        if (memchr(data, '\0', size))
                return fail(err, err_size, -EBADMSG, "manifest contains a NUL byte");
        root = cJSON_ParseWithLength(data, size);
        if (!root)
                return fail(err, err_size, -EBADMSG, "manifest is not JSON");
        if (!cJSON_IsObject(root))
                return fail(err, err_size, -EBADMSG, "manifest is not a JSON object");

        /* Which format and version first, so that a future manifest says so
         * rather than "unknown key". */
        format = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(root, "format"));
        if (!format || strcmp(format, BUNDLE_FORMAT_NAME) != 0)
                return fail(err, err_size, -EBADMSG, "not an otad bundle manifest (\"format\" is not \"%s\")",
                            BUNDLE_FORMAT_NAME);
        fv = cJSON_GetObjectItemCaseSensitive(root, "format_version");
        if (!cJSON_IsNumber(fv))
                return fail(err, err_size, -EBADMSG, "\"format_version\" is not a number");
        if (fv->valuedouble != BUNDLE_FORMAT_VERSION)
                return fail(err, err_size, -EPROTONOSUPPORT, "bundle format version %g, this otad reads %d",
                            fv->valuedouble, BUNDLE_FORMAT_VERSION);
        r = check_keys(root, "manifest", keys, ELEMENTSOF(keys), err, err_size);
        if (r < 0)
                return r;

        m = calloc(1, sizeof(*m));
        if (!m)
                return -ENOMEM;
        m->format_version = BUNDLE_FORMAT_VERSION;

        const cJSON *image = cJSON_GetObjectItemCaseSensitive(root, "image");
        if ((r = get_text(root, "compatible", false, &m->compatible, err, err_size)) < 0 ||
            (r = get_text(root, "version", false, &m->version, err, err_size)) < 0 ||
            (r = check_keys(image, "image", image_keys, ELEMENTSOF(image_keys), err, err_size)) < 0 ||
            (r = get_uint(image, "size", 1, BUNDLE_IMAGE_SIZE_MAX, &m->image_size, err, err_size)) < 0 ||
            (r = get_sha256(image, "sha256", m->image_sha256, err, err_size)) < 0 ||
            (r = parse_payload(cJSON_GetObjectItemCaseSensitive(root, "payload"), m, err, err_size)) < 0 ||
            (r = parse_parts(cJSON_GetObjectItemCaseSensitive(root, "parts"), m, err, err_size)) < 0)
                goto fail;

        /* Sizes that must agree before anything is allocated from them. */
        if (m->chunk_count > m->image_size ||
            (uint64_t) m->chunk_count * m->chunk_size_max < m->image_size) {
                r = fail(err, err_size, -EBADMSG, "%u chunks of at most %u bytes cannot hold %llu bytes",
                         m->chunk_count, m->chunk_size_max, (unsigned long long) m->image_size);
                goto fail;
        }
        if (m->chunking.max_size > m->chunk_size_max) {
                r = fail(err, err_size, -EBADMSG, "chunking max_size %u exceeds chunk_size_max %u",
                         m->chunking.max_size, m->chunk_size_max);
                goto fail;
        }

        *ret = m;
        return 0;
fail:
        bundle_manifest_free(m);
        return r;
}

void bundle_manifest_free(struct bundle_manifest *m) {
        if (!m)
                return;
        free(m->compatible);
        free(m->version);
        free(m->payload_format);
        free(m->chunking.algorithm);
        for (size_t i = 0; i < m->n_parts; i++)
                free(m->parts[i].file);
        free(m->parts);
        free(m);
}

static bool add_hex(cJSON *obj, const char *key, const uint8_t sha256[static 32]) {
        char hex[65];

        bundle_sha256_hex(sha256, hex);
        return cJSON_AddStringToObject(obj, key, hex) != NULL;
}

int bundle_manifest_format(const struct bundle_manifest *m, char **ret) {
        _cleanup_(cJSONp) cJSON *root = cJSON_CreateObject();
        cJSON *image, *payload, *chunking, *parts;
        char *text;

        if (!root)
                return -ENOMEM;
        /* Key order is the order a person reads it in; the signature covers
         * the file's bytes, so no canonical form is needed. */
        if (!cJSON_AddStringToObject(root, "format", BUNDLE_FORMAT_NAME) ||
            !cJSON_AddNumberToObject(root, "format_version", m->format_version) ||
            !cJSON_AddStringToObject(root, "compatible", m->compatible) ||
            !cJSON_AddStringToObject(root, "version", m->version) ||
            !(image = cJSON_AddObjectToObject(root, "image")) ||
            !cJSON_AddNumberToObject(image, "size", (double) m->image_size) ||
            !add_hex(image, "sha256", m->image_sha256) ||
            !(payload = cJSON_AddObjectToObject(root, "payload")) ||
            !cJSON_AddStringToObject(payload, "format", m->payload_format) ||
            !cJSON_AddNumberToObject(payload, "size", (double) m->payload_size) ||
            !cJSON_AddNumberToObject(payload, "header_size", m->header_size) ||
            !add_hex(payload, "header_sha256", m->header_sha256) ||
            !cJSON_AddNumberToObject(payload, "chunk_count", m->chunk_count) ||
            !cJSON_AddNumberToObject(payload, "chunk_size_max", m->chunk_size_max) ||
            !(chunking = cJSON_AddObjectToObject(payload, "chunking")) ||
            !cJSON_AddStringToObject(chunking, "algorithm", m->chunking.algorithm) ||
            !cJSON_AddNumberToObject(chunking, "min_size", m->chunking.min_size) ||
            !cJSON_AddNumberToObject(chunking, "mask_bits", m->chunking.mask_bits) ||
            !cJSON_AddNumberToObject(chunking, "max_size", m->chunking.max_size) ||
            !(parts = cJSON_AddArrayToObject(root, "parts")))
                return -ENOMEM;
        for (size_t i = 0; i < m->n_parts; i++) {
                cJSON *p = cJSON_CreateObject();

                if (!p || !cJSON_AddItemToArray(parts, p) ||
                    !cJSON_AddStringToObject(p, "file", m->parts[i].file) ||
                    !cJSON_AddNumberToObject(p, "size", (double) m->parts[i].size) || !add_hex(p, "sha256", m->parts[i].sha256))
                        return -ENOMEM;
        }
        text = cJSON_Print(root);
        if (!text)
                return -ENOMEM;
        /* cJSON indents with tabs and ends without a newline. */
        size_t len = strlen(text);
        char *out = realloc(text, len + 2);
        if (!out) {
                free(text);
                return -ENOMEM;
        }
        out[len] = '\n';
        out[len + 1] = '\0';
        *ret = out;
        return 0;
}

int bundle_manifest_part_at(const struct bundle_manifest *m, uint64_t offset, size_t *ret_index) {
        for (size_t i = 0; i < m->n_parts; i++)
                if (offset - m->parts[i].offset < m->parts[i].size) {
                        *ret_index = i;
                        return 0;
                }
        return -ERANGE;
}

const char *bundle_verdict_to_string(enum bundle_verdict v) {
        switch (v) {
        case BUNDLE_ACCEPT:
                return "accept";
        case BUNDLE_INCOMPATIBLE:
                return "incompatible";
        case BUNDLE_DOWNGRADE:
                return "downgrade";
        case BUNDLE_SAME_VERSION:
                return "same-version";
        case BUNDLE_TOO_LARGE:
                return "too-large";
        }
        return "unknown";
}

/* The reference agent's codes (protocol.md §2.4). */
#define ERR_JOB_PARSER 0x0c
#define JOB_PARSE_NON_CONFORMING 0x04
#define ERR_DOWNGRADE 0x0f
#define ERR_SAME_VERSION 0x10
#define PAL_RX_FILE_TOO_LARGE 0xe5

void bundle_manifest_decide(const struct bundle_manifest *m, const struct bundle_policy *p,
                            struct bundle_decision *ret) {
        const char *running = p->running_version ? p->running_version : "0";
        int cmp;

        memset(ret, 0, sizeof(*ret));
        if (!p->compatible || !p->compatible[0]) {
                ret->verdict = BUNDLE_INCOMPATIBLE;
                ret->code = ERR_JOB_PARSER;
                ret->sub_code = JOB_PARSE_NON_CONFORMING;
                snprintf(ret->detail, sizeof(ret->detail),
                         "bundle for \"%s\" refused: no compatible= in [update] of otad.conf", m->compatible);
                return;
        }
        if (strcmp(m->compatible, p->compatible) != 0) {
                ret->verdict = BUNDLE_INCOMPATIBLE;
                ret->code = ERR_JOB_PARSER;
                ret->sub_code = JOB_PARSE_NON_CONFORMING;
                snprintf(ret->detail, sizeof(ret->detail), "bundle is for \"%s\", this device is \"%s\"",
                         m->compatible, p->compatible);
                return;
        }
        if (p->slot_size > 0 && m->image_size > p->slot_size) {
                ret->verdict = BUNDLE_TOO_LARGE;
                ret->code = PAL_RX_FILE_TOO_LARGE;
                ret->sub_code = EFBIG;
                snprintf(ret->detail, sizeof(ret->detail), "image of %llu bytes does not fit the %llu-byte slot",
                         (unsigned long long) m->image_size, (unsigned long long) p->slot_size);
                return;
        }
        cmp = version_compare(m->version, running);
        if (cmp == 0 && !p->allow_same_version) {
                ret->verdict = BUNDLE_SAME_VERSION;
                ret->word = "rejected";
                ret->code = ERR_SAME_VERSION;
                snprintf(ret->detail, sizeof(ret->detail), "bundle version %s is the running version", m->version);
                return;
        }
        if (cmp < 0 && !p->allow_downgrade) {
                ret->verdict = BUNDLE_DOWNGRADE;
                ret->word = "rejected";
                ret->code = ERR_DOWNGRADE;
                snprintf(ret->detail, sizeof(ret->detail), "downgrade from %s to %s refused", running, m->version);
                return;
        }
        ret->verdict = BUNDLE_ACCEPT;
        snprintf(ret->detail, sizeof(ret->detail), "bundle %s for \"%s\" accepted", m->version, m->compatible);
}
