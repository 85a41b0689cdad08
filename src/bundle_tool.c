/* SPDX-License-Identifier: MIT */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <zck.h>

#include "bundle_chunker.h"
#include "bundle_manifest.h"
#include "bundle_tool.h"
#include "delta.h"
#include "fileio.h"
#include "macro.h"
#include "payload_decoder.h"
#include "verify.h"

#define IO_BUFFER (1024 * 1024)
#define PLACEHOLDER_BUCKET "REPLACE-WITH-BUCKET"
#define PLACEHOLDER_ROLE "arn:aws:iam::123456789012:role/REPLACE-WITH-OTA-ROLE"
#define PLACEHOLDER_TARGET "arn:aws:iot:REGION:123456789012:thing/REPLACE-WITH-THING"

static inline void EVP_PKEYp(EVP_PKEY **p) { EVP_PKEY_free(*p); }
static inline void X509p(X509 **p) { X509_free(*p); }
static inline void EVP_MD_CTXp(EVP_MD_CTX **p) { EVP_MD_CTX_free(*p); }
static inline void cJSONp(cJSON **p) { cJSON_Delete(*p); }
static inline void zckp(zckCtx **p) { zck_free(p); }
static inline void manifestp(struct bundle_manifest **p) { bundle_manifest_free(*p); }
static inline void decoderp(struct payload_decoder **p) { payload_decoder_free(*p); }
static inline void planp(struct delta_plan **p) { delta_plan_free(*p); }
static inline void closedirp(DIR **p) {
        if (*p)
                closedir(*p);
}

/* Every message of the tool goes through here: "otad bundle: what".
 * Returns -1 so that a caller can `return error(...)`. */
__attribute__((format(printf, 1, 2)))
static int error(const char *format, ...) {
        va_list ap;

        fputs("otad bundle: ", stderr);
        va_start(ap, format);
        vfprintf(stderr, format, ap);
        va_end(ap);
        fputc('\n', stderr);
        return -1;
}

static void usage(FILE *f) {
        fprintf(f,
                "Usage: otad bundle create --key KEY --cert CERT --version V --compatible C [OPTIONS] IMAGE OUTDIR\n"
                "       otad bundle inspect [--json] [--previous OLD] MANIFEST|DIR\n"
                "       otad bundle verify --cert CERT DIR\n"
                "\n"
                "Builds and checks update bundles for otad (see otad-bundle(1)).\n"
                "\n"
                "create options:\n"
                "  --key PATH          PEM private key (EC P-256 or P-384) that signs every file\n"
                "  --cert PATH         its code-signing certificate (PEM)\n"
                "  --cert-name NAME    certificate name the device's trust_dir holds (default: CERT's file name)\n"
                "  --version V         version of the image, compared with the device's running version\n"
                "  --compatible C      must equal compatible= in the device's otad.conf\n"
                "  --name NAME         file name stem (default: bundle-V)\n"
                "  --part-size BYTES   payload part size, at most 25165824 (24 MiB, an AWS IoT stream file)\n"
                "  --level N           zstd level, 1-19 (default 9, as zck)\n"
                "  --bucket B          S3 bucket of the files in ota-update.json\n"
                "  --prefix P          S3 key prefix (default none)\n"
                "  --stream-id ID      files are in this existing stream instead (create-stream.json makes it)\n"
                "  --protocol P        MQTT and/or HTTP (repeatable; default MQTT)\n"
                "  --target ARN        thing or thing group (repeatable)\n"
                "  --role-arn ARN      role of the OTA update\n"
                "  --ota-update-id ID  default: otad-C-V with [^A-Za-z0-9_-] as _\n"
                "  --previous OLD      report how many of the image's chunks are new compared with the bundle\n"
                "                      OLD (its directory or manifest): what a device running it fetches\n");
}

/* ---- small helpers ------------------------------------------------------ */

static char *path_join(const char *dir, const char *name) {
        char *p;

        if (asprintf(&p, "%s/%s", dir, name) < 0)
                return NULL;
        return p;
}

static int write_text_file(const char *dir, const char *name, const char *text) {
        _cleanup_free_ char *path = path_join(dir, name);
        int r;

        if (!path)
                return -ENOMEM;
        r = write_file_atomic(path, text, strlen(text), 0644);
        if (r < 0) {
                errno = -r;
                return error("cannot write %s: %m", path);
        }
        return 0;
}

static int sha256_file(const char *path, uint8_t md[static 32]) {
        _cleanup_(EVP_MD_CTXp) EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        _cleanup_free_ uint8_t *buf = malloc(IO_BUFFER);
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
        ssize_t n;

        if (fd < 0)
                return -errno;
        if (!ctx || !buf || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1)
                return -ENOMEM;
        while ((n = read(fd, buf, IO_BUFFER)) > 0)
                if (EVP_DigestUpdate(ctx, buf, (size_t) n) != 1)
                        return -EIO;
        if (n < 0)
                return -errno;
        return EVP_DigestFinal_ex(ctx, md, NULL) == 1 ? 0 : -EIO;
}

/* sig-sha256-ecdsa as AWS custom code signing carries it: base64 of the DER
 * ECDSA signature over SHA-256 of the file's bytes (protocol.md §5). */
static int sign_file(EVP_PKEY *key, const char *path, char **ret_b64) {
        _cleanup_(EVP_MD_CTXp) EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        _cleanup_free_ uint8_t *buf = malloc(IO_BUFFER), *sig = NULL;
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
        size_t sig_len = 0;
        char *b64;
        ssize_t n;

        if (fd < 0)
                return -errno;
        if (!ctx || !buf || EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, key) != 1)
                return -ENOMEM;
        while ((n = read(fd, buf, IO_BUFFER)) > 0)
                if (EVP_DigestSignUpdate(ctx, buf, (size_t) n) != 1)
                        return -EIO;
        if (n < 0)
                return -errno;
        if (EVP_DigestSignFinal(ctx, NULL, &sig_len) != 1)
                return -EIO;
        sig = malloc(sig_len);
        if (!sig)
                return -ENOMEM;
        if (EVP_DigestSignFinal(ctx, sig, &sig_len) != 1)
                return -EIO;
        b64 = malloc(4 * ((sig_len + 2) / 3) + 1);
        if (!b64)
                return -ENOMEM;
        EVP_EncodeBlock((unsigned char *) b64, sig, (int) sig_len);
        *ret_b64 = b64;
        return 0;
}

