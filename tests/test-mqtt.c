/* SPDX-License-Identifier: MIT */
/* The router's MQTT 3.1.1 topic matching (§4.7), which decides which
 * handler sees a message. */
#include <stdbool.h>

#include "mqtt.h"
#include "tap.h"

static const struct {
        const char *filter, *topic;
        bool match;
} cases[] = {
        { "jobs/notify-next", "jobs/notify-next", true },
        { "jobs/notify-next", "jobs/notify", false },
        { "jobs/notify", "jobs/notify-next", false },
        { "jobs/+/get/+", "jobs/$next/get/accepted", true },
        { "jobs/+/get/+", "jobs/job-1/get/rejected", true },
        { "jobs/+/get/+", "jobs/job-1/update/accepted", false },
        { "jobs/+/get/+", "jobs/job-1/get", false },
        { "jobs/+/get/+", "jobs/job-1/get/accepted/extra", false },
        { "jobs/+/update/+", "jobs/a/update/accepted", true },
        { "jobs/+/update/+", "jobs//update/accepted", true }, /* empty level */
        { "streams/s1/data/cbor", "streams/s1/data/cbor", true },
        { "streams/+/data/cbor", "streams/s1/data/json", false },
        { "#", "jobs/notify-next", true },
        { "jobs/#", "jobs", true }, /* '#' includes the parent level */
        { "jobs/#", "jobs/a/b/c", true },
        { "jobs/#", "jobsx/a", false },
        { "+", "jobs", true },
        { "+", "jobs/x", false },
        { "+/+", "a/b", true },
        { "a/+", "a/", true },
        { "a/+", "a", false },
        { "+", "$SYS", false }, /* wildcards never match a leading '$' */
        { "#", "$aws/things", false },
        { "$aws/#", "$aws/things", true },
        { "", "", true },
        { "a", "", false },
        { "", "a", false },
};

int main(void) {
        tap_plan((int) (sizeof(cases) / sizeof(cases[0])));
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
                tap_ok(mqtt_topic_matches(cases[i].filter, cases[i].topic) == cases[i].match, "'%s' %s '%s'",
                       cases[i].filter, cases[i].match ? "matches" : "does not match", cases[i].topic);
        return tap_done();
}
