/* SPDX-License-Identifier: MIT */
/*
 * config: /etc/otad.conf, parsed through one table of
 * (section, key, parser, destination, default). Owns the parsed values and
 * their validation; never opens a network connection or a slot.
 * Every key here has an entry in man/otad.conf.5 and etc/otad.conf.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define OTAD_DEFAULT_CONFIG "/etc/otad.conf"

enum ota_protocol {
        OTA_PROTOCOL_MQTT,
        OTA_PROTOCOL_HTTP,
};

enum target_type {
        TARGET_FILE,    /* atomically replace a file in a directory */
        TARGET_AB,      /* write the inactive slot of an A/B pair */
        TARGET_COMMAND, /* hand the verified image to a program */
};

enum bootloader_type {
        BOOTLOADER_NONE,
        BOOTLOADER_GRUB,
        BOOTLOADER_UBOOT,
        BOOTLOADER_CUSTOM,
};

enum reboot_policy {
        REBOOT_IMMEDIATE,
        REBOOT_DELAY,  /* wait reboot_delay seconds */
        REBOOT_MARKER, /* wait until reboot_marker exists */
};

/* [target.NAME]: where the files of an OTA job go. A job file is routed to
 * the first target whose match_filepath (fnmatch pattern) and
 * match_file_type both accept it. */
struct config_target {
        char *name;
        enum target_type type;
        char *match_filepath;    /* default "*" */
        int64_t match_file_type; /* -1 = any */
        char *directory;         /* file: where the payload lands */
        char *command;           /* command: program run with the image */
        int64_t timeout;         /* command: seconds before it is stopped, 0 = never */
        char *slot_class;        /* ab: which [slot.CLASS.*] pair, default "rootfs" */
        unsigned line;           /* where it was defined, for messages */
};

/* [slot.CLASS.NAME]: one half of an A/B pair. */
struct config_slot {
        char *class_name;
        char *name;
        char *device;
        char *bootname;
        unsigned line;
};

struct otad_config {
        char *path; /* the file this came from */

        struct {
                char *endpoint;
                int64_t port;
                char *thing_name;
                char *client_id; /* defaults to thing_name */
                char *ca_file;
                char *cert_file;
                char *key_file;
                int64_t keepalive;     /* seconds, clamped to AWS's 30..1200 */
                bool clean_session;
                int64_t reconnect_min; /* seconds, first backoff step */
                int64_t reconnect_max; /* seconds, backoff ceiling */
        } mqtt;

        struct {
                char *directory;
        } state;

        struct {
                int level; /* LOG_ERR .. LOG_DEBUG */
        } log;

        struct {
                char *handler_dir;
                int64_t handler_timeout; /* seconds */
                char *operation_key;     /* document field that names the handler */
        } jobs;

        struct {
                enum ota_protocol protocol; /* preferred when a job lists both */
                int64_t block_size;         /* bytes, 256..131072 */
                int64_t window;             /* GetStream requests in flight */
                int64_t max_requests_per_second;
                int64_t request_timeout;    /* seconds without a block before re-requesting */
                int64_t momentum;           /* requests without progress before giving up */
                int64_t progress_interval;  /* seconds between "receive" updates */
                char *trust_dir;            /* code-signing certificates, by certfile name */
                char *signing_ca;           /* optional: chain check of the signer cert */
                int64_t http_low_speed_limit; /* bytes/s */
                int64_t http_low_speed_time;  /* seconds below the limit before retrying */
                int64_t http_retries;
                char *http_ca_file;           /* CA bundle for presigned HTTPS; empty: system default */
        } ota;

        struct {
                char *version;          /* running version; empty: from os_release */
                char *os_release;       /* where VERSION_ID is read from */
                bool allow_downgrade;
                bool allow_same_version;
                char *compatible;       /* what a bundle's manifest must name; empty: no bundle is */
                enum reboot_policy reboot_policy;
                char *reboot_command;
                int64_t reboot_delay;   /* seconds, REBOOT_DELAY */
                char *reboot_marker;    /* REBOOT_MARKER */
                char *health_check;     /* command, run by /bin/sh -c; empty: none */
                int64_t health_timeout; /* seconds */
                bool wait_system_running;
                char *booted_slot;      /* override of the detected booted slot (tests) */
        } update;

        struct {
                enum bootloader_type type;
                char *grubenv;
                char *fw_env_config;
                char *command;
        } bootloader;

        struct config_target *targets;
        size_t n_targets;
        struct config_slot *slots;
        size_t n_slots;
};

/* Parses path into a new config, by the syntax rules of otad.conf(5).
 * Logs every syntax error as "path:line: what", naming the section
 * ("[target.app]"); rules across keys are checked on a file without any.
 * Returns 0, or a negative errno (-EINVAL for a bad file) with *ret
 * untouched. What the values point to is config_check()'s business. */
int config_load(const char *path, struct otad_config **ret);
void config_free(struct otad_config *config);

const char *target_type_to_string(enum target_type t);
const char *bootloader_type_to_string(enum bootloader_type t);
const struct config_slot *config_find_slot(const struct otad_config *config,
                                           const char *class_name, const char *name);