static int load_key_and_cert(const char *key_path, const char *cert_path, EVP_PKEY **ret_key, X509 **ret_cert) {
        _cleanup_(EVP_PKEYp) EVP_PKEY *key = NULL;
        _cleanup_(X509p) X509 *cert = NULL;
        _cleanup_fclose_ FILE *kf = NULL, *cf = NULL;
        char group[64] = "";
        size_t len;

        kf = fopen(key_path, "re");
        if (!kf)
                return error("cannot read key %s: %m", key_path);
        key = PEM_read_PrivateKey(kf, NULL, NULL, NULL);
        if (!key)
                return error("%s is not a PEM private key (or it is encrypted)", key_path);
        cf = fopen(cert_path, "re");
        if (!cf)
                return error("cannot read certificate %s: %m", cert_path);
        cert = PEM_read_X509(cf, NULL, NULL, NULL);
        if (!cert)
                return error("%s is not a PEM certificate", cert_path);
        /* What otad verifies (verify.c): ECDSA with P-256 or P-384. */
        if (EVP_PKEY_get_base_id(key) != EVP_PKEY_EC ||
            EVP_PKEY_get_group_name(key, group, sizeof(group), &len) != 1 ||
            (strcmp(group, "prime256v1") != 0 && strcmp(group, "secp384r1") != 0))
                return error("key %s is not an EC P-256 or P-384 key, which is what otad verifies", key_path);
        if (X509_check_private_key(cert, key) != 1)
                return error("key %s does not match certificate %s", key_path, cert_path);
        *ret_key = take_ptr(&key);
        *ret_cert = take_ptr(&cert);
        return 0;
}

/* OUTDIR must not exist or be empty: a bundle never mixes with an older one. */
static int prepare_outdir(const char *dir) {
        _cleanup_(closedirp) DIR *d = NULL;
        struct dirent *de;

        if (mkdir(dir, 0755) == 0)
                return 0;
        if (errno != EEXIST)
                return error("cannot create output directory %s: %m", dir);
        d = opendir(dir);
        if (!d)
                return error("cannot open output directory %s: %m", dir);
        while ((de = readdir(d)))
                if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
                        return error("output directory %s is not empty (it holds %s)", dir, de->d_name);
        return 0;
}

static bool text_ok(const char *s, bool id) {
        size_t len = strlen(s);

        if (len == 0 || len > BUNDLE_TEXT_MAX)
                return false;
        for (const char *p = s; *p; p++) {
                char c = *p;
                bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                          c == '-' || (!id && (c == '.' || c == '+' || c == ':' || c == '~'));
                if (!ok)
                        return false;
        }
        return true;
}

/* DIR's one *.manifest, or FILE itself. */
static int find_manifest(const char *path, char **ret) {
        _cleanup_(closedirp) DIR *d = NULL;
        struct dirent *de;
        struct stat st;
        char *found = NULL;

        if (stat(path, &st) < 0)
                return error("cannot read %s: %m", path);
        if (!S_ISDIR(st.st_mode)) {
                *ret = strdup(path);
                return *ret ? 0 : error("out of memory");
        }
        d = opendir(path);
        if (!d)
                return error("cannot read directory %s: %m", path);
        while ((de = readdir(d))) {
                size_t len = strlen(de->d_name);

                if (len <= 9 || strcmp(de->d_name + len - 9, ".manifest") != 0)
                        continue;
                if (found) {
                        free(found);
                        return error("%s holds more than one *.manifest", path);
                }
                found = path_join(path, de->d_name);
                if (!found)
                        return error("out of memory");
        }
        if (!found)
                return error("%s holds no *.manifest", path);
        *ret = found;
        return 0;
}

static int load_manifest(const char *path, struct bundle_manifest **ret, char **ret_text, size_t *ret_size) {
        _cleanup_free_ char *text = NULL;
        char err[256] = "";
        size_t size = 0;
        int r;

        r = read_file_full(path, BUNDLE_MANIFEST_MAX, &text, &size);
        if (r == -EFBIG)
                return error("%s is larger than a manifest can be (%d bytes)", path, BUNDLE_MANIFEST_MAX);
        if (r < 0) {
                errno = -r;
                return error("cannot read %s: %m", path);
        }
        r = bundle_manifest_parse(text, size, ret, err, sizeof(err));
        if (r < 0)
                return error("%s: %s", path, err);
        if (ret_text)
                *ret_text = take_ptr(&text);
        if (ret_size)
                *ret_size = size;
        return 0;
}

/* ---- comparing with a previous bundle ----------------------------------- */

/* The verified payload header of the bundle whose manifest is at path: its
 * first header_size bytes, from the part files beside it. */
static int load_header(const char *path, const struct bundle_manifest *m, struct payload_decoder **ret) {
        _cleanup_(decoderp) struct payload_decoder *d = NULL;
        _cleanup_free_ char *copy = strdup(path);
        _cleanup_free_ uint8_t *buf = malloc(m->header_size);
        const char *dir = copy ? dirname(copy) : NULL;
        uint64_t done = 0;
        int r;

        if (!dir || !buf || payload_decoder_new(m, NULL, NULL, &d) < 0)
                return error("out of memory");
        /* A part may be smaller than the header. */
        for (size_t i = 0; i < m->n_parts && done < m->header_size; i++) {
                _cleanup_free_ char *part = path_join(dir, m->parts[i].file);
                _cleanup_close_ int fd = -1;
                uint64_t len = m->header_size - done < m->parts[i].size ? m->header_size - done : m->parts[i].size;

                if (!part)
                        return error("out of memory");
                fd = open(part, O_RDONLY | O_CLOEXEC);
                if (fd < 0)
                        return error("cannot read part %s: %m", part);
                r = pread_all(fd, buf + done, (size_t) len, 0);
                if (r < 0) {
                        errno = -r;
                        return error("cannot read part %s: %m", part);
                }
                done += len;
        }
        if (payload_decoder_feed(d, buf, m->header_size) < 0)
                return error("%s: payload header: %s", path, payload_decoder_error(d));
        *ret = take_ptr(&d);
        return 0;
}

/* What a device running old's image would fetch of new: each of new's
 * chunks looked up among old's uncompressed checksums, as delta_scan()
 * looks them up among the pieces of the active slot it cuts. The same
 * result as a scan when both were cut with the same parameters, which is
 * why a change of them is pointed out. */
static int compare_previous(const char *path, const struct bundle_manifest *m, const char *old_path,
                            const struct bundle_manifest *old, struct delta_stats *ret) {
        _cleanup_(decoderp) struct payload_decoder *d = NULL, *old_d = NULL;
        _cleanup_(planp) struct delta_plan *plan = NULL;
        struct payload_chunk c;

        if (load_header(path, m, &d) < 0 || load_header(old_path, old, &old_d) < 0)
                return -1;
        if (delta_plan_new(m, d, &plan) < 0)
                return error("out of memory");
        for (uint32_t i = 0; i < payload_decoder_chunk_count(old_d); i++) {
                if (payload_decoder_chunk(old_d, i, &c) < 0)
                        return error("%s: chunk %u of the index unreadable", old_path, i);
                (void) delta_plan_match(plan, c.sha256_uncompressed, c.image_size, c.image_offset);
        }
        *ret = *delta_plan_stats(plan);
        return 0;
}

