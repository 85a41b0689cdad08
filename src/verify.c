/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include "fileio.h"
#include "macro.h"
#include "base64.h"
#include "verify.h"

#define READ_CHUNK (64 * 1024)
/* The reference agent caps a decoded signature at 384 bytes (RSA-3072);
 * a DER ECDSA P-384 signature is at most 104. */
#define SIGNATURE_MAX 384
/* A certificate file larger than this is not a certificate. */
#define CERT_FILE_MAX (64 * 1024)

static inline void X509p(X509 **p) { X509_free(*p); }
static inline void EVP_PKEYp(EVP_PKEY **p) { EVP_PKEY_free(*p); }
static inline void EVP_PKEY_CTXp(EVP_PKEY_CTX **p) { EVP_PKEY_CTX_free(*p); }
static inline void EVP_MD_CTXp(EVP_MD_CTX **p) { EVP_MD_CTX_free(*p); }
static inline void BIOp(BIO **p) { BIO_free(*p); }
static inline void X509_STOREp(X509_STORE **p) { X509_STORE_free(*p); }
static inline void X509_STORE_CTXp(X509_STORE_CTX **p) { X509_STORE_CTX_free(*p); }

__attribute__((format(printf, 3, 4)))
static int fail(struct verify_report *report, int error, const char *format, ...) {
        va_list ap;

        va_start(ap, format);
        vsnprintf(report->reason, sizeof(report->reason), format, ap);
        va_end(ap);
        return error;
}

