/* SPDX-License-Identifier: MIT */
/*
 * mqtt_tls: the TLS client context of the MQTT session. Owns the OpenSSL
 * context libmosquitto connects with: the CA file, client certificate and
 * key (read again before every connect cycle, so renewed files take effect),
 * TLS 1.2 or newer, verification of the broker's certificate against the
 * endpoint's name whatever address the connection goes to (SNI too), ALPN
 * for AWS's port 443, and what each handshake reported (the verification
 * error, the broker's alert, OpenSSL's error) to say why a connection
 * failed. Never opens a socket and never logs: mqtt.c decides and logs.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;

struct mqtt_tls_files {
        const char *ca_file;
        const char *cert_file;
        const char *key_file;
};

struct mqtt_tls;

/* host is the endpoint name the broker's certificate must match (or an IP
 * literal); aws_alpn offers AWS IoT's "x-amzn-mqtt-ca" (port 443). The files
 * are only read by mqtt_tls_load(). */
int mqtt_tls_new(const char *host, bool aws_alpn, const struct mqtt_tls_files *files, struct mqtt_tls **ret);
void mqtt_tls_free(struct mqtt_tls *t);
/* For MOSQ_OPT_SSL_CTX; the session's whole life. */
SSL_CTX *mqtt_tls_context(struct mqtt_tls *t);

/* (Re)reads the three files. 0, or a negative errno and a reason naming the
 * file and what is wrong with it (missing, no PEM certificate, key that does
 * not belong to the certificate, ...). */
int mqtt_tls_load(struct mqtt_tls *t, char *reason, size_t size);
/* After a successful load: whether our certificate is inside its validity
 * period by this system's clock: 0, or >0 expired, <0 not yet valid, with
 * a sentence saying since or until when in buf. */
int mqtt_tls_client_validity(const struct mqtt_tls *t, char *buf, size_t size);

/* Forgets what the previous handshake reported; call before each attempt. */
void mqtt_tls_attempt_begin(struct mqtt_tls *t);
/* Holds a reference to the attempt's SSL: libmosquitto frees its own as
 * soon as a write fails, before the alert the broker sent just before it
 * closed (TLS 1.3: after our handshake finished) was read. */
void mqtt_tls_attempt_hold(struct mqtt_tls *t, SSL *ssl);
/* Reads what the broker sent last, so that a pending alert is known before
 * a failure is judged: through the SSL's own socket (fd < 0) while
 * libmosquitto still has it, else through fd, our duplicate of it. */
void mqtt_tls_read_pending(struct mqtt_tls *t, int fd);
/* Lets go of the attempt's SSL. */
void mqtt_tls_attempt_end(struct mqtt_tls *t);
/* The handshake of the current attempt completed (TLS 1.3: before the
 * broker checked our certificate). */
bool mqtt_tls_handshake_done(const struct mqtt_tls *t);
/* OpenSSL's error text as libmosquitto reported it; the first one of an
 * attempt is kept. */
void mqtt_tls_note_error(struct mqtt_tls *t, const char *text);
/* Why the current attempt's TLS failed, from what OpenSSL and the broker
 * reported: the broker's certificate failed verification (untrusted, name,
 * dates), the broker sent an alert (e.g. it refused our certificate), or
 * OpenSSL's own error. false (and buf untouched) when TLS reported nothing. */
bool mqtt_tls_describe_failure(const struct mqtt_tls *t, char *buf, size_t size);
