/* SPDX-License-Identifier: MIT */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/types.h>

#include "config.h"
#include "log.h"
#include "macro.h"
#include "utf8.h"

/* Which struct an item's offset points into. */
enum section_kind {
        SECTION_FIXED,  /* [mqtt], [ota], ...: struct otad_config */
        SECTION_TARGET, /* [target.NAME]: struct config_target */
        SECTION_SLOT,   /* [slot.CLASS.NAME]: struct config_slot */
};

/* otad.conf(5) promises these limits. A line (without its newline) is at
 * most this long, which bounds every value and the memory a parse takes. */
#define CONFIG_LINE_MAX 4096
/* NAME of [target.NAME], CLASS and NAME of [slot.CLASS.NAME]. */
#define CONFIG_NAME_MAX 64
/* How much of a bad value an error message repeats. */
#define EXCERPT_MAX 100
/* Syntax errors reported before giving up on a file: a binary file or a
 * wrong path should not print one error per line. */
#define ERRORS_MAX 20

struct config_item;
typedef int (*config_parse_fn)(const struct config_item *item, const char *value, void *dest);

struct config_item {
        const char *section; /* "mqtt", or "target" / "slot" for named sections */
        const char *key;
        config_parse_fn parse;
        size_t offset;
        const char *default_value; /* NULL: no default */
        bool required;
        bool nonempty;               /* strings: "" means nothing, refuse it */
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
/* STR may be empty (it then means "none" or "the default behaviour", as
 * otad.conf(5) says for each); NONEMPTY and REQ may not. */
#define STR(sec, key, off, def) { sec, key, parse_string, off, def, false, false, 0, 0, NULL }
#define NONEMPTY(sec, key, off, def) { sec, key, parse_string, off, def, false, true, 0, 0, NULL }
#define REQ(sec, key, off) { sec, key, parse_string, off, NULL, true, true, 0, 0, NULL }
#define INT(sec, key, off, def, lo, hi) { sec, key, parse_int, off, def, false, false, lo, hi, NULL }
#define BOOL(sec, key, off, def) { sec, key, parse_bool, off, def, false, false, 0, 0, NULL }
#define ENUM(sec, key, off, def, names) { sec, key, parse_enum, off, def, false, false, 0, 0, names }

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

        NONEMPTY("state", "directory", C(state.directory), "/var/lib/otad"),

        { "log", "level", parse_log_level, C(log.level), "info", false, false, 0, 0, NULL },

        NONEMPTY("jobs", "handler_dir", C(jobs.handler_dir), "/etc/otad/handlers"),
        INT("jobs", "handler_timeout", C(jobs.handler_timeout), "600", 1, 604800),
        NONEMPTY("jobs", "operation_key", C(jobs.operation_key), "operation"),

        ENUM("ota", "protocol", C(ota.protocol), "mqtt", protocol_names),
        INT("ota", "block_size", C(ota.block_size), "32768", 256, 131072),
        INT("ota", "window", C(ota.window), "4", 1, 64),
        INT("ota", "max_requests_per_second", C(ota.max_requests_per_second), "20", 0, 100),
        INT("ota", "request_timeout", C(ota.request_timeout), "10", 1, 3600),
        INT("ota", "momentum", C(ota.momentum), "32", 1, 1000),
        INT("ota", "progress_interval", C(ota.progress_interval), "10", 0, 86400),
        NONEMPTY("ota", "trust_dir", C(ota.trust_dir), "/etc/otad/trust"),
        STR("ota", "signing_ca", C(ota.signing_ca), ""),
        INT("ota", "http_low_speed_limit", C(ota.http_low_speed_limit), "1024", 0, INT32_MAX),
        INT("ota", "http_low_speed_time", C(ota.http_low_speed_time), "30", 1, 3600),
        INT("ota", "http_retries", C(ota.http_retries), "5", 0, 100),
        STR("ota", "http_ca_file", C(ota.http_ca_file), ""),

