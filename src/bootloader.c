/* SPDX-License-Identifier: MIT */
#include "bootloader.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bootloaders/backends.h"
#include "config.h"
#include "log.h"
#include "macro.h"

static const struct {
        enum bootloader_type type;
        const struct bootloader_ops *ops;
} backends[] = {
        { BOOTLOADER_GRUB, &bootloader_grub_ops },
        { BOOTLOADER_UBOOT, &bootloader_uboot_ops },
        { BOOTLOADER_CUSTOM, &bootloader_custom_ops },
};

static bool strv_contains(char **v, size_t n, const char *s) {
        for (size_t i = 0; i < n; i++)
                if (strcmp(v[i], s) == 0)
                        return true;
        return false;
}

static void strv_free(char **v, size_t n) {
        for (size_t i = 0; i < n; i++)
                free(v[i]);
        free(v);
}

void bootloader_free(struct bootloader *b) {
        if (!b)
                return;
        if (b->ops && b->ops->free)
                b->ops->free(b);
        strv_free(b->bootnames, b->n_bootnames);
        free(b);
}

int bootloader_new(const struct otad_config *config, struct bootloader **ret) {
        const struct bootloader_ops *ops = NULL;
        struct bootloader *b;

        for (size_t i = 0; i < ELEMENTSOF(backends); i++)
                if (backends[i].type == config->bootloader.type)
                        ops = backends[i].ops;
        if (!ops)
                return log_error_errno(-EOPNOTSUPP, "No [bootloader] type configured, cannot switch slots");

        b = calloc(1, sizeof(*b));
        if (!b)
                return -ENOMEM;
        b->ops = ops;
        b->config = config;
        b->bootnames = calloc(config->n_slots + 1, sizeof(char *));
        if (!b->bootnames)
                goto oom;
        for (size_t i = 0; i < config->n_slots; i++) {
                const char *name = config->slots[i].bootname;

                if (!name || !*name || strv_contains(b->bootnames, b->n_bootnames, name))
                        continue;
                b->bootnames[b->n_bootnames] = strdup(name);
                if (!b->bootnames[b->n_bootnames])
                        goto oom;
                b->n_bootnames++;
        }
        *ret = b;
        return 0;
oom:
        bootloader_free(b);
        return -ENOMEM;
}

const char *bootloader_factory_slot(const struct bootloader *b) {
        return b->n_bootnames > 0 ? b->bootnames[0] : "";
}

bool bootloader_knows(const struct bootloader *b, const char *bootname) {
        return bootname && strv_contains(b->bootnames, b->n_bootnames, bootname);
}

/* Appends word to the order being built unless it is already there or is
 * the one to be placed last. */
static int order_add(char ***v, size_t *n, const char *word, const char *last) {
        char **grown;

        if (!word || !*word || strv_contains(*v, *n, word) || (last && strcmp(word, last) == 0))
                return 0;
        grown = realloc(*v, (*n + 1) * sizeof(char *));
        if (!grown)
                return -ENOMEM;
        *v = grown;
        (*v)[*n] = strdup(word);
        if (!(*v)[*n])
                return -ENOMEM;
        (*n)++;
        return 0;
}

int bootloader_order(const struct bootloader *b, const char *current, const char *first,
                     const char *last, bool drop_last, char **ret_order) {
        _cleanup_free_ char *cur = current ? strdup(current) : NULL;
        char **v = NULL;
        size_t n = 0, len = 1;
        char *save = NULL, *out;
        int r;

        if (current && !cur)
                return -ENOMEM;
        r = order_add(&v, &n, first, last);
        for (char *w = cur ? strtok_r(cur, " \t", &save) : NULL; r >= 0 && w; w = strtok_r(NULL, " \t", &save))
                r = order_add(&v, &n, w, last);
        for (size_t i = 0; r >= 0 && !current && i < b->n_bootnames; i++)
                r = order_add(&v, &n, b->bootnames[i], last);
        if (r >= 0 && last && !drop_last)
                r = order_add(&v, &n, last, NULL);
        if (r < 0) {
                strv_free(v, n);
                return r;
        }
        for (size_t i = 0; i < n; i++)
                len += strlen(v[i]) + 1;
        out = calloc(1, len);
        if (!out) {
                strv_free(v, n);
                return -ENOMEM;
        }
        for (size_t i = 0; i < n; i++) {
                if (i > 0)
                        strcat(out, " ");
                strcat(out, v[i]);
        }
        strv_free(v, n);
        *ret_order = out;
        return 0;
}

static int check_known(const struct bootloader *b, const char *bootname) {
        if (bootloader_knows(b, bootname))
                return 0;
        return log_error_errno(-EINVAL, "Bootloader: '%s' is no configured slot bootname, refusing",
                               bootname ? bootname : "(null)");
}

int bootloader_get_primary(struct bootloader *b, char **ret_bootname) {
        return b->ops->get_primary(b, ret_bootname);
}

int bootloader_get_state(struct bootloader *b, const char *bootname, bool *ret_good) {
        int r = check_known(b, bootname);

        if (r < 0)
                return r;
        return b->ops->get_state(b, bootname, ret_good);
}

int bootloader_set_try_once(struct bootloader *b, const char *bootname) {
        int r = check_known(b, bootname);

        if (r < 0)
                return r;
        r = b->ops->set_try_once(b, bootname);
        if (r < 0)
                return r;
        log_full(LOG_DEBUG, 0, &(const struct log_fields){ .slot = bootname },
                 "Bootloader (%s): slot %s boots once on the next boot", b->ops->name, bootname);
        return 0;
}

int bootloader_mark_good(struct bootloader *b, const char *bootname) {
        int r = check_known(b, bootname);

        if (r < 0)
                return r;
        r = b->ops->mark_good(b, bootname);
        if (r < 0)
                return r;
        log_full(LOG_INFO, 0, &(const struct log_fields){ .slot = bootname },
                 "Bootloader (%s): slot %s marked good", b->ops->name, bootname);
        return 0;
}

int bootloader_mark_bad(struct bootloader *b, const char *bootname) {
        int r = check_known(b, bootname);

        if (r < 0)
                return r;
        r = b->ops->mark_bad(b, bootname);
        if (r < 0)
                return r;
        log_full(LOG_NOTICE, 0, &(const struct log_fields){ .slot = bootname },
                 "Bootloader (%s): slot %s marked bad", b->ops->name, bootname);
        return 0;
}

bool bootloader_order_has(const char *order, const char *bootname) {
        _cleanup_free_ char *copy = strdup(order);
        char *save = NULL;

        if (!copy)
                return false;
        for (char *w = strtok_r(copy, " \t", &save); w; w = strtok_r(NULL, " \t", &save))
                if (strcmp(w, bootname) == 0)
                        return true;
        return false;
}
