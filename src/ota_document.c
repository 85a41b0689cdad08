/* SPDX-License-Identifier: MIT */
#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base64.h"
#include "macro.h"
#include "ota_document.h"

static int fail(char *reason, size_t reason_size, const char *format, ...)
        __attribute__((format(printf, 3, 4)));

static int fail(char *reason, size_t reason_size, const char *format, ...) {
        va_list ap;

        if (reason && reason_size > 0) {
                va_start(ap, format);
                vsnprintf(reason, reason_size, format, ap);
                va_end(ap);
        }
        return -EINVAL;
}

bool ota_document_is_afr_ota(const cJSON *job_document) {
        return cJSON_IsObject(job_document) &&
               cJSON_GetObjectItemCaseSensitive(job_document, "afr_ota") != NULL;
}

/* Digits only, no sign, no spaces: "1024". */
static int parse_decimal(const char *s, uint64_t max, uint64_t *ret) {
        uint64_t v = 0;

        if (!s || !*s)
                return -EINVAL;
        for (; *s; s++) {
                if (*s < '0' || *s > '9')
                        return -EINVAL;
                if (v > (max - (uint64_t) (*s - '0')) / 10)
                        return -ERANGE;
                v = v * 10 + (uint64_t) (*s - '0');
        }
        *ret = v;
        return 0;
}

/* An unsigned integer given as a JSON number or, like the reference agent
 * accepts, as a quoted decimal number. */
static int json_to_uint(const cJSON *item, uint64_t max, uint64_t *ret) {
        if (cJSON_IsString(item))
                return parse_decimal(item->valuestring, max, ret);
        if (cJSON_IsNumber(item)) {
                double d = item->valuedouble;

                /* 2^53: beyond it a double no longer names one integer. */
                if (!isfinite(d) || d < 0 || d != floor(d) || d > 9007199254740992.0 ||
                    (uint64_t) d > max)
                        return -ERANGE;
                *ret = (uint64_t) d;
                return 0;
        }
        return -EINVAL;
}

static bool name_valid(const char *s, size_t max) {
        size_t n = strlen(s);

        if (n == 0 || n > max)
                return false;
        return strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") == n;
}

/* Free text from the operator: no control characters, bounded. */
static bool text_valid(const char *s, size_t max) {
        size_t n = strlen(s);

        if (n == 0 || n > max)
                return false;
        for (const unsigned char *p = (const unsigned char *) s; *p; p++)
                if (*p < 0x20 || *p == 0x7f)
                        return false;
        return true;
}

/* Optional text member: absent or null -> *ret stays NULL. */
static int get_text(const cJSON *file, size_t index, const char *key, size_t max, char **ret,
                    char *reason, size_t reason_size) {
        const cJSON *item = cJSON_GetObjectItemCaseSensitive(file, key);

        if (!item || cJSON_IsNull(item))
                return 0;
        if (!cJSON_IsString(item))
                return fail(reason, reason_size, "files[%zu].%s: not a string", index, key);
        if (!text_valid(item->valuestring, max))
                return fail(reason, reason_size, "files[%zu].%s: empty, longer than %zu or control characters",
                            index, key, max);
        *ret = strdup(item->valuestring);
        return *ret ? 0 : -ENOMEM;
}

/* "<image>#part=<offset>/<total>" (see ota_document.h). */
static int parse_part(struct ota_document_file *f, size_t index, char *reason, size_t reason_size) {
        const char *hash = strstr(f->filepath, "#part=");
        _cleanup_free_ char *spec = NULL;
        uint64_t offset, total;
        char *slash;

        if (!hash) {
                f->image = strdup(f->filepath);
                f->image_size = f->filesize;
                return f->image ? 0 : -ENOMEM;
        }

        spec = strdup(hash + strlen("#part="));
        if (!spec)
                return -ENOMEM;
        slash = strchr(spec, '/');
        if (!slash)
                return fail(reason, reason_size, "files[%zu].filepath: part is not <offset>/<total>", index);
        *slash = '\0';
        if (parse_decimal(spec, UINT64_MAX, &offset) < 0 ||
            parse_decimal(slash + 1, UINT64_MAX, &total) < 0 || total == 0)
                return fail(reason, reason_size, "files[%zu].filepath: part is not <offset>/<total>", index);
        if (offset > total || total - offset < f->filesize)
                return fail(reason, reason_size, "files[%zu].filepath: part ends beyond the image size", index);
        if (hash == f->filepath || (size_t) (hash - f->filepath) > OTA_DOCUMENT_IMAGE_NAME_MAX)
                return fail(reason, reason_size, "files[%zu].filepath: part without a valid image name", index);

        f->image = strndup(f->filepath, (size_t) (hash - f->filepath));
        if (!f->image)
                return -ENOMEM;
        f->is_part = true;
        f->part_offset = offset;
        f->image_size = total;
        return 0;
}

