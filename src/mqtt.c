/* SPDX-License-Identifier: MIT */
/*
 * The one TLS MQTT 3.1.1 session to AWS IoT, on libmosquitto driven by
 * sd-event (no libmosquitto thread), and the topic router.
 *
 * A connect cycle resolves the endpoint off the loop (resolve.c), then tries
 * its addresses in the resolver's order: AWS endpoints have several, and a
 * device's IPv6 is often broken. A transport failure (refused, unreachable,
 * no answer, no TLS answer) moves on to the next address at once; anything
 * the broker said (its certificate, an alert, a CONNACK) ends the cycle,
 * because every address would say the same. Then backoff (backoff.h).
 *
 * libmosquitto 2.0 is used through its "external loop" API: we poll a
 * duplicate of mosquitto_socket() and call mosquitto_loop_read/write/misc.
 * It is handed one numeric address at a time, and mqtt_tls's context keeps
 * SNI and the certificate check on the endpoint's name. Two quirks shape
 * the code below:
 *  - While the TLS handshake runs, mosquitto_loop_write() does nothing and
 *    mosquitto_want_write() may stay true; the handshake only advances
 *    through mosquitto_loop_read(). So until the handshake is done we poll
 *    for what OpenSSL wants (SSL_want_write) and always call loop_read.
 *  - A handshake that fails with SSL_ERROR_SYSCALL (connection refused,
 *    reset, EOF) is reported as "still connecting"; we notice it through
 *    EPOLLERR/EPOLLHUP/EPOLLRDHUP and the attempt's timeouts instead.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <mosquitto.h>
#include <netdb.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "backoff.h"
#include "clock.h"
#include "config.h"
#include "log.h"
#include "macro.h"
#include "mqtt.h"
#include "mqtt_tls.h"
#include "resolve.h"

#define SUBSCRIBE_MAX_FILTERS 8 /* AWS IoT: at most 8 filters per SUBSCRIBE */
/* A SYN nobody answers (a broken IPv6 path): give up on that address. */
#define TCP_CONNECT_TIMEOUT_SEC 10
/* Once TCP is up: the TLS handshake and the CONNACK. Shorter than the
 * smallest keepalive (30 s), after which libmosquitto gives up by itself. */
#define CONNACK_TIMEOUT_SEC 20
#define MISC_INTERVAL_USEC (1 * USEC_PER_SEC)
#define SUBACK_FAILURE 0x80
#define SUBSCRIPTIONS_MAX 50 /* AWS IoT: per connection; more may close it */
#define TOPIC_MAX 256        /* AWS IoT: topic names ≤ 256 bytes */
#define ADDRESSES_MAX 16

enum session_state {
        SESSION_IDLE,       /* not started, or freed */
        SESSION_RESOLVING,  /* loading the TLS files, looking up the endpoint */
        SESSION_CONNECTING, /* TCP/TLS handshake or waiting for CONNACK, at one address */
        SESSION_CONNECTED,  /* CONNACK 0 received */
        SESSION_WAITING,    /* backoff before the next cycle, or about to try the next address */
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

struct link_observer {
        mqtt_link_fn fn;
        void *userdata;
        struct link_observer *next;
};

struct mqtt_session {
        struct otad *otad;
        struct mosquitto *mosq;
        struct mqtt_tls *tls;
        char *prefix; /* "$aws/things/<thing>/" */
        size_t prefix_len;
        const char *thing;
        const char *client_id;
        const char *host;
        int port;
        int keepalive;
        bool clean_session;

        enum session_state state;
        struct backoff backoff; /* between connect cycles; reset by a CONNACK */
        struct resolve_query *query;
        char *addresses[ADDRESSES_MAX]; /* of this cycle, numeric, in the resolver's order */
        size_t n_addresses;
        size_t address_index; /* the one being tried or connected */
        bool next_address;    /* the retry timer tries the next address, not a new cycle */
        bool tcp_connected;   /* of the current attempt */
        sd_event_source *io;
        sd_event_source *misc_timer;
        sd_event_source *retry_timer;
        sd_event_source *attempt_timer;

        char connack_error[256]; /* why the broker refused this attempt's CONNECT */
        int validity;            /* of our certificate when last loaded, see mqtt_tls_client_validity() */