int verify_cert_name(const char *certfile, char *ret_name, size_t size) {
        const char *base;
        size_t len;

        if (!certfile)
                return -EINVAL;
        base = strrchr(certfile, '/');
        base = base ? base + 1 : certfile;
        len = strlen(base);
        if (len == 0 || len > 255 || base[0] == '.' || len >= size)
                return -EINVAL;

        for (size_t i = 0; i < len; i++) {
                char c = base[i];
                bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                          (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
                ret_name[i] = ok ? c : '_';
        }
        ret_name[len] = '\0';
        return 0;
}

static void hex_encode(const uint8_t *data, size_t len, char *out) {
        static const char digits[] = "0123456789abcdef";
        for (size_t i = 0; i < len; i++) {
                out[2 * i] = digits[data[i] >> 4];
                out[2 * i + 1] = digits[data[i] & 0xf];
        }
        out[2 * len] = '\0';
}

/* Digests size bytes from read into md (32 bytes). Returns the read
 * callback's error as is, -ENOMEM/-EIO for OpenSSL failures. */
static int sha256_of(uint64_t size, verify_read_fn read, void *userdata, uint8_t md[static 32]) {
        _cleanup_(EVP_MD_CTXp) EVP_MD_CTX *ctx = NULL;
        _cleanup_free_ uint8_t *buf = NULL;
        unsigned md_len = 0;
        int r;

        ctx = EVP_MD_CTX_new();
        buf = malloc(READ_CHUNK);
        if (!ctx || !buf)
                return -ENOMEM;
        if (EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1)
                return -EIO;

        for (uint64_t offset = 0; offset < size;) {
                size_t len = size - offset < READ_CHUNK ? (size_t) (size - offset) : READ_CHUNK;
                r = read(offset, buf, len, userdata);
                if (r < 0)
                        return r;
                if (EVP_DigestUpdate(ctx, buf, len) != 1)
                        return -EIO;
                offset += len;
        }
        if (EVP_DigestFinal_ex(ctx, md, &md_len) != 1 || md_len != 32)
                return -EIO;
        return 0;
}

int verify_sha256(uint64_t size, verify_read_fn read, void *userdata, char ret_hex[static 65]) {
        uint8_t md[32];
        int r = sha256_of(size, read, userdata, md);
        if (r < 0)
                return r;
        hex_encode(md, sizeof(md), ret_hex);
        return 0;
}

/* Opens name inside trust_dir only: no path from the job is ever opened, and
 * a symlink there is refused rather than followed out of the directory. */
static int load_trusted_cert(const char *trust_dir, const char *name, X509 **ret,
                             struct verify_report *report) {
        _cleanup_close_ int dfd = -1, fd = -1;
        _cleanup_free_ char *pem = NULL;
        _cleanup_(BIOp) BIO *bio = NULL;
        struct stat st;
        X509 *cert;

        if (!trust_dir || !trust_dir[0])
                return fail(report, -ENOKEY, "no trust directory configured");
        dfd = open(trust_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0)
                return fail(report, -ENOKEY, "cannot open trust directory %s: %s", trust_dir, strerror(errno));
        fd = openat(dfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK);
        if (fd < 0) {
                if (errno == ELOOP)
                        return fail(report, -ENOKEY, "certificate %s in %s is a symlink, refused", name, trust_dir);
                return fail(report, -ENOKEY, "no certificate %s in %s: %s", name, trust_dir, strerror(errno));
        }
        if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
                return fail(report, -ENOKEY, "certificate %s in %s is not a regular file", name, trust_dir);
        if (st.st_size > CERT_FILE_MAX)
                return fail(report, -ENOKEY, "certificate %s is larger than %d bytes", name, CERT_FILE_MAX);

        pem = malloc((size_t) st.st_size + 1);
        if (!pem)
                return -ENOMEM;
        if (pread_all(fd, pem, (size_t) st.st_size, 0) < 0)
                return fail(report, -ENOKEY, "cannot read certificate %s", name);

        bio = BIO_new_mem_buf(pem, (int) st.st_size);
        if (!bio)
                return -ENOMEM;
        cert = PEM_read_bio_X509(bio, NULL, NULL, NULL);
        if (!cert)
                return fail(report, -ENOKEY, "%s in %s is not a PEM certificate", name, trust_dir);
        *ret = cert;
        return 0;
}

/* What a code-signing certificate must allow when it says anything at all:
 * AWS Signer requires EKU codeSigning (protocol.md §5). */
static int check_key_usage(X509 *cert, struct verify_report *report) {
        uint32_t flags = X509_get_extension_flags(cert);

        if ((flags & EXFLAG_XKUSAGE) && !(X509_get_extended_key_usage(cert) & XKU_CODE_SIGN))
                return fail(report, -EKEYREJECTED, "certificate %s is not for code signing (extendedKeyUsage)",
                            report->cert_name);
        if ((flags & EXFLAG_KUSAGE) && !(X509_get_key_usage(cert) & KU_DIGITAL_SIGNATURE))
                return fail(report, -EKEYREJECTED, "certificate %s does not allow digitalSignature",
                            report->cert_name);
        return 0;
}

static int check_chain(X509 *cert, const char *signing_ca, struct verify_report *report) {
        _cleanup_(X509_STOREp) X509_STORE *store = NULL;
        _cleanup_(X509_STORE_CTXp) X509_STORE_CTX *ctx = NULL;

        store = X509_STORE_new();
        ctx = X509_STORE_CTX_new();
        if (!store || !ctx)
                return -ENOMEM;
        if (X509_STORE_load_file(store, signing_ca) != 1)
                return fail(report, -EKEYREJECTED, "cannot load signing CA %s", signing_ca);
        /* The configured file is the anchor even when it is an intermediate
         * or the pinned self-signed signer itself. */
        X509_STORE_set_flags(store, X509_V_FLAG_PARTIAL_CHAIN);
        if (X509_STORE_CTX_init(ctx, store, cert, NULL) != 1)
                return -ENOMEM;
        if (X509_verify_cert(ctx) != 1)
                return fail(report, -EKEYREJECTED, "certificate %s is not signed by %s: %s", report->cert_name,
                            signing_ca, X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx)));
        return 0;
}

