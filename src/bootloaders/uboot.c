/* SPDX-License-Identifier: MIT */
/*
 * The U-Boot backend, through libubootenv (which writes the inactive copy of
 * a redundant environment and flips the flag, so a torn write leaves the
 * previous copy valid). Variables as in RAUC's U-Boot integration:
 * BOOT_ORDER="A B" lists the slots by preference; BOOT_<slot>_LEFT is the
 * number of boots the slot has left (hexadecimal, as setexpr writes it).
 * U-Boot boots the first slot of BOOT_ORDER with tries left and decrements
 * its counter first, so a slot that is not marked good while running runs
 * out of tries and the next slot of BOOT_ORDER boots. When no slot of
 * BOOT_ORDER has tries left, the script gives each of them 3 again.
 *
 *   set_try_once(X): BOOT_ORDER="X ...", BOOT_X_LEFT=1
 *   mark_good(X):    BOOT_ORDER="X ...", BOOT_X_LEFT=3
 *   mark_bad(X):     X leaves BOOT_ORDER, BOOT_X_LEFT=0; the slots left in
 *                    BOOT_ORDER get their tries back (3). Refused when no
 *                    slot would be left in BOOT_ORDER
 *   get_primary:     the first slot of BOOT_ORDER with BOOT_<slot>_LEFT > 0,
 *                    else (all out of tries) the first slot of BOOT_ORDER
 *   get_state(X):    good = X in BOOT_ORDER and BOOT_X_LEFT > 0
 *
 * Missing variables read as the boot script defaults them: BOOT_ORDER = the
 * factory slot alone (the first configured, A), BOOT_<factory>_LEFT=3 and
 * BOOT_<other>_LEFT=0: on a fresh device B may be empty, and only
 * set_try_once() (after otad wrote and verified it) brings it into
 * BOOT_ORDER. A blank environment (no copy with a valid CRC: erased
 * storage, on which U-Boot boots with its built-in default environment,
 * which has none of these variables) reads the same, but is never written:
 * libubootenv would write one holding only our variables, and U-Boot would
 * lose bootcmd and the rest. The boot script's saveenv at the first boot
 * stores U-Boot's own.
 *
 * The boot script is in otad.conf(5), BOOTLOADER SCHEMES, and only there:
 * tests/test-uboot-boot.c runs that text in U-Boot.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libuboot.h>

#include "backends.h"
#include "config.h"
#include "log.h"
#include "macro.h"

#define UBOOT_TRIES_GOOD 3
#define UBOOT_TRIES_ONCE 1

static const char *fw_env_config(const struct bootloader *b) {
        return b->config->bootloader.fw_env_config;
}

static void uboot_ctx_freep(struct uboot_ctx **ctx) {
        if (*ctx) {
                libuboot_close(*ctx);
                libuboot_exit(*ctx);
        }
}

/* A fresh context each time: a read-back must come from the storage, not
 * from the library's copy in memory. A blank environment gives *ret = NULL
 * to a reader (U-Boot runs on its built-in defaults, none of which are
 * ours) and -EIO to a writer. */
static int uboot_open(struct bootloader *b, bool for_write, struct uboot_ctx **ret) {
        struct uboot_ctx *ctx = NULL;
        int r;

        if (!fw_env_config(b) || !*fw_env_config(b))
                return log_error_errno(-EINVAL, "[bootloader] type=uboot needs fw_env_config=");
        r = libuboot_initialize(&ctx, NULL);
        if (r < 0)
                return log_error_errno(r, "Failed to initialise libubootenv: %m");
        r = libuboot_read_config(ctx, fw_env_config(b));
        if (r < 0) {
                libuboot_exit(ctx);
                return log_error_errno(r, "Failed to read %s (or the environment file it names is missing): %m",
                                       fw_env_config(b));
        }
        r = libuboot_open(ctx);
        if (r < 0) {
                /* libuboot_open() takes /var/lock/fw_printenv.lock even when
                 * it fails, and only libuboot_close() lets go of it */
                libuboot_close(ctx);
                libuboot_exit(ctx);
        }
        if (r == -ENODATA && !for_write) {
                *ret = NULL;
                return 0;
        }
        if (r == -ENODATA)
                return log_error_errno(-EIO, "U-Boot environment named by %s is blank (no copy with a valid CRC); refusing to write one that would hold only otad's variables. U-Boot stores its own at the first boot through the documented boot script (saveenv), or provision it (see otad.conf(5), FACTORY PROVISIONING)",
                                       fw_env_config(b));
        if (r < 0)
                return log_error_errno(r, "Failed to read the U-Boot environment named by %s: %m", fw_env_config(b));
        *ret = ctx;
        return 0;
}