        struct mqtt_subscription *subs;
        struct sub_batch *batches;
        struct connection_handler *handlers;
        struct link_observer *observers;
        unsigned dispatching;
};

static void session_update_io(struct mqtt_session *s);
static bool tcp_check(struct mqtt_session *s, int fd, uint32_t revents);
static void session_fail_errno(struct mqtt_session *s, int rc, int error);
static void cycle_start(struct mqtt_session *s);
static void attempt_start(struct mqtt_session *s);

bool mqtt_topic_matches(const char *filter, const char *topic) {
        assert(filter);
        assert(topic);

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

/* A libmosquitto return code as a negative errno, for %m. */
static int mosq_errno(int rc) {
        switch (rc) {
        case MOSQ_ERR_ERRNO: return -errno;
        case MOSQ_ERR_NOMEM: return -ENOMEM;
        case MOSQ_ERR_NO_CONN:
        case MOSQ_ERR_CONN_LOST: return -ENOTCONN;
        case MOSQ_ERR_PAYLOAD_SIZE:
        case MOSQ_ERR_OVERSIZE_PACKET: return -EMSGSIZE;
        case MOSQ_ERR_INVAL: return -EINVAL;
        default: return -EIO;
        }
}

static const char *connack_string(int rc) {
        switch (rc) {
        case 1: return "unacceptable protocol version (the broker does not speak MQTT 3.1.1)";
        case 2: return "identifier rejected (the broker does not accept our client id)";
        case 3: return "server unavailable";
        case 4: return "bad user name or password (otad authenticates with its certificate only)";
        case 5: return "not authorized (check the thing's policy and certificate status)";
        /* AWS IoT says 7 where MQTT says 5 for an unauthorized client. */
        case 7: return "not authorized by AWS IoT (rc 7: check the thing's policy, certificate status and client id)";
        default: return "unknown CONNACK code";
        }
}

static const char *current_address(const struct mqtt_session *s) {
        return s->address_index < s->n_addresses ? s->addresses[s->address_index] : "none";
}

static void addresses_clear(struct mqtt_session *s) {
        for (size_t i = 0; i < s->n_addresses; i++)
                free(s->addresses[i]);
        s->n_addresses = s->address_index = 0;
}

static void notify_link(struct mqtt_session *s, enum mqtt_link_state state, uint64_t retry_usec, const char *reason) {
        const struct mqtt_link link = {
                .state = state,
                .host = s->host,
                .port = s->port,
                .address = state == MQTT_LINK_CONNECTING || state == MQTT_LINK_CONNECTED ? current_address(s) : NULL,
                .retry_usec = retry_usec,
                .reason = reason,
        };

        for (struct link_observer *o = s->observers; o; o = o->next)
                o->fn(&link, o->userdata);
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
        s->attempt_timer = sd_event_source_disable_unref(s->attempt_timer);
        mqtt_tls_attempt_end(s->tls);
        for (struct mqtt_subscription *sub = s->subs; sub; sub = sub->next)
                sub->pending = false;
        batches_free(s);
}

static int on_retry_timer(sd_event_source *es, uint64_t usec, void *userdata) {
        struct mqtt_session *s = userdata;

        s->retry_timer = sd_event_source_disable_unref(s->retry_timer);
        if (s->next_address) {
                s->next_address = false;
                attempt_start(s);
        } else
                cycle_start(s);
        return 0;
}

static void arm_retry_timer(struct mqtt_session *s, uint64_t delay) {
        int r;

        s->state = SESSION_WAITING;
        s->retry_timer = sd_event_source_disable_unref(s->retry_timer);
        r = sd_event_add_time_relative(s->otad->event, &s->retry_timer, CLOCK_MONOTONIC, delay, 0, on_retry_timer, s);
        if (r < 0) {
                /* Without a timer we would never reconnect: stop the loop so
                 * that systemd restarts us. */
                log_error_errno(r, "Failed to arm the reconnect timer: %m");
                sd_event_exit(s->otad->event, r);
        }
}

/* The end of a connect cycle (or of a connection): backoff, then a new
 * cycle that resolves the endpoint again. */
static void schedule_retry(struct mqtt_session *s, const char *reason) {
        uint64_t delay = backoff_next(&s->backoff);

        s->next_address = false;
        arm_retry_timer(s, delay);
        log_info("Reconnecting to %s:%d in %.1f s", s->host, s->port, (double) delay / USEC_PER_SEC);
        notify_link(s, MQTT_LINK_WAITING, delay, reason);
}

/* A cycle that failed before any address was tried. */
static void cycle_failed(struct mqtt_session *s, const char *reason) {
        log_error("Connection to %s:%d failed: %s", s->host, s->port, reason);
        schedule_retry(s, reason);
}

/* The single place where an attempt or a connection ends. try_next: the
 * failure belongs to this address (transport), so the next one may work. */
static void session_failed(struct mqtt_session *s, const char *reason, bool try_next) {
        bool was_connected = s->state == SESSION_CONNECTED;

        if (s->state != SESSION_CONNECTING && s->state != SESSION_CONNECTED)
                return;
        session_drop_socket(s);
        if (s->clean_session)
                for (struct mqtt_subscription *sub = s->subs; sub; sub = sub->next)
                        sub->subscribed = false;
        if (was_connected) {
                log_full(LOG_WARNING, 0, &(const struct log_fields){ .message_id = OTAD_MID_DISCONNECTED },
                         "Disconnected from %s:%d (address %s): %s", s->host, s->port, current_address(s), reason);
                s->state = SESSION_WAITING;
                notify_connection(s, false, false);
                schedule_retry(s, reason);
                return;
        }
        if (try_next && s->address_index + 1 < s->n_addresses) {
                log_warning("Connection to %s:%d (address %s) failed: %s; trying %s next", s->host, s->port,
                            current_address(s), reason, s->addresses[s->address_index + 1]);
                s->address_index++;
                /* From the loop, never from inside a libmosquitto call that
                 * is still unwinding. */
                s->next_address = true;
                arm_retry_timer(s, 0);
                return;
        }
        log_error("Connection to %s:%d (address %s) failed: %s", s->host, s->port, current_address(s), reason);
        schedule_retry(s, reason);
}

/* session_failed() with a formatted reason; errno is error while
 * formatting, for %m. */
static void session_failedf(struct mqtt_session *s, bool try_next, int error, const char *format, ...)
        __attribute__((format(printf, 4, 5)));
static void session_failedf(struct mqtt_session *s, bool try_next, int error, const char *format, ...) {
        char reason[512];
        va_list ap;

        errno = error;
        va_start(ap, format);
        vsnprintf(reason, sizeof(reason), format, ap);
        va_end(ap);
        session_failed(s, reason, try_next);
}

/* Why the attempt or connection ended, after a libmosquitto call returned
 * rc (with error, for MOSQ_ERR_ERRNO): in order, what the broker answered
 * to CONNECT, what TLS reported (after reading what is still pending),
 * then what the transport says. */
static void session_fail_errno(struct mqtt_session *s, int rc, int error) {
        char reason[512];

        if (s->state != SESSION_CONNECTING && s->state != SESSION_CONNECTED)
                return;
        if (rc != MOSQ_ERR_ERRNO)
                error = 0;
        /* A TLS error needs a TCP connection, even one that came up and
         * went inside mosquitto_connect_async() before we looked. */
        if (rc == MOSQ_ERR_TLS)
                s->tcp_connected = true;
        if (s->io)
                mqtt_tls_read_pending(s->tls, mosquitto_socket(s->mosq) >= 0 ? -1 : sd_event_source_get_io_fd(s->io));
        if (s->connack_error[0]) {
                session_failed(s, s->connack_error, false);
                return;
        }
        if (mqtt_tls_describe_failure(s->tls, reason, sizeof(reason))) {
                session_failed(s, reason, false);
                return;
        }
        if (s->state == SESSION_CONNECTING && !s->tcp_connected) {
                if (error)
                        session_failedf(s, true, error, "%m");
                else
                        session_failedf(s, true, 0, "%s", mosquitto_strerror(rc));
        } else if (s->state == SESSION_CONNECTING && !mqtt_tls_handshake_done(s->tls))
                session_failed(s, "the broker closed the connection during the TLS handshake without a TLS alert (as a port that does not speak TLS would, e.g. a plain MQTT listener)",
                               true);
        else if (s->state == SESSION_CONNECTING)
                session_failedf(s, false, 0,
                                "the broker closed the connection after the TLS handshake without answering CONNECT (AWS IoT does so when the certificate %s is not active or its policy does not allow iot:Connect as client id %s)",
                                s->otad->config->mqtt.cert_file, s->client_id);
        else if (error)
                session_failedf(s, false, error, "%m");
        else if (rc == MOSQ_ERR_KEEPALIVE)
                session_failedf(s, false, 0, "no answer to PINGREQ within the keepalive of %d s", s->keepalive);
        else if (rc == MOSQ_ERR_CONN_LOST)
                session_failed(s, "the broker closed the connection", false);
        else
                session_failedf(s, false, 0, "%s", mosquitto_strerror(rc));
}

static void session_fail(struct mqtt_session *s, int rc) {
        session_fail_errno(s, rc, errno);
}

static int on_attempt_timeout(sd_event_source *es, uint64_t usec, void *userdata) {
        struct mqtt_session *s = userdata;

        s->attempt_timer = sd_event_source_disable_unref(s->attempt_timer);
        /* A connection that came up without a poll event (nothing to read
         * yet) gets its handshake's time now. */
        if (!s->tcp_connected && s->io && (!tcp_check(s, sd_event_source_get_io_fd(s->io), 0) || s->tcp_connected))
                return 0;
        if (!s->tcp_connected)
                session_failedf(s, true, 0, "TCP connect timed out after %d s", TCP_CONNECT_TIMEOUT_SEC);
        else if (!mqtt_tls_handshake_done(s->tls))
                session_failedf(s, true, 0, "the TLS handshake did not finish within %d s", CONNACK_TIMEOUT_SEC);
        else
                session_failedf(s, false, 0, "no CONNACK within %d s", CONNACK_TIMEOUT_SEC);
        return 0;
}

static int arm_attempt_timer(struct mqtt_session *s, unsigned seconds) {
        s->attempt_timer = sd_event_source_disable_unref(s->attempt_timer);
        return sd_event_add_time_relative(s->otad->event, &s->attempt_timer, CLOCK_MONOTONIC,
                                          seconds * USEC_PER_SEC, 0, on_attempt_timeout, s);
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

/* Until the TCP connection is up: false when this attempt just failed. */
static bool tcp_check(struct mqtt_session *s, int fd, uint32_t revents) {
        struct sockaddr_storage peer;
        socklen_t peer_len = sizeof(peer), len = sizeof(int);
        int error = 0;

        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) == 0 && error != 0) {
                if (error == ECONNRESET || error == EPIPE) {
                        /* Only an established connection is reset: the
                         * handshake ran inside mosquitto_connect_async()
                         * and the broker hung up, maybe after an alert. */
                        s->tcp_connected = true;
                        session_fail_errno(s, MOSQ_ERR_ERRNO, error);
                } else
                        session_failedf(s, true, error, "%m");
                return false;
        }
        if (getpeername(fd, (struct sockaddr *) &peer, &peer_len) == 0) {
                s->tcp_connected = true;
                log_debug("TCP connection to %s port %d established", current_address(s), s->port);
                if (arm_attempt_timer(s, CONNACK_TIMEOUT_SEC) < 0) {
                        session_failed(s, "cannot arm the CONNACK timeout", false);
                        return false;
                }
                return true;
        }
        if (revents & (EPOLLERR | EPOLLHUP | EPOLLRDHUP)) {
                /* OpenSSL's first write may have consumed the error of a
                 * refused TCP connect; a socket that never got a peer tells
                 * the same story. */
                session_failedf(s, true, ECONNREFUSED, "%m");
                return false;
        }
        return true;
}

static int on_io(sd_event_source *es, int fd, uint32_t revents, void *userdata) {
        struct mqtt_session *s = userdata;
        int rc = MOSQ_ERR_SUCCESS;

        if (!handshake_done(s)) {
                if (!s->tcp_connected && !tcp_check(s, fd, revents))
                        return 0;
                if (revents & (EPOLLERR | EPOLLHUP | EPOLLRDHUP)) {
                        /* session_fail() reads a pending alert first. */
                        session_fail(s, MOSQ_ERR_CONN_LOST);
                        return 0;
                }
                rc = mosquitto_loop_read(s->mosq, 1);
        } else if (revents & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP))
                rc = mosquitto_loop_read(s->mosq, 1);
        /* Everything libmosquitto queued (CONNECT, PUBACKs, publishes) is
         * written here, from the loop (see mosquitto_threaded_set()). */
        if (rc == MOSQ_ERR_SUCCESS && s->io && handshake_done(s) && mosquitto_want_write(s->mosq))
                rc = mosquitto_loop_write(s->mosq, 1);
        if (rc != MOSQ_ERR_SUCCESS) {
                session_fail(s, rc);
                return 0;
        }
        /* A loop call that ends the connection reports it through
         * on_disconnect, which already ended the attempt. */
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
                                log_warning_errno(mosq_errno(rc), "Failed to subscribe to %s and %d more: %m",
                                                  filters[0], b->n - 1);
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
        s->attempt_timer = sd_event_source_disable_unref(s->attempt_timer);
        s->state = SESSION_CONNECTED;
        backoff_reset(&s->backoff);
        log_full(LOG_INFO, 0, &(const struct log_fields){ .message_id = OTAD_MID_CONNECTED },
                 "Connected to %s:%d (address %s) as %s (%s session%s)", s->host, s->port, current_address(s),
                 s->client_id, s->clean_session ? "clean" : "persistent", session_present ? ", resumed" : "");
        notify_link(s, MQTT_LINK_CONNECTED, 0, NULL);