static int parse_signature(const cJSON *file, struct ota_document_file *f, size_t index,
                           char *reason, size_t reason_size) {
        const cJSON *chosen = NULL, *item;
        _cleanup_free_ uint8_t *der = NULL;
        size_t der_len = 0;
        const char *dash;
        int r;

        /* The key names the algorithm: "sig-sha256-ecdsa". Prefer the one
         * verify supports when a document carries several. */
        cJSON_ArrayForEach(item, file) {
                if (strncmp(item->string, "sig-", 4) != 0)
                        continue;
                if (!chosen || strcmp(item->string, "sig-sha256-ecdsa") == 0)
                        chosen = item;
        }
        if (!chosen || cJSON_IsNull(chosen))
                return 0; /* unsigned, e.g. rustot's "sig--": null; verify refuses it */
        if (!cJSON_IsString(chosen))
                return fail(reason, reason_size, "files[%zu].%s: not a string", index, chosen->string);

        dash = strchr(chosen->string + 4, '-');
        if (!dash || dash == chosen->string + 4 || !dash[1] || strlen(chosen->string) > 64)
                return fail(reason, reason_size, "files[%zu]: signature key \"%.64s\" is not sig-<hash>-<algorithm>",
                            index, chosen->string);

        r = base64_decode(chosen->valuestring, strlen(chosen->valuestring), &der, &der_len);
        if (r == -ENOMEM)
                return r;
        if (r < 0 || der_len == 0)
                return fail(reason, reason_size, "files[%zu].%s: invalid base64", index, chosen->string);
        if (der_len > sizeof f->signature_der)
                return fail(reason, reason_size, "files[%zu].%s: signature longer than %d bytes", index,
                            chosen->string, OTA_DOCUMENT_SIGNATURE_MAX);
        memcpy(f->signature_der, der, der_len);
        f->signature_len = der_len;

        f->signature_key = strdup(chosen->string);
        f->signature_hash = strndup(chosen->string + 4, (size_t) (dash - (chosen->string + 4)));
        f->signature_alg = strdup(dash + 1);
        f->signature = strdup(chosen->valuestring);
        if (!f->signature_key || !f->signature_hash || !f->signature_alg || !f->signature)
                return -ENOMEM;
        return 0;
}

static int parse_file(const cJSON *file, size_t index, struct ota_document_file *f, char *reason,
                      size_t reason_size) {
        const cJSON *item;
        uint64_t v;
        int r;

        if (!cJSON_IsObject(file))
                return fail(reason, reason_size, "files[%zu]: not an object", index);

        item = cJSON_GetObjectItemCaseSensitive(file, "filesize");
        if (!item)
                return fail(reason, reason_size, "files[%zu].filesize: missing", index);
        if (json_to_uint(item, UINT32_MAX, &v) < 0 || v == 0)
                return fail(reason, reason_size, "files[%zu].filesize: not a positive integer below 2^32", index);
        f->filesize = (uint32_t) v;

        item = cJSON_GetObjectItemCaseSensitive(file, "fileid");
        if (!item)
                return fail(reason, reason_size, "files[%zu].fileid: missing", index);
        if (json_to_uint(item, 255, &v) < 0)
                return fail(reason, reason_size, "files[%zu].fileid: not an integer 0..255", index);
        f->fileid = (unsigned) v;

        item = cJSON_GetObjectItemCaseSensitive(file, "fileType");
        if (item && !cJSON_IsNull(item)) {
                if (json_to_uint(item, 255, &v) < 0)
                        return fail(reason, reason_size, "files[%zu].fileType: not an integer 0..255", index);
                f->file_type = (unsigned) v;
        }

        item = cJSON_GetObjectItemCaseSensitive(file, "attr");
        if (item && !cJSON_IsNull(item)) {
                if (json_to_uint(item, UINT32_MAX, &v) < 0)
                        return fail(reason, reason_size, "files[%zu].attr: not an unsigned 32-bit integer", index);
                f->has_attr = true;
                f->attr = (uint32_t) v;
        }

        r = get_text(file, index, "filepath", OTA_DOCUMENT_FILEPATH_MAX, &f->filepath, reason, reason_size);
        if (r < 0)
                return r;
        if (!f->filepath) {
                /* Free text the operator may leave out; routing then sees "". */
                f->filepath = strdup("");
                if (!f->filepath)
                        return -ENOMEM;
        }
        r = parse_part(f, index, reason, reason_size);
        if (r < 0)
                return r;

        r = get_text(file, index, "certfile", OTA_DOCUMENT_CERTFILE_MAX, &f->certfile, reason, reason_size);
        if (r < 0)
                return r;
        r = get_text(file, index, "update_data_url", OTA_DOCUMENT_URL_MAX, &f->update_data_url, reason,
                     reason_size);
        if (r < 0)
                return r;
        r = get_text(file, index, "auth_scheme", OTA_DOCUMENT_AUTH_SCHEME_MAX, &f->auth_scheme, reason,
                     reason_size);
        if (r < 0)
                return r;

        return parse_signature(file, f, index, reason, reason_size);
}