/* A variable, or NULL when it is unset or the environment is blank. */
static char *uboot_get(struct uboot_ctx *ctx, const char *name) {
        return ctx ? libuboot_get_env(ctx, name) : NULL;
}

/* BOOT_<slot>_LEFT, defaulting as the boot script does. */
static unsigned long tries_left(const struct bootloader *b, struct uboot_ctx *ctx, const char *bootname) {
        char name[128];
        _cleanup_free_ char *v = NULL;

        snprintf(name, sizeof(name), "BOOT_%s_LEFT", bootname);
        v = uboot_get(ctx, name);
        if (!v)
                return strcmp(bootname, bootloader_factory_slot(b)) == 0 ? UBOOT_TRIES_GOOD : 0;
        return strtoul(v, NULL, 16);
}

/* BOOT_ORDER, defaulting as the boot script does: the factory slot alone. */
static int current_order(const struct bootloader *b, struct uboot_ctx *ctx, char **ret) {
        char *o = uboot_get(ctx, "BOOT_ORDER");

        if (!o)
                o = strdup(bootloader_factory_slot(b));
        if (!o)
                return -ENOMEM;
        *ret = o;
        return 0;
}

struct uboot_var {
        char name[128];
        char value[256];
};

/* Sets vars, stores, then reads the environment back through a new context
 * and compares every variable. Takes *ctxp: it must let go of the lock
 * (libubootenv flocks /var/lock/fw_printenv.lock from open to close) before
 * the read-back opens the environment again. */
static int uboot_store(struct bootloader *b, struct uboot_ctx **ctxp, const struct uboot_var *vars, size_t n) {
        _cleanup_(uboot_ctx_freep) struct uboot_ctx *ctx = take_ptr(ctxp);
        _cleanup_(uboot_ctx_freep) struct uboot_ctx *back = NULL;
        int r;

        for (size_t i = 0; i < n; i++) {
                r = libuboot_set_env(ctx, vars[i].name, vars[i].value);
                if (r < 0)
                        return log_error_errno(r, "Failed to set U-Boot variable %s: %m", vars[i].name);
        }
        r = libuboot_env_store(ctx);
        if (r < 0)
                return log_error_errno(r, "Failed to store the U-Boot environment named by %s: %m", fw_env_config(b));
        uboot_ctx_freep(&ctx);
        ctx = NULL;

        r = uboot_open(b, false, &back);
        if (r < 0)
                return -EIO;
        if (!back)
                return log_error_errno(-EIO, "U-Boot environment named by %s reads back blank right after writing it, refusing to continue",
                                       fw_env_config(b));
        for (size_t i = 0; i < n; i++) {
                _cleanup_free_ char *v = libuboot_get_env(back, vars[i].name);

                if (!v || strcmp(v, vars[i].value) != 0)
                        return log_error_errno(-EIO, "U-Boot environment reads back %s=%s instead of %s, refusing to continue",
                                               vars[i].name, v ? v : "(unset)", vars[i].value);
        }
        return 0;
}

static int uboot_get_primary(struct bootloader *b, char **ret_bootname) {
        _cleanup_(uboot_ctx_freep) struct uboot_ctx *ctx = NULL;
        _cleanup_free_ char *order = NULL;
        int r;

        r = uboot_open(b, false, &ctx);
        if (r < 0)
                return r;
        r = current_order(b, ctx, &order);
        if (r < 0)
                return r;
        /* two passes, as the boot script: a slot with tries left, else
         * (all out of tries) the first of BOOT_ORDER, given tries again */
        for (int pass = 0; pass < 2; pass++) {
                _cleanup_free_ char *words = strdup(order);
                char *save = NULL;

                if (!words)
                        return -ENOMEM;
                for (char *w = strtok_r(words, " \t", &save); w; w = strtok_r(NULL, " \t", &save)) {
                        if (!bootloader_knows(b, w) || (pass == 0 && tries_left(b, ctx, w) == 0))
                                continue;
                        *ret_bootname = strdup(w);
                        return *ret_bootname ? 0 : -ENOMEM;
                }
        }
        return log_error_errno(-ENOENT, "U-Boot environment: no slot of BOOT_ORDER=\"%s\" is bootable", order);
}