static bool same_chunking(const struct bundle_manifest *a, const struct bundle_manifest *b) {
        return strcmp(a->chunking.algorithm, b->chunking.algorithm) == 0 &&
               a->chunking.min_size == b->chunking.min_size && a->chunking.mask_bits == b->chunking.mask_bits &&
               a->chunking.max_size == b->chunking.max_size;
}

static void print_previous(const struct bundle_manifest *m, const struct bundle_manifest *old,
                           const struct delta_stats *s, const char *indent) {
        printf("%sfrom %s: %u of %u chunks new, %.1f MB of the image; a device running %s fetches %.1f MB "
               "of the payload (%.1f %%), %u chunks (%.1f MB) it has\n",
               indent, old->version, s->fetch_chunks, s->chunks, (double) s->fetch_image_bytes / 1e6, old->version,
               (double) s->fetch_payload_bytes / 1e6,
               s->payload_bytes ? 100.0 * (double) s->fetch_payload_bytes / (double) s->payload_bytes : 0.0,
               s->active_chunks, (double) s->active_bytes / 1e6);
        if (!same_chunking(m, old))
                printf("%snote: %s was cut with other chunking parameters (%s %u/%u/%u): its chunks rarely match; "
                       "a device cuts its slot the way this bundle says, so expect it to find more\n",
                       indent, old->version, old->chunking.algorithm, old->chunking.min_size, old->chunking.mask_bits,
                       old->chunking.max_size);
}

/* ---- create ------------------------------------------------------------- */

struct create_args {
        const char *key, *cert, *cert_name, *version, *compatible, *name;
        const char *bucket, *prefix, *stream_id, *role_arn, *ota_update_id;
        const char *targets[16];
        size_t n_targets;
        const char *protocols[2];
        size_t n_protocols;
        uint64_t part_size;
        int level;
        const char *image, *outdir;
        const char *previous;  /* a bundle's directory or manifest */
};

/* Compresses the image into a zchunk payload at path: otad's chunk
 * boundaries (bundle_chunker.h), SHA-256 chunk checksums of both the
 * compressed and the uncompressed bytes (zck -u), zstd. */
static int build_payload(const struct create_args *a, const struct bundle_chunking *chunking, const char *path,
                         struct bundle_manifest *m) {
        _cleanup_(zckp) zckCtx *zck = NULL;
        _cleanup_close_ int in = -1, out = -1;
        _cleanup_free_ uint8_t *buf = NULL;
        _cleanup_(EVP_MD_CTXp) EVP_MD_CTX *md = NULL;
        struct bundle_chunker chunker;
        uint64_t total = 0;
        ssize_t n, hdr;

        in = open(a->image, O_RDONLY | O_CLOEXEC);
        if (in < 0)
                return error("cannot read image %s: %m", a->image);
        out = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (out < 0)
                return error("cannot create %s: %m", path);
        buf = malloc(IO_BUFFER);
        md = EVP_MD_CTX_new();
        zck = zck_create();
        if (!buf || !md || !zck || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1)
                return error("out of memory");
        if (bundle_chunker_init(&chunker, chunking) < 0)
                return error("invalid chunking parameters");
        if (!zck_init_write(zck, out) || !zck_set_ioption(zck, ZCK_HASH_FULL_TYPE, ZCK_HASH_SHA256) ||
            !zck_set_ioption(zck, ZCK_HASH_CHUNK_TYPE, ZCK_HASH_SHA256) ||
            !zck_set_ioption(zck, ZCK_UNCOMP_HEADER, 1) || !zck_set_ioption(zck, ZCK_COMP_TYPE, ZCK_COMP_ZSTD) ||
            !zck_set_ioption(zck, ZCK_ZSTD_COMP_LEVEL, a->level) || !zck_set_ioption(zck, ZCK_MANUAL_CHUNK, 1) ||
            !zck_set_ioption(zck, ZCK_CHUNK_MAX, chunking->max_size))
                return error("cannot set up zchunk: %s", zck_get_error(zck));

        while ((n = read(in, buf, IO_BUFFER)) > 0) {
                size_t pos = 0;

                if (EVP_DigestUpdate(md, buf, (size_t) n) != 1)
                        return error("cannot hash the image");
                while (pos < (size_t) n) {
                        size_t len = bundle_chunker_scan(&chunker, buf + pos, (size_t) n - pos);

                        if (zck_write(zck, (const char *) buf + pos, len) != (ssize_t) len)
                                return error("zchunk: %s", zck_get_error(zck));
                        pos += len;
                        /* scan() stopped early: a boundary. */
                        if (chunker.len == 0 && zck_end_chunk(zck) < 0)
                                return error("zchunk: %s", zck_get_error(zck));
                }
                total += (uint64_t) n;
        }
        if (n < 0)
                return error("cannot read image %s: %m", a->image);
        if (total == 0)
                return error("image %s is empty", a->image);
        if (chunker.len > 0 && zck_end_chunk(zck) < 0)
                return error("zchunk: %s", zck_get_error(zck));
        if (!zck_close(zck))
                return error("zchunk: %s", zck_get_error(zck));
        if (EVP_DigestFinal_ex(md, m->image_sha256, NULL) != 1)
                return error("cannot hash the image");
        hdr = zck_get_header_length(zck);
        if (hdr <= 0 || hdr > BUNDLE_HEADER_SIZE_MAX)
                return error("zchunk header of %zd bytes is more than a bundle allows (%u)", hdr,
                             BUNDLE_HEADER_SIZE_MAX);
        m->image_size = total;
        m->header_size = (uint32_t) hdr;
        m->chunk_count = (uint32_t) (zck_get_chunk_count(zck) - 1); /* without the dict chunk */
        m->payload_size = (uint64_t) zck_get_length(zck);
        if (fsync(out) < 0)
                return error("cannot write %s: %m", path);
        return 0;
}

/* Cuts the payload into parts of at most part_size bytes, named
 * NAME.payload.NN, and fills in m's parts and header hash. */