/* The parts of one image: consecutive, contiguous from 0, ending at total. */
static int check_parts(const struct ota_document *doc, char *reason, size_t reason_size) {
        for (size_t i = 0; i < doc->n_files; i++) {
                const struct ota_document_file *f = &doc->files[i], *prev = i > 0 ? &doc->files[i - 1] : NULL;
                bool continues = prev && prev->is_part && f->is_part && strcmp(prev->image, f->image) == 0;

                if (!continues) {
                        /* Another image starts here: the previous one must be whole,
                         * and this image must not have appeared before. */
                        if (prev && prev->is_part && prev->part_offset + prev->filesize != prev->image_size)
                                return fail(reason, reason_size, "files[%zu]: image \"%.64s\" ends at %" PRIu64
                                            " of %" PRIu64 " bytes", i - 1, prev->image,
                                            prev->part_offset + prev->filesize, prev->image_size);
                        for (size_t j = 0; j < i; j++)
                                if ((f->is_part || doc->files[j].is_part) &&
                                    strcmp(doc->files[j].image, f->image) == 0)
                                        return fail(reason, reason_size, "files[%zu]: parts of image \"%.64s\" are not consecutive",
                                                    i, f->image);
                        if (f->is_part && f->part_offset != 0)
                                return fail(reason, reason_size, "files[%zu]: first part of \"%.64s\" does not start at 0",
                                            i, f->image);
                        continue;
                }

                if (f->image_size != prev->image_size || f->file_type != prev->file_type)
                        return fail(reason, reason_size, "files[%zu]: parts of \"%.64s\" disagree on size or fileType",
                                    i, f->image);
                if (f->part_offset != prev->part_offset + prev->filesize)
                        return fail(reason, reason_size, "files[%zu]: part of \"%.64s\" at %" PRIu64
                                    " does not follow the previous one (%" PRIu64 ")", i, f->image,
                                    f->part_offset, prev->part_offset + prev->filesize);
        }

        if (doc->n_files > 0) {
                const struct ota_document_file *last = &doc->files[doc->n_files - 1];

                if (last->is_part && last->part_offset + last->filesize != last->image_size)
                        return fail(reason, reason_size, "files[%zu]: image \"%.64s\" ends at %" PRIu64
                                    " of %" PRIu64 " bytes", doc->n_files - 1, last->image,
                                    last->part_offset + last->filesize, last->image_size);
        }
        return 0;
}

static int parse_protocols(const cJSON *afr, struct ota_document *doc, char *reason, size_t reason_size) {
        const cJSON *protocols = cJSON_GetObjectItemCaseSensitive(afr, "protocols"), *p;

        if (!cJSON_IsArray(protocols))
                return fail(reason, reason_size, "protocols: missing or not an array");
        cJSON_ArrayForEach(p, protocols) {
                /* Unknown values are ignored: AWS may add protocols. */
                if (!cJSON_IsString(p))
                        continue;
                if (strcmp(p->valuestring, "MQTT") == 0)
                        doc->protocols |= OTA_DOCUMENT_MQTT;
                else if (strcmp(p->valuestring, "HTTP") == 0)
                        doc->protocols |= OTA_DOCUMENT_HTTP;
        }
        if (doc->protocols == 0) {
                fail(reason, reason_size, "protocols: neither MQTT nor HTTP");
                return -EPROTONOSUPPORT;
        }
        return 0;
}

/* The length of url's "scheme://" (or of its start, at most 16 printable
 * bytes, when it has none): all of a URL that may be shown, since a
 * presigned URL's query is a credential. */
static int url_scheme_length(const char *url) {
        const char *sep = strstr(url, "://");
        int n = 0;

        if (sep && sep - url <= 16)
                return (int) (sep - url) + 3;
        while (n < 16 && url[n] > 0x20 && url[n] < 0x7f && url[n] != '?')
                n++;
        return n;
}

