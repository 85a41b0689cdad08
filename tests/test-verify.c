/* SPDX-License-Identifier: MIT */
/* Unit tests of verify: keys, certificates and signatures are made at test
 * time with the openssl CLI in a temporary directory. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fileio.h"
#include "macro.h"
#include "tap.h"
#include "base64.h"
#include "verify.h"

static char dir[] = "/tmp/test-verify.XXXXXX";
static char trust[300];

struct memdata {
        const uint8_t *data;
        size_t len;
        unsigned reads;
};

static int mem_read(uint64_t offset, void *buf, size_t len, void *userdata) {
        struct memdata *m = userdata;
        m->reads++;
        if (offset > m->len || len > m->len - offset)
                return -EIO; /* truncated target */
        memcpy(buf, m->data + offset, len);
        return 0;
}

#define sh(...) tap_sh(dir, __VA_ARGS__)

static char *slurp(const char *name) {
        _cleanup_free_ char *p = NULL;
        char *data = NULL;
        if (asprintf(&p, "%s/%s", dir, name) < 0)
                abort();
        if (read_file_full(p, 1 << 20, &data, NULL) < 0)
                return strdup("");
        data[strcspn(data, "\n")] = '\0';
        return data;
}

static int run(const char *sig_key, const char *sig, const char *certfile, const char *ca,
               struct memdata *m, uint64_t size, struct verify_report *rep) {
        struct verify_request req = {
                .sig_key = sig_key,
                .signature = sig,
                .certfile = certfile,
                .trust_dir = trust,
                .signing_ca = ca,
                .size = size,
                .read = mem_read,
                .userdata = m,
        };
        int r = verify_file(&req, rep);
        tap_diag("%s", rep->reason);
        return r;
}

static void test_base64(void) {
        static const struct {
                const char *in, *out;
        } good[] = {
                { "", "" }, { "Zg==", "f" }, { "Zm8=", "fo" }, { "Zm9v", "foo" },
                { "Zm9vYg==", "foob" }, { "Zm9vYmE=", "fooba" }, { "Zm9vYmFy", "foobar" },
                { "Zm9v\r\nYmFy\n", "foobar" }, { " Zm 9v Ym E= ", "fooba" },
        };
        static const char *const bad[] = {
                "Zg=", "Zg", "Z===", "Zm9v=", "Zh==", "Zm9=", "Zg==Zg==", "Zm9v*mFy", "=Zm9", "Zm9v====", "Zm-v", "Zm_v",
        };

        for (size_t i = 0; i < ELEMENTSOF(good); i++) {
                _cleanup_free_ uint8_t *out = NULL;
                size_t n = 99;
                int r = base64_decode(good[i].in, strlen(good[i].in), &out, &n);
                tap_ok(r == 0 && n == strlen(good[i].out) && memcmp(out, good[i].out, n) == 0,
                       "base64 good[%zu] decodes to \"%s\"", i, good[i].out);
        }
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                uint8_t *out = NULL;
                size_t n = 99;
                int r = base64_decode(bad[i], strlen(bad[i]), &out, &n);
                tap_ok(r == -EINVAL && !out && n == 99, "base64 \"%s\" rejected, outputs untouched", bad[i]);
        }
        tap_ok(base64_decode("Zm\0v", 4, &(uint8_t *){ NULL }, &(size_t){ 0 }) == -EINVAL, "embedded NUL rejected");

        /* protocol.md §8.2 test vector */
        const char *v = "MEQCIF2QDvww1G/kpRGZ8FYvQrok1bSZvXjXefRk7sqNcyPTAiB4dvGt8fozIY5NC0vUDJ2MY42ZERYEcrbwA4n6q7vrBg==";
        static const uint8_t head[] = { 0x30, 0x44, 0x02, 0x20, 0x5d, 0x90, 0x0e, 0xfc };
        _cleanup_free_ uint8_t *out = NULL;
        size_t n = 0;
        tap_ok(base64_decode(v, strlen(v), &out, &n) == 0 && n == 70 && memcmp(out, head, sizeof(head)) == 0 &&
               out[69] == 0x06, "protocol.md 8.2 signature decodes to 70 DER bytes");
}