static int split_payload(const struct create_args *a, const char *payload, const char *name,
                         struct bundle_manifest *m) {
        _cleanup_close_ int in = open(payload, O_RDONLY | O_CLOEXEC);
        _cleanup_free_ uint8_t *buf = malloc(IO_BUFFER);
        uint64_t n_parts = (m->payload_size + a->part_size - 1) / a->part_size;
        int r;

        if (in < 0 || !buf)
                return error("cannot read %s: %m", payload);
        if (n_parts > BUNDLE_PARTS_MAX)
                return error("the payload is %llu bytes: %llu parts of %llu bytes, but an AWS IoT stream holds 50 "
                             "files (the manifest and %d parts), so at most %llu bytes; use a larger --part-size "
                             "(at most %llu) or a smaller image",
                             (unsigned long long) m->payload_size, (unsigned long long) n_parts,
                             (unsigned long long) a->part_size, BUNDLE_PARTS_MAX,
                             (unsigned long long) a->part_size * BUNDLE_PARTS_MAX,
                             (unsigned long long) BUNDLE_PART_SIZE_MAX);

        /* The header hash, from the first header_size bytes. */
        {
                _cleanup_free_ uint8_t *hdr = malloc(m->header_size);

                if (!hdr)
                        return error("out of memory");
                r = pread_all(in, hdr, m->header_size, 0);
                if (r < 0 || EVP_Digest(hdr, m->header_size, m->header_sha256, NULL, EVP_sha256(), NULL) != 1) {
                        errno = r < 0 ? -r : EIO;
                        return error("cannot read %s: %m", payload);
                }
        }

        m->parts = calloc(n_parts, sizeof(*m->parts));
        if (!m->parts)
                return error("out of memory");
        for (uint64_t i = 0; i < n_parts; i++) {
                struct bundle_part *p = &m->parts[i];
                _cleanup_free_ char *path = NULL;
                _cleanup_close_ int out = -1;
                _cleanup_(EVP_MD_CTXp) EVP_MD_CTX *md = EVP_MD_CTX_new();

                if (asprintf(&p->file, "%s.payload.%02llu", name, (unsigned long long) i) < 0 ||
                    !(path = path_join(a->outdir, p->file)) || !md || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1)
                        return error("out of memory");
                m->n_parts++;
                p->offset = i * a->part_size;
                p->size = m->payload_size - p->offset < a->part_size ? m->payload_size - p->offset : a->part_size;
                out = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
                if (out < 0)
                        return error("cannot create %s: %m", path);
                for (uint64_t done = 0; done < p->size;) {
                        size_t len = p->size - done < IO_BUFFER ? (size_t) (p->size - done) : IO_BUFFER;

                        r = pread_all(in, buf, len, p->offset + done);
                        if (r >= 0)
                                r = write_all(out, buf, len);
                        if (r < 0) {
                                errno = -r;
                                return error("cannot write %s: %m", path);
                        }
                        EVP_DigestUpdate(md, buf, len);
                        done += len;
                }
                if (fsync(out) < 0)
                        return error("cannot write %s: %m", path);
                EVP_DigestFinal_ex(md, p->sha256, NULL);
        }
        return 0;
}

static cJSON *file_entry(const struct create_args *a, const char *file, unsigned file_id, const char *signature) {
        cJSON *f = cJSON_CreateObject(), *loc, *cs, *ccs, *o;
        _cleanup_free_ char *key = NULL;

        if (!f || asprintf(&key, "%s%s", a->prefix ? a->prefix : "", file) < 0)
                goto fail;
        if (!cJSON_AddStringToObject(f, "fileName", file) || !cJSON_AddNumberToObject(f, "fileType", 0) ||
            !(loc = cJSON_AddObjectToObject(f, "fileLocation")))
                goto fail;
        if (a->stream_id) {
                if (!(o = cJSON_AddObjectToObject(loc, "stream")) ||
                    !cJSON_AddStringToObject(o, "streamId", a->stream_id) ||
                    !cJSON_AddNumberToObject(o, "fileId", file_id))
                        goto fail;
        } else if (!(o = cJSON_AddObjectToObject(loc, "s3Location")) ||
                   !cJSON_AddStringToObject(o, "bucket", a->bucket ? a->bucket : PLACEHOLDER_BUCKET) ||
                   !cJSON_AddStringToObject(o, "key", key))
                goto fail;
        /* Custom code signing: the signature travels into the job document
         * as sig-<hashAlgorithm>-<signatureAlgorithm> (lowercased) = base64,
         * certificateName as its certfile (protocol.md §5). inlineDocument is
         * a blob: in CLI input JSON that is base64 text. */
        if (!(cs = cJSON_AddObjectToObject(f, "codeSigning")) || !(ccs = cJSON_AddObjectToObject(cs, "customCodeSigning")) ||
            !(o = cJSON_AddObjectToObject(ccs, "signature")) || !cJSON_AddStringToObject(o, "inlineDocument", signature) ||
            !(o = cJSON_AddObjectToObject(ccs, "certificateChain")) ||
            !cJSON_AddStringToObject(o, "certificateName", a->cert_name) ||
            !cJSON_AddStringToObject(ccs, "hashAlgorithm", "SHA256") ||
            !cJSON_AddStringToObject(ccs, "signatureAlgorithm", "ECDSA"))
                goto fail;
        return f;
fail:
        cJSON_Delete(f);
        return NULL;
}

static void sanitize_id(const char *in, char *out, size_t size) {
        size_t i = 0;

        for (; in[i] && i + 1 < size && i < 128; i++) {
                char c = in[i];
                out[i] = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ? c
                                                                                                                    : '_';
        }
        out[i] = '\0';
}

