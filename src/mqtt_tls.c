/* SPDX-License-Identifier: MIT */
/*
 * libmosquitto 2.0 connects to the host string it is given and uses that
 * same string for SNI and for its own host name check. To connect to one
 * resolved address at a time and still verify the endpoint's name, mqtt.c
 * hands libmosquitto the numeric address and this context (MOSQ_OPT_SSL_CTX
 * without its defaults): OpenSSL checks the name (X509_VERIFY_PARAM), and
 * the handshake-start callback puts the name into SNI before the
 * ClientHello is built. The same callbacks record what went wrong, from
 * OpenSSL's side and from the broker's alert, in our own words.
 */
#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "macro.h"
#include "mqtt_tls.h"

#define ALPN_AWS_MQTT "\x0e" "x-amzn-mqtt-ca" /* AWS IoT: MQTT with client certificates on 443 */

struct mqtt_tls {
        SSL_CTX *ctx;
        char *host;
        bool host_is_ip;
        struct mqtt_tls_files files;

        /* Our certificate as last loaded. */
        int cert_validity; /* <0 not yet valid, >0 expired, 0 valid */
        char cert_not_before[40], cert_not_after[40];

        /* The current attempt. */
        SSL *ssl; /* our reference, see mqtt_tls_attempt_hold() */
        bool handshake_done;
        long verify_error; /* X509_V_OK: none */
        int verify_depth;
        char verify_subject[160], verify_issuer[160], verify_names[200], verify_time[40];
        int alert_received; /* -1: none */
        char ssl_error[200];
};