static void test_cert_name(void) {
        static const struct {
                const char *in, *out;
        } map[] = {
                { "ecdsa-sha256-signer.crt.pem", "ecdsa-sha256-signer.crt.pem" },
                { "/certs/x.pem", "x.pem" },
                { "Code Verify Key", "Code_Verify_Key" },
                { "../x", "x" },
                { "/etc/passwd", "passwd" },
                { "a\\b", "a_b" },
        };
        static const char *const refused[] = { "", "/", "certs/", "..", ".", "/a/..", ".hidden", "x/.pem" };
        char name[256];

        for (size_t i = 0; i < ELEMENTSOF(map); i++) {
                int r = verify_cert_name(map[i].in, name, sizeof(name));
                tap_ok(r == 0 && strcmp(name, map[i].out) == 0, "certfile \"%s\" -> \"%s\"", map[i].in, map[i].out);
        }
        for (size_t i = 0; i < ELEMENTSOF(refused); i++)
                tap_is_int(verify_cert_name(refused[i], name, sizeof(name)), -EINVAL, refused[i]);
        tap_is_int(verify_cert_name(NULL, name, sizeof(name)), -EINVAL, "NULL certfile refused");
        char big[300];
        memset(big, 'a', sizeof(big) - 1);
        big[sizeof(big) - 1] = '\0';
        tap_is_int(verify_cert_name(big, name, sizeof(name)), -EINVAL, "over-long certfile refused");
}

#define EC256 "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1"
#define EC384 "-newkey ec -pkeyopt ec_paramgen_curve:secp384r1"
#define CS_EXT "-addext keyUsage=critical,digitalSignature -addext extendedKeyUsage=codeSigning"

static void make_pki(void) {
        int r = 0;
        r |= sh("mkdir trust outside");
        /* A CA and a signer it issued (EKU codeSigning), like an ACM import. */
        r |= sh("openssl req -x509 " EC256 " -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=test-ca "
                "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign");
        r |= sh("openssl req " EC256 " -nodes -keyout signer.key -out signer.csr -subj /CN=signer");
        r |= sh("printf 'keyUsage=critical,digitalSignature\\nextendedKeyUsage=codeSigning\\n' > cs.ext && "
                "openssl x509 -req -in signer.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 "
                "-extfile cs.ext -out trust/signer.pem");
        /* A self-signed P-384 signer, a foreign key, a TLS-only cert, an RSA cert. */
        r |= sh("openssl req -x509 " EC384 " -nodes -keyout p384.key -out trust/p384.pem -days 2 -subj /CN=p384 " CS_EXT);
        r |= sh("openssl req -x509 " EC256 " -nodes -keyout other.key -out outside/x -days 2 -subj /CN=other " CS_EXT);
        r |= sh("openssl req -x509 " EC256 " -nodes -keyout other2.key -out other-ca.crt -days 2 -subj /CN=other-ca");
        r |= sh("openssl req -x509 " EC256 " -nodes -keyout tls.key -out trust/tls.pem -days 2 -subj /CN=tls "
                "-addext extendedKeyUsage=serverAuth");
        r |= sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout rsa.key -out trust/rsa.pem -days 2 -subj /CN=rsa");
        r |= sh("cp trust/signer.pem trust/Code_Verify_Key && ln -s ../outside/x trust/link.pem && "
                "echo 'not a cert' > trust/junk.pem");
        /* The data: 300 KiB + 7 bytes, so verification spans several 64 KiB chunks. */
        r |= sh("head -c 307207 /dev/urandom > data.bin");
        r |= sh("openssl dgst -sha256 -sign signer.key data.bin | openssl base64 -A > good.b64");
        r |= sh("openssl dgst -sha256 -sign p384.key data.bin | openssl base64 -A > p384.b64");
        r |= sh("openssl dgst -sha256 -sign other.key data.bin | openssl base64 -A > other.b64");
        r |= sh("openssl dgst -sha256 -sign tls.key data.bin | openssl base64 -A > tls.b64");
        r |= sh("openssl dgst -sha256 -sign rsa.key data.bin | openssl base64 -A > rsa.b64");
        r |= sh("openssl base64 -A -d -in good.b64 | openssl base64 > good-wrapped.b64; " /* 64-col lines */
                "sha256sum data.bin | cut -d' ' -f1 > data.sha256");
        tap_is_int(r, 0, "test PKI and signatures made with the openssl CLI");
}