static int write_requests(const struct create_args *a, const struct bundle_manifest *m, const char *manifest_file,
                          char *const *sigs) {
        _cleanup_(cJSONp) cJSON *req = cJSON_CreateObject(), *stream_req = NULL;
        _cleanup_free_ char *text = NULL, *id_text = NULL;
        cJSON *arr, *files;
        char id[129];

        if (!req)
                return error("out of memory");
        if (a->ota_update_id)
                snprintf(id, sizeof(id), "%s", a->ota_update_id);
        else {
                if (asprintf(&id_text, "otad-%s-%s", m->compatible, m->version) < 0)
                        return error("out of memory");
                sanitize_id(id_text, id, sizeof(id));
        }
        if (!cJSON_AddStringToObject(req, "otaUpdateId", id) ||
            !cJSON_AddStringToObject(req, "description", "otad bundle") || !(arr = cJSON_AddArrayToObject(req, "targets")))
                return error("out of memory");
        if (a->n_targets == 0)
                cJSON_AddItemToArray(arr, cJSON_CreateString(PLACEHOLDER_TARGET));
        for (size_t i = 0; i < a->n_targets; i++)
                cJSON_AddItemToArray(arr, cJSON_CreateString(a->targets[i]));
        if (!(arr = cJSON_AddArrayToObject(req, "protocols")))
                return error("out of memory");
        if (a->n_protocols == 0)
                cJSON_AddItemToArray(arr, cJSON_CreateString("MQTT"));
        for (size_t i = 0; i < a->n_protocols; i++)
                cJSON_AddItemToArray(arr, cJSON_CreateString(a->protocols[i]));
        if (!cJSON_AddStringToObject(req, "targetSelection", "SNAPSHOT") ||
            !(files = cJSON_AddArrayToObject(req, "files")))
                return error("out of memory");
        /* The manifest first: otad decides from it before fetching the rest. */
        for (size_t i = 0; i <= m->n_parts; i++) {
                cJSON *f = file_entry(a, i == 0 ? manifest_file : m->parts[i - 1].file, (unsigned) i, sigs[i]);
                if (!f)
                        return error("out of memory");
                cJSON_AddItemToArray(files, f);
        }
        if (!cJSON_AddStringToObject(req, "roleArn", a->role_arn ? a->role_arn : PLACEHOLDER_ROLE))
                return error("out of memory");
        text = cJSON_Print(req);
        if (!text || write_text_file(a->outdir, "ota-update.json", text) < 0)
                return -1;

        if (a->stream_id) {
                /* The stream the files live in, for `aws iot create-stream
                 * --cli-input-json file://create-stream.json`. */
                free(text);
                text = NULL;
                stream_req = cJSON_CreateObject();
                if (!stream_req || !cJSON_AddStringToObject(stream_req, "streamId", a->stream_id) ||
                    !cJSON_AddStringToObject(stream_req, "description", "otad bundle") ||
                    !(arr = cJSON_AddArrayToObject(stream_req, "files")))
                        return error("out of memory");
                for (size_t i = 0; i <= m->n_parts; i++) {
                        cJSON *f = cJSON_CreateObject(), *s3;
                        _cleanup_free_ char *key = NULL;

                        if (!f || asprintf(&key, "%s%s", a->prefix ? a->prefix : "",
                                           i == 0 ? manifest_file : m->parts[i - 1].file) < 0)
                                return error("out of memory");
                        cJSON_AddItemToArray(arr, f);
                        if (!cJSON_AddNumberToObject(f, "fileId", (double) i) ||
                            !(s3 = cJSON_AddObjectToObject(f, "s3Location")) ||
                            !cJSON_AddStringToObject(s3, "bucket", a->bucket ? a->bucket : PLACEHOLDER_BUCKET) ||
                            !cJSON_AddStringToObject(s3, "key", key))
                                return error("out of memory");
                }
                if (!cJSON_AddStringToObject(stream_req, "roleArn", a->role_arn ? a->role_arn : PLACEHOLDER_ROLE))
                        return error("out of memory");
                text = cJSON_Print(stream_req);
                if (!text || write_text_file(a->outdir, "create-stream.json", text) < 0)
                        return -1;
        }
        return 0;
}

static int write_upload_script(const struct create_args *a, const struct bundle_manifest *m, const char *manifest_file,
                               char **ret_text) {
        _cleanup_free_ char *text = NULL;
        size_t size = 0;
        FILE *f = open_memstream(&text, &size);

        if (!f)
                return error("out of memory");
        fprintf(f, "#!/bin/sh\n# Upload the bundle and create the OTA update (written by otad bundle create).\nset -e\n"
                   "cd \"$(dirname \"$0\")\"\n");
        for (size_t i = 0; i <= m->n_parts; i++) {
                const char *file = i == 0 ? manifest_file : m->parts[i - 1].file;
                fprintf(f, "aws s3 cp %s s3://%s/%s%s\n", file, a->bucket ? a->bucket : PLACEHOLDER_BUCKET,
                        a->prefix ? a->prefix : "", file);
        }
        if (a->stream_id)
                fprintf(f, "aws iot create-stream --cli-input-json file://create-stream.json\n");
        fprintf(f, "aws iot create-ota-update --cli-input-json file://ota-update.json\n");
        if (fclose(f) != 0)
                return error("out of memory");
        if (write_text_file(a->outdir, "upload.sh", text) < 0)
                return -1;
        *ret_text = take_ptr(&text);
        return 0;
}

static int parse_size(const char *s, uint64_t *ret) {
        char *end;
        unsigned long long v;

        errno = 0;
        v = strtoull(s, &end, 10);
        if (errno || end == s || *end || s[0] == '-')
                return -EINVAL;
        *ret = v;
        return 0;
}