static void format_time(const ASN1_TIME *at, char *buf, size_t size) {
        struct tm tm;

        if (!at || !ASN1_TIME_to_tm(at, &tm) || strftime(buf, size, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
                snprintf(buf, size, "(unknown)");
}

static void format_now(char *buf, size_t size) {
        time_t now = time(NULL);
        struct tm tm;

        if (!gmtime_r(&now, &tm) || strftime(buf, size, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
                snprintf(buf, size, "(unknown)");
}

static void format_name(const X509_NAME *name, char *buf, size_t size) {
        BIO *bio = BIO_new(BIO_s_mem());
        char *data;
        long n;

        buf[0] = '\0';
        if (!bio)
                return;
        if (X509_NAME_print_ex(bio, name, 0, XN_FLAG_RFC2253) >= 0) {
                n = BIO_get_mem_data(bio, &data);
                snprintf(buf, size, "%.*s", (int) (n > 0 ? n : 0), data);
        }
        BIO_free(bio);
}

/* "DNS:a, DNS:b, IP:192.0.2.1": the names a certificate is valid for. */
static void format_names(X509 *cert, char *buf, size_t size) {
        GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
        size_t used = 0;

        buf[0] = '\0';
        for (int i = 0; names && i < sk_GENERAL_NAME_num(names) && used < size; i++) {
                const GENERAL_NAME *gn = sk_GENERAL_NAME_value(names, i);
                char ip[INET6_ADDRSTRLEN] = "";
                int n = 0;

                if (gn->type == GEN_DNS)
                        n = snprintf(buf + used, size - used, "%sDNS:%.*s", used ? ", " : "",
                                     ASN1_STRING_length(gn->d.dNSName),
                                     (const char *) ASN1_STRING_get0_data(gn->d.dNSName));
                else if (gn->type == GEN_IPADD && (ASN1_STRING_length(gn->d.iPAddress) == 4 ||
                                                    ASN1_STRING_length(gn->d.iPAddress) == 16)) {
                        inet_ntop(ASN1_STRING_length(gn->d.iPAddress) == 4 ? AF_INET : AF_INET6,
                                  ASN1_STRING_get0_data(gn->d.iPAddress), ip, sizeof(ip));
                        n = snprintf(buf + used, size - used, "%sIP:%s", used ? ", " : "", ip);
                }
                if (n > 0)
                        used += (size_t) n;
        }
        GENERAL_NAMES_free(names);
        if (!buf[0]) {
                char subject[120];

                format_name(X509_get_subject_name(cert), subject, sizeof(subject));
                snprintf(buf, size, "only the subject %s, no subjectAltName", subject);
        }
}

static struct mqtt_tls *tls_of(const SSL *ssl) {
        return ssl ? SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl)) : NULL;
}

/* Keeps the first failure of the chain as OpenSSL saw it; the verdict
 * stays OpenSSL's. */
static int on_verify(int ok, X509_STORE_CTX *store) {
        SSL *ssl = X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
        struct mqtt_tls *t = tls_of(ssl);
        X509 *cert = X509_STORE_CTX_get_current_cert(store);
        long error = X509_STORE_CTX_get_error(store);

        if (ok || !t || t->verify_error != X509_V_OK)
                return ok;
        t->verify_error = error;
        t->verify_depth = X509_STORE_CTX_get_error_depth(store);
        if (!cert)
                return ok;
        format_name(X509_get_subject_name(cert), t->verify_subject, sizeof(t->verify_subject));
        format_name(X509_get_issuer_name(cert), t->verify_issuer, sizeof(t->verify_issuer));
        if (error == X509_V_ERR_HOSTNAME_MISMATCH || error == X509_V_ERR_IP_ADDRESS_MISMATCH)
                format_names(cert, t->verify_names, sizeof(t->verify_names));
        else if (error == X509_V_ERR_CERT_HAS_EXPIRED)
                format_time(X509_get0_notAfter(cert), t->verify_time, sizeof(t->verify_time));
        else if (error == X509_V_ERR_CERT_NOT_YET_VALID)
                format_time(X509_get0_notBefore(cert), t->verify_time, sizeof(t->verify_time));
        return ok;
}

static void on_info(const SSL *ssl, int where, int value) {
        struct mqtt_tls *t = tls_of(ssl);

        if (!t)
                return;
        /* Before the ClientHello is built: SNI names the endpoint, not the
         * address libmosquitto was given (AWS IoT requires SNI). RFC 6066
         * allows no IP literal there. */
        if ((where & SSL_CB_HANDSHAKE_START) && !t->host_is_ip)
                (void) SSL_set_tlsext_host_name((SSL *) ssl, t->host);
        if (where & SSL_CB_HANDSHAKE_DONE)
                t->handshake_done = true;
        if ((where & SSL_CB_READ_ALERT) == SSL_CB_READ_ALERT && t->alert_received < 0 &&
            (value & 0xff) != SSL3_AD_CLOSE_NOTIFY)
                t->alert_received = value & 0xff;
}

int mqtt_tls_new(const char *host, bool aws_alpn, const struct mqtt_tls_files *files, struct mqtt_tls **ret) {
        struct mqtt_tls *t;
        X509_VERIFY_PARAM *param;
        unsigned char ip[16];
        int r = -ENOMEM;

        assert(host);
        assert(files);
        assert(ret);

        t = calloc(1, sizeof(*t));
        if (!t)
                return -ENOMEM;
        t->files = *files;
        t->alert_received = -1;
        t->host = strdup(host);
        t->ctx = SSL_CTX_new(TLS_client_method());
        if (!t->host || !t->ctx)
                goto fail;
        t->host_is_ip = inet_pton(AF_INET, host, ip) == 1 || inet_pton(AF_INET6, host, ip) == 1;

        /* AWS IoT requires TLS 1.2 or newer; there is no insecure fallback. */
        r = -EIO;
        if (!SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION))
                goto fail;
        SSL_CTX_set_options(t->ctx, SSL_OP_NO_COMPRESSION);
        SSL_CTX_set_mode(t->ctx, SSL_MODE_RELEASE_BUFFERS);
        SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, on_verify);
        SSL_CTX_set_info_callback(t->ctx, on_info);
        SSL_CTX_set_app_data(t->ctx, t);
        param = SSL_CTX_get0_param(t->ctx);
        X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        if (!(t->host_is_ip ? X509_VERIFY_PARAM_set1_ip_asc(param, host) : X509_VERIFY_PARAM_set1_host(param, host, 0)))
                goto fail;
        if (aws_alpn && SSL_CTX_set_alpn_protos(t->ctx, (const unsigned char *) ALPN_AWS_MQTT,
                                                sizeof(ALPN_AWS_MQTT) - 1) != 0)
                goto fail;
        *ret = t;
        return 0;
fail:
        ERR_clear_error();
        mqtt_tls_free(t);
        return r;
}

