/* SPDX-License-Identifier: MIT */
/*
 * The one TLS MQTT 3.1.1 session to AWS IoT, on libmosquitto driven by
 * sd-event (no libmosquitto thread), and the topic router.
 *
 * libmosquitto 2.0 is used through its "external loop" API: we poll a
 * duplicate of mosquitto_socket() and call mosquitto_loop_read/write/misc.
 * Two quirks shape the code below:
 *  - While the TLS handshake runs, mosquitto_loop_write() does nothing and
 *    mosquitto_want_write() may stay true; the handshake only advances
 *    through mosquitto_loop_read(). So until the handshake is done we poll
 *    for what OpenSSL wants (SSL_want_write) and always call loop_read.
 *  - A handshake that fails with SSL_ERROR_SYSCALL (connection refused,
 *    reset, EOF) is reported as "still connecting"; we notice it through
 *    EPOLLERR/EPOLLHUP/EPOLLRDHUP and a connect timeout instead.
 * The only blocking call is the DNS lookup inside mosquitto_connect_async()
 * (getaddrinfo); libmosquitto offers no asynchronous resolver for clients.
 */
#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <mosquitto.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "macro.h"
#include "mqtt.h"

#define ALPN_AWS_MQTT "x-amzn-mqtt-ca" /* AWS IoT: MQTT with client certs on 443 */
#define SUBSCRIBE_MAX_FILTERS 8         /* AWS IoT: at most 8 filters per SUBSCRIBE */
#define CONNECT_TIMEOUT_USEC (30 * 1000000ULL)
#define MISC_INTERVAL_USEC (1 * 1000000ULL)
#define SUBACK_FAILURE 0x80
#define SUBSCRIPTIONS_MAX 50 /* AWS IoT: per connection; more may close it */
#define TOPIC_MAX 256        /* AWS IoT: topic names ≤ 256 bytes */

enum session_state {
        SESSION_IDLE,       /* not started, or freed */
        SESSION_CONNECTING, /* TCP/TLS handshake or waiting for CONNACK */
        SESSION_CONNECTED,  /* CONNACK 0 received */
        SESSION_WAITING,    /* backoff before the next attempt */
};

struct mqtt_subscription {
        struct mqtt_session *session;
        char *filter; /* relative to the thing prefix */
        char *full_filter;
        int qos;
        mqtt_message_fn on_message;
        mqtt_subscribed_fn on_subscribed;
        void *userdata;
        bool subscribed; /* granted by the broker in this session */
        bool pending;    /* SUBSCRIBE sent, SUBACK not yet seen */
        bool dead;       /* unsubscribed during a dispatch, freed after it */
        struct mqtt_subscription *next;
};

/* One SUBSCRIBE packet in flight: SUBACK return codes come back in the order
 * of the filters in the packet. */
struct sub_batch {
        int mid;
        struct mqtt_subscription *subs[SUBSCRIBE_MAX_FILTERS];
        int n;
        struct sub_batch *next;
};

struct connection_handler {
        mqtt_connection_fn fn;
        void *userdata;
        struct connection_handler *next;
};

struct mqtt_session {
        struct otad *otad;
        struct mosquitto *mosq;
        char *prefix; /* "$aws/things/<thing>/" */
        size_t prefix_len;
        const char *thing;
        const char *host;
        int port;
        int keepalive;
        bool clean_session;

        enum session_state state;
        unsigned attempt; /* failed attempts since the last CONNACK */
        sd_event_source *io;
        sd_event_source *misc_timer;
        sd_event_source *retry_timer;
        sd_event_source *connect_timer;

        /* Why the current attempt failed, collected from the places that see
         * it (libmosquitto's log, OpenSSL, CONNACK) for one clear line. */
        char tls_error[256];
        bool hostname_mismatch;
        char connack_error[256];

        struct mqtt_subscription *subs;
        struct sub_batch *batches;
        struct connection_handler *handlers;
        unsigned dispatching;
};

static void session_schedule_retry(struct mqtt_session *s, const char *reason);
static void session_update_io(struct mqtt_session *s);