static int cmd_create(int argc, char *argv[]) {
        enum { KEY = 0x100, CERT, CERT_NAME, VERSION, COMPATIBLE, NAME, PART_SIZE, LEVEL, BUCKET, PREFIX,
               STREAM_ID, PROTOCOL, TARGET, ROLE_ARN, OTA_UPDATE_ID, PREVIOUS };
        static const struct option options[] = {
                { "key", required_argument, NULL, KEY },
                { "cert", required_argument, NULL, CERT },
                { "cert-name", required_argument, NULL, CERT_NAME },
                { "version", required_argument, NULL, VERSION },
                { "compatible", required_argument, NULL, COMPATIBLE },
                { "name", required_argument, NULL, NAME },
                { "part-size", required_argument, NULL, PART_SIZE },
                { "level", required_argument, NULL, LEVEL },
                { "bucket", required_argument, NULL, BUCKET },
                { "prefix", required_argument, NULL, PREFIX },
                { "stream-id", required_argument, NULL, STREAM_ID },
                { "protocol", required_argument, NULL, PROTOCOL },
                { "target", required_argument, NULL, TARGET },
                { "role-arn", required_argument, NULL, ROLE_ARN },
                { "ota-update-id", required_argument, NULL, OTA_UPDATE_ID },
                { "previous", required_argument, NULL, PREVIOUS },
                { "help", no_argument, NULL, 'h' },
                {}
        };
        struct create_args a = { .part_size = BUNDLE_PART_SIZE_MAX, .level = 9 };
        _cleanup_(EVP_PKEYp) EVP_PKEY *key = NULL;
        _cleanup_(X509p) X509 *cert = NULL;
        _cleanup_(manifestp) struct bundle_manifest *m = NULL, *previous = NULL;
        _cleanup_(decoderp) struct payload_decoder *previous_header = NULL;
        _cleanup_free_ char *name = NULL, *cert_name = NULL, *payload = NULL, *manifest_file = NULL,
                            *manifest_path = NULL, *manifest_text = NULL, *upload = NULL, *previous_path = NULL;
        struct delta_stats delta = {};
        char **sigs = NULL;
        struct stat st;
        uint64_t v;
        int c, r = -1;

        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0)
                switch (c) {
                case KEY: a.key = optarg; break;
                case CERT: a.cert = optarg; break;
                case CERT_NAME: a.cert_name = optarg; break;
                case VERSION: a.version = optarg; break;
                case COMPATIBLE: a.compatible = optarg; break;
                case NAME: a.name = optarg; break;
                case PART_SIZE:
                        if (parse_size(optarg, &a.part_size) < 0 || a.part_size < 1 ||
                            a.part_size > BUNDLE_PART_SIZE_MAX)
                                return error("--part-size %s is not 1..%llu bytes (24 MiB, an AWS IoT stream file)",
                                             optarg, (unsigned long long) BUNDLE_PART_SIZE_MAX);
                        break;
                case LEVEL:
                        if (parse_size(optarg, &v) < 0 || v < 1 || v > 19)
                                return error("--level %s is not 1..19", optarg);
                        a.level = (int) v;
                        break;
                case BUCKET: a.bucket = optarg; break;
                case PREFIX: a.prefix = optarg; break;
                case STREAM_ID:
                        if (!text_ok(optarg, true))
                                return error("--stream-id %s is not 1-128 characters of [A-Za-z0-9_-]", optarg);
                        a.stream_id = optarg;
                        break;
                case PROTOCOL:
                        if (strcmp(optarg, "MQTT") != 0 && strcmp(optarg, "HTTP") != 0)
                                return error("--protocol is MQTT or HTTP, not %s", optarg);
                        if (a.n_protocols == 2 || (a.n_protocols == 1 && strcmp(a.protocols[0], optarg) == 0))
                                return error("--protocol %s given twice", optarg);
                        a.protocols[a.n_protocols++] = optarg;
                        break;
                case TARGET:
                        if (a.n_targets == ELEMENTSOF(a.targets))
                                return error("at most %zu --target", ELEMENTSOF(a.targets));
                        a.targets[a.n_targets++] = optarg;
                        break;
                case ROLE_ARN: a.role_arn = optarg; break;
                case OTA_UPDATE_ID:
                        if (!text_ok(optarg, true))
                                return error("--ota-update-id %s is not 1-128 characters of [A-Za-z0-9_-]", optarg);
                        a.ota_update_id = optarg;
                        break;
                case PREVIOUS: a.previous = optarg; break;
                case 'h':
                        usage(stdout);
                        return 0;
                default:
                        return -1;
                }
        if (argc - optind != 2) {
                usage(stderr);
                return -1;
        }
        a.image = argv[optind];
        a.outdir = argv[optind + 1];
        if (!a.key || !a.cert || !a.version || !a.compatible)
                return error("create needs --key, --cert, --version and --compatible");
        if (!text_ok(a.version, false))
                return error("--version %s is not 1-128 characters of [A-Za-z0-9._:+~-]", a.version);
        if (!text_ok(a.compatible, false))
                return error("--compatible %s is not 1-128 characters of [A-Za-z0-9._:+~-]", a.compatible);
        if (a.name && (!text_ok(a.name, false) || a.name[0] == '.' || strchr(a.name, ':') || strlen(a.name) > 100))
                return error("--name %s is not 1-100 characters of [A-Za-z0-9._+~-]", a.name);
        if (a.prefix && strlen(a.prefix) > 512)
                return error("--prefix is longer than 512 characters");
        if (a.n_protocols > 0 && a.stream_id && !(a.n_protocols == 1 && strcmp(a.protocols[0], "MQTT") == 0))
                return error("--stream-id files are served over MQTT only: HTTP needs S3 locations (--bucket)");

        /* Cheap checks first: nothing is compressed for a bundle that cannot
         * be signed or written. */
        if (load_key_and_cert(a.key, a.cert, &key, &cert) < 0)
                return -1;
        if (a.cert_name)
                cert_name = strdup(a.cert_name);
        else {
                _cleanup_free_ char *copy = strdup(a.cert);
                cert_name = copy ? strdup(basename(copy)) : NULL;
        }
        if (!cert_name)
                return error("out of memory");
        {
                char mapped[256];
                /* The device maps certfile to a trust_dir entry this way. */
                if (verify_cert_name(cert_name, mapped, sizeof(mapped)) < 0 || strcmp(mapped, cert_name) != 0)
                        return error("certificate name %s is not a plain file name of [A-Za-z0-9._-] "
                                     "(use --cert-name)", cert_name);
        }
        a.cert_name = cert_name;
        if (stat(a.image, &st) < 0)
                return error("cannot read image %s: %m", a.image);
        if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
                return error("image %s is not a file", a.image);
        if (S_ISREG(st.st_mode) && (uint64_t) st.st_size > BUNDLE_IMAGE_SIZE_MAX)
                return error("image %s is %llu bytes, the bundle format allows at most %llu", a.image,
                             (unsigned long long) st.st_size, (unsigned long long) BUNDLE_IMAGE_SIZE_MAX);
        if (S_ISREG(st.st_mode) && st.st_size == 0)
                return error("image %s is empty", a.image);
        /* A --previous that cannot be read fails before the compression. */
        if (a.previous && (find_manifest(a.previous, &previous_path) < 0 ||
                           load_manifest(previous_path, &previous, NULL, NULL) < 0 ||
                           load_header(previous_path, previous, &previous_header) < 0))
                return -1;
        if (prepare_outdir(a.outdir) < 0)
                return -1;

        if (a.name)
                name = strdup(a.name);
        else if (asprintf(&name, "bundle-%s", a.version) < 0)
                name = NULL;
        if (!name)
                return error("out of memory");
        for (char *p = name; *p; p++)
                if (*p == ':')
                        *p = '_';
        m = calloc(1, sizeof(*m));
        payload = path_join(a.outdir, ".payload.zck");
        if (!m || !payload || asprintf(&manifest_file, "%s.manifest", name) < 0 ||
            !(manifest_path = path_join(a.outdir, manifest_file)))
                return error("out of memory");
        m->format_version = BUNDLE_FORMAT_VERSION;
        m->compatible = strdup(a.compatible);
        m->version = strdup(a.version);
        m->payload_format = strdup(BUNDLE_PAYLOAD_FORMAT);
        m->chunking = (struct bundle_chunking) {
                .algorithm = strdup(BUNDLE_CHUNKING_NAME),
                .min_size = BUNDLE_CHUNK_MIN_DEFAULT,
                .mask_bits = BUNDLE_CHUNK_MASK_BITS_DEFAULT,
                .max_size = BUNDLE_CHUNK_MAX_DEFAULT,
        };
        m->chunk_size_max = BUNDLE_CHUNK_MAX_DEFAULT;
        if (!m->compatible || !m->version || !m->payload_format || !m->chunking.algorithm)
                return error("out of memory");

        r = build_payload(&a, &m->chunking, payload, m);
        if (r >= 0)
                r = split_payload(&a, payload, name, m);
        (void) unlink(payload);
        if (r < 0)
                return -1;

        r = bundle_manifest_format(m, &manifest_text);
        if (r < 0)
                return error("out of memory");
        /* What the device will check: the manifest must parse back. */
        {
                struct bundle_manifest *check = NULL;
                char err[256] = "";

                r = bundle_manifest_parse(manifest_text, strlen(manifest_text), &check, err, sizeof(err));
                bundle_manifest_free(check);
                if (r < 0)
                        return error("the manifest does not parse back: %s", err);
        }
        if (write_text_file(a.outdir, manifest_file, manifest_text) < 0)
                return -1;

        sigs = calloc(m->n_parts + 1, sizeof(char *));
        if (!sigs)
                return error("out of memory");
        r = 0;
        for (size_t i = 0; i <= m->n_parts && r >= 0; i++) {
                _cleanup_free_ char *path = path_join(a.outdir, i == 0 ? manifest_file : m->parts[i - 1].file);
                _cleanup_free_ char *sig_name = NULL, *sig_text = NULL;

                if (!path || asprintf(&sig_name, "%s.sig", i == 0 ? manifest_file : m->parts[i - 1].file) < 0) {
                        r = error("out of memory");
                        break;
                }
                r = sign_file(key, path, &sigs[i]);
                if (r < 0) {
                        errno = -r;
                        r = error("cannot sign %s: %m", path);
                        break;
                }
                if (asprintf(&sig_text, "%s\n", sigs[i]) < 0)
                        r = error("out of memory");
                else
                        r = write_text_file(a.outdir, sig_name, sig_text);
        }
        if (r >= 0)
                r = write_requests(&a, m, manifest_file, sigs);
        if (r >= 0)
                r = write_upload_script(&a, m, manifest_file, &upload);
        for (size_t i = 0; i <= m->n_parts; i++)
                free(sigs[i]);
        free(sigs);
        if (r < 0)
                return -1;

        printf("Bundle %s for \"%s\" in %s:\n", m->version, m->compatible, a.outdir);
        printf("  image     %llu bytes\n", (unsigned long long) m->image_size);
        printf("  payload   %llu bytes (%.1f %%) in %zu part%s, %u chunks\n", (unsigned long long) m->payload_size,
               100.0 * (double) m->payload_size / (double) m->image_size, m->n_parts, m->n_parts == 1 ? "" : "s",
               m->chunk_count);
        printf("  manifest  %s, then ota-update.json%s and upload.sh\n", manifest_file,
               a.stream_id ? ", create-stream.json" : "");
        if (previous) {
                if (compare_previous(manifest_path, m, previous_path, previous, &delta) < 0)
                        return -1;
                print_previous(m, previous, &delta, "  previous  ");
        }
        if (!a.bucket || !a.role_arn || a.n_targets == 0)
                printf("Placeholders left for --bucket, --role-arn or --target: edit ota-update.json or pass them.\n");
        printf("\n%s", upload);
        return 0;
}

