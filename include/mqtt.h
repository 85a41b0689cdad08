/* SPDX-License-Identifier: MIT */
/*
 * mqtt: the one mutually-authenticated TLS MQTT 3.1.1 session to AWS IoT
 * (libmosquitto driven by the sd-event loop) and the topic router that hands
 * each message to the handler that registered its filter. Owns resolving
 * the endpoint, trying its addresses in turn, reconnect backoff, what a
 * failed connection is reported as, subscriptions and the thing-name check;
 * never interprets a payload. TLS details live in mqtt_tls.
 *
 * Topics are given relative to "$aws/things/<thing>/", e.g. "jobs/notify-next":
 * a module cannot subscribe to, publish to or receive another thing's topics.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "otad.h"

typedef void (*mqtt_message_fn)(const char *topic, const uint8_t *payload, size_t len,
                                void *userdata);
/* granted is false when the broker refused the filter (SUBACK 0x80). */
typedef void (*mqtt_subscribed_fn)(bool granted, void *userdata);
/* Called after CONNACK (connected=true, session_present as the broker said) and
 * on every loss of the connection (connected=false). */
typedef void (*mqtt_connection_fn)(bool connected, bool session_present, void *userdata);

int mqtt_session_new(struct otad *otad, struct mqtt_session **ret);
void mqtt_session_free(struct mqtt_session *s);
/* Starts connecting; reconnects by itself with backoff until freed. */
int mqtt_session_start(struct mqtt_session *s);
bool mqtt_session_is_connected(const struct mqtt_session *s);
const char *mqtt_session_thing_name(const struct mqtt_session *s);

int mqtt_add_connection_handler(struct mqtt_session *s, mqtt_connection_fn fn, void *userdata);

/* What the session is doing, for whoever shows it to a person (the daemon's
 * STATUS= line). */
enum mqtt_link_state {
        MQTT_LINK_RESOLVING,  /* looking up host */
        MQTT_LINK_CONNECTING, /* TCP, TLS and CONNACK with address */
        MQTT_LINK_CONNECTED,  /* through address */
        MQTT_LINK_WAITING,    /* retry_usec before the next attempt, because of reason */
};

struct mqtt_link {
        enum mqtt_link_state state;
        const char *host;
        int port;
        const char *address; /* CONNECTING, CONNECTED: the numeric address, else NULL */
        uint64_t retry_usec; /* WAITING */
        const char *reason;  /* WAITING: why the attempt failed or the connection ended */
};

typedef void (*mqtt_link_fn)(const struct mqtt_link *link, void *userdata);

/* Called on every change of the link state, in registration order. */
int mqtt_add_link_observer(struct mqtt_session *s, mqtt_link_fn fn, void *userdata);

/* Registers filter (relative, may contain + and #) with the router and
 * subscribes now or on the next connect. on_subscribed may be NULL. */
int mqtt_subscribe(struct mqtt_session *s, const char *filter, int qos,
                   mqtt_message_fn on_message, mqtt_subscribed_fn on_subscribed,
                   void *userdata, struct mqtt_subscription **ret);
/* Unsubscribes and forgets the registration; NULL is fine. */
void mqtt_unsubscribe(struct mqtt_subscription *sub);

/* Hands a received message (full topic) to the registrations it matches,
 * after the thing-name check; what libmosquitto's receive path calls, and
 * what fuzzers call. */
void mqtt_session_route(struct mqtt_session *s, const char *full_topic, const void *payload, size_t len);

/* MQTT 3.1.1 topic matching ('+' one level, '#' the rest, no wildcard match
 * of a leading '$' level). Pure; both arguments are plain topic strings. */
bool mqtt_topic_matches(const char *filter, const char *topic);

/* Publishes to "$aws/things/<thing>/" + topic. QoS 0 or 1 (AWS has no QoS 2).
 * -ENOTCONN when offline: the caller decides whether to retry.
 * -ENAMETOOLONG when the whole topic exceeds AWS's 256 bytes, -EMSGSIZE when
 * the payload is too large for an MQTT packet. Never retained. */
int mqtt_publish(struct mqtt_session *s, const char *topic, const void *payload, size_t len,
                 int qos);
