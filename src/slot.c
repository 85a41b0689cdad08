/* SPDX-License-Identifier: MIT */
#include "slot.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include "config.h"
#include "fileio.h"
#include "log.h"
#include "macro.h"

#define CMDLINE_MAX   (64 * 1024)
#define MOUNTINFO_MAX (4 * 1024 * 1024)

struct mount_entry {
        dev_t dev;        /* the third mountinfo field, major:minor */
        char *mountpoint; /* unescaped */
        char *source;     /* unescaped, e.g. /dev/mmcblk0p2 or /dev/root */
};

struct mount_table {
        struct mount_entry *entries;
        size_t n;
};

static void mount_table_done(struct mount_table *t) {
        for (size_t i = 0; i < t->n; i++) {
                free(t->entries[i].mountpoint);
                free(t->entries[i].source);
        }
        free(t->entries);
        t->entries = NULL;
        t->n = 0;
}

static const char *source_cmdline(const struct slot_sources *src) {
        return src && src->cmdline ? src->cmdline : "/proc/cmdline";
}

static const char *source_mountinfo(const struct slot_sources *src) {
        return src && src->mountinfo ? src->mountinfo : "/proc/self/mountinfo";
}

/* The kernel escapes space, tab, newline and backslash in mountinfo as \ooo. */
static char *unescape_octal(const char *s) {
        char *r = malloc(strlen(s) + 1);
        char *o = r;

        if (!r)
                return NULL;
        while (*s) {
                if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
                    s[3] >= '0' && s[3] <= '7') {
                        *o++ = (char) (((s[1] - '0') << 6) | ((s[2] - '0') << 3) | (s[3] - '0'));
                        s += 4;
                } else
                        *o++ = *s++;
        }
        *o = '\0';
        return r;
}

/* One mountinfo line: "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS".
 * Returns 0 and fills e, or -EINVAL for a line that does not have that shape. */
static int parse_mountinfo_line(char *line, struct mount_entry *e) {
        char *fields[6];
        char *save = NULL, *tok;
        unsigned maj, min;
        char *source = NULL;
        size_t n = 0;

        while (n < ELEMENTSOF(fields) && (tok = strtok_r(n == 0 ? line : NULL, " ", &save)))
                fields[n++] = tok;
        if (n < ELEMENTSOF(fields))
                return -EINVAL;
        /* skip the optional fields up to the "-" separator */
        while ((tok = strtok_r(NULL, " ", &save)) && strcmp(tok, "-") != 0)
                ;
        if (!tok)
                return -EINVAL;
        if (!strtok_r(NULL, " ", &save)) /* fstype */
                return -EINVAL;
        source = strtok_r(NULL, " ", &save);
        if (!source)
                return -EINVAL;
        if (sscanf(fields[2], "%u:%u", &maj, &min) != 2)
                return -EINVAL;

        e->dev = makedev(maj, min);
        e->mountpoint = unescape_octal(fields[4]);
        e->source = unescape_octal(source);
        if (!e->mountpoint || !e->source) {
                free(e->mountpoint);
                free(e->source);
                return -ENOMEM;
        }
        return 0;
}