bool mqtt_topic_matches(const char *filter, const char *topic) {
        /* MQTT 3.1.1 §4.7: '+' matches one level, '#' the rest (also the
         * parent level itself), wildcards never match a leading '$' level. */
        if (topic[0] == '$' && (filter[0] == '+' || filter[0] == '#'))
                return false;
        for (;;) {
                if (filter[0] == '#' && filter[1] == '\0')
                        return true;
                if (filter[0] == '+' && (filter[1] == '/' || filter[1] == '\0')) {
                        topic += strcspn(topic, "/");
                        filter++;
                } else {
                        size_t n = strcspn(filter, "/");
                        size_t m = strcspn(topic, "/");

                        if (n != m || memcmp(filter, topic, n) != 0)
                                return false;
                        filter += n;
                        topic += m;
                }
                if (filter[0] == '\0' && topic[0] == '\0')
                        return true;
                if (filter[0] == '\0')
                        return false;
                /* filter continues: "a/#" also matches "a" */
                if (topic[0] == '\0')
                        return strcmp(filter, "/#") == 0;
                filter++;
                topic++;
        }
}

static bool filter_is_valid(const char *filter) {
        /* '#' only as the last level, '+' only as a whole level. */
        for (const char *p = filter; *p; p++) {
                bool starts = p == filter || p[-1] == '/';
                bool ends = p[1] == '\0' || p[1] == '/';

                if (*p == '#' && !(starts && p[1] == '\0'))
                        return false;
                if (*p == '+' && !(starts && ends))
                        return false;
        }
        return *filter != '\0';
}

static const char *mosq_rc_string(int rc) {
        if (rc == MOSQ_ERR_ERRNO)
                return strerror(errno);
        return mosquitto_strerror(rc);
}

static const char *connack_string(int rc) {
        switch (rc) {
        case 1: return "unacceptable protocol version";
        case 2: return "client id rejected";
        case 3: return "server unavailable";
        case 4: return "bad user name or password";
        case 5: return "not authorized (check the thing's policy and certificate status)";
        /* AWS IoT says 7 where MQTT says 5 for an unauthorized client. */
        case 7: return "not authorized by AWS IoT (rc 7: check the thing's policy, certificate status and client id)";
        default: return "unknown CONNACK code";
        }
}

static uint64_t now_usec(struct mqtt_session *s) {
        uint64_t t = 0;

        sd_event_now(s->otad->event, CLOCK_MONOTONIC, &t);
        return t;
}

static uint32_t random_u32(void) {
        uint32_t v;

        if (getrandom(&v, sizeof(v), GRND_NONBLOCK) != sizeof(v))
                v = (uint32_t) rand();
        return v;
}

/* Exponential backoff with full jitter, bounded below so that we never
 * exceed AWS's 1 CONNECT/s per client id: uniform in
 * [reconnect_min, min(reconnect_max, reconnect_min * 2^attempt)]. */
static uint64_t backoff_usec(const struct mqtt_session *s) {
        const struct otad_config *c = s->otad->config;
        uint64_t lo = (uint64_t) c->mqtt.reconnect_min * 1000000ULL;
        uint64_t hi = (uint64_t) c->mqtt.reconnect_max * 1000000ULL;
        uint64_t ceiling = lo;

        for (unsigned i = 0; i < s->attempt && ceiling < hi; i++)
                ceiling *= 2;
        if (ceiling > hi)
                ceiling = hi;
        if (ceiling <= lo)
                return lo;
        return lo + ((uint64_t) random_u32() * (ceiling - lo)) / UINT32_MAX;
}

static void subscription_free(struct mqtt_subscription *sub) {
        if (!sub)
                return;
        free(sub->filter);
        free(sub->full_filter);
        free(sub);
}

static void session_collect_garbage(struct mqtt_session *s) {
        struct mqtt_subscription **p = &s->subs;

        while (*p) {
                struct mqtt_subscription *sub = *p;

                if (sub->dead) {
                        *p = sub->next;
                        subscription_free(sub);
                } else
                        p = &sub->next;
        }
}

static void batches_free(struct mqtt_session *s) {
        while (s->batches) {
                struct sub_batch *b = s->batches;

                s->batches = b->next;
                free(b);
        }
}

static void notify_connection(struct mqtt_session *s, bool connected, bool session_present) {
        for (struct connection_handler *h = s->handlers; h; h = h->next)
                h->fn(connected, session_present, h->userdata);
}

/* Drops our view of the socket; the next connect attempt (or
 * mosquitto_destroy) closes libmosquitto's own descriptor. shutdown() makes
 * the broker see the end now rather than at the next attempt. */