/* ---- inspect and verify ------------------------------------------------- */

/* The comparison as inspect --json adds it to the manifest, as "previous". */
static int add_previous_json(cJSON *root, const struct bundle_manifest *m, const struct bundle_manifest *old,
                             const struct delta_stats *s) {
        cJSON *o = cJSON_AddObjectToObject(root, "previous");

        if (!o || !cJSON_AddStringToObject(o, "version", old->version) ||
            !cJSON_AddBoolToObject(o, "same_chunking", same_chunking(m, old)) ||
            !cJSON_AddNumberToObject(o, "chunks", s->chunks) ||
            !cJSON_AddNumberToObject(o, "new_chunks", s->fetch_chunks) ||
            !cJSON_AddNumberToObject(o, "new_image_bytes", (double) s->fetch_image_bytes) ||
            !cJSON_AddNumberToObject(o, "fetch_payload_bytes", (double) s->fetch_payload_bytes) ||
            !cJSON_AddNumberToObject(o, "reused_chunks", s->active_chunks) ||
            !cJSON_AddNumberToObject(o, "reused_image_bytes", (double) s->active_bytes))
                return -ENOMEM;
        return 0;
}

static int cmd_inspect(int argc, char *argv[]) {
        static const struct option options[] = {
                { "json", no_argument, NULL, 'j' },
                { "previous", required_argument, NULL, 'p' },
                { "help", no_argument, NULL, 'h' },
                {}
        };
        _cleanup_(manifestp) struct bundle_manifest *m = NULL, *old = NULL;
        _cleanup_free_ char *path = NULL, *text = NULL, *old_path = NULL;
        const char *previous = NULL;
        struct delta_stats delta = {};
        bool json = false;
        char hex[65];
        int c;

        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0)
                switch (c) {
                case 'j': json = true; break;
                case 'p': previous = optarg; break;
                case 'h': usage(stdout); return 0;
                default: return -1;
                }
        if (argc - optind != 1) {
                usage(stderr);
                return -1;
        }
        if (find_manifest(argv[optind], &path) < 0 || load_manifest(path, &m, NULL, NULL) < 0)
                return -1;
        if (previous && (find_manifest(previous, &old_path) < 0 || load_manifest(old_path, &old, NULL, NULL) < 0 ||
                         compare_previous(path, m, old_path, old, &delta) < 0))
                return -1;
        if (json) {
                _cleanup_(cJSONp) cJSON *root = NULL;
                _cleanup_free_ char *out = NULL;

                if (bundle_manifest_format(m, &text) < 0)
                        return error("out of memory");
                if (!old) {
                        fputs(text, stdout);
                        return 0;
                }
                root = cJSON_Parse(text);
                if (!root || add_previous_json(root, m, old, &delta) < 0 || !(out = cJSON_Print(root)))
                        return error("out of memory");
                printf("%s\n", out);
                return 0;
        }
        printf("Manifest:     %s\n", path);
        printf("Compatible:   %s\n", m->compatible);
        printf("Version:      %s\n", m->version);
        bundle_sha256_hex(m->image_sha256, hex);
        printf("Image:        %llu bytes, sha256 %s\n", (unsigned long long) m->image_size, hex);
        printf("Payload:      %s, %llu bytes (%.1f %% of the image)\n", m->payload_format,
               (unsigned long long) m->payload_size, 100.0 * (double) m->payload_size / (double) m->image_size);
        bundle_sha256_hex(m->header_sha256, hex);
        printf("Header:       %u bytes, sha256 %s\n", m->header_size, hex);
        printf("Chunks:       %u, at most %u bytes; %s min %u, mask %u bits, max %u\n", m->chunk_count,
               m->chunk_size_max, m->chunking.algorithm, m->chunking.min_size, m->chunking.mask_bits,
               m->chunking.max_size);
        printf("Parts:        %zu\n", m->n_parts);
        for (size_t i = 0; i < m->n_parts; i++) {
                bundle_sha256_hex(m->parts[i].sha256, hex);
                printf("  %-30s %10llu bytes at %llu, sha256 %s\n", m->parts[i].file,
                       (unsigned long long) m->parts[i].size, (unsigned long long) m->parts[i].offset, hex);
        }
        if (old)
                print_previous(m, old, &delta, "Previous:     ");
        return 0;
}

struct verify_file_ctx {
        int fd;
};

static int read_fd(uint64_t offset, void *buf, size_t len, void *userdata) {
        return pread_all(((struct verify_file_ctx *) userdata)->fd, buf, len, offset);
}

