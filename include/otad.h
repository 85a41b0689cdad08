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

/* The parts of the one STATUS= line, each kept by daemon.c from what a
 * module told it through a callback: the MQTT session's link, the Jobs
 * client's job, and the update pipeline's stage and percent of a job. */
struct otad_status {
        char link[224];          /* "connected to host:port" */
        char job[128];           /* "job J (handler)", "no pending job" */
        char job_id[65];         /* the job the Jobs client runs, "" if none */
        char update_job_id[65];  /* the job update[] is about */
        char update[128];        /* "downloading file 1/1 over MQTT, 42%" */
        bool stopping;
        char line[576];          /* the last STATUS= sent */
};

struct otad {
        sd_event *event;
        struct otad_config *config;
        struct mqtt_session *mqtt;
        struct jobs *jobs;
        struct ota *ota;               /* afr_ota documents */
        struct custom_jobs *custom;    /* documents naming a configured handler */
        struct otad_status status;
};
