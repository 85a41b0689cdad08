/* SPDX-License-Identifier: MIT */
/*
 * mqtt-probe: drives mqtt.c alone on an sd-event loop, for the integration
 * tests of what otad's own modules never do (refused filters, more than 8
 * filters at once). Not installed.
 *
 * Usage: mqtt-probe CONFIG FILTER...   (filters relative to the thing)
 * Connects as otad would, registers every FILTER at QoS 1, prints
 * "connected session_present=N", then one "suback FILTER granted|refused"
 * line per filter, and exits 0 when all are answered, 1 after 20 s.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <systemd/sd-event.h>

#include "config.h"
#include "log.h"
#include "mqtt.h"
#include "otad.h"

struct probe {
        struct otad *otad;
        const char *filter;
        int *left;
};

static void on_message(const char *topic, const uint8_t *payload, size_t len, void *userdata) {
        printf("message %s %zu\n", topic, len);
        fflush(stdout);
}

static void on_subscribed(bool granted, void *userdata) {
        struct probe *p = userdata;

        printf("suback %s %s\n", p->filter, granted ? "granted" : "refused");
        fflush(stdout);
        if (--*p->left == 0)
                sd_event_exit(p->otad->event, 0);
}

static void on_connection(bool connected, bool session_present, void *userdata) {
        if (connected)
                printf("connected session_present=%d\n", session_present);
        else
                printf("disconnected\n");
        fflush(stdout);
}

static int on_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        fprintf(stderr, "mqtt-probe: timed out\n");
        return sd_event_exit(sd_event_source_get_event(s), 1);
}

int main(int argc, char *argv[]) {
        struct otad_config *config = NULL;
        struct otad otad = { 0 };
        struct probe *probes;
        int left = argc - 2, r, code = 1;

        if (argc < 3) {
                fprintf(stderr, "Usage: mqtt-probe CONFIG FILTER...\n");
                return 2;
        }
        log_open();
        if (config_load(argv[1], &config) < 0)
                return 1;
        log_set_max_level(config->log.level);
        otad.config = config;
        probes = calloc((size_t) left, sizeof(*probes));
        if (!probes || sd_event_default(&otad.event) < 0 || mqtt_session_new(&otad, &otad.mqtt) < 0)
                return 1;
        mqtt_add_connection_handler(otad.mqtt, on_connection, NULL);
        for (int i = 0; i < left; i++) {
                probes[i] = (struct probe){ &otad, argv[i + 2], &left };
                r = mqtt_subscribe(otad.mqtt, argv[i + 2], 1, on_message, on_subscribed, &probes[i], NULL);
                if (r < 0) {
                        errno = -r;
                        fprintf(stderr, "mqtt-probe: cannot register %s: %m\n", argv[i + 2]);
                        return 1;
                }
        }
        sd_event_add_time_relative(otad.event, NULL, CLOCK_MONOTONIC, 20 * 1000000ULL, 0, on_timeout, NULL);
        r = mqtt_session_start(otad.mqtt);
        if (r >= 0)
                r = sd_event_loop(otad.event);
        if (r >= 0)
                (void) sd_event_get_exit_code(otad.event, &code);
        mqtt_session_free(otad.mqtt);
        sd_event_unref(otad.event);
        config_free(config);
        free(probes);
        return code;
}