        /* Without a stored session the broker forgot every subscription. */
        if (!session_present)
                for (struct mqtt_subscription *sub = s->subs; sub; sub = sub->next)
                        sub->subscribed = false;
        session_subscribe_pending(s);
        notify_connection(s, true, session_present);
}

static void on_mosq_disconnect(struct mosquitto *mosq, void *userdata, int rc) {
        struct mqtt_session *s = userdata;

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

        assert(s);
        assert(payload || len == 0);

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

        /* "OpenSSL Error[0]: error:0A000086:SSL routines::certificate verify
         * failed": OpenSSL's reason is the text after the last colon. */
        if (level == MOSQ_LOG_ERR && strncmp(line, "OpenSSL Error", 13) == 0) {
                const char *reason = strrchr(line, ':');

                mqtt_tls_note_error(s->tls, reason && reason[1] ? reason + 1 : line);
        }
        log_debug("libmosquitto: %s", line);
}

static void attempt_start(struct mqtt_session *s) {
        int fd, rc, r;

        s->state = SESSION_CONNECTING;
        s->tcp_connected = false;
        s->connack_error[0] = '\0';
        mqtt_tls_attempt_begin(s->tls);
        if (s->n_addresses > 1)
                log_info("Connecting to %s:%d (address %s, %zu of %zu) as %s", s->host, s->port, current_address(s),
                         s->address_index + 1, s->n_addresses, s->client_id);
        else
                log_info("Connecting to %s:%d (address %s) as %s", s->host, s->port, current_address(s), s->client_id);
        notify_link(s, MQTT_LINK_CONNECTING, 0, NULL);

        /* A numeric host: libmosquitto's own lookup returns at once and it
         * connects to exactly this address (non-blocking TCP connect, then
         * the TLS handshake starts). */
        rc = mosquitto_connect_async(s->mosq, current_address(s), s->port, s->keepalive);
        if (rc != MOSQ_ERR_SUCCESS) {
                session_fail(s, rc);
                return;
        }
        mqtt_tls_attempt_hold(s->tls, mosquitto_ssl_get(s->mosq));
        fd = mosquitto_socket(s->mosq);
        if (fd < 0) {
                session_fail(s, MOSQ_ERR_NO_CONN);
                return;
        }
        /* libmosquitto does not ask for close-on-exec: no program we start
         * may inherit the session. */
        (void) fcntl(fd, F_SETFD, FD_CLOEXEC);
        /* Poll our own duplicate: libmosquitto closes its descriptor when it
         * likes, and a reused number must never be confused with it. */
        fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        if (fd < 0) {
                session_failedf(s, false, errno, "cannot duplicate the socket: %m");
                return;
        }
        r = sd_event_add_io(s->otad->event, &s->io, fd, EPOLLOUT, on_io, s);
        if (r < 0) {
                close(fd);
                session_failedf(s, false, -r, "cannot watch the socket: %m");
                return;
        }
        sd_event_source_set_io_fd_own(s->io, true);
        sd_event_source_set_description(s->io, "mqtt-socket");
        r = arm_attempt_timer(s, TCP_CONNECT_TIMEOUT_SEC);
        if (r >= 0)
                r = sd_event_add_time_relative(s->otad->event, &s->misc_timer, CLOCK_MONOTONIC, MISC_INTERVAL_USEC,
                                               200 * USEC_PER_MSEC, on_misc_timer, s);
        if (r < 0) {
                session_failedf(s, false, -r, "cannot arm the connect timers: %m");
                return;
        }
        /* On loopback the TCP connection is usually up already. */
        if (tcp_check(s, fd, 0))
                session_update_io(s);
}

