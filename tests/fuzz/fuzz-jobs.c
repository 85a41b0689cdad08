/* SPDX-License-Identifier: MIT */
/* libFuzzer: Jobs messages as the broker delivers them (notify-next,
 * $next/get and update answers, another thing's topics) through the router
 * into the Jobs client and the custom job handler. The session never
 * connects; the handler directory does not exist, so nothing is executed. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "config.h"
#include "custom_jobs.h"
#include "jobs.h"
#include "log.h"
#include "mqtt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct otad otad;
static struct otad_config config;

static void setup(void) {
        log_set_max_level(LOG_CRIT);
        config.mqtt.endpoint = (char *) "localhost";
        config.mqtt.port = 8883;
        config.mqtt.thing_name = (char *) "fuzz-thing";
        config.mqtt.client_id = (char *) "fuzz-thing";
        /* libmosquitto only checks that these can be opened. */
        config.mqtt.ca_file = config.mqtt.cert_file = config.mqtt.key_file = (char *) "/dev/null";
        config.mqtt.keepalive = 60;
        config.mqtt.clean_session = true;
        config.mqtt.reconnect_min = 1;
        config.mqtt.reconnect_max = 2;
        config.jobs.handler_dir = (char *) "/nonexistent/otad-fuzz-handlers";
        config.jobs.handler_timeout = 1;
        config.jobs.operation_key = (char *) "operation";
        otad.config = &config;
        if (sd_event_new(&otad.event) < 0 || mqtt_session_new(&otad, &otad.mqtt) < 0)
                __builtin_trap();
}

static const char *const topics[] = {
        "$aws/things/fuzz-thing/jobs/notify-next",
        "$aws/things/fuzz-thing/jobs/$next/get/accepted",
        "$aws/things/fuzz-thing/jobs/$next/get/rejected",
        "$aws/things/fuzz-thing/jobs/job-1/update/accepted",
        "$aws/things/fuzz-thing/jobs/job-1/update/rejected",
        "$aws/things/fuzz-thing/jobs/job-1/get/accepted",
        "$aws/things/other-thing/jobs/notify-next",
        "$aws/things/fuzz-thing/streams/s/data/cbor",
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        if (!otad.mqtt)
                setup();
        if (jobs_new(&otad, &otad.jobs) < 0 || custom_jobs_new(&otad, &otad.custom) < 0)
                __builtin_trap();
        /* A sequence of messages: [topic byte][length byte][payload]... */
        while (size >= 2) {
                const char *topic = topics[data[0] % (sizeof(topics) / sizeof(topics[0]))];
                size_t len = data[1] == 255 ? size - 2 : data[1];

                if (len > size - 2)
                        len = size - 2;
                mqtt_session_route(otad.mqtt, topic, data + 2, len);
                data += 2 + len;
                size -= 2 + len;
        }
        custom_jobs_free(otad.custom);
        jobs_free(otad.jobs);
        otad.custom = NULL;
        otad.jobs = NULL;
        return 0;
}
