/* SPDX-License-Identifier: MIT */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/asn1.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "config.h"
#include "config_check.h"
#include "log.h"
#include "macro.h"
#include "sandbox.h"

static inline void X509p(X509 **p) { X509_free(*p); }
static inline void EVP_PKEYp(EVP_PKEY **p) { EVP_PKEY_free(*p); }
static inline void X509_stackp(STACK_OF(X509) **p) { sk_X509_pop_free(*p, X509_free); }
static inline void closedirp(DIR **p) {
        if (*p)
                closedir(*p);
}

/* "2026-01-31 12:00:00 UTC": how every date in these messages reads. */
#define TIME_TEXT_MAX 32

static void format_asn1_time(const ASN1_TIME *t, char buf[static TIME_TEXT_MAX]) {
        struct tm tm;

        if (!t || ASN1_TIME_to_tm(t, &tm) != 1 || strftime(buf, TIME_TEXT_MAX, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
                snprintf(buf, TIME_TEXT_MAX, "(unreadable date)");
}

static void format_now(char buf[static TIME_TEXT_MAX]) {
        time_t now = time(NULL);
        struct tm tm;

        if (!gmtime_r(&now, &tm) || strftime(buf, TIME_TEXT_MAX, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
                snprintf(buf, TIME_TEXT_MAX, "(unknown)");
}

enum validity {
        CERT_VALID,
        CERT_EXPIRING, /* valid, but for less than CONFIG_CHECK_EXPIRY_WARNING_DAYS */
        CERT_EXPIRED,
        CERT_NOT_YET_VALID,
};

/* Where cert stands in its validity period now, as OpenSSL's verification
 * will judge it; *ret_days_left (started days, so 9 days and 23 hours are
 * "10") is set for CERT_EXPIRING. */
static enum validity cert_validity(X509 *cert, int *ret_days_left) {
        int days, seconds;

        if (X509_cmp_current_time(X509_get0_notBefore(cert)) >= 0)
                return CERT_NOT_YET_VALID;
        if (X509_cmp_current_time(X509_get0_notAfter(cert)) <= 0)
                return CERT_EXPIRED;
        if (ASN1_TIME_diff(&days, &seconds, NULL, X509_get0_notAfter(cert)) == 1 &&
            days < CONFIG_CHECK_EXPIRY_WARNING_DAYS) {
                *ret_days_left = days + (seconds > 0);
                return CERT_EXPIRING;
        }
        return CERT_VALID;
}

struct cert_dates {
        char not_before[TIME_TEXT_MAX];
        char not_after[TIME_TEXT_MAX];
        char now[TIME_TEXT_MAX];
};

static void cert_dates(X509 *cert, struct cert_dates *ret) {
        format_asn1_time(X509_get0_notBefore(cert), ret->not_before);
        format_asn1_time(X509_get0_notAfter(cert), ret->not_after);
        format_now(ret->now);
}

/* Opens path, which must be a regular file; what names it ("cert_file"). */
static int open_regular(const char *path, const char *what, FILE **ret) {
        _cleanup_fclose_ FILE *f = NULL;
        struct stat st;

        f = fopen(path, "re");
        if (!f)
                return log_error_errno(-errno, "%s %s: %m", what, path);
        if (fstat(fileno(f), &st) < 0)
                return log_error_errno(-errno, "%s %s: %m", what, path);
        if (S_ISDIR(st.st_mode))
                return log_error_errno(-EISDIR, "%s %s is a directory", what, path);
        if (!S_ISREG(st.st_mode))
                return log_error_errno(-EINVAL, "%s %s is not a regular file", what, path);
        *ret = take_ptr(&f);
        return 0;
}

/* Every certificate of a PEM file, in order; other PEM blocks (a key, a
 * CRL) are passed over as OpenSSL does when it loads the file. An empty
 * stack when there is none. -EBADMSG, logged, when a CERTIFICATE block
 * does not parse. */
static int read_pem_certs(const char *path, const char *what, STACK_OF(X509) **ret) {
        _cleanup_(X509_stackp) STACK_OF(X509) *certs = NULL;
        _cleanup_fclose_ FILE *f = NULL;
        unsigned long e;
        X509 *cert;
        int r;

        r = open_regular(path, what, &f);
        if (r < 0)
                return r;
        certs = sk_X509_new_null();
        if (!certs)
                return log_error_errno(-ENOMEM, "Out of memory");
        ERR_clear_error();
        while ((cert = PEM_read_X509(f, NULL, NULL, NULL)))
                if (!sk_X509_push(certs, cert)) {
                        X509_free(cert);
                        return log_error_errno(-ENOMEM, "Out of memory");
                }
        /* The end of the file shows as "no start line"; anything else is a
         * block that does not parse. */
        e = ERR_peek_last_error();
        ERR_clear_error();
        if (e != 0 && !(ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE))
                return log_error_errno(-EBADMSG, "%s %s: certificate %d does not parse (%s): replace the file with an intact copy",
                                       what, path, sk_X509_num(certs) + 1,
                                       ERR_reason_error_string(e) ? ERR_reason_error_string(e) : "unknown error");
        *ret = take_ptr(&certs);
        return 0;
}

/* A file of CA certificates that otad (or libcurl) verifies a peer with:
 * used_for says whose certificate, for the messages. At least one of its
 * certificates must be valid now; an expired one is worth a warning. */
static int check_ca_file(const char *path, const char *what, const char *used_for, unsigned *warnings) {
        _cleanup_(X509_stackp) STACK_OF(X509) *certs = NULL;
        int r, usable = 0;

        r = read_pem_certs(path, what, &certs);
        if (r < 0)
                return r;
        if (sk_X509_num(certs) == 0)
                return log_error_errno(-EBADMSG,
                                       "%s %s holds no PEM certificate (no -----BEGIN CERTIFICATE----- block): %s cannot be verified",
                                       what, path, used_for);
        for (int i = 0; i < sk_X509_num(certs); i++) {
                X509 *cert = sk_X509_value(certs, i);
                char subject[256];
                struct cert_dates d;
                int days = 0;

                X509_NAME_oneline(X509_get_subject_name(cert), subject, sizeof(subject));
                cert_dates(cert, &d);
                switch (cert_validity(cert, &days)) {
                case CERT_VALID:
                        usable++;
                        break;
                case CERT_EXPIRING:
                        usable++;
                        log_warning("%s %s: certificate %s expires on %s, in %d day%s: %s cannot be verified through it after that",
                                    what, path, subject, d.not_after, days, days == 1 ? "" : "s", used_for);
                        ++*warnings;
                        break;
                case CERT_EXPIRED:
                case CERT_NOT_YET_VALID:
                        log_warning("%s %s: certificate %s is valid from %s until %s, not now (%s): %s cannot be verified through it",
                                    what, path, subject, d.not_before, d.not_after, d.now, used_for);
                        ++*warnings;
                        break;
                }
        }
        if (usable == 0)
                return log_error_errno(-EKEYEXPIRED,
                                       "%s %s: none of its certificates is valid now, so %s cannot be verified: "
                                       "check the system clock (timedatectl), or install a current CA certificate",
                                       what, path, used_for);
        return 0;
}

/* The device certificate: the first certificate of cert_file (more may
 * follow as its chain). */
static int load_client_cert(const char *path, X509 **ret) {
        _cleanup_(X509_stackp) STACK_OF(X509) *certs = NULL;
        X509 *leaf;
        int r;

        r = read_pem_certs(path, "cert_file", &certs);
        if (r < 0)
                return r;
        if (sk_X509_num(certs) == 0)
                return log_error_errno(-EBADMSG,
                                       "cert_file %s holds no PEM certificate (no -----BEGIN CERTIFICATE----- block): "
                                       "put the device certificate there in PEM (openssl x509 -inform der converts DER)",
                                       path);
        leaf = sk_X509_value(certs, 0);
        if (X509_up_ref(leaf) != 1)
                return log_error_errno(-ENOMEM, "Out of memory");
        *ret = leaf;
        return 0;
}

/* AWS IoT refuses a device certificate outside its validity period at the
 * TLS handshake, and says nothing more than that the handshake failed. */
static int check_client_cert_dates(X509 *cert, const char *path, unsigned *warnings) {
        struct cert_dates d;
        int days = 0;

        cert_dates(cert, &d);
        switch (cert_validity(cert, &days)) {
        case CERT_VALID:
                return 0;
        case CERT_EXPIRING:
                log_warning("cert_file %s expires on %s, in %d day%s: the broker will refuse it after that; "
                            "rotate the device certificate before then",
                            path, d.not_after, days, days == 1 ? "" : "s");
                ++*warnings;
                return 0;
        case CERT_EXPIRED:
                return log_error_errno(-EKEYEXPIRED,
                                       "cert_file %s has expired: valid from %s until %s, now is %s. The broker will refuse it: "
                                       "create a new certificate for this thing and configure it",
                                       path, d.not_before, d.not_after, d.now);
        case CERT_NOT_YET_VALID:
                return log_error_errno(-EKEYEXPIRED,
                                       "cert_file %s is not valid yet: valid from %s until %s, now is %s. The broker will refuse it: "
                                       "check the system clock (timedatectl)",
                                       path, d.not_before, d.not_after, d.now);
        }
        return 0;
}

static int passphrase_refused(char *buf, int size, int rwflag, void *userdata) {
        *(bool *) userdata = true;
        return -1;
}

/* A private key others can read is a stolen device identity waiting to
 * happen; refuse it like ssh does. */
static int check_key_mode(const char *path) {
        struct stat st;

        if (stat(path, &st) < 0)
                return log_error_errno(-errno, "key_file %s: %m", path);
        if (st.st_mode & (S_IRWXG | S_IRWXO))
                return log_error_errno(-EPERM, "key_file %s is accessible by group or others (mode %04o); run chmod 600 %s",
                                       path, (unsigned) (st.st_mode & 07777), path);
        return 0;
}

static int load_private_key(const char *path, EVP_PKEY **ret) {
        _cleanup_fclose_ FILE *f = NULL;
        bool asked_passphrase = false;
        EVP_PKEY *key;
        int r;

        r = open_regular(path, "key_file", &f);
        if (r < 0)
                return r;
        ERR_clear_error();
        key = PEM_read_PrivateKey(f, NULL, passphrase_refused, &asked_passphrase);
        ERR_clear_error();
        /* libmosquitto would ask on a terminal the daemon does not have. */
        if (!key && asked_passphrase)
                return log_error_errno(-EKEYREJECTED,
                                       "key_file %s is encrypted and otad cannot ask for its passphrase: "
                                       "store it decrypted (openssl pkey -in %s -out NEW) with mode 0600",
                                       path, path);
        if (!key)
                return log_error_errno(-EBADMSG, "key_file %s holds no PEM private key (no -----BEGIN ... PRIVATE KEY----- block)",
                                       path);
        *ret = key;
        return 0;
}

/* The handshake fails, with a message about neither file, when the key is
 * not the one the certificate was issued for. */
static int check_key_matches(X509 *cert, EVP_PKEY *key, const char *cert_path, const char *key_path) {
        EVP_PKEY *public = X509_get0_pubkey(cert);
        int r;

        if (!public) {
                ERR_clear_error();
                return log_error_errno(-EBADMSG, "cert_file %s: its public key does not parse", cert_path);
        }
        r = EVP_PKEY_eq(public, key);
        ERR_clear_error();
        if (r == 1)
                return 0;
        if (r == -1)
                return log_error_errno(-EKEYREJECTED,
                                       "key_file %s is an %s key but cert_file %s holds an %s public key: "
                                       "they are not a pair; configure the key the certificate was issued for",
                                       key_path, EVP_PKEY_get0_type_name(key), cert_path, EVP_PKEY_get0_type_name(public));
        return log_error_errno(-EKEYREJECTED,
                               "key_file %s does not belong to cert_file %s (their public keys differ), so the TLS handshake "
                               "would fail: configure the key the certificate was issued for",
                               key_path, cert_path);
}

#define CHECK(expr)                             \
        do {                                    \
                int _r = (expr);                \
                if (_r < 0 && first == 0)       \
                        first = _r;             \
        } while (0)

static int check_mqtt_credentials(const struct otad_config *c, unsigned *warnings) {
        _cleanup_(X509p) X509 *cert = NULL;
        _cleanup_(EVP_PKEYp) EVP_PKEY *key = NULL;
        int first = 0, r;

        CHECK(check_ca_file(c->mqtt.ca_file, "ca_file", "the broker's certificate", warnings));
        CHECK(load_client_cert(c->mqtt.cert_file, &cert));
        if (cert)
                CHECK(check_client_cert_dates(cert, c->mqtt.cert_file, warnings));
        r = check_key_mode(c->mqtt.key_file);
        CHECK(r);
        if (r == 0 || r == -EPERM) /* else the file is not there to read */
                CHECK(load_private_key(c->mqtt.key_file, &key));
        if (cert && key)
                CHECK(check_key_matches(cert, key, c->mqtt.cert_file, c->mqtt.key_file));
        return first;
}

static int check_exists(const char *path, const char *what, bool want_dir) {
        struct stat st;

        if (stat(path, &st) < 0)
                return log_error_errno(-errno, "%s %s: %m", what, path);
        if (want_dir && !S_ISDIR(st.st_mode))
                return log_error_errno(-ENOTDIR, "%s %s is not a directory", what, path);
        if (!want_dir && S_ISDIR(st.st_mode))
                return log_error_errno(-EISDIR, "%s %s is a directory", what, path);
        return 0;
}

/* One code-signing certificate in trust_dir, opened the way verify.c
 * opens it (no symlinks). Problems here fail only the jobs that name the
 * file, so they are warnings. */
static void check_signer_cert(const struct otad_config *c, int dfd, const char *name, unsigned *warnings, bool *ret_found) {
        const char *dir = c->ota.trust_dir;
        _cleanup_(X509p) X509 *cert = NULL;
        _cleanup_fclose_ FILE *f = NULL;
        struct cert_dates d;
        struct stat st;
        int fd, days = 0;

        if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
                return;
        if (S_ISLNK(st.st_mode)) {
                log_warning("trust_dir %s: %s is a symlink, which otad refuses to follow: copy the certificate there instead",
                            dir, name);
                ++*warnings;
                return;
        }
        if (!S_ISREG(st.st_mode))
                return;
        fd = openat(dfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY);
        f = fd >= 0 ? fdopen(fd, "re") : NULL;
        if (!f) {
                int error = errno;

                if (fd >= 0)
                        close(fd);
                log_warning_errno(-error, "trust_dir %s: cannot read %s: %m", dir, name);
                ++*warnings;
                return;
        }
        cert = PEM_read_X509(f, NULL, NULL, NULL);
        ERR_clear_error();
        if (!cert) {
                log_warning("trust_dir %s: %s holds no PEM certificate: jobs whose certfile names it will fail", dir, name);
                ++*warnings;
                return;
        }
        *ret_found = true;
        cert_dates(cert, &d);
        switch (cert_validity(cert, &days)) {
        case CERT_VALID:
                break;
        case CERT_EXPIRING:
                log_warning("trust_dir %s: code-signing certificate %s expires on %s, in %d day%s%s", dir, name, d.not_after,
                            days, days == 1 ? "" : "s",
                            *c->ota.signing_ca ? ": jobs signed with it will fail the chain check against signing_ca after that" : "");
                ++*warnings;
                break;
        case CERT_EXPIRED:
        case CERT_NOT_YET_VALID:
                if (*c->ota.signing_ca)
                        log_warning("trust_dir %s: code-signing certificate %s is valid from %s until %s, not now (%s): "
                                    "jobs signed with it will fail the chain check against signing_ca %s",
                                    dir, name, d.not_before, d.not_after, d.now, c->ota.signing_ca);
                else
                        log_warning("trust_dir %s: code-signing certificate %s is valid from %s until %s, not now (%s); "
                                    "otad checks no dates without signing_ca, but sign new images with a current one",
                                    dir, name, d.not_before, d.not_after, d.now);
                ++*warnings;
                break;
        }
}

static int check_trust_dir(const struct otad_config *c, unsigned *warnings) {
        _cleanup_(closedirp) DIR *d = NULL;
        struct dirent *de;
        bool found = false;
        int r;

        r = check_exists(c->ota.trust_dir, "trust_dir", true);
        if (r < 0)
                return r;
        d = opendir(c->ota.trust_dir);
        if (!d)
                return log_error_errno(-errno, "trust_dir %s: %m", c->ota.trust_dir);
        /* verify_cert_name() never maps a job's certfile to a name starting
         * with '.', so such files are never used. */
        while ((de = readdir(d)))
                if (de->d_name[0] != '.')
                        check_signer_cert(c, dirfd(d), de->d_name, warnings, &found);
        if (!found) {
                log_warning("trust_dir %s holds no code-signing certificate: every OTA job will fail its signature check "
                            "until the certificate its certfile names is there",
                            c->ota.trust_dir);
                ++*warnings;
        }
        return 0;
}

static int check_ota_certificates(const struct otad_config *c, unsigned *warnings) {
        int first = 0;

        if (c->n_targets > 0)
                CHECK(check_trust_dir(c, warnings));
        if (*c->ota.signing_ca)
                CHECK(check_ca_file(c->ota.signing_ca, "signing_ca", "code-signing certificates", warnings));
        if (*c->ota.http_ca_file)
                CHECK(check_ca_file(c->ota.http_ca_file, "http_ca_file", "the HTTPS server's certificate", warnings));
        return first;
}

static int check_targets_and_bootloader(const struct otad_config *c, unsigned *warnings) {
        int first = 0;

        for (size_t i = 0; i < c->n_targets; i++)
                if (c->targets[i].type == TARGET_FILE)
                        CHECK(check_exists(c->targets[i].directory, "target directory", true));
        for (size_t i = 0; i < c->n_slots; i++)
                CHECK(check_exists(c->slots[i].device, "slot device", false));
        if (c->bootloader.type == BOOTLOADER_GRUB)
                CHECK(check_exists(c->bootloader.grubenv, "grubenv", false));
        if (c->bootloader.type == BOOTLOADER_UBOOT)
                CHECK(check_exists(c->bootloader.fw_env_config, "fw_env_config", false));
        return first;
}

/* otad.service's ProtectSystem=strict keeps a file target it does not open
 * read-only: its first job would fail with EROFS. Say so now, with the
 * drop-in that opens it. */
static int check_sandbox(const struct otad_config *c, unsigned *warnings) {
        int first = 0;

        for (size_t i = 0; i < c->n_targets; i++)
                if (c->targets[i].type == TARGET_FILE)
                        CHECK(sandbox_check_writable(c->targets[i].directory, "target directory"));
        return first;
}

/* Each check logs every problem it finds and returns the first error; a
 * new check is one function and one line here. */
static const struct {
        const char *name;
        int (*run)(const struct otad_config *c, unsigned *warnings);
} checks[] = {
        { "MQTT credentials", check_mqtt_credentials },
        { "code-signing and HTTPS certificates", check_ota_certificates },
        { "targets and bootloader", check_targets_and_bootloader },
        { "otad.service's sandbox", check_sandbox },
};

int config_check(const struct otad_config *c, unsigned *warnings) {
        int first = 0;

        for (size_t i = 0; i < ELEMENTSOF(checks); i++) {
                log_debug("Checking %s", checks[i].name);
                CHECK(checks[i].run(c, warnings));
        }
        return first;
}
