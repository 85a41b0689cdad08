/* SPDX-License-Identifier: MIT */
/*
 * otad: the daemon's context, the one struct that holds all of its state,
 * passed explicitly to every module. Forward declarations live here so that
 * module headers need no include chains.
 */
#pragma once

#include <stdbool.h>
#include <systemd/sd-event.h>

struct otad_config;
struct mqtt_session;
struct mqtt_subscription;
struct jobs;
struct job;
struct ota;
struct custom_jobs;
struct installer;
struct bootloader;

struct otad {
        sd_event *event;
        struct otad_config *config;
        struct mqtt_session *mqtt;
        struct jobs *jobs;
        struct ota *ota;               /* afr_ota documents */
        struct custom_jobs *custom;    /* documents naming a configured handler */
        char status[256];              /* last STATUS= sent to systemd */
};

/* One human line for `systemctl status` (sd_notify STATUS=), also logged at
 * debug level. Cheap when unchanged. */
void otad_set_status(struct otad *otad, const char *format, ...) __attribute__((format(printf, 2, 3)));