void mqtt_tls_free(struct mqtt_tls *t) {
        if (!t)
                return;
        mqtt_tls_attempt_end(t);
        SSL_CTX_free(t->ctx);
        free(t->host);
        free(t);
}

SSL_CTX *mqtt_tls_context(struct mqtt_tls *t) {
        return t->ctx;
}

static void openssl_error(char *buf, size_t size) {
        unsigned long e = ERR_peek_last_error();
        const char *reason = e ? ERR_reason_error_string(e) : NULL;

        snprintf(buf, size, "%s", reason ? reason : "unknown OpenSSL error");
        ERR_clear_error();
}

static FILE *open_file(const char *key, const char *path, char *reason, size_t size, int *ret) {
        FILE *f = fopen(path, "re");

        if (!f) {
                *ret = -errno;
                snprintf(reason, size, "cannot open %s %s: %m", key, path);
        }
        return f;
}

/* Certificates are never encrypted, and otad has no one to ask for a
 * passphrase: an encrypted key is refused instead of prompting on a tty. */
static int no_passphrase(char *buf, int size, int rwflag, void *userdata) {
        return 0;
}

static int load_ca(struct mqtt_tls *t, char *reason, size_t size) {
        _cleanup_fclose_ FILE *f = NULL;
        X509_STORE *store;
        unsigned n = 0;
        X509 *x;
        int r = 0;

        f = open_file("ca_file", t->files.ca_file, reason, size, &r);
        if (!f)
                return r;
        store = X509_STORE_new();
        if (!store)
                return -ENOMEM;
        while ((x = PEM_read_X509(f, NULL, no_passphrase, NULL))) {
                if (X509_STORE_add_cert(store, x))
                        n++;
                X509_free(x);
        }
        ERR_clear_error();
        if (n == 0) {
                X509_STORE_free(store);
                snprintf(reason, size, "ca_file %s holds no PEM certificate", t->files.ca_file);
                return -EBADMSG;
        }
        SSL_CTX_set_cert_store(t->ctx, store);
        return 0;
}

int mqtt_tls_load(struct mqtt_tls *t, char *reason, size_t size) {
        _cleanup_fclose_ FILE *cf = NULL, *kf = NULL;
        EVP_PKEY *key = NULL;
        X509 *cert = NULL, *extra;
        char error[160];
        int r;

        assert(t);
        assert(reason);

        r = load_ca(t, reason, size);
        if (r < 0)
                return r;

        cf = open_file("cert_file", t->files.cert_file, reason, size, &r);
        if (!cf)
                return r;
        cert = PEM_read_X509(cf, NULL, no_passphrase, NULL);
        if (!cert) {
                ERR_clear_error();
                snprintf(reason, size, "cert_file %s holds no PEM certificate", t->files.cert_file);
                return -EBADMSG;
        }
        kf = open_file("key_file", t->files.key_file, reason, size, &r);
        if (!kf)
                goto fail;
        key = PEM_read_PrivateKey(kf, NULL, no_passphrase, NULL);
        if (!key) {
                ERR_clear_error();
                snprintf(reason, size, "key_file %s holds no unencrypted PEM private key", t->files.key_file);
                r = -EBADMSG;
                goto fail;
        }
        if (X509_check_private_key(cert, key) != 1) {
                ERR_clear_error();
                snprintf(reason, size, "the private key in key_file %s does not belong to the certificate in cert_file %s",
                         t->files.key_file, t->files.cert_file);
                r = -EKEYREJECTED;
                goto fail;
        }
        if (SSL_CTX_use_certificate(t->ctx, cert) != 1 || SSL_CTX_use_PrivateKey(t->ctx, key) != 1) {
                openssl_error(error, sizeof(error));
                snprintf(reason, size, "cannot use the certificate in cert_file %s: %s", t->files.cert_file, error);
                r = -EINVAL;
                goto fail;
        }
        /* Intermediate certificates after ours go with it. */
        SSL_CTX_clear_chain_certs(t->ctx);
        while ((extra = PEM_read_X509(cf, NULL, no_passphrase, NULL)))
                if (!SSL_CTX_add0_chain_cert(t->ctx, extra))
                        X509_free(extra);
        ERR_clear_error();

        t->cert_validity = X509_cmp_current_time(X509_get0_notAfter(cert)) < 0    ? 1
                           : X509_cmp_current_time(X509_get0_notBefore(cert)) > 0 ? -1
                                                                                  : 0;
        format_time(X509_get0_notBefore(cert), t->cert_not_before, sizeof(t->cert_not_before));
        format_time(X509_get0_notAfter(cert), t->cert_not_after, sizeof(t->cert_not_after));
        r = 0;
fail:
        EVP_PKEY_free(key);
        X509_free(cert);
        return r;
}