static void session_drop_socket(struct mqtt_session *s) {
        int fd = mosquitto_socket(s->mosq);

        if (fd >= 0)
                shutdown(fd, SHUT_RDWR);
        s->io = sd_event_source_disable_unref(s->io);
        s->misc_timer = sd_event_source_disable_unref(s->misc_timer);
        s->connect_timer = sd_event_source_disable_unref(s->connect_timer);
        for (struct mqtt_subscription *sub = s->subs; sub; sub = sub->next)
                sub->pending = false;
        batches_free(s);
}

/* The single place where a connection (or an attempt) ends. */
static void session_lost(struct mqtt_session *s, const char *reason) {
        bool was_connected = s->state == SESSION_CONNECTED;

        if (s->state != SESSION_CONNECTING && s->state != SESSION_CONNECTED)
                return;
        session_drop_socket(s);
        if (s->clean_session)
                for (struct mqtt_subscription *sub = s->subs; sub; sub = sub->next)
                        sub->subscribed = false;
        if (was_connected) {
                log_full(LOG_WARNING, 0, &(const struct log_fields){ .message_id = OTAD_MID_DISCONNECTED },
                         "Disconnected from %s:%d: %s", s->host, s->port, reason);
                s->state = SESSION_WAITING;
                notify_connection(s, false, false);
        } else
                log_error("Connection to %s:%d failed: %s", s->host, s->port, reason);
        session_schedule_retry(s, reason);
}

/* Says which of the usual TLS failures happened, from what libmosquitto and
 * OpenSSL left behind. Never suggests turning verification off. */
static void describe_failure(struct mqtt_session *s, int rc, char *buf, size_t size) {
        /* libmosquitto keeps the SSL of a failed handshake until the next
         * one starts: trust its verify result only while our socket is up. */
        SSL *ssl = s->io ? mosquitto_ssl_get(s->mosq) : NULL;
        long verify = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;

        if (s->connack_error[0])
                snprintf(buf, size, "%s", s->connack_error);
        else if (s->hostname_mismatch)
                snprintf(buf, size, "the broker's certificate does not match the host name %s (wrong endpoint?)",
                         s->host);
        else if (verify != X509_V_OK)
                snprintf(buf, size, "the broker's certificate is not trusted by %s: %s (wrong ca_file?)",
                         s->otad->config->mqtt.ca_file, X509_verify_cert_error_string(verify));
        else if (s->tls_error[0])
                snprintf(buf, size, "TLS error: %s (did the broker refuse our certificate %s?)", s->tls_error,
                         s->otad->config->mqtt.cert_file);
        else if (s->state == SESSION_CONNECTING && (rc == MOSQ_ERR_ERRNO || rc == MOSQ_ERR_CONN_LOST))
                /* TLS 1.3 and some brokers drop a refused client certificate
                 * without an alert we could quote. */
                snprintf(buf, size,
                         "%s before CONNACK (the broker may be restarting, or it refused our certificate %s)",
                         rc == MOSQ_ERR_ERRNO ? strerror(errno) : "connection closed",
                         s->otad->config->mqtt.cert_file);
        else
                snprintf(buf, size, "%s", mosq_rc_string(rc));
}

static void session_fail(struct mqtt_session *s, int rc) {
        char reason[512];

        describe_failure(s, rc, reason, sizeof(reason));
        session_lost(s, reason);
}

static int on_connect_timeout(sd_event_source *es, uint64_t usec, void *userdata) {
        struct mqtt_session *s = userdata;

        session_lost(s, "no CONNACK within 30 s");
        return 0;
}

static int on_misc_timer(sd_event_source *es, uint64_t usec, void *userdata) {
        struct mqtt_session *s = userdata;
        int rc;

        /* Keepalive: sends PINGREQ, notices a missing PINGRESP. */
        rc = mosquitto_loop_misc(s->mosq);
        if (rc != MOSQ_ERR_SUCCESS) {
                session_fail(s, rc);
                return 0;
        }
        session_update_io(s);
        sd_event_source_set_time(es, usec + MISC_INTERVAL_USEC);
        return sd_event_source_set_enabled(es, SD_EVENT_ON);
}

static bool handshake_done(struct mqtt_session *s) {
        SSL *ssl = mosquitto_ssl_get(s->mosq);

        return ssl && SSL_is_init_finished(ssl);
}

