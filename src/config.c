/* SPDX-License-Identifier: MIT */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "macro.h"

/* Which struct an item's offset points into. */
enum section_kind {
        SECTION_FIXED,  /* [mqtt], [ota], ...: struct otad_config */
        SECTION_TARGET, /* [target.NAME]: struct config_target */
        SECTION_SLOT,   /* [slot.CLASS.NAME]: struct config_slot */
};

struct config_item;
typedef int (*config_parse_fn)(const struct config_item *item, const char *value, void *dest);

struct config_item {
        const char *section; /* "mqtt", or "target" / "slot" for named sections */
        const char *key;
        config_parse_fn parse;
        size_t offset;
        const char *default_value; /* NULL: no default */
        bool required;
        int64_t min, max;            /* integers */
        const char *const *choices;  /* enums: index = value */
};

static int parse_string(const struct config_item *item, const char *value, void *dest);
static int parse_int(const struct config_item *item, const char *value, void *dest);
static int parse_bool(const struct config_item *item, const char *value, void *dest);
static int parse_enum(const struct config_item *item, const char *value, void *dest);
static int parse_log_level(const struct config_item *item, const char *value, void *dest);

static const char *const protocol_names[] = { [OTA_PROTOCOL_MQTT] = "mqtt", [OTA_PROTOCOL_HTTP] = "http", NULL };
static const char *const target_type_names[] = {
        [TARGET_FILE] = "file", [TARGET_AB] = "ab", [TARGET_COMMAND] = "command", NULL
};
static const char *const bootloader_names[] = {
        [BOOTLOADER_NONE] = "none", [BOOTLOADER_GRUB] = "grub",
        [BOOTLOADER_UBOOT] = "uboot", [BOOTLOADER_CUSTOM] = "custom", NULL
};
static const char *const reboot_policy_names[] = {
        [REBOOT_IMMEDIATE] = "immediate", [REBOOT_DELAY] = "delay", [REBOOT_MARKER] = "marker", NULL
};

#define C(field) offsetof(struct otad_config, field)
#define T(field) offsetof(struct config_target, field)
#define S(field) offsetof(struct config_slot, field)
#define STR(sec, key, off, def) { sec, key, parse_string, off, def, false, 0, 0, NULL }
#define REQ(sec, key, off) { sec, key, parse_string, off, NULL, true, 0, 0, NULL }
#define INT(sec, key, off, def, lo, hi) { sec, key, parse_int, off, def, false, lo, hi, NULL }
#define BOOL(sec, key, off, def) { sec, key, parse_bool, off, def, false, 0, 0, NULL }
#define ENUM(sec, key, off, def, names) { sec, key, parse_enum, off, def, false, 0, 0, names }

/* The one table: every key otad reads. Keep man/otad.conf.5 and
 * etc/otad.conf in step with it. */