static void on_resolved(int error, int sys_errno, char *const *addresses, size_t n, void *userdata) {
        struct mqtt_session *s = userdata;
        char reason[512], list[512] = "";
        size_t used = 0;

        s->query = NULL;
        if (error) {
                if (error == EAI_SYSTEM) {
                        errno = sys_errno;
                        snprintf(reason, sizeof(reason), "cannot look up %s: %m", s->host);
                } else
                        snprintf(reason, sizeof(reason), "cannot look up %s: %s", s->host, gai_strerror(error));
                cycle_failed(s, reason);
                return;
        }
        for (size_t i = 0; i < n && i < ADDRESSES_MAX; i++) {
                s->addresses[i] = strdup(addresses[i]);
                if (!s->addresses[i]) {
                        cycle_failed(s, "out of memory");
                        return;
                }
                s->n_addresses++;
                if (used < sizeof(list))
                        used += (size_t) snprintf(list + used, sizeof(list) - used, "%s%s", i ? ", " : "", addresses[i]);
        }
        log_debug("%s resolves to %s", s->host, list);
        attempt_start(s);
}

/* A connect cycle: the TLS files, then the endpoint's addresses, then each
 * address in turn until one connects or the broker answers. */
static void cycle_start(struct mqtt_session *s) {
        char reason[512], validity[256];
        int r;

        s->state = SESSION_RESOLVING;
        addresses_clear(s);
        /* Read again every cycle: a renewed certificate takes effect
         * without a restart. */
        r = mqtt_tls_load(s->tls, reason, sizeof(reason));
        if (r < 0) {
                cycle_failed(s, reason);
                return;
        }
        /* Said once, not every cycle: the broker's verdict follows anyway. */
        r = mqtt_tls_client_validity(s->tls, validity, sizeof(validity));
        if (r != 0 && r != s->validity)
                log_warning("The broker will refuse this certificate unless the clock is wrong: %s; connecting anyway",
                            validity);
        s->validity = r;

        notify_link(s, MQTT_LINK_RESOLVING, 0, NULL);
        r = resolve_start(s->otad->event, s->host, on_resolved, s, &s->query);
        if (r < 0) {
                errno = -r;
                snprintf(reason, sizeof(reason), "cannot look up %s: %m", s->host);
                cycle_failed(s, reason);
        }
}