static int mount_table_load(const struct slot_sources *src, struct mount_table *ret) {
        _cleanup_free_ char *data = NULL;
        struct mount_table t = { 0 };
        char *save = NULL;
        int r;

        r = read_file_full(source_mountinfo(src), MOUNTINFO_MAX, &data, NULL);
        if (r < 0)
                return log_error_errno(r, "Failed to read mount table %s: %m", source_mountinfo(src));

        for (char *line = strtok_r(data, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
                struct mount_entry e;
                struct mount_entry *grown;

                r = parse_mountinfo_line(line, &e);
                if (r == -ENOMEM)
                        goto fail;
                if (r < 0)
                        continue; /* a line we do not understand names no slot */
                grown = realloc(t.entries, (t.n + 1) * sizeof(*t.entries));
                if (!grown) {
                        free(e.mountpoint);
                        free(e.source);
                        r = -ENOMEM;
                        goto fail;
                }
                t.entries = grown;
                t.entries[t.n++] = e;
        }
        *ret = t;
        return 0;
fail:
        mount_table_done(&t);
        return r;
}

/* Device numbers that stand for slot's device in the mount table: the block
 * device itself, or for a regular file (tests) every loop device backed by it. */
struct slot_devs {
        dev_t devs[16];
        size_t n;
};

static void loop_devices_backed_by(const char *file, struct slot_devs *d) {
        _cleanup_free_ char *real = realpath(file, NULL);
        DIR *dir;
        struct dirent *de;

        if (!real)
                return;
        dir = opendir("/sys/block");
        if (!dir)
                return;
        while ((de = readdir(dir)) && d->n < ELEMENTSOF(d->devs)) {
                char path[PATH_MAX];
                _cleanup_free_ char *backing = NULL, *devno = NULL;
                unsigned maj, min;
                size_t len;

                if (strncmp(de->d_name, "loop", 4) != 0)
                        continue;
                snprintf(path, sizeof(path), "/sys/block/%s/loop/backing_file", de->d_name);
                if (read_file_full(path, PATH_MAX, &backing, &len) < 0)
                        continue;
                while (len > 0 && backing[len - 1] == '\n')
                        backing[--len] = '\0';
                if (strcmp(backing, real) != 0)
                        continue;
                snprintf(path, sizeof(path), "/sys/block/%s/dev", de->d_name);
                if (read_file_full(path, 4096, &devno, NULL) < 0) /* sysfs says 4096 bytes */
                        continue;
                if (sscanf(devno, "%u:%u", &maj, &min) == 2)
                        d->devs[d->n++] = makedev(maj, min);
        }
        closedir(dir);
}

static int slot_devs_get(const struct config_slot *slot, struct slot_devs *ret) {
        struct slot_devs d = { .n = 0 };
        struct stat st;

        if (stat(slot->device, &st) < 0)
                return -errno;
        if (S_ISBLK(st.st_mode))
                d.devs[d.n++] = st.st_rdev;
        else if (S_ISREG(st.st_mode))
                loop_devices_backed_by(slot->device, &d);
        else
                return -ENOTBLK;
        *ret = d;
        return 0;
}

static bool mount_entry_is(const struct mount_entry *e, const struct slot_devs *d) {
        struct stat st;
        bool source_is_blk = e->source[0] == '/' && stat(e->source, &st) == 0 && S_ISBLK(st.st_mode);

        for (size_t i = 0; i < d->n; i++) {
                if (e->dev == d->devs[i])
                        return true;
                /* btrfs and friends report an anonymous device number; the
                 * source still names the block device */
                if (source_is_blk && st.st_rdev == d->devs[i])
                        return true;
        }
        return false;
}

int slot_is_mounted(const struct config_slot *slot, const struct slot_sources *src) {
        struct mount_table t = { 0 };
        struct slot_devs d;
        int r;

        r = slot_devs_get(slot, &d);
        if (r < 0)
                return log_error_errno(r, "Failed to look at slot device %s: %m", slot->device);
        r = mount_table_load(src, &t);
        if (r < 0)
                return r;
        r = 0;
        for (size_t i = 0; i < t.n && r == 0; i++)
                if (mount_entry_is(&t.entries[i], &d))
                        r = 1;
        mount_table_done(&t);
        return r;
}

int slot_class_pair(const struct otad_config *config, const char *class_name,
                    const struct config_slot *ret_pair[2]) {
        const struct config_slot *pair[2] = { NULL, NULL };
        size_t n = 0;

        for (size_t i = 0; i < config->n_slots; i++) {
                if (strcmp(config->slots[i].class_name, class_name) != 0)
                        continue;
                if (n < 2)
                        pair[n] = &config->slots[i];
                n++;
        }
        if (n == 0)
                return -ENOENT;
        if (n != 2)
                return -EINVAL;
        ret_pair[0] = pair[0];
        ret_pair[1] = pair[1];
        return 0;
}

/* The value of the last "key=value" word in a kernel command line; words
 * may be double-quoted as the kernel allows. */
static char *cmdline_value(const char *cmdline, const char *key) {
        size_t klen = strlen(key);
        char *found = NULL;
        const char *p = cmdline;

        while (*p) {
                const char *start, *end;
                bool quoted = false;

                while (*p == ' ' || *p == '\t' || *p == '\n')
                        p++;
                if (!*p)
                        break;
                start = p;
                while (*p && (quoted || (*p != ' ' && *p != '\t' && *p != '\n'))) {
                        if (*p == '"')
                                quoted = !quoted;
                        p++;
                }
                end = p;
                if ((size_t) (end - start) > klen && strncmp(start, key, klen) == 0 && start[klen] == '=') {
                        const char *v = start + klen + 1;
                        size_t vlen = (size_t) (end - v);

                        if (vlen >= 2 && v[0] == '"' && v[vlen - 1] == '"') {
                                v++;
                                vlen -= 2;
                        }
                        free(found);
                        found = strndup(v, vlen);
                        if (!found)
                                return NULL;
                }
        }
        return found;
}

int slot_cmdline_bootname(const struct slot_sources *src, char **ret_bootname) {
        _cleanup_free_ char *cmdline = NULL;
        char *v;
        int r;

        r = read_file_full(source_cmdline(src), CMDLINE_MAX, &cmdline, NULL);
        if (r < 0)
                return r;
        v = cmdline_value(cmdline, "otad.slot");
        if (!v)
                v = cmdline_value(cmdline, "rauc.slot");
        if (!v || !*v) {
                free(v);
                return -ENOENT;
        }
        *ret_bootname = v;
        return 0;
}

static const struct config_slot *pair_find(const struct config_slot *pair[2], const char *name) {
        for (size_t i = 0; i < 2; i++)
                if (pair[i]->bootname && strcmp(pair[i]->bootname, name) == 0)
                        return pair[i];
        for (size_t i = 0; i < 2; i++)
                if (strcmp(pair[i]->name, name) == 0)
                        return pair[i];
        return NULL;
}

static int booted_by_root_mount(const struct config_slot *pair[2], const struct slot_sources *src,
                                const struct config_slot **ret_slot) {
        struct mount_table t = { 0 };
        const struct mount_entry *root = NULL;
        const struct config_slot *found = NULL;
        int r;

        r = mount_table_load(src, &t);
        if (r < 0)
                return r;
        /* the last "/" entry is the one on top, the one processes see */
        for (size_t i = 0; i < t.n; i++)
                if (strcmp(t.entries[i].mountpoint, "/") == 0)
                        root = &t.entries[i];
        for (size_t i = 0; root && i < 2 && !found; i++) {
                struct slot_devs d;

                if (slot_devs_get(pair[i], &d) < 0)
                        continue;
                if (mount_entry_is(root, &d))
                        found = pair[i];
        }
        mount_table_done(&t);
        if (!found)
                return -ENODEV;
        *ret_slot = found;
        return 0;
}

int slot_booted(const struct otad_config *config, const char *class_name,
                const struct slot_sources *src, const struct config_slot **ret_slot) {
        const struct config_slot *pair[2];
        const struct config_slot *s;
        _cleanup_free_ char *bootname = NULL;
        int r;

        r = slot_class_pair(config, class_name, pair);
        if (r < 0)
                return log_error_errno(r, "Slot class '%s' needs exactly two [slot.%s.NAME] sections",
                                       class_name, class_name);

        if (config->update.booted_slot && *config->update.booted_slot) {
                s = pair_find(pair, config->update.booted_slot);
                if (!s)
                        return log_error_errno(-ENODEV, "[update] booted_slot=%s names no slot of class '%s'",
                                               config->update.booted_slot, class_name);
                *ret_slot = s;
                return 0;
        }

        r = slot_cmdline_bootname(src, &bootname);
        if (r >= 0) {
                s = pair_find(pair, bootname);
                if (!s)
                        return log_error_errno(-ENODEV, "Kernel command line names slot '%s', which is no bootname of class '%s'",
                                               bootname, class_name);
                *ret_slot = s;
                return 0;
        }
        if (r != -ENOENT)
                return log_error_errno(r, "Failed to read the kernel command line %s: %m", source_cmdline(src));

        r = booted_by_root_mount(pair, src, &s);
        if (r == -ENODEV)
                return log_error_errno(r, "Cannot tell which slot of class '%s' is booted: no otad.slot=/rauc.slot= on the kernel command line and neither %s nor %s is mounted at /",
                                       class_name, pair[0]->device, pair[1]->device);
        if (r < 0)
                return r;
        *ret_slot = s;
        return 0;
}

int slot_inactive(const struct otad_config *config, const char *class_name,
                  const struct slot_sources *src, const struct config_slot **ret_slot) {
        const struct config_slot *pair[2];
        const struct config_slot *booted;
        int r;

        r = slot_booted(config, class_name, src, &booted);
        if (r < 0)
                return r;
        r = slot_class_pair(config, class_name, pair);
        if (r < 0)
                return r;
        *ret_slot = pair[0] == booted ? pair[1] : pair[0];
        return 0;
}