/* The signature in path.sig over path, checked as the device does. */
static int check_signature(const char *path, const char *cert_path, uint64_t size) {
        _cleanup_free_ char *sig_path = NULL, *sig = NULL, *dir_copy = strdup(cert_path),
                            *base_copy = strdup(cert_path);
        struct verify_file_ctx ctx = { .fd = -1 };
        struct verify_request req;
        struct verify_report report;
        int r;

        if (!dir_copy || !base_copy || asprintf(&sig_path, "%s.sig", path) < 0)
                return error("out of memory");
        r = read_file_full(sig_path, 4096, &sig, NULL);
        if (r < 0) {
                errno = -r;
                return error("cannot read signature %s: %m", sig_path);
        }
        sig[strcspn(sig, "\n")] = '\0';
        ctx.fd = open(path, O_RDONLY | O_CLOEXEC);
        if (ctx.fd < 0)
                return error("cannot read %s: %m", path);
        req = (struct verify_request) {
                .sig_key = VERIFY_SIG_KEY,
                .signature = sig,
                .certfile = basename(base_copy),
                .trust_dir = dirname(dir_copy),
                .size = size,
                .read = read_fd,
                .userdata = &ctx,
        };
        r = verify_file(&req, &report);
        close(ctx.fd);
        if (r < 0)
                return error("%s: %s", path, report.reason);
        return 0;
}

struct image_hash {
        EVP_MD_CTX *md;
        uint64_t next;
};

static int hash_image(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct image_hash *h = userdata;

        if (offset != h->next)
                return -EINVAL;
        h->next += len;
        return EVP_DigestUpdate(h->md, buf, len) == 1 ? 0 : -EIO;
}

static int cmd_verify(int argc, char *argv[]) {
        static const struct option options[] = {
                { "cert", required_argument, NULL, 'c' },
                { "help", no_argument, NULL, 'h' },
                {}
        };
        _cleanup_(manifestp) struct bundle_manifest *m = NULL;
        _cleanup_(decoderp) struct payload_decoder *dec = NULL;
        _cleanup_(EVP_MD_CTXp) EVP_MD_CTX *md = EVP_MD_CTX_new();
        _cleanup_free_ char *path = NULL, *dir = NULL;
        _cleanup_free_ uint8_t *buf = malloc(IO_BUFFER);
        const char *cert = NULL;
        struct image_hash ih = { .md = md };
        size_t manifest_size = 0;
        uint8_t digest[32];
        int c, r;

        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0)
                switch (c) {
                case 'c': cert = optarg; break;
                case 'h': usage(stdout); return 0;
                default: return -1;
                }
        if (argc - optind != 1 || !cert) {
                usage(stderr);
                return -1;
        }
        if (!md || !buf || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1)
                return error("out of memory");
        if (find_manifest(argv[optind], &path) < 0)
                return -1;
        {
                _cleanup_free_ char *copy = strdup(path);
                dir = copy ? strdup(dirname(copy)) : NULL;
                if (!dir)
                        return error("out of memory");
        }
        /* The order the device trusts things in: signature, then manifest,
         * then payload against it. */
        {
                struct stat st;
                if (stat(path, &st) < 0)
                        return error("cannot read %s: %m", path);
                manifest_size = (size_t) st.st_size;
        }
        if (manifest_size > BUNDLE_MANIFEST_MAX)
                return error("%s is larger than a manifest can be (%d bytes)", path, BUNDLE_MANIFEST_MAX);
        if (check_signature(path, cert, manifest_size) < 0 || load_manifest(path, &m, NULL, NULL) < 0)
                return -1;
        r = payload_decoder_new(m, hash_image, &ih, &dec);
        if (r < 0)
                return error("out of memory");
        for (size_t i = 0; i < m->n_parts; i++) {
                const struct bundle_part *p = &m->parts[i];
                _cleanup_free_ char *part = path_join(dir, p->file);
                _cleanup_close_ int fd = -1;
                struct stat st;
                char want[65], got[65];

                if (!part)
                        return error("out of memory");
                fd = open(part, O_RDONLY | O_CLOEXEC);
                if (fd < 0 || fstat(fd, &st) < 0)
                        return error("cannot read part %s: %m", part);
                if ((uint64_t) st.st_size != p->size)
                        return error("part %s is %llu bytes, the manifest says %llu", part,
                                     (unsigned long long) st.st_size, (unsigned long long) p->size);
                if (check_signature(part, cert, p->size) < 0)
                        return -1;
                if (sha256_file(part, digest) < 0)
                        return error("cannot read part %s: %m", part);
                if (memcmp(digest, p->sha256, 32) != 0) {
                        bundle_sha256_hex(p->sha256, want);
                        bundle_sha256_hex(digest, got);
                        return error("part %s has sha256 %s, the manifest says %s", part, got, want);
                }
                for (uint64_t done = 0; done < p->size;) {
                        size_t len = p->size - done < IO_BUFFER ? (size_t) (p->size - done) : IO_BUFFER;

                        r = pread_all(fd, buf, len, done);
                        if (r < 0) {
                                errno = -r;
                                return error("cannot read part %s: %m", part);
                        }
                        r = payload_decoder_feed(dec, buf, len);
                        if (r < 0)
                                return error("payload: %s", payload_decoder_error(dec));
                        done += len;
                }
        }
        if (!payload_decoder_finished(dec))
                return error("payload ends before its last chunk");
        if (EVP_DigestFinal_ex(md, digest, NULL) != 1)
                return error("cannot hash the image");
        if (memcmp(digest, m->image_sha256, 32) != 0)
                return error("the decoded image does not match the manifest's image sha256");
        printf("%s: bundle %s for \"%s\" verified: signatures, %zu part%s, %u chunks, image of %llu bytes\n", dir,
               m->version, m->compatible, m->n_parts, m->n_parts == 1 ? "" : "s", m->chunk_count,
               (unsigned long long) m->image_size);
        return 0;
}

static int zck_quiet_log_set;

int bundle_tool_main(int argc, char *argv[]) {
        const char *cmd;
        int r;

        if (!zck_quiet_log_set) {
                /* libzck logs to stderr itself; our messages say what failed. */
                zck_set_log_level(ZCK_LOG_NONE);
                zck_quiet_log_set = 1;
        }
        if (argc < 2) {
                usage(stderr);
                return EXIT_FAILURE;
        }
        cmd = argv[1];
        if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
                usage(stdout);
                return EXIT_SUCCESS;
        }
        /* Each subcommand parses its own options from argv[1] on. */
        optind = 1;
        if (strcmp(cmd, "create") == 0)
                r = cmd_create(argc - 1, argv + 1);
        else if (strcmp(cmd, "inspect") == 0)
                r = cmd_inspect(argc - 1, argv + 1);
        else if (strcmp(cmd, "verify") == 0)
                r = cmd_verify(argc - 1, argv + 1);
        else {
                error("unknown command '%s' (create, inspect, verify)", cmd);
                return EXIT_FAILURE;
        }
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