static void session_update_io(struct mqtt_session *s) {
        uint32_t events = EPOLLIN | EPOLLRDHUP;

        if (!s->io)
                return;
        if (!handshake_done(s)) {
                SSL *ssl = mosquitto_ssl_get(s->mosq);

                if (!ssl || SSL_want_write(ssl))
                        events = EPOLLOUT | EPOLLRDHUP;
        } else if (mosquitto_want_write(s->mosq))
                events |= EPOLLOUT;
        sd_event_source_set_io_events(s->io, events);
}

static int on_io(sd_event_source *es, int fd, uint32_t revents, void *userdata) {
        struct mqtt_session *s = userdata;
        int rc = MOSQ_ERR_SUCCESS;

        if (!handshake_done(s)) {
                if (revents & (EPOLLERR | EPOLLHUP | EPOLLRDHUP)) {
                        int error = 0;
                        socklen_t len = sizeof(error);
                        char reason[512];

                        struct sockaddr_storage peer;
                        socklen_t peer_len = sizeof(peer);

                        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) == 0 && error != 0) {
                                session_lost(s, strerror(error));
                                return 0;
                        }
                        /* OpenSSL's first write may have consumed the error of
                         * a refused TCP connect; a socket that never got a
                         * peer tells the same story. */
                        if (getpeername(fd, (struct sockaddr *) &peer, &peer_len) < 0 && errno == ENOTCONN) {
                                session_lost(s, "Connection refused (is the endpoint and port right?)");
                                return 0;
                        }
                        /* Let OpenSSL read a pending alert before we judge. */
                        (void) mosquitto_loop_read(s->mosq, 1);
                        describe_failure(s, MOSQ_ERR_CONN_LOST, reason, sizeof(reason));
                        if (!s->tls_error[0] && !s->hostname_mismatch)
                                snprintf(reason, sizeof(reason),
                                         "the broker closed the connection during the TLS handshake (it may be restarting, or it refused our certificate %s)",
                                         s->otad->config->mqtt.cert_file);
                        session_lost(s, reason);
                        return 0;
                }
                rc = mosquitto_loop_read(s->mosq, 1);
        } else {
                if (revents & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP))
                        rc = mosquitto_loop_read(s->mosq, 1);
                if (rc == MOSQ_ERR_SUCCESS && s->io && (revents & EPOLLOUT))
                        rc = mosquitto_loop_write(s->mosq, 1);
        }
        if (rc != MOSQ_ERR_SUCCESS) {
                session_fail(s, rc);
                return 0;
        }
        /* A loop call that ends the connection reports it through
         * on_disconnect, which already scheduled the retry. */
        if (s->io && mosquitto_socket(s->mosq) < 0) {
                session_fail(s, MOSQ_ERR_CONN_LOST);
                return 0;
        }
        session_update_io(s);
        return 0;
}

static void session_subscribe_pending(struct mqtt_session *s) {
        for (int qos = 0; qos <= 1; qos++) {
                for (;;) {
                        _cleanup_free_ struct sub_batch *b = calloc(1, sizeof(*b));
                        char *filters[SUBSCRIBE_MAX_FILTERS];
                        int rc;

                        if (!b) {
                                log_error("Out of memory, subscriptions delayed to the next connection");
                                return;
                        }
                        for (struct mqtt_subscription *sub = s->subs; sub && b->n < SUBSCRIBE_MAX_FILTERS;
                             sub = sub->next) {
                                if (sub->dead || sub->subscribed || sub->pending || sub->qos != qos)
                                        continue;
                                filters[b->n] = sub->full_filter;
                                b->subs[b->n++] = sub;
                        }
                        if (b->n == 0)
                                break;
                        rc = mosquitto_subscribe_multiple(s->mosq, &b->mid, b->n, filters, qos, 0, NULL);
                        if (rc != MOSQ_ERR_SUCCESS) {
                                /* The connection is going away; we subscribe again on the next one. */
                                log_warning("Failed to subscribe to %s and %d more: %s", filters[0], b->n - 1,
                                            mosq_rc_string(rc));
                                return;
                        }
                        for (int i = 0; i < b->n; i++)
                                b->subs[i]->pending = true;
                        log_debug("SUBSCRIBE mid %d: %d filter(s) at QoS %d, first %s", b->mid, b->n, qos, filters[0]);
                        b->next = s->batches;
                        s->batches = take_ptr(&b);
                }
        }
        session_update_io(s);
}