        STR("update", "version", C(update.version), ""),
        NONEMPTY("update", "os_release", C(update.os_release), "/etc/os-release"),
        BOOL("update", "allow_downgrade", C(update.allow_downgrade), "no"),
        BOOL("update", "allow_same_version", C(update.allow_same_version), "no"),
        STR("update", "compatible", C(update.compatible), ""),
        ENUM("update", "reboot_policy", C(update.reboot_policy), "immediate", reboot_policy_names),
        NONEMPTY("update", "reboot_command", C(update.reboot_command), "systemctl reboot"),
        INT("update", "reboot_delay", C(update.reboot_delay), "0", 0, 604800),
        STR("update", "reboot_marker", C(update.reboot_marker), ""),
        STR("update", "health_check", C(update.health_check), ""),
        INT("update", "health_timeout", C(update.health_timeout), "300", 1, 86400),
        BOOL("update", "wait_system_running", C(update.wait_system_running), "yes"),
        STR("update", "booted_slot", C(update.booted_slot), ""),

        ENUM("bootloader", "type", C(bootloader.type), "none", bootloader_names),
        NONEMPTY("bootloader", "grubenv", C(bootloader.grubenv), "/boot/grub/grubenv"),
        NONEMPTY("bootloader", "fw_env_config", C(bootloader.fw_env_config), "/etc/fw_env.config"),
        STR("bootloader", "command", C(bootloader.command), ""),