static void test_verify(void) {
        _cleanup_free_ char *data = NULL, *good = slurp("good.b64"), *p384 = slurp("p384.b64");
        _cleanup_free_ char *other = slurp("other.b64"), *tls = slurp("tls.b64"), *rsa = slurp("rsa.b64");
        _cleanup_free_ char *want_sha = slurp("data.sha256"), *wrapped = NULL, *path = NULL;
        _cleanup_free_ char *ca = NULL, *other_ca = NULL;
        struct verify_report rep;
        size_t len = 0;

        if (asprintf(&path, "%s/data.bin", dir) < 0 || asprintf(&ca, "%s/ca.crt", dir) < 0 ||
            asprintf(&other_ca, "%s/other-ca.crt", dir) < 0)
                abort();
        if (read_file_full(path, 1 << 20, &data, &len) < 0)
                abort();
        free(path);
        if (asprintf(&path, "%s/good-wrapped.b64", dir) < 0 || read_file_full(path, 1 << 20, &wrapped, NULL) < 0)
                abort();

        struct memdata m = { .data = (const uint8_t *) data, .len = len };

        tap_is_int(run(VERIFY_SIG_KEY, good, "signer.pem", NULL, &m, len, &rep), 0, "good signature verifies");
        tap_is_str(rep.sha256_hex, want_sha, "reported SHA-256 equals sha256sum");
        tap_ok(m.reads == (len + 65535) / 65536, "data read in 64 KiB chunks (%u reads)", m.reads);
        tap_is_int(run(VERIFY_SIG_KEY, wrapped, "signer.pem", NULL, &m, len, &rep), 0,
                   "signature with line breaks verifies");
        tap_is_int(run(VERIFY_SIG_KEY, good, "/opt/certs/signer.pem", NULL, &m, len, &rep), 0,
                   "certfile with a directory prefix maps to its name in trust_dir");
        tap_is_int(run(VERIFY_SIG_KEY, good, "Code Verify Key", NULL, &m, len, &rep), 0,
                   "\"Code Verify Key\" maps to Code_Verify_Key");
        tap_is_int(run(VERIFY_SIG_KEY, p384, "p384.pem", NULL, &m, len, &rep), 0, "P-384 key verifies");
        tap_is_int(run(VERIFY_SIG_KEY, good, "signer.pem", ca, &m, len, &rep), 0, "chain check against the CA passes");
        _cleanup_free_ char *pinned = NULL;
        if (asprintf(&pinned, "%s/p384.pem", trust) < 0)
                abort();
        tap_is_int(run(VERIFY_SIG_KEY, p384, "p384.pem", pinned, &m, len, &rep), 0,
                   "chain check against the self-signed signer itself passes");
        tap_is_int(run(VERIFY_SIG_KEY, good, "signer.pem", pinned, &m, len, &rep), -EKEYREJECTED,
                   "chain check against an unrelated pinned cert: -EKEYREJECTED");

        tap_is_int(run(VERIFY_SIG_KEY, good, "signer.pem", other_ca, &m, len, &rep), -EKEYREJECTED,
                   "chain check against another CA: -EKEYREJECTED");
        tap_is_int(run(VERIFY_SIG_KEY, good, "p384.pem", NULL, &m, len, &rep), -EBADMSG,
                   "signature checked with the wrong certificate: -EBADMSG");
        tap_is_int(run(VERIFY_SIG_KEY, other, "signer.pem", NULL, &m, len, &rep), -EBADMSG,
                   "signature by another key: -EBADMSG");
        tap_is_int(run(VERIFY_SIG_KEY, tls, "tls.pem", NULL, &m, len, &rep), -EKEYREJECTED,
                   "certificate without EKU codeSigning: -EKEYREJECTED");
        tap_is_int(run(VERIFY_SIG_KEY, rsa, "rsa.pem", NULL, &m, len, &rep), -EKEYREJECTED,
                   "RSA certificate: -EKEYREJECTED");
        tap_is_int(run("sig-sha1-rsa", rsa, "rsa.pem", NULL, &m, len, &rep), -EOPNOTSUPP,
                   "sig-sha1-rsa: -EOPNOTSUPP");
        tap_is_int(run("sig--", good, "signer.pem", NULL, &m, len, &rep), -EOPNOTSUPP, "sig--: -EOPNOTSUPP");
        tap_is_int(run(VERIFY_SIG_KEY, good, "nosuch.pem", NULL, &m, len, &rep), -ENOKEY, "unknown cert: -ENOKEY");
        tap_is_int(run(VERIFY_SIG_KEY, other, "../outside/x", NULL, &m, len, &rep), -ENOKEY,
                   "certfile ../outside/x does not leave trust_dir: -ENOKEY");
        tap_is_int(run(VERIFY_SIG_KEY, other, "/etc/passwd", NULL, &m, len, &rep), -ENOKEY, "/etc/passwd: -ENOKEY");
        tap_is_int(run(VERIFY_SIG_KEY, other, "link.pem", NULL, &m, len, &rep), -ENOKEY,
                   "symlink in trust_dir refused: -ENOKEY");
        tap_is_int(run(VERIFY_SIG_KEY, good, "junk.pem", NULL, &m, len, &rep), -ENOKEY, "non-PEM cert: -ENOKEY");
        tap_is_int(run(VERIFY_SIG_KEY, good, "..", NULL, &m, len, &rep), -ENOKEY, "certfile ..: -ENOKEY");
        tap_is_int(run(VERIFY_SIG_KEY, good, NULL, NULL, &m, len, &rep), -ENOKEY, "no certfile: -ENOKEY");
        tap_is_int(run(VERIFY_SIG_KEY, "MEQC!!==", "signer.pem", NULL, &m, len, &rep), -EINVAL, "bad base64: -EINVAL");
        tap_is_int(run(VERIFY_SIG_KEY, "", "signer.pem", NULL, &m, len, &rep), -EINVAL, "empty signature: -EINVAL");
        tap_is_int(run(VERIFY_SIG_KEY, "AAAA", "signer.pem", NULL, &m, len, &rep), -EINVAL,
                   "3-byte signature: -EINVAL");

        /* Short data: filesize promises more than the target holds. */
        m.reads = 0;
        tap_is_int(run(VERIFY_SIG_KEY, good, "signer.pem", NULL, &m, len + 1, &rep), -EIO,
                   "truncated data (read fails): -EIO");
        /* Verifying fewer bytes than were signed. */
        tap_is_int(run(VERIFY_SIG_KEY, good, "signer.pem", NULL, &m, len - 1, &rep), -EBADMSG,
                   "one byte short: -EBADMSG");

        /* One flipped bit anywhere breaks it; the first and last bytes too. */
        size_t where[] = { 0, 65536, len - 1 };
        for (size_t i = 0; i < ELEMENTSOF(where); i++) {
                data[where[i]] ^= 0x01;
                tap_is_int(run(VERIFY_SIG_KEY, good, "signer.pem", NULL, &m, len, &rep), -EBADMSG,
                           "flipped bit at offset: -EBADMSG");
                data[where[i]] ^= 0x01;
        }
        tap_is_int(run(VERIFY_SIG_KEY, good, "signer.pem", NULL, &m, len, &rep), 0, "restored data verifies again");
}

int main(void) {
        if (!mkdtemp(dir)) {
                perror("mkdtemp");
                return 1;
        }
        snprintf(trust, sizeof(trust), "%s/trust", dir);

        test_base64();
        test_cert_name();
        make_pki();
        test_verify();

        sh("rm -rf '%s'", dir);
        return tap_done();
}