static void on_mosq_connect(struct mosquitto *mosq, void *userdata, int rc, int flags) {
        struct mqtt_session *s = userdata;
        bool session_present = flags & 1;

        if (rc != 0) {
                snprintf(s->connack_error, sizeof(s->connack_error), "broker refused the connection: CONNACK %d, %s",
                         rc, connack_string(rc));
                /* libmosquitto closes the connection right after and calls on_disconnect. */
                return;
        }
        s->connect_timer = sd_event_source_disable_unref(s->connect_timer);
        s->state = SESSION_CONNECTED;
        s->attempt = 0;
        log_full(LOG_INFO, 0, &(const struct log_fields){ .message_id = OTAD_MID_CONNECTED },
                 "Connected to %s:%d as %s (%s session%s)", s->host, s->port, s->otad->config->mqtt.client_id,
                 s->clean_session ? "clean" : "persistent", session_present ? ", resumed" : "");
        otad_set_status(s->otad, "connected to %s:%d", s->host, s->port);

        /* Without a stored session the broker forgot every subscription. */
        if (!session_present)
                for (struct mqtt_subscription *sub = s->subs; sub; sub = sub->next)
                        sub->subscribed = false;
        session_subscribe_pending(s);
        notify_connection(s, true, session_present);
}

static void on_mosq_disconnect(struct mosquitto *mosq, void *userdata, int rc) {
        struct mqtt_session *s = userdata;

        if (s->state == SESSION_CONNECTING || s->state == SESSION_CONNECTED)
                session_fail(s, rc == MOSQ_ERR_SUCCESS ? MOSQ_ERR_CONN_LOST : rc);
}

static void on_mosq_subscribe(struct mosquitto *mosq, void *userdata, int mid, int qos_count,
                              const int *granted_qos) {
        struct mqtt_session *s = userdata;
        struct sub_batch **p = &s->batches;
        struct sub_batch *b;

        while (*p && (*p)->mid != mid)
                p = &(*p)->next;
        if (!*p)
                return;
        b = *p;
        *p = b->next;
        s->dispatching++;
        for (int i = 0; i < b->n; i++) {
                struct mqtt_subscription *sub = b->subs[i];
                bool granted = i < qos_count && granted_qos[i] != SUBACK_FAILURE;

                if (!sub || sub->dead)
                        continue;
                sub->pending = false;
                sub->subscribed = granted;
                if (!granted)
                        log_error("The broker refused the subscription to %s (SUBACK 0x80): check the thing's policy",
                                  sub->full_filter);
                else
                        log_debug("Subscribed to %s at QoS %d", sub->full_filter, granted_qos[i]);
                if (sub->on_subscribed)
                        sub->on_subscribed(granted, sub->userdata);
        }
        s->dispatching--;
        if (!s->dispatching)
                session_collect_garbage(s);
        free(b);
}

void mqtt_session_route(struct mqtt_session *s, const char *full_topic, const void *payload, size_t len) {
        const char *topic;
        bool matched = false;

        /* Only our own thing's topics, whatever the broker sends (AWS routes
         * Jobs replies without a subscription). */
        if (!full_topic || strncmp(full_topic, s->prefix, s->prefix_len) != 0) {
                log_debug("Dropping message on %s: not a topic of thing %s", full_topic ? full_topic : "(null)",
                          s->thing);
                return;
        }
        topic = full_topic + s->prefix_len;
        s->dispatching++;
        for (struct mqtt_subscription *sub = s->subs; sub; sub = sub->next) {
                if (sub->dead || !mqtt_topic_matches(sub->filter, topic))
                        continue;
                matched = true;
                sub->on_message(topic, payload, len, sub->userdata);
        }
        s->dispatching--;
        if (!s->dispatching)
                session_collect_garbage(s);
        if (!matched)
                log_debug("Dropping message on %s: no handler registered", full_topic);
}

static void on_mosq_message(struct mosquitto *mosq, void *userdata, const struct mosquitto_message *m) {
        mqtt_session_route(userdata, m->topic, m->payload, m->payloadlen > 0 ? (size_t) m->payloadlen : 0);
}