        { "target", "type", parse_enum, T(type), NULL, true, false, 0, 0, target_type_names },
        NONEMPTY("target", "match_filepath", T(match_filepath), "*"),
        INT("target", "match_file_type", T(match_file_type), "-1", -1, 255),
        STR("target", "directory", T(directory), ""),
        STR("target", "command", T(command), ""),
        INT("target", "timeout", T(timeout), "3600", 0, 604800),
        NONEMPTY("target", "slot_class", T(slot_class), "rootfs"),

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

/* Decimal digits, a '-' only where negative numbers are allowed: no
 * blanks, no '+', no hex, nothing after the number. */
static int parse_int(const struct config_item *item, const char *value, void *dest) {
        const char *digits = value[0] == '-' && item->min < 0 ? value + 1 : value;
        long long v;

        if (!*digits || strspn(digits, "0123456789") != strlen(digits))
                return -EINVAL;
        errno = 0;
        v = strtoll(value, NULL, 10);
        if (errno != 0 || v < item->min || v > item->max)
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

static bool is_name(const char *s, const char *extra, size_t max) {
        size_t n = strlen(s);

        if (n == 0 || n > max)
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
        int error;            /* the first syntax error; parsing goes on to report every one */
        unsigned n_errors;
        enum section_kind kind;
        const char *section;  /* item section name to match; NULL before the first header */
        bool skipping;        /* after a bad section header: its keys are not looked at */
        char section_name[sizeof("slot..") + 2 * CONFIG_NAME_MAX]; /* "target.app", for messages */
        char in_section[sizeof(" in section []") + sizeof("slot..") + 2 * CONFIG_NAME_MAX]; /* or "" */
        size_t instance;      /* index into targets/slots */
        unsigned *fixed_lines;     /* ELEMENTSOF(items): line where set, 0 = unset */
        unsigned **target_lines;   /* the same, per [target.*] section */
        unsigned **slot_lines;     /* the same, per [slot.*.*] section */
        unsigned section_lines[ELEMENTSOF(fixed_sections)];
};

/* Logs "path:line: message" ("path: message" for line 0), remembers the
 * first error and returns -EINVAL. */
static int parse_error(struct parser *p, unsigned line, const char *format, ...) __attribute__((format(printf, 3, 4)));
static int parse_error(struct parser *p, unsigned line, const char *format, ...) {
        char message[1024];
        va_list ap;

        va_start(ap, format);
        vsnprintf(message, sizeof(message), format, ap);
        va_end(ap);
        if (line > 0)
                log_error("%s:%u: %s", p->path, line, message);
        else
                log_error("%s: %s", p->path, message);
        if (p->error == 0)
                p->error = -EINVAL;
        p->n_errors++;
        return -EINVAL;
}

/* A key or value as a message repeats it: at most EXCERPT_MAX bytes, cut
 * at a character boundary (lines are valid UTF-8 by then), "..." when cut. */
static const char *excerpt(const char *s, char buf[static EXCERPT_MAX + 4]) {
        size_t n = strlen(s);

        if (n <= EXCERPT_MAX)
                return s;
        n = EXCERPT_MAX;
        while (n > 0 && ((unsigned char) s[n] & 0xc0) == 0x80)
                n--;
        memcpy(buf, s, n);
        memcpy(buf + n, "...", 4);
        return buf;
}

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

/* A fixed section appears once: a second [mqtt] further down is more likely
 * a pasted block than an intended merge, and its keys would silently meet
 * the first one's. */
static int start_fixed(struct parser *p, size_t i) {
        if (p->section_lines[i])
                return parse_error(p, p->line, "Section [%s] already defined at line %u",
                                   fixed_sections[i], p->section_lines[i]);
        p->section_lines[i] = p->line;
        p->kind = SECTION_FIXED;
        p->section = fixed_sections[i];
        return 0;
}

static int start_target(struct parser *p, const char *name) {
        struct otad_config *c = p->config;
        struct config_target *t;
        int r;

        for (size_t i = 0; i < c->n_targets; i++)
                if (strcmp(c->targets[i].name, name) == 0)
                        return parse_error(p, p->line, "Section [target.%s] already defined at line %u",
                                           name, c->targets[i].line);
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
        const struct config_slot *first;
        struct config_slot *s;
        char *dot, e[EXCERPT_MAX + 4];
        int r;

        if (!class_name)
                return log_error_errno(-ENOMEM, "Out of memory");
        dot = strchr(class_name, '.');
        if (!dot || (*dot = '\0', !is_name(class_name, "_-", CONFIG_NAME_MAX)) ||
            !is_name(dot + 1, "_-", CONFIG_NAME_MAX))
                return parse_error(p, p->line,
                                   "Invalid section [slot.%s]: slot sections are named [slot.CLASS.NAME], "
                                   "e.g. [slot.rootfs.a], CLASS and NAME 1 to %d of [A-Za-z0-9_-]",
                                   excerpt(class_and_name, e), CONFIG_NAME_MAX);
        first = config_find_slot(c, class_name, dot + 1);
        if (first)
                return parse_error(p, p->line, "Section [slot.%s] already defined at line %u", class_and_name,
                                   first->line);
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

/* Blanks are spaces and tabs; other control characters never get here. */
static char *strip(char *s) {
        char *end;

        s += strspn(s, " \t");
        end = s + strlen(s);
        while (end > s && (end[-1] == ' ' || end[-1] == '\t'))
                *--end = '\0';
        return s;
}

static int start_section(struct parser *p, const char *name) {
        char e[EXCERPT_MAX + 4];

        for (size_t i = 0; i < ELEMENTSOF(fixed_sections); i++)
                if (strcmp(name, fixed_sections[i]) == 0)
                        return start_fixed(p, i);
        if (strncmp(name, "target.", 7) == 0) {
                if (!is_name(name + 7, "_-", CONFIG_NAME_MAX))
                        return parse_error(p, p->line, "Invalid target name '%s': 1 to %d of [A-Za-z0-9_-]",
                                           excerpt(name + 7, e), CONFIG_NAME_MAX);
                return start_target(p, name + 7);
        }
        if (strncmp(name, "slot.", 5) == 0)
                return start_slot(p, name + 5);
        return parse_error(p, p->line, "Unknown section [%s]", excerpt(name, e));
}

static int parse_section_header(struct parser *p, char *line) {
        char *end = strchr(line, ']');
        char *name = line + 1, *rest;
        char e1[EXCERPT_MAX + 4], e2[EXCERPT_MAX + 4];
        int r;

        /* Until this header proves good, the keys below it belong nowhere. */
        p->section = NULL;
        p->skipping = true;
        p->in_section[0] = '\0';

        if (!end)
                return parse_error(p, p->line, "Malformed section header '%s', expected [name]", excerpt(line, e1));
        *end = '\0';
        rest = strip(end + 1);
        if (*rest)
                return parse_error(p, p->line, "Text after the section header [%s]: '%s'", excerpt(name, e1),
                                   excerpt(rest, e2));
        r = start_section(p, name);
        if (r < 0)
                return r;
        p->skipping = false;
        snprintf(p->section_name, sizeof(p->section_name), "%s", name);
        snprintf(p->in_section, sizeof(p->in_section), " in section [%s]", p->section_name);
        return 0;
}

/* A value in double quotes keeps its blanks; inside them \" is a quote and
 * \\ a backslash, and nothing else is an escape. A bare value is taken as
 * written, quotes and backslashes included (a shell command stays one). */
static int unquote(struct parser *p, const char *key, char *raw, char **ret) {
        char *in = raw + 1, *out = raw, e[EXCERPT_MAX + 4];

        if (raw[0] != '"') {
                *ret = raw;
                return 0;
        }
        for (; *in && *in != '"'; in++) {
                if (*in == '\\' && (in[1] == '"' || in[1] == '\\'))
                        in++;
                else if (*in == '\\' && in[1]) {
                        uint32_t cp;
                        int len = utf8_decode(in + 1, strlen(in + 1), &cp);

                        return parse_error(p, p->line,
                                           "Unknown escape '\\%.*s' in the value of %s in [%s]: "
                                           "inside quotes only \\\" and \\\\ are escapes",
                                           len > 0 ? len : 1, in + 1, key, p->section_name);
                }
                *out++ = *in;
        }
        if (*in != '"')
                return parse_error(p, p->line, "The value of %s in [%s] has no closing quote", key, p->section_name);
        if (in[1])
                return parse_error(p, p->line, "Text after the closing quote of %s in [%s]: '%s'", key,
                                   p->section_name, excerpt(strip(in + 1), e));
        *out = '\0';
        *ret = raw;
        return 0;
}

static int parse_assignment(struct parser *p, char *line) {
        char *eq = strchr(line, '=');
        const struct config_item *item = NULL;
        char *key, *value = NULL, e[EXCERPT_MAX + 4];
        char expected[128];
        unsigned *lines;
        size_t i;
        int r;

        if (p->skipping)
                return 0;
        if (!p->section)
                return parse_error(p, p->line, "Assignment outside of a section");
        if (!eq)
                return parse_error(p, p->line, "Expected key = value in section [%s]", p->section_name);
        *eq = '\0';
        key = strip(line);
        if (!*key)
                return parse_error(p, p->line, "Empty key before '=' in section [%s]", p->section_name);
        for (i = 0; i < ELEMENTSOF(items) && !item; i++)
                if (strcmp(items[i].section, p->section) == 0 && strcmp(items[i].key, key) == 0)
                        item = &items[i];
        if (!item)
                return parse_error(p, p->line, "Unknown key '%s' in section [%s]", excerpt(key, e), p->section_name);
        i = (size_t) (item - items);
        lines = p->kind == SECTION_FIXED    ? p->fixed_lines
                : p->kind == SECTION_TARGET ? p->target_lines[p->instance]
                                            : p->slot_lines[p->instance];
        if (lines[i])
                return parse_error(p, p->line, "Key '%s' in [%s] already set at line %u", key, p->section_name, lines[i]);
        r = unquote(p, key, strip(eq + 1), &value);
        if (r < 0)
                return r;
        if (!*value && item->nonempty) {
                if (item->default_value)
                        return parse_error(p, p->line, "%s in [%s] needs a value (remove the line for the default, %s)",
                                           key, p->section_name, item->default_value);
                return parse_error(p, p->line, "%s in [%s] needs a value", key, p->section_name);
        }
        r = item->parse(item, value, (char *) base_of(p) + item->offset);
        if (r == -ENOMEM)
                return log_error_errno(r, "Out of memory");
        if (r < 0) {
                describe_expected(item, expected, sizeof(expected));
                return parse_error(p, p->line, "Invalid value '%s' for %s in [%s]: expected %s", excerpt(value, e), key,
                                   p->section_name, expected);
        }
        lines[i] = p->line;
        return 0;
}

/* otad.conf is text: valid UTF-8 without control characters but the tab.
 * Anything else is an editor accident or a truncated write, and a NUL
 * would silently cut the value short. */
static int check_characters(struct parser *p, const char *line, size_t n) {
        size_t column = 1;

        for (size_t i = 0; i < n; column++) {
                uint32_t cp;
                int len = utf8_decode(line + i, n - i, &cp);

                if (len < 0)
                        return parse_error(p, p->line, "Invalid UTF-8 at column %zu%s", column, p->in_section);
                if (cp == 0)
                        return parse_error(p, p->line, "NUL byte at column %zu%s", column, p->in_section);
                if ((cp < 0x20 && cp != '\t') || (cp >= 0x7f && cp < 0xa0))
                        return parse_error(p, p->line, "Control character 0x%02x at column %zu%s", (unsigned) cp, column,
                                           p->in_section);
                i += (size_t) len;
        }
        return 0;
}

static int parse_line(struct parser *p, char *line, size_t n) {
        /* A byte order mark some editors write; systemd skips it too. */
        if (p->line == 1 && n >= 3 && memcmp(line, "\xef\xbb\xbf", 3) == 0) {
                line += 3;
                n -= 3;
        }
        /* A file saved with CRLF line endings. */
        if (n > 0 && line[n - 1] == '\r')
                line[--n] = '\0';
        if (check_characters(p, line, n) < 0)
                return -EINVAL;
        line = strip(line);
        if (*line == '\0' || *line == '#' || *line == ';')
                return 0;
        return *line == '[' ? parse_section_header(p, line) : parse_assignment(p, line);
}

/* Reads the next line of f into buf (CONFIG_LINE_MAX + 1 bytes) without its
 * newline. Returns its length; -ENODATA at the end of the file; -E2BIG for
 * a longer line, read to its end but not kept, so memory stays bounded;
 * another negative errno when reading fails. */
static ssize_t read_line(FILE *f, char *buf) {
        bool too_long = false;
        size_t n = 0;
        int ch;

        while ((ch = getc_unlocked(f)) != EOF && ch != '\n') {
                if (n < CONFIG_LINE_MAX)
                        buf[n++] = (char) ch;
                else
                        too_long = true;
        }
        if (ch == EOF && ferror(f))
                return errno > 0 ? -errno : -EIO;
        if (ch == EOF && n == 0 && !too_long)
                return -ENODATA;
        buf[n] = '\0';
        return too_long ? -E2BIG : (ssize_t) n;
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
                                        return parse_error(p, c->targets[t].line, "[target.%s] needs %s=",
                                                           c->targets[t].name, item->key);
                } else if (strcmp(item->section, "slot") == 0) {
                        for (size_t s = 0; s < c->n_slots; s++)
                                if (string_missing(&c->slots[s], item))
                                        return parse_error(p, c->slots[s].line, "[slot.%s.%s] needs %s=",
                                                           c->slots[s].class_name, c->slots[s].name, item->key);
                } else if (string_missing(c, item)) {
                        unsigned where = 0;

                        for (size_t s = 0; s < ELEMENTSOF(fixed_sections); s++)
                                if (strcmp(fixed_sections[s], item->section) == 0)
                                        where = p->section_lines[s];
                        if (where)
                                return parse_error(p, where, "Missing required key '%s' in section [%s]",
                                                   item->key, item->section);
                        return parse_error(p, 0, "Missing required key '%s': there is no [%s] section",
                                           item->key, item->section);
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

/* Where [section] key of a fixed section was set; 0 when it kept its default. */
static unsigned key_line(const struct parser *p, const char *section, const char *key) {
        for (size_t i = 0; i < ELEMENTSOF(items); i++)
                if (strcmp(items[i].section, section) == 0 && strcmp(items[i].key, key) == 0)
                        return p->fixed_lines[i];
        return 0;
}

/* Rules that span keys; each names the line to look at. */
static int check_consistency(struct parser *p) {
        struct otad_config *c = p->config;
        char e[EXCERPT_MAX + 4];

        if (!is_name(c->mqtt.thing_name, ":_-", 128))
                return parse_error(p, key_line(p, "mqtt", "thing_name"),
                                   "thing_name '%s' must be 1-128 of [a-zA-Z0-9:_-] (AWS IoT thing name rule)",
                                   excerpt(c->mqtt.thing_name, e));
        if (!*c->mqtt.client_id && parse_string(NULL, c->mqtt.thing_name, &c->mqtt.client_id) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");
        if (strlen(c->mqtt.client_id) > 128 || c->mqtt.client_id[0] == '$')
                return parse_error(p, key_line(p, "mqtt", "client_id"),
                                   "client_id must be at most 128 bytes and not start with '$' (AWS IoT rule)");
        /* AWS IoT treats 0 and >1200 as 1200 and 1..29 as 30; say so rather
         * than let the broker surprise the user. */
        if (c->mqtt.keepalive < 30 || c->mqtt.keepalive > 1200) {
                int64_t clamped = c->mqtt.keepalive < 30 && c->mqtt.keepalive != 0 ? 30 : 1200;

                log_notice("%s:%u: keepalive %" PRId64 " is outside AWS IoT's 30..1200 s, using %" PRId64,
                           p->path, key_line(p, "mqtt", "keepalive"), c->mqtt.keepalive, clamped);
                c->mqtt.keepalive = clamped;
        }
        if (c->mqtt.reconnect_min > c->mqtt.reconnect_max) {
                unsigned min_line = key_line(p, "mqtt", "reconnect_min"), max_line = key_line(p, "mqtt", "reconnect_max");

                return parse_error(p, min_line > max_line ? min_line : max_line,
                                   "reconnect_min (%" PRId64 ") is larger than reconnect_max (%" PRId64 ")",
                                   c->mqtt.reconnect_min, c->mqtt.reconnect_max);
        }
        if (c->state.directory[0] != '/')
                return parse_error(p, key_line(p, "state", "directory"), "[state] directory must be an absolute path");
        if (c->update.reboot_policy == REBOOT_MARKER && !*c->update.reboot_marker)
                return parse_error(p, key_line(p, "update", "reboot_policy"),
                                   "reboot_policy=marker in [update] needs reboot_marker=");
        if (c->bootloader.type == BOOTLOADER_CUSTOM && !*c->bootloader.command)
                return parse_error(p, key_line(p, "bootloader", "type"), "type=custom in [bootloader] needs command=");

        for (size_t i = 0; i < c->n_targets; i++) {
                const struct config_target *t = &c->targets[i];

                if (t->type == TARGET_FILE && !*t->directory)
                        return parse_error(p, t->line, "[target.%s] type=file needs directory=", t->name);
                if (t->type == TARGET_COMMAND && !*t->command)
                        return parse_error(p, t->line, "[target.%s] type=command needs command=", t->name);
                if (t->type == TARGET_AB) {
                        if (count_slots(c, t->slot_class) != 2)
                                return parse_error(p, t->line,
                                                   "[target.%s] type=ab needs exactly two [slot.%s.NAME] sections, found %zu",
                                                   t->name, t->slot_class, count_slots(c, t->slot_class));
                        if (c->bootloader.type == BOOTLOADER_NONE)
                                return parse_error(p, t->line, "[target.%s] type=ab needs a [bootloader] type", t->name);
                }
        }
        for (size_t i = 0; i < c->n_slots; i++)
                for (size_t j = 0; j < i; j++)
                        if (strcmp(c->slots[i].class_name, c->slots[j].class_name) == 0 &&
                            strcmp(c->slots[i].bootname, c->slots[j].bootname) == 0)
                                return parse_error(p, c->slots[i].line, "bootname '%s' already used by [slot.%s.%s]",
                                                   c->slots[i].bootname, c->slots[j].class_name, c->slots[j].name);
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
        _cleanup_free_ char *buf = NULL;
        struct otad_config *c = NULL;
        struct parser p = { .path = path };
        int r;

        f = fopen(path, "re");
        if (!f)
                return log_error_errno(-errno, "Failed to open %s: %m", path);
        buf = malloc(CONFIG_LINE_MAX + 1);
        c = calloc(1, sizeof(*c));
        p.fixed_lines = calloc(ELEMENTSOF(items), sizeof(unsigned));
        if (!buf || !c || !p.fixed_lines || !(c->path = strdup(path))) {
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

        /* Every syntax error is reported, as a compiler does, so that one
         * run of --check-config names them all; the rules across keys are
         * checked only on a file without any. */
        for (;;) {
                ssize_t n = read_line(f, buf);

                if (n == -ENODATA)
                        break;
                if (n < 0 && n != -E2BIG) {
                        r = log_error_errno((int) n, "Failed to read %s: %m", path);
                        goto fail;
                }
                p.line++;
                if (n == -E2BIG)
                        r = parse_error(&p, p.line, "Line longer than %d bytes%s", CONFIG_LINE_MAX, p.in_section);
                else
                        r = parse_line(&p, buf, (size_t) n);
                if (r < 0 && r != -EINVAL)
                        goto fail;
                if (p.n_errors >= ERRORS_MAX) {
                        log_error("%s: %u errors, not reading further", path, p.n_errors);
                        break;
                }
        }
        r = p.error;
        if (r < 0)
                goto fail;
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