/* A protocol the document lists but cannot serve (no stream name, a file
 * without URL) is dropped when the other one can; alone it is an error. */
static int check_transport(struct ota_document *doc, char *reason, size_t reason_size) {
        if ((doc->protocols & OTA_DOCUMENT_MQTT) && !doc->stream_name) {
                if (!(doc->protocols & OTA_DOCUMENT_HTTP)) {
                        fail(reason, reason_size, "streamname: missing for MQTT");
                        return -EPROTONOSUPPORT;
                }
                doc->protocols &= ~(unsigned) OTA_DOCUMENT_MQTT;
        }
        if (doc->protocols & OTA_DOCUMENT_HTTP)
                for (size_t i = 0; i < doc->n_files; i++) {
                        const char *url = doc->files[i].update_data_url;

                        /* Presigned S3 URLs are https://; anything else
                         * (http://, file://) would skip the server's
                         * authentication or read the device itself. */
                        if (url && strncasecmp(url, "https://", 8) == 0)
                                continue;
                        if (!(doc->protocols & OTA_DOCUMENT_MQTT)) {
                                if (url)
                                        fail(reason, reason_size,
                                             "files[%zu].update_data_url: only https:// URLs are accepted, not %.*s",
                                             i, url_scheme_length(url), url);
                                else
                                        fail(reason, reason_size, "files[%zu].update_data_url: missing for HTTP", i);
                                return -EPROTONOSUPPORT;
                        }
                        doc->protocols &= ~(unsigned) OTA_DOCUMENT_HTTP;
                        break;
                }
        return 0;
}

int ota_document_parse(const cJSON *job_document, struct ota_document **ret, char *reason,
                       size_t reason_size) {
        struct ota_document *doc = NULL;
        const cJSON *afr, *stream, *files, *file;
        int r;

        afr = cJSON_IsObject(job_document) ? cJSON_GetObjectItemCaseSensitive(job_document, "afr_ota") : NULL;
        if (!cJSON_IsObject(afr))
                return fail(reason, reason_size, "afr_ota: missing or not an object");

        doc = calloc(1, sizeof *doc);
        if (!doc)
                return -ENOMEM;

        r = parse_protocols(afr, doc, reason, reason_size);
        if (r < 0)
                goto fail;

        stream = cJSON_GetObjectItemCaseSensitive(afr, "streamname");
        if (stream && !cJSON_IsNull(stream)) {
                if (!cJSON_IsString(stream) || !name_valid(stream->valuestring, OTA_DOCUMENT_STREAM_NAME_MAX)) {
                        r = fail(reason, reason_size, "streamname: not 1..%d of [a-zA-Z0-9_-]",
                                 OTA_DOCUMENT_STREAM_NAME_MAX);
                        goto fail;
                }
                doc->stream_name = strdup(stream->valuestring);
                if (!doc->stream_name) {
                        r = -ENOMEM;
                        goto fail;
                }
        }

        files = cJSON_GetObjectItemCaseSensitive(afr, "files");
        if (!cJSON_IsArray(files) || cJSON_GetArraySize(files) == 0) {
                r = fail(reason, reason_size, "files: missing, empty or not an array");
                goto fail;
        }
        if (cJSON_GetArraySize(files) > OTA_DOCUMENT_MAX_FILES) {
                r = fail(reason, reason_size, "files: more than %d entries", OTA_DOCUMENT_MAX_FILES);
                goto fail;
        }
        cJSON_ArrayForEach(file, files) {
                r = parse_file(file, doc->n_files, &doc->files[doc->n_files], reason, reason_size);
                doc->n_files++; /* counted even when half-filled, so free() sees it */
                if (r < 0)
                        goto fail;
        }

        r = check_parts(doc, reason, reason_size);
        if (r < 0)
                goto fail;
        r = check_transport(doc, reason, reason_size);
        if (r < 0)
                goto fail;

        *ret = doc;
        return 0;

fail:
        if (r == -ENOMEM)
                fail(reason, reason_size, "out of memory");
        ota_document_free(doc);
        return r;
}

void ota_document_free(struct ota_document *doc) {
        if (!doc)
                return;
        for (size_t i = 0; i < doc->n_files; i++) {
                struct ota_document_file *f = &doc->files[i];

                free(f->filepath);
                free(f->image);
                free(f->certfile);
                free(f->signature_key);
                free(f->signature_hash);
                free(f->signature_alg);
                free(f->signature);
                free(f->update_data_url);
                free(f->auth_scheme);
        }
        free(doc->stream_name);
        free(doc);
}