static const struct config_item items[] = {
        REQ("mqtt", "endpoint", C(mqtt.endpoint)),
        INT("mqtt", "port", C(mqtt.port), "8883", 1, 65535),
        REQ("mqtt", "thing_name", C(mqtt.thing_name)),
        STR("mqtt", "client_id", C(mqtt.client_id), ""),
        REQ("mqtt", "ca_file", C(mqtt.ca_file)),
        REQ("mqtt", "cert_file", C(mqtt.cert_file)),
        REQ("mqtt", "key_file", C(mqtt.key_file)),
        INT("mqtt", "keepalive", C(mqtt.keepalive), "60", 0, 65535),
        BOOL("mqtt", "clean_session", C(mqtt.clean_session), "yes"),
        INT("mqtt", "reconnect_min", C(mqtt.reconnect_min), "1", 1, 3600),
        INT("mqtt", "reconnect_max", C(mqtt.reconnect_max), "120", 1, 86400),

        STR("state", "directory", C(state.directory), "/var/lib/otad"),

        { "log", "level", parse_log_level, C(log.level), "info", false, 0, 0, NULL },

        STR("jobs", "handler_dir", C(jobs.handler_dir), "/etc/otad/handlers"),
        INT("jobs", "handler_timeout", C(jobs.handler_timeout), "600", 1, 604800),
        STR("jobs", "operation_key", C(jobs.operation_key), "operation"),

        ENUM("ota", "protocol", C(ota.protocol), "mqtt", protocol_names),
        INT("ota", "block_size", C(ota.block_size), "32768", 256, 131072),
        INT("ota", "window", C(ota.window), "4", 1, 64),
        INT("ota", "max_requests_per_second", C(ota.max_requests_per_second), "20", 0, 100),
        INT("ota", "request_timeout", C(ota.request_timeout), "10", 1, 3600),
        INT("ota", "momentum", C(ota.momentum), "32", 1, 1000),
        INT("ota", "progress_interval", C(ota.progress_interval), "10", 0, 86400),
        STR("ota", "trust_dir", C(ota.trust_dir), "/etc/otad/trust"),
        STR("ota", "signing_ca", C(ota.signing_ca), ""),
        INT("ota", "http_low_speed_limit", C(ota.http_low_speed_limit), "1024", 0, INT32_MAX),
        INT("ota", "http_low_speed_time", C(ota.http_low_speed_time), "30", 1, 3600),
        INT("ota", "http_retries", C(ota.http_retries), "5", 0, 100),
        STR("ota", "http_ca_file", C(ota.http_ca_file), ""),

        STR("update", "version", C(update.version), ""),
        STR("update", "os_release", C(update.os_release), "/etc/os-release"),
        BOOL("update", "allow_downgrade", C(update.allow_downgrade), "no"),
        BOOL("update", "allow_same_version", C(update.allow_same_version), "no"),
        STR("update", "compatible", C(update.compatible), ""),
        ENUM("update", "reboot_policy", C(update.reboot_policy), "immediate", reboot_policy_names),
        STR("update", "reboot_command", C(update.reboot_command), "systemctl reboot"),
        INT("update", "reboot_delay", C(update.reboot_delay), "0", 0, 604800),
        STR("update", "reboot_marker", C(update.reboot_marker), ""),
        STR("update", "health_check", C(update.health_check), ""),
        INT("update", "health_timeout", C(update.health_timeout), "300", 1, 86400),
        BOOL("update", "wait_system_running", C(update.wait_system_running), "yes"),
        STR("update", "booted_slot", C(update.booted_slot), ""),

        ENUM("bootloader", "type", C(bootloader.type), "none", bootloader_names),
        STR("bootloader", "grubenv", C(bootloader.grubenv), "/boot/grub/grubenv"),
        STR("bootloader", "fw_env_config", C(bootloader.fw_env_config), "/etc/fw_env.config"),
        STR("bootloader", "command", C(bootloader.command), ""),

        { "target", "type", parse_enum, T(type), NULL, true, 0, 0, target_type_names },
        STR("target", "match_filepath", T(match_filepath), "*"),
        INT("target", "match_file_type", T(match_file_type), "-1", -1, 255),
        STR("target", "directory", T(directory), ""),
        STR("target", "command", T(command), ""),
        STR("target", "slot_class", T(slot_class), "rootfs"),

        REQ("slot", "device", S(device)),
        REQ("slot", "bootname", S(bootname)),
};

static const char *const fixed_sections[] = { "mqtt", "state", "log", "jobs", "ota", "update", "bootloader" };

/* Parsers log nothing: they return -EINVAL and the caller names file:line. */
static int parse_string(const struct config_item *item, const char *value, void *dest) {
        char **s = dest;
        char *copy = strdup(value);

        if (!copy)
                return -ENOMEM;
        free(*s);
        *s = copy;
        return 0;
}

static int parse_int(const struct config_item *item, const char *value, void *dest) {
        char *end;
        long long v;

        errno = 0;
        v = strtoll(value, &end, 10);
        if (errno != 0 || end == value || *end != '\0' || v < item->min || v > item->max)
                return -EINVAL;
        *(int64_t *) dest = v;
        return 0;
}

static int parse_bool(const struct config_item *item, const char *value, void *dest) {
        static const char *const yes[] = { "yes", "true", "on", "1" };
        static const char *const no[] = { "no", "false", "off", "0" };

        for (size_t i = 0; i < ELEMENTSOF(yes); i++) {
                if (strcasecmp(value, yes[i]) == 0) {
                        *(bool *) dest = true;
                        return 0;
                }
                if (strcasecmp(value, no[i]) == 0) {
                        *(bool *) dest = false;
                        return 0;
                }
        }
        return -EINVAL;
}