static int uboot_get_state(struct bootloader *b, const char *bootname, bool *ret_good) {
        _cleanup_(uboot_ctx_freep) struct uboot_ctx *ctx = NULL;
        _cleanup_free_ char *order = NULL;
        int r;

        r = uboot_open(b, false, &ctx);
        if (r < 0)
                return r;
        r = current_order(b, ctx, &order);
        if (r < 0)
                return r;
        *ret_good = bootloader_order_has(order, bootname) && tries_left(b, ctx, bootname) > 0;
        return 0;
}

static int uboot_make_primary(struct bootloader *b, const char *bootname, unsigned tries) {
        _cleanup_(uboot_ctx_freep) struct uboot_ctx *ctx = NULL;
        _cleanup_free_ char *order = NULL, *new_order = NULL;
        struct uboot_var vars[2];
        int r;

        r = uboot_open(b, true, &ctx);
        if (r < 0)
                return r;
        r = current_order(b, ctx, &order);
        if (r >= 0)
                r = bootloader_order(b, order, bootname, NULL, false, &new_order);
        if (r < 0)
                return r;
        snprintf(vars[0].name, sizeof(vars[0].name), "BOOT_%s_LEFT", bootname);
        snprintf(vars[0].value, sizeof(vars[0].value), "%x", tries);
        snprintf(vars[1].name, sizeof(vars[1].name), "BOOT_ORDER");
        snprintf(vars[1].value, sizeof(vars[1].value), "%s", new_order);
        return uboot_store(b, &ctx, vars, ELEMENTSOF(vars));
}

static int uboot_set_try_once(struct bootloader *b, const char *bootname) {
        return uboot_make_primary(b, bootname, UBOOT_TRIES_ONCE);
}

static int uboot_mark_good(struct bootloader *b, const char *bootname) {
        return uboot_make_primary(b, bootname, UBOOT_TRIES_GOOD);
}

static int uboot_mark_bad(struct bootloader *b, const char *bootname) {
        _cleanup_(uboot_ctx_freep) struct uboot_ctx *ctx = NULL;
        _cleanup_free_ char *order = NULL, *new_order = NULL;
        _cleanup_free_ struct uboot_var *vars = NULL;
        bool other_bootable = false;
        size_t n = 0;
        char *save = NULL;
        int r;

        r = uboot_open(b, true, &ctx);
        if (r < 0)
                return r;
        r = current_order(b, ctx, &order);
        if (r >= 0)
                r = bootloader_order(b, order, NULL, bootname, true, &new_order);
        if (r < 0)
                return r;
        vars = calloc(b->n_bootnames + 2, sizeof(*vars));
        if (!vars)
                return -ENOMEM;
        snprintf(vars[n].name, sizeof(vars[n].name), "BOOT_%s_LEFT", bootname);
        snprintf(vars[n++].value, sizeof(vars[0].value), "0");
        snprintf(vars[n].name, sizeof(vars[n].name), "BOOT_ORDER");
        snprintf(vars[n++].value, sizeof(vars[0].value), "%s", new_order);
        /* switch back: what is left in BOOT_ORDER may boot again */
        for (char *w = strtok_r(new_order, " \t", &save); w && n < b->n_bootnames + 2;
             w = strtok_r(NULL, " \t", &save)) {
                if (!bootloader_knows(b, w))
                        continue;
                other_bootable = true;
                if (tries_left(b, ctx, w) > 0)
                        continue;
                snprintf(vars[n].name, sizeof(vars[n].name), "BOOT_%s_LEFT", w);
                snprintf(vars[n++].value, sizeof(vars[0].value), "%x", UBOOT_TRIES_GOOD);
        }
        if (!other_bootable)
                return log_error_errno(-ENOENT, "U-Boot environment: no slot but %s is in BOOT_ORDER=\"%s\", refusing to mark it bad: U-Boot would have nothing to boot",
                                       bootname, order);
        return uboot_store(b, &ctx, vars, n);
}

const struct bootloader_ops bootloader_uboot_ops = {
        .name = "uboot",
        .get_primary = uboot_get_primary,
        .set_try_once = uboot_set_try_once,
        .mark_good = uboot_mark_good,
        .mark_bad = uboot_mark_bad,
        .get_state = uboot_get_state,
};