int mqtt_session_new(struct otad *otad, struct mqtt_session **ret) {
        const struct otad_config *c;
        struct mqtt_session *s;
        int rc, r;

        assert(otad);
        assert(otad->config);
        assert(ret);

        c = otad->config;
        s = calloc(1, sizeof(*s));
        if (!s)
                return log_error_errno(-ENOMEM, "Out of memory");
        s->otad = otad;
        s->thing = c->mqtt.thing_name;
        s->client_id = c->mqtt.client_id;
        s->host = c->mqtt.endpoint;
        s->port = (int) c->mqtt.port;
        s->clean_session = c->mqtt.clean_session;
        /* config.c already clamped this to AWS's 30..1200; stay safe. */
        s->keepalive = c->mqtt.keepalive < 30 ? 30 : c->mqtt.keepalive > 1200 ? 1200 : (int) c->mqtt.keepalive;
        /* Never faster than AWS's 1 CONNECT/s per client id (reconnect_min
         * is at least 1 s). */
        s->backoff = BACKOFF_INIT((uint64_t) c->mqtt.reconnect_min * USEC_PER_SEC,
                                  (uint64_t) c->mqtt.reconnect_max * USEC_PER_SEC);
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
        r = mqtt_tls_new(s->host, s->port == 443,
                         &(const struct mqtt_tls_files){ c->mqtt.ca_file, c->mqtt.cert_file, c->mqtt.key_file }, &s->tls);
        if (r < 0) {
                log_error_errno(r, "Failed to set up the TLS context for %s: %m", s->host);
                goto fail;
        }
        mosquitto_int_option(s->mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
        /* libmosquitto writes a packet at once unless told that threads are
         * about; then it only queues, and on_io() writes from the loop. So no
         * write fails inside mosquitto_connect_async() or a publish, where
         * the socket and the broker's last words would be thrown away
         * before we could read them, and no disconnect is reported from
         * inside a caller's mqtt_publish(). */
        mosquitto_threaded_set(s->mosq, true);
        mosquitto_int_option(s->mosq, MOSQ_OPT_TCP_NODELAY, 1);
        /* Our context as it is: libmosquitto's defaults would install its own
         * host name check, against the numeric address it connects to. */
        rc = mosquitto_int_option(s->mosq, MOSQ_OPT_SSL_CTX_WITH_DEFAULTS, 0);
        if (rc == MOSQ_ERR_SUCCESS)
                rc = mosquitto_void_option(s->mosq, MOSQ_OPT_SSL_CTX, mqtt_tls_context(s->tls));
        if (rc != MOSQ_ERR_SUCCESS) {
                r = log_error_errno(-EINVAL, "Failed to hand the TLS context to libmosquitto: %s",
                                    mosquitto_strerror(rc));
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
        resolve_cancel(s->query);
        s->retry_timer = sd_event_source_disable_unref(s->retry_timer);
        addresses_clear(s);
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
        while (s->observers) {
                struct link_observer *o = s->observers;

                s->observers = o->next;
                free(o);
        }
        /* libmosquitto holds a reference to the TLS context: destroy it first. */
        if (s->mosq) {
                mosquitto_destroy(s->mosq);
                mosquitto_lib_cleanup();
        }
        mqtt_tls_free(s->tls);
        free(s->prefix);
        free(s);
}

int mqtt_session_start(struct mqtt_session *s) {
        assert(s);

        if (s->state != SESSION_IDLE)
                return -EALREADY;
        cycle_start(s);
        return 0;
}

bool mqtt_session_is_connected(const struct mqtt_session *s) {
        assert(s);

        return s->state == SESSION_CONNECTED;
}

const char *mqtt_session_thing_name(const struct mqtt_session *s) {
        assert(s);

        return s->thing;
}

int mqtt_add_link_observer(struct mqtt_session *s, mqtt_link_fn fn, void *userdata) {
        struct link_observer *o = calloc(1, sizeof(*o)), **p;

        assert(s);
        assert(fn);

        if (!o)
                return -ENOMEM;
        o->fn = fn;
        o->userdata = userdata;
        for (p = &s->observers; *p; p = &(*p)->next)
                ;
        *p = o;
        return 0;
}

int mqtt_add_connection_handler(struct mqtt_session *s, mqtt_connection_fn fn, void *userdata) {
        struct connection_handler *h = calloc(1, sizeof(*h)), **p;

        assert(s);
        assert(fn);

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

        assert(s);
        assert(filter);

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
                        log_full(LOG_DEBUG, mosq_errno(rc), NULL, "Failed to unsubscribe from %s: %m, ignoring",
                                 sub->full_filter);
                session_update_io(s);
        }
        if (!s->dispatching)
                session_collect_garbage(s);
}

int mqtt_publish(struct mqtt_session *s, const char *topic, const void *payload, size_t len, int qos) {
        _cleanup_free_ char *full = NULL;
        int rc;

        assert(s);
        assert(topic);
        assert(payload || len == 0);

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
        if (rc != MOSQ_ERR_SUCCESS)
                return mosq_errno(rc);
        log_debug("PUBLISH q%d %s (%zu bytes)", qos, full, len);
        session_update_io(s);
        return 0;
}