static int parse_enum(const struct config_item *item, const char *value, void *dest) {
        for (int i = 0; item->choices[i]; i++)
                if (strcmp(value, item->choices[i]) == 0) {
                        *(int *) dest = i;
                        return 0;
                }
        return -EINVAL;
}

static int parse_log_level(const struct config_item *item, const char *value, void *dest) {
        int level = log_level_from_string(value);

        if (level < 0)
                return -EINVAL;
        *(int *) dest = level;
        return 0;
}

/* What a user should have written, for the error message. */
static void describe_expected(const struct config_item *item, char *buf, size_t size) {
        if (item->parse == parse_int)
                snprintf(buf, size, "an integer from %" PRId64 " to %" PRId64, item->min, item->max);
        else if (item->parse == parse_bool)
                snprintf(buf, size, "yes or no");
        else if (item->parse == parse_log_level)
                snprintf(buf, size, "err, warning, notice, info or debug");
        else if (item->parse == parse_enum) {
                size_t n = 0;

                buf[0] = '\0';
                for (int i = 0; item->choices[i] && n < size; i++)
                        n += (size_t) snprintf(buf + n, size - n, "%s%s", i ? ", " : "one of ", item->choices[i]);
        } else
                snprintf(buf, size, "a string");
}

static bool is_name(const char *s, const char *extra) {
        if (!*s)
                return false;
        for (; *s; s++)
                if (!isalnum((unsigned char) *s) && !strchr(extra, *s))
                        return false;
        return true;
}

/* The parse in progress: where we are and which keys each section has set. */
struct parser {
        struct otad_config *config;
        const char *path;
        unsigned line;
        enum section_kind kind;
        const char *section;  /* item section name to match */
        void *base;           /* struct the offsets point into */
        size_t instance;      /* index into targets/slots */
        unsigned *fixed_lines;     /* ELEMENTSOF(items): line where set, 0 = unset */
        unsigned **target_lines;   /* the same, per [target.*] section */
        unsigned **slot_lines;     /* the same, per [slot.*.*] section */
        unsigned section_lines[ELEMENTSOF(fixed_sections)];
};

static int apply_defaults(const char *section, void *base) {
        for (size_t i = 0; i < ELEMENTSOF(items); i++) {
                int r;

                if (strcmp(items[i].section, section) != 0 || !items[i].default_value)
                        continue;
                r = items[i].parse(&items[i], items[i].default_value, (char *) base + items[i].offset);
                if (r < 0)
                        return r; /* a bad default is a bug in the table */
        }
        return 0;
}

static void *base_of(struct parser *p) {
        if (p->kind == SECTION_TARGET)
                return &p->config->targets[p->instance];
        if (p->kind == SECTION_SLOT)
                return &p->config->slots[p->instance];
        return p->config;
}

/* Adds the line record of instance n (0-based) to *lines. */
static int grow_instance_lines(unsigned ***lines, size_t n) {
        unsigned **grown = realloc(*lines, (n + 1) * sizeof(*grown));

        if (!grown)
                return -ENOMEM;
        *lines = grown;
        grown[n] = calloc(ELEMENTSOF(items), sizeof(unsigned));
        return grown[n] ? 0 : -ENOMEM;
}

static int start_target(struct parser *p, const char *name) {
        struct otad_config *c = p->config;
        struct config_target *t;
        int r;

        for (size_t i = 0; i < c->n_targets; i++)
                if (strcmp(c->targets[i].name, name) == 0)
                        return log_error_errno(-EINVAL, "%s:%u: Section [target.%s] already defined at line %u",
                                               p->path, p->line, name, c->targets[i].line);
        t = realloc(c->targets, (c->n_targets + 1) * sizeof(*t));
        if (!t)
                return log_error_errno(-ENOMEM, "Out of memory");
        c->targets = t;
        t = &c->targets[c->n_targets];
        *t = (struct config_target){ .line = p->line };
        t->name = strdup(name);
        if (!t->name)
                return log_error_errno(-ENOMEM, "Out of memory");
        p->kind = SECTION_TARGET;
        p->section = "target";
        r = grow_instance_lines(&p->target_lines, c->n_targets);
        if (r < 0) {
                free(t->name);
                return log_error_errno(r, "Out of memory");
        }
        p->instance = c->n_targets++;
        return apply_defaults("target", t);
}