int mqtt_tls_client_validity(const struct mqtt_tls *t, char *buf, size_t size) {
        char now[40];

        format_now(now, sizeof(now));
        if (t->cert_validity > 0)
                snprintf(buf, size, "the client certificate %s expired on %s (this system's clock says %s)",
                         t->files.cert_file, t->cert_not_after, now);
        else if (t->cert_validity < 0)
                snprintf(buf, size, "the client certificate %s is not valid before %s, and this system's clock says %s (is the clock set?)",
                         t->files.cert_file, t->cert_not_before, now);
        else
                buf[0] = '\0';
        return t->cert_validity;
}

void mqtt_tls_attempt_begin(struct mqtt_tls *t) {
        t->handshake_done = false;
        t->verify_error = X509_V_OK;
        t->verify_depth = 0;
        t->verify_subject[0] = t->verify_issuer[0] = t->verify_names[0] = t->verify_time[0] = '\0';
        t->alert_received = -1;
        t->ssl_error[0] = '\0';
}

void mqtt_tls_attempt_hold(struct mqtt_tls *t, SSL *ssl) {
        mqtt_tls_attempt_end(t);
        if (ssl && SSL_up_ref(ssl))
                t->ssl = ssl;
}

void mqtt_tls_read_pending(struct mqtt_tls *t, int fd) {
        unsigned long e;
        const char *reason;
        char c;

        if (!t->ssl || t->alert_received >= 0 || t->verify_error != X509_V_OK)
                return;
        ERR_clear_error();
        /* Once libmosquitto closed its descriptor (and freed its SSL), read
         * through ours, a duplicate of the same socket that still holds what
         * arrived; never while libmosquitto may still write through this
         * SSL. The socket is non-blocking: this returns at once. */
        if (fd >= 0 && SSL_set_fd(t->ssl, fd) != 1)
                goto done;
        if (SSL_peek(t->ssl, &c, 1) <= 0) {
                e = ERR_peek_last_error();
                reason = e ? ERR_reason_error_string(e) : NULL;
                if (reason)
                        mqtt_tls_note_error(t, reason);
        }
done:
        ERR_clear_error();
}

void mqtt_tls_attempt_end(struct mqtt_tls *t) {
        SSL_free(t->ssl);
        t->ssl = NULL;
}

bool mqtt_tls_handshake_done(const struct mqtt_tls *t) {
        return t->handshake_done;
}

void mqtt_tls_note_error(struct mqtt_tls *t, const char *text) {
        if (!t->ssl_error[0])
                snprintf(t->ssl_error, sizeof(t->ssl_error), "%s", text);
}