static void on_mosq_log(struct mosquitto *mosq, void *userdata, int level, const char *line) {
        struct mqtt_session *s = userdata;

        if (level == MOSQ_LOG_ERR) {
                if (strstr(line, "host name verification failed"))
                        s->hostname_mismatch = true;
                else if (strncmp(line, "OpenSSL Error", 13) == 0) {
                        const char *msg = strchr(line, ':');

                        snprintf(s->tls_error, sizeof(s->tls_error), "%s", msg ? msg + 2 : line);
                }
        }
        log_debug("libmosquitto: %s", line);
}

static int session_connect(struct mqtt_session *s) {
        int fd, rc, r;

        s->state = SESSION_CONNECTING;
        s->tls_error[0] = '\0';
        s->connack_error[0] = '\0';
        s->hostname_mismatch = false;
        otad_set_status(s->otad, "connecting to %s:%d", s->host, s->port);
        log_info("Connecting to %s:%d as %s", s->host, s->port, s->otad->config->mqtt.client_id);

        /* Resolves the host name synchronously (the one blocking step), then
         * starts a non-blocking TCP connect and TLS handshake. */
        rc = mosquitto_connect_async(s->mosq, s->host, s->port, s->keepalive);
        if (rc != MOSQ_ERR_SUCCESS) {
                session_fail(s, rc);
                return 0;
        }
        fd = mosquitto_socket(s->mosq);
        if (fd < 0) {
                session_fail(s, MOSQ_ERR_NO_CONN);
                return 0;
        }
        /* libmosquitto does not ask for close-on-exec: no program we start
         * may inherit the session. */
        (void) fcntl(fd, F_SETFD, FD_CLOEXEC);
        /* Poll our own duplicate: libmosquitto closes its descriptor when it
         * likes, and a reused number must never be confused with it. */
        fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        if (fd < 0) {
                session_lost(s, strerror(errno));
                return 0;
        }
        r = sd_event_add_io(s->otad->event, &s->io, fd, EPOLLOUT, on_io, s);
        if (r < 0) {
                close(fd);
                session_lost(s, strerror(-r));
                return 0;
        }
        sd_event_source_set_io_fd_own(s->io, true);
        sd_event_source_set_description(s->io, "mqtt-socket");
        r = sd_event_add_time_relative(s->otad->event, &s->connect_timer, CLOCK_MONOTONIC, CONNECT_TIMEOUT_USEC,
                                       0, on_connect_timeout, s);
        if (r >= 0)
                r = sd_event_add_time_relative(s->otad->event, &s->misc_timer, CLOCK_MONOTONIC, MISC_INTERVAL_USEC,
                                               200000, on_misc_timer, s);
        if (r < 0) {
                session_lost(s, strerror(-r));
                return 0;
        }
        session_update_io(s);
        return 0;
}

static int on_retry_timer(sd_event_source *es, uint64_t usec, void *userdata) {
        struct mqtt_session *s = userdata;

        s->retry_timer = sd_event_source_disable_unref(s->retry_timer);
        return session_connect(s);
}

static void session_schedule_retry(struct mqtt_session *s, const char *reason) {
        uint64_t delay = backoff_usec(s);
        int r;

        s->state = SESSION_WAITING;
        s->attempt++;
        s->retry_timer = sd_event_source_disable_unref(s->retry_timer);
        r = sd_event_add_time(s->otad->event, &s->retry_timer, CLOCK_MONOTONIC, now_usec(s) + delay, 0,
                              on_retry_timer, s);
        if (r < 0) {
                /* Without a timer we would never reconnect: stop the loop so
                 * that systemd restarts us. */
                log_error_errno(r, "Failed to arm the reconnect timer: %m");
                sd_event_exit(s->otad->event, r);
                return;
        }
        otad_set_status(s->otad, "reconnecting in %" PRIu64 " s: %s", (delay + 500000) / 1000000, reason);
        log_info("Reconnecting to %s:%d in %.1f s", s->host, s->port, (double) delay / 1e6);
}