static int start_slot(struct parser *p, const char *class_and_name) {
        struct otad_config *c = p->config;
        _cleanup_free_ char *class_name = strdup(class_and_name);
        struct config_slot *s;
        char *dot;
        int r;

        if (!class_name)
                return log_error_errno(-ENOMEM, "Out of memory");
        dot = strchr(class_name, '.');
        if (!dot || !is_name(dot + 1, "_-") || (*dot = '\0', !is_name(class_name, "_-")))
                return log_error_errno(-EINVAL, "%s:%u: Slot sections are named [slot.CLASS.NAME], e.g. [slot.rootfs.a]",
                                       p->path, p->line);
        if (config_find_slot(c, class_name, dot + 1))
                return log_error_errno(-EINVAL, "%s:%u: Section [slot.%s] defined twice", p->path, p->line,
                                       class_and_name);
        s = realloc(c->slots, (c->n_slots + 1) * sizeof(*s));
        if (!s)
                return log_error_errno(-ENOMEM, "Out of memory");
        c->slots = s;
        s = &c->slots[c->n_slots];
        *s = (struct config_slot){ .line = p->line };
        s->class_name = strdup(class_name);
        s->name = strdup(dot + 1);
        if (!s->class_name || !s->name)
                return log_error_errno(-ENOMEM, "Out of memory");
        p->kind = SECTION_SLOT;
        p->section = "slot";
        r = grow_instance_lines(&p->slot_lines, c->n_slots);
        if (r < 0) {
                free(s->class_name);
                free(s->name);
                return log_error_errno(r, "Out of memory");
        }
        p->instance = c->n_slots++;
        return 0;
}

static int parse_section_header(struct parser *p, char *line) {
        char *end = strchr(line, ']');
        char *name = line + 1;

        if (!end || end[1] != '\0')
                return log_error_errno(-EINVAL, "%s:%u: Malformed section header, expected [name]", p->path, p->line);
        *end = '\0';
        for (size_t i = 0; i < ELEMENTSOF(fixed_sections); i++)
                if (strcmp(name, fixed_sections[i]) == 0) {
                        p->kind = SECTION_FIXED;
                        p->section = fixed_sections[i];
                        if (!p->section_lines[i])
                                p->section_lines[i] = p->line;
                        return 0;
                }
        if (strncmp(name, "target.", 7) == 0) {
                if (!is_name(name + 7, "_-"))
                        return log_error_errno(-EINVAL, "%s:%u: Invalid target name '%s' (letters, digits, _ and -)",
                                               p->path, p->line, name + 7);
                return start_target(p, name + 7);
        }
        if (strncmp(name, "slot.", 5) == 0)
                return start_slot(p, name + 5);
        return log_error_errno(-EINVAL, "%s:%u: Unknown section [%s]", p->path, p->line, name);
}

static char *strip(char *s) {
        char *end;

        while (isspace((unsigned char) *s))
                s++;
        end = s + strlen(s);
        while (end > s && isspace((unsigned char) end[-1]))
                *--end = '\0';
        return s;
}

static int parse_assignment(struct parser *p, char *line) {
        char *eq = strchr(line, '=');
        char *key, *value;
        unsigned *lines;

        if (!p->section)
                return log_error_errno(-EINVAL, "%s:%u: Assignment outside of a section", p->path, p->line);
        if (!eq)
                return log_error_errno(-EINVAL, "%s:%u: Expected key = value", p->path, p->line);
        *eq = '\0';
        key = strip(line);
        value = strip(eq + 1);
        /* A value may be quoted to keep leading or trailing blanks. */
        if (strlen(value) >= 2 && value[0] == '"' && value[strlen(value) - 1] == '"') {
                value[strlen(value) - 1] = '\0';
                value++;
        }
        lines = p->kind == SECTION_FIXED    ? p->fixed_lines
                : p->kind == SECTION_TARGET ? p->target_lines[p->instance]
                                            : p->slot_lines[p->instance];
        for (size_t i = 0; i < ELEMENTSOF(items); i++) {
                const struct config_item *item = &items[i];
                char expected[128];
                int r;

                if (strcmp(item->section, p->section) != 0 || strcmp(item->key, key) != 0)
                        continue;
                if (lines[i])
                        return log_error_errno(-EINVAL, "%s:%u: Key '%s' in [%s] already set at line %u",
                                               p->path, p->line, key, p->section, lines[i]);
                r = item->parse(item, value, (char *) base_of(p) + item->offset);
                if (r == -ENOMEM)
                        return log_error_errno(r, "Out of memory");
                if (r < 0) {
                        describe_expected(item, expected, sizeof(expected));
                        return log_error_errno(r, "%s:%u: Invalid value '%s' for %s in [%s]: expected %s",
                                               p->path, p->line, value, key, p->section, expected);
                }
                lines[i] = p->line;
                return 0;
        }
        return log_error_errno(-EINVAL, "%s:%u: Unknown key '%s' in section [%s]", p->path, p->line, key, p->section);
}