static void describe_verify_error(const struct mqtt_tls *t, char *buf, size_t size) {
        const char *what = X509_verify_cert_error_string(t->verify_error);
        const char *whose = t->verify_depth == 0 ? "the broker's certificate" : "a CA certificate of the broker's chain";
        char now[40];

        format_now(now, sizeof(now));
        switch (t->verify_error) {
        case X509_V_ERR_HOSTNAME_MISMATCH:
        case X509_V_ERR_IP_ADDRESS_MISMATCH:
                snprintf(buf, size, "the broker's certificate does not match the host name %s: it is for %s (wrong endpoint?)",
                         t->host, t->verify_names);
                break;
        case X509_V_ERR_CERT_HAS_EXPIRED:
                snprintf(buf, size, "%s (%s) expired on %s (this system's clock says %s)", whose, t->verify_subject,
                         t->verify_time, now);
                break;
        case X509_V_ERR_CERT_NOT_YET_VALID:
                snprintf(buf, size, "%s (%s) is not valid before %s, and this system's clock says %s (is the clock set?)",
                         whose, t->verify_subject, t->verify_time, now);
                break;
        case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
        case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
                snprintf(buf, size, "the broker's certificate is not trusted by ca_file %s: %s (its chain ends at %s, which ca_file does not hold; wrong ca_file?)",
                         t->files.ca_file, what, t->verify_subject);
                break;
        case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
        case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
        case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
                snprintf(buf, size, "the broker's certificate is not trusted by ca_file %s: %s (%s is not in ca_file; wrong ca_file?)",
                         t->files.ca_file, what, t->verify_issuer);
                break;
        case X509_V_ERR_CERT_UNTRUSTED:
        case X509_V_ERR_CERT_SIGNATURE_FAILURE:
                snprintf(buf, size, "the broker's certificate is not trusted by ca_file %s: %s (%s, issued by %s; wrong ca_file?)",
                         t->files.ca_file, what, t->verify_subject, t->verify_issuer);
                break;
        default:
                snprintf(buf, size, "%s (%s, issued by %s) failed verification: %s", whose, t->verify_subject,
                         t->verify_issuer, what);
        }
}

static void describe_alert(const struct mqtt_tls *t, char *buf, size_t size) {
        const char *alert = SSL_alert_desc_string_long(t->alert_received);

        if (t->alert_received == SSL3_AD_CERTIFICATE_EXPIRED && t->cert_validity > 0) {
                snprintf(buf, size, "the broker refused our client certificate %s: TLS alert \"%s\" (it expired on %s)",
                         t->files.cert_file, alert, t->cert_not_after);
                return;
        }
        switch (t->alert_received) {
        case SSL3_AD_CERTIFICATE_EXPIRED:
        case SSL3_AD_BAD_CERTIFICATE:
        case SSL3_AD_UNSUPPORTED_CERTIFICATE:
        case SSL3_AD_CERTIFICATE_REVOKED:
        case SSL3_AD_CERTIFICATE_UNKNOWN:
        case TLS1_AD_UNKNOWN_CA:
        case TLS1_AD_ACCESS_DENIED:
        case TLS13_AD_CERTIFICATE_REQUIRED:
                snprintf(buf, size, "the broker refused our client certificate %s: TLS alert \"%s\"", t->files.cert_file,
                         alert);
                break;
        case TLS1_AD_PROTOCOL_VERSION:
                snprintf(buf, size, "the broker speaks no TLS version from 1.2 on: TLS alert \"%s\"", alert);
                break;
        case TLS1_AD_UNRECOGNIZED_NAME:
                snprintf(buf, size, "the broker does not serve the host name %s: TLS alert \"%s\" (wrong endpoint?)",
                         t->host, alert);
                break;
        case TLS1_AD_NO_APPLICATION_PROTOCOL:
                snprintf(buf, size, "the broker does not speak AWS IoT's x-amzn-mqtt-ca on this port: TLS alert \"%s\"",
                         alert);
                break;
        default:
                snprintf(buf, size, "the broker ended the TLS %s: TLS alert \"%s\"",
                         t->handshake_done ? "connection" : "handshake", alert);
        }
}

bool mqtt_tls_describe_failure(const struct mqtt_tls *t, char *buf, size_t size) {
        if (t->verify_error != X509_V_OK)
                describe_verify_error(t, buf, size);
        else if (t->alert_received >= 0)
                describe_alert(t, buf, size);
        else if (strstr(t->ssl_error, "wrong version number") || strstr(t->ssl_error, "packet length too long"))
                snprintf(buf, size, "the server does not answer in TLS (OpenSSL: %s): is this the broker's TLS port?",
                         t->ssl_error);
        else if (t->ssl_error[0] && !strstr(t->ssl_error, "unexpected eof while reading"))
                snprintf(buf, size, "TLS error: %s", t->ssl_error);
        else
                /* Nothing TLS could tell: the connection simply ended. */
                return false;
        return true;
}