int mqtt_session_new(struct otad *otad, struct mqtt_session **ret) {
        const struct otad_config *c = otad->config;
        struct mqtt_session *s;
        int rc, r;

        s = calloc(1, sizeof(*s));
        if (!s)
                return log_error_errno(-ENOMEM, "Out of memory");
        s->otad = otad;
        s->thing = c->mqtt.thing_name;
        s->host = c->mqtt.endpoint;
        s->port = (int) c->mqtt.port;
        s->clean_session = c->mqtt.clean_session;
        /* config.c already clamped this to AWS's 30..1200; stay safe. */
        s->keepalive = c->mqtt.keepalive < 30 ? 30 : c->mqtt.keepalive > 1200 ? 1200 : (int) c->mqtt.keepalive;
        if (asprintf(&s->prefix, "$aws/things/%s/", s->thing) < 0) {
                s->prefix = NULL;
                r = log_error_errno(-ENOMEM, "Out of memory");
                goto fail;
        }
        s->prefix_len = strlen(s->prefix);

        /* libmosquitto (through OpenSSL) writes the socket with write(2): a
         * broker that went away must be an error code, not a SIGPIPE. */
        signal(SIGPIPE, SIG_IGN);
        mosquitto_lib_init();
        s->mosq = mosquitto_new(c->mqtt.client_id, c->mqtt.clean_session, s);
        if (!s->mosq) {
                r = log_error_errno(-errno, "Failed to create the MQTT client: %m");
                goto fail;
        }
        mosquitto_int_option(s->mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
        mosquitto_int_option(s->mosq, MOSQ_OPT_TCP_NODELAY, 1);
        rc = mosquitto_tls_set(s->mosq, c->mqtt.ca_file, NULL, c->mqtt.cert_file, c->mqtt.key_file, NULL);
        if (rc != MOSQ_ERR_SUCCESS) {
                r = log_error_errno(-EINVAL, "Failed to use ca_file %s, cert_file %s, key_file %s: %s",
                                    c->mqtt.ca_file, c->mqtt.cert_file, c->mqtt.key_file,
                                    rc == MOSQ_ERR_INVAL ? "a file is missing or unreadable" : mosq_rc_string(rc));
                goto fail;
        }
        /* TLS 1.2 or newer, peer verification and host name check: AWS IoT
         * requires 1.2+, and there is no insecure fallback. */
        rc = mosquitto_tls_opts_set(s->mosq, 1, "tlsv1.2", NULL);
        if (rc == MOSQ_ERR_SUCCESS)
                rc = mosquitto_tls_insecure_set(s->mosq, false);
        if (rc == MOSQ_ERR_SUCCESS && s->port == 443)
                rc = mosquitto_string_option(s->mosq, MOSQ_OPT_TLS_ALPN, ALPN_AWS_MQTT);
        if (rc != MOSQ_ERR_SUCCESS) {
                r = log_error_errno(-EINVAL, "Failed to set TLS options: %s", mosq_rc_string(rc));
                goto fail;
        }
        mosquitto_connect_with_flags_callback_set(s->mosq, on_mosq_connect);
        mosquitto_disconnect_callback_set(s->mosq, on_mosq_disconnect);
        mosquitto_subscribe_callback_set(s->mosq, on_mosq_subscribe);
        mosquitto_message_callback_set(s->mosq, on_mosq_message);
        mosquitto_log_callback_set(s->mosq, on_mosq_log);

        *ret = s;
        return 0;
fail:
        mqtt_session_free(s);
        return r;
}

void mqtt_session_free(struct mqtt_session *s) {
        bool connected;

        if (!s)
                return;
        connected = s->state == SESSION_CONNECTED;

        /* IDLE first: libmosquitto calls on_disconnect from inside
         * mosquitto_disconnect(), and that must not schedule a retry. */
        s->state = SESSION_IDLE;
        if (connected) {
                /* Best effort: a DISCONNECT tells the broker we left on purpose. */
                mosquitto_disconnect(s->mosq);
                mosquitto_loop_write(s->mosq, 1);
        }
        if (s->mosq)
                session_drop_socket(s);
        s->retry_timer = sd_event_source_disable_unref(s->retry_timer);
        while (s->subs) {
                struct mqtt_subscription *sub = s->subs;

                s->subs = sub->next;
                subscription_free(sub);
        }
        while (s->handlers) {
                struct connection_handler *h = s->handlers;

                s->handlers = h->next;
                free(h);
        }
        if (s->mosq) {
                mosquitto_destroy(s->mosq);
                mosquitto_lib_cleanup();
        }
        free(s->prefix);
        free(s);
}

int mqtt_session_start(struct mqtt_session *s) {
        if (s->state != SESSION_IDLE)
                return -EALREADY;
        return session_connect(s);
}

bool mqtt_session_is_connected(const struct mqtt_session *s) {
        return s->state == SESSION_CONNECTED;
}

const char *mqtt_session_thing_name(const struct mqtt_session *s) {
        return s->thing;
}

int mqtt_add_connection_handler(struct mqtt_session *s, mqtt_connection_fn fn, void *userdata) {
        struct connection_handler *h = calloc(1, sizeof(*h)), **p;

        if (!h)
                return -ENOMEM;
        h->fn = fn;
        h->userdata = userdata;
        /* In registration order: jobs registers before the handlers it feeds. */
        for (p = &s->handlers; *p; p = &(*p)->next)
                ;
        *p = h;
        return 0;
}

int mqtt_subscribe(struct mqtt_session *s, const char *filter, int qos, mqtt_message_fn on_message,
                   mqtt_subscribed_fn on_subscribed, void *userdata, struct mqtt_subscription **ret) {
        struct mqtt_subscription *sub, **p;
        size_t n = 1;

        /* AWS IoT has no QoS 2: a SUBSCRIBE asking for it is never answered. */
        if (qos < 0 || qos > 1 || !on_message || !filter_is_valid(filter))
                return -EINVAL;
        sub = calloc(1, sizeof(*sub));
        if (!sub)
                return -ENOMEM;
        sub->session = s;
        sub->qos = qos;
        sub->on_message = on_message;
        sub->on_subscribed = on_subscribed;
        sub->userdata = userdata;
        sub->filter = strdup(filter);
        if (!sub->filter || asprintf(&sub->full_filter, "%s%s", s->prefix, filter) < 0) {
                sub->full_filter = NULL;
                subscription_free(sub);
                return -ENOMEM;
        }
        for (p = &s->subs; *p; p = &(*p)->next)
                n += !(*p)->dead;
        *p = sub;
        if (n > SUBSCRIPTIONS_MAX)
                log_warning("%zu topic filters registered, more than AWS IoT's %d per connection: the broker may refuse %s",
                            n, SUBSCRIPTIONS_MAX, sub->full_filter);
        if (s->state == SESSION_CONNECTED)
                session_subscribe_pending(s);
        if (ret)
                *ret = sub;
        return 0;
}

void mqtt_unsubscribe(struct mqtt_subscription *sub) {
        struct mqtt_session *s;
        bool shared = false;

        if (!sub || sub->dead)
                return;
        s = sub->session;
        sub->dead = true;
        for (struct sub_batch *b = s->batches; b; b = b->next)
                for (int i = 0; i < b->n; i++)
                        if (b->subs[i] == sub)
                                b->subs[i] = NULL;
        for (struct mqtt_subscription *o = s->subs; o; o = o->next)
                if (!o->dead && strcmp(o->full_filter, sub->full_filter) == 0)
                        shared = true;
        if (!shared && s->state == SESSION_CONNECTED && (sub->subscribed || sub->pending)) {
                int rc = mosquitto_unsubscribe(s->mosq, NULL, sub->full_filter);

                if (rc != MOSQ_ERR_SUCCESS)
                        log_debug("Failed to unsubscribe from %s: %s, ignoring", sub->full_filter,
                                  mosq_rc_string(rc));
                session_update_io(s);
        }
        if (!s->dispatching)
                session_collect_garbage(s);
}

int mqtt_publish(struct mqtt_session *s, const char *topic, const void *payload, size_t len, int qos) {
        _cleanup_free_ char *full = NULL;
        int rc;

        if (qos < 0 || qos > 1 || len > INT32_MAX)
                return -EINVAL;
        if (s->state != SESSION_CONNECTED)
                return -ENOTCONN;
        if (asprintf(&full, "%s%s", s->prefix, topic) < 0) {
                full = NULL;
                return -ENOMEM;
        }
        if (strlen(full) > TOPIC_MAX)
                return -ENAMETOOLONG;
        /* Never RETAIN: AWS refuses retained publishes to $aws/ topics. */
        rc = mosquitto_publish(s->mosq, NULL, full, (int) len, payload, qos, false);
        if (rc == MOSQ_ERR_NO_CONN)
                return -ENOTCONN;
        if (rc == MOSQ_ERR_PAYLOAD_SIZE || rc == MOSQ_ERR_OVERSIZE_PACKET)
                return -EMSGSIZE;
        if (rc != MOSQ_ERR_SUCCESS)
                return rc == MOSQ_ERR_ERRNO ? -errno : -EIO;
        log_debug("PUBLISH q%d %s (%zu bytes)", qos, full, len);
        session_update_io(s);
        return 0;
}