static bool string_missing(const void *base, const struct config_item *item) {
        const char *s = *(char *const *) ((const char *) base + item->offset);

        return !s || !*s;
}

static int check_required(struct parser *p) {
        const struct otad_config *c = p->config;

        for (size_t i = 0; i < ELEMENTSOF(items); i++) {
                const struct config_item *item = &items[i];

                if (!item->required)
                        continue;
                if (strcmp(item->section, "target") == 0) {
                        for (size_t t = 0; t < c->n_targets; t++)
                                if (!p->target_lines[t][i] ||
                                    (item->parse == parse_string && string_missing(&c->targets[t], item)))
                                        return log_error_errno(-EINVAL, "%s:%u: [target.%s] needs %s=",
                                                               p->path, c->targets[t].line, c->targets[t].name, item->key);
                } else if (strcmp(item->section, "slot") == 0) {
                        for (size_t s = 0; s < c->n_slots; s++)
                                if (string_missing(&c->slots[s], item))
                                        return log_error_errno(-EINVAL, "%s:%u: [slot.%s.%s] needs %s=",
                                                               p->path, c->slots[s].line, c->slots[s].class_name,
                                                               c->slots[s].name, item->key);
                } else if (string_missing(c, item)) {
                        unsigned where = 0;

                        for (size_t s = 0; s < ELEMENTSOF(fixed_sections); s++)
                                if (strcmp(fixed_sections[s], item->section) == 0)
                                        where = p->section_lines[s];
                        if (where)
                                return log_error_errno(-EINVAL, "%s:%u: Missing required key '%s' in section [%s]",
                                                       p->path, where, item->key, item->section);
                        return log_error_errno(-EINVAL, "%s: Missing required key '%s': there is no [%s] section",
                                               p->path, item->key, item->section);
                }
        }
        return 0;
}

static size_t count_slots(const struct otad_config *c, const char *class_name) {
        size_t n = 0;

        for (size_t i = 0; i < c->n_slots; i++)
                n += strcmp(c->slots[i].class_name, class_name) == 0;
        return n;
}