static int check_key_type(EVP_PKEY *key, struct verify_report *report) {
        char group[64] = "";
        size_t len = 0;

        if (EVP_PKEY_get_base_id(key) != EVP_PKEY_EC)
                return fail(report, -EKEYREJECTED, "certificate %s does not hold an EC key", report->cert_name);
        if (EVP_PKEY_get_group_name(key, group, sizeof(group), &len) != 1)
                return fail(report, -EKEYREJECTED, "certificate %s has an EC key of unknown curve", report->cert_name);
        if (strcmp(group, SN_X9_62_prime256v1) != 0 && strcmp(group, SN_secp384r1) != 0)
                return fail(report, -EKEYREJECTED, "certificate %s uses curve %s, not P-256/P-384",
                            report->cert_name, group);
        return 0;
}

int verify_file(const struct verify_request *req, struct verify_report *report) {
        _cleanup_free_ uint8_t *sig = NULL;
        _cleanup_(X509p) X509 *cert = NULL;
        _cleanup_(EVP_PKEYp) EVP_PKEY *key = NULL;
        _cleanup_(EVP_PKEY_CTXp) EVP_PKEY_CTX *pctx = NULL;
        uint8_t md[32];
        size_t sig_len = 0;
        int r;

        memset(report, 0, sizeof(*report));

        /* Cheap checks first: a job we cannot verify fails before any
         * byte is read back. */
        if (!req->sig_key || strcmp(req->sig_key, VERIFY_SIG_KEY) != 0)
                return fail(report, -EOPNOTSUPP, "unsupported signature type %s (only %s)",
                            req->sig_key ? req->sig_key : "(none)", VERIFY_SIG_KEY);
        if (!req->signature || !req->signature[0])
                return fail(report, -EINVAL, "job file carries no signature");
        r = base64_decode(req->signature, strlen(req->signature), &sig, &sig_len);
        if (r == -ENOMEM)
                return r;
        if (r < 0)
                return fail(report, -EINVAL, "signature is not valid base64");
        if (sig_len < 8 || sig_len > SIGNATURE_MAX)
                return fail(report, -EINVAL, "signature is %zu bytes, not a DER ECDSA signature", sig_len);

        r = verify_cert_name(req->certfile, report->cert_name, sizeof(report->cert_name));
        if (r < 0)
                return fail(report, -ENOKEY, "certfile does not name a file in the trust directory");
        r = load_trusted_cert(req->trust_dir, report->cert_name, &cert, report);
        if (r < 0)
                return r;
        r = check_key_usage(cert, report);
        if (r < 0)
                return r;
        if (req->signing_ca && req->signing_ca[0]) {
                r = check_chain(cert, req->signing_ca, report);
                if (r < 0)
                        return r;
        }
        key = X509_get_pubkey(cert);
        if (!key)
                return fail(report, -EKEYREJECTED, "certificate %s has no usable public key", report->cert_name);
        r = check_key_type(key, report);
        if (r < 0)
                return r;

        r = sha256_of(req->size, req->read, req->userdata, md);
        if (r == -ENOMEM)
                return r;
        if (r < 0)
                return fail(report, -EIO, "cannot read back the data: %s", strerror(-r));
        hex_encode(md, sizeof(md), report->sha256_hex);

        pctx = EVP_PKEY_CTX_new(key, NULL);
        if (!pctx)
                return -ENOMEM;
        if (EVP_PKEY_verify_init(pctx) != 1 || EVP_PKEY_CTX_set_signature_md(pctx, EVP_sha256()) != 1)
                return fail(report, -EKEYREJECTED, "cannot use the key of %s for ECDSA", report->cert_name);
        /* 1: valid; 0: mismatch; <0: malformed DER. Both failures mean the
         * job's signature does not prove these bytes. */
        if (EVP_PKEY_verify(pctx, sig, sig_len, md, sizeof(md)) != 1)
                return fail(report, -EBADMSG, "signature mismatch (sha256 %s, certificate %s)",
                            report->sha256_hex, report->cert_name);

        return fail(report, 0, "signature verified with %s", report->cert_name);
}