/* Rules that span keys; each names where to look. */
static int check_consistency(struct parser *p) {
        struct otad_config *c = p->config;
        const char *path = p->path;

        if (!is_name(c->mqtt.thing_name, ":_-") || strlen(c->mqtt.thing_name) > 128)
                return log_error_errno(-EINVAL, "%s: thing_name '%s' must be 1-128 of [a-zA-Z0-9:_-] (AWS IoT thing name rule)",
                                       path, c->mqtt.thing_name);
        if (!*c->mqtt.client_id && parse_string(NULL, c->mqtt.thing_name, &c->mqtt.client_id) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");
        if (strlen(c->mqtt.client_id) > 128 || c->mqtt.client_id[0] == '$')
                return log_error_errno(-EINVAL, "%s: client_id must be at most 128 bytes and not start with '$' (AWS IoT rule)",
                                       path);
        /* AWS IoT treats 0 and >1200 as 1200 and 1..29 as 30; say so rather
         * than let the broker surprise the user. */
        if (c->mqtt.keepalive < 30 || c->mqtt.keepalive > 1200) {
                int64_t clamped = c->mqtt.keepalive < 30 && c->mqtt.keepalive != 0 ? 30 : 1200;

                log_notice("%s: keepalive %" PRId64 " is outside AWS IoT's 30..1200 s, using %" PRId64,
                           path, c->mqtt.keepalive, clamped);
                c->mqtt.keepalive = clamped;
        }
        if (c->mqtt.reconnect_min > c->mqtt.reconnect_max)
                return log_error_errno(-EINVAL, "%s: reconnect_min (%" PRId64 ") is larger than reconnect_max (%" PRId64 ")",
                                       path, c->mqtt.reconnect_min, c->mqtt.reconnect_max);
        if (c->state.directory[0] != '/')
                return log_error_errno(-EINVAL, "%s: [state] directory must be an absolute path", path);
        if (c->update.reboot_policy == REBOOT_MARKER && !*c->update.reboot_marker)
                return log_error_errno(-EINVAL, "%s: reboot_policy=marker needs reboot_marker=", path);
        if (c->bootloader.type == BOOTLOADER_CUSTOM && !*c->bootloader.command)
                return log_error_errno(-EINVAL, "%s: [bootloader] type=custom needs command=", path);

        for (size_t i = 0; i < c->n_targets; i++) {
                const struct config_target *t = &c->targets[i];

                if (t->type == TARGET_FILE && !*t->directory)
                        return log_error_errno(-EINVAL, "%s:%u: [target.%s] type=file needs directory=", path, t->line, t->name);
                if (t->type == TARGET_COMMAND && !*t->command)
                        return log_error_errno(-EINVAL, "%s:%u: [target.%s] type=command needs command=", path, t->line, t->name);
                if (t->type == TARGET_AB) {
                        if (count_slots(c, t->slot_class) != 2)
                                return log_error_errno(-EINVAL, "%s:%u: [target.%s] type=ab needs exactly two [slot.%s.NAME] sections, found %zu",
                                                       path, t->line, t->name, t->slot_class, count_slots(c, t->slot_class));
                        if (c->bootloader.type == BOOTLOADER_NONE)
                                return log_error_errno(-EINVAL, "%s:%u: [target.%s] type=ab needs a [bootloader] type",
                                                       path, t->line, t->name);
                }
        }
        for (size_t i = 0; i < c->n_slots; i++)
                for (size_t j = 0; j < i; j++)
                        if (strcmp(c->slots[i].class_name, c->slots[j].class_name) == 0 &&
                            strcmp(c->slots[i].bootname, c->slots[j].bootname) == 0)
                                return log_error_errno(-EINVAL, "%s:%u: bootname '%s' already used by [slot.%s.%s]",
                                                       path, c->slots[i].line, c->slots[i].bootname,
                                                       c->slots[j].class_name, c->slots[j].name);
        return 0;
}

static void parser_done(struct parser *p) {
        size_t n_targets = p->config ? p->config->n_targets : 0, n_slots = p->config ? p->config->n_slots : 0;

        for (size_t i = 0; p->target_lines && i < n_targets; i++)
                free(p->target_lines[i]);
        for (size_t i = 0; p->slot_lines && i < n_slots; i++)
                free(p->slot_lines[i]);
        free(p->target_lines);
        free(p->slot_lines);
        free(p->fixed_lines);
}

int config_load(const char *path, struct otad_config **ret) {
        _cleanup_fclose_ FILE *f = NULL;
        struct otad_config *c = NULL;
        struct parser p = { .path = path };
        _cleanup_free_ char *buf = NULL;
        size_t bufsize = 0;
        int r;

        f = fopen(path, "re");
        if (!f)
                return log_error_errno(-errno, "Failed to open %s: %m", path);
        c = calloc(1, sizeof(*c));
        p.fixed_lines = calloc(ELEMENTSOF(items), sizeof(unsigned));
        if (!c || !p.fixed_lines || !(c->path = strdup(path))) {
                r = log_error_errno(-ENOMEM, "Out of memory");
                goto fail;
        }
        p.config = c;
        for (size_t i = 0; i < ELEMENTSOF(fixed_sections); i++) {
                r = apply_defaults(fixed_sections[i], c);
                if (r < 0) {
                        log_error_errno(r, "Bad built-in default in section [%s]", fixed_sections[i]);
                        goto fail;
                }
        }

        while (getline(&buf, &bufsize, f) >= 0) {
                char *line;

                p.line++;
                line = strip(buf);
                if (*line == '\0' || *line == '#' || *line == ';')
                        continue;
                r = *line == '[' ? parse_section_header(&p, line) : parse_assignment(&p, line);
                if (r < 0)
                        goto fail;
        }
        if (ferror(f)) {
                r = log_error_errno(-EIO, "Failed to read %s", path);
                goto fail;
        }
        r = check_required(&p);
        if (r < 0)
                goto fail;
        r = check_consistency(&p);
        if (r < 0)
                goto fail;

        parser_done(&p);
        *ret = c;
        return 0;
fail:
        parser_done(&p);
        config_free(c);
        return r;
}

static int check_exists(const char *path, const char *what, bool want_dir) {
        struct stat st;

        if (stat(path, &st) < 0)
                return log_error_errno(-errno, "%s %s: %m", what, path);
        if (want_dir && !S_ISDIR(st.st_mode))
                return log_error_errno(-ENOTDIR, "%s %s is not a directory", what, path);
        if (!want_dir && S_ISDIR(st.st_mode))
                return log_error_errno(-EISDIR, "%s %s is a directory", what, path);
        return 0;
}

/* A private key others can read is a stolen device identity waiting to
 * happen; refuse it like ssh does. */
static int check_private_key(const char *path) {
        struct stat st;

        if (stat(path, &st) < 0)
                return log_error_errno(-errno, "key_file %s: %m", path);
        if (st.st_mode & (S_IRWXG | S_IRWXO))
                return log_error_errno(-EPERM, "key_file %s is accessible by group or others (mode %04o); run chmod 600 %s",
                                       path, (unsigned) (st.st_mode & 07777), path);
        return 0;
}

int config_check_files(const struct otad_config *c) {
        int first = 0, r;

#define CHECK(expr) do { r = (expr); if (r < 0 && first == 0) first = r; } while (0)
        CHECK(check_exists(c->mqtt.ca_file, "ca_file", false));
        CHECK(check_exists(c->mqtt.cert_file, "cert_file", false));
        CHECK(check_private_key(c->mqtt.key_file));
        if (c->n_targets > 0)
                CHECK(check_exists(c->ota.trust_dir, "trust_dir", true));
        if (*c->ota.signing_ca)
                CHECK(check_exists(c->ota.signing_ca, "signing_ca", false));
        for (size_t i = 0; i < c->n_targets; i++)
                if (c->targets[i].type == TARGET_FILE)
                        CHECK(check_exists(c->targets[i].directory, "target directory", true));
        for (size_t i = 0; i < c->n_slots; i++)
                CHECK(check_exists(c->slots[i].device, "slot device", false));
        if (c->bootloader.type == BOOTLOADER_GRUB)
                CHECK(check_exists(c->bootloader.grubenv, "grubenv", false));
        if (c->bootloader.type == BOOTLOADER_UBOOT)
                CHECK(check_exists(c->bootloader.fw_env_config, "fw_env_config", false));
#undef CHECK
        return first;
}

static void free_strings(const char *section, void *base) {
        for (size_t i = 0; i < ELEMENTSOF(items); i++)
                if (strcmp(items[i].section, section) == 0 && items[i].parse == parse_string)
                        free(*(char **) ((char *) base + items[i].offset));
}

void config_free(struct otad_config *c) {
        if (!c)
                return;
        for (size_t i = 0; i < ELEMENTSOF(fixed_sections); i++)
                free_strings(fixed_sections[i], c);
        for (size_t i = 0; i < c->n_targets; i++) {
                free_strings("target", &c->targets[i]);
                free(c->targets[i].name);
        }
        for (size_t i = 0; i < c->n_slots; i++) {
                free_strings("slot", &c->slots[i]);
                free(c->slots[i].class_name);
                free(c->slots[i].name);
        }
        free(c->targets);
        free(c->slots);
        free(c->path);
        free(c);
}

const char *target_type_to_string(enum target_type t) {
        return (size_t) t < ELEMENTSOF(target_type_names) - 1 ? target_type_names[t] : NULL;
}

const char *bootloader_type_to_string(enum bootloader_type t) {
        return (size_t) t < ELEMENTSOF(bootloader_names) - 1 ? bootloader_names[t] : NULL;
}

const struct config_slot *config_find_slot(const struct otad_config *c, const char *class_name, const char *name) {
        for (size_t i = 0; i < c->n_slots; i++)
                if (strcmp(c->slots[i].class_name, class_name) == 0 && strcmp(c->slots[i].name, name) == 0)
                        return &c->slots[i];
        return NULL;
}
