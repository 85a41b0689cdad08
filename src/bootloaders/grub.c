/* SPDX-License-Identifier: MIT */
/*
 * The GRUB backend, with RAUC's variable scheme so that one grub.cfg serves
 * both: ORDER="A B" lists the slots by preference; <slot>_OK=1 says a slot
 * may boot at all, <slot>_TRY=1 that it has been booted and not marked good
 * since. GRUB boots the first slot of ORDER with OK=1 and TRY=0 and sets its
 * TRY=1 (save_env) before booting it: so a slot that is not marked good while
 * running is not booted again, and the next slot of ORDER is. When every
 * slot with OK=1 has been tried, GRUB starts over with them.
 *
 *   set_try_once(X): ORDER="X ...", X_OK=1, X_TRY=0
 *   mark_good(X):    ORDER="X ...", X_OK=1, X_TRY=0
 *   mark_bad(X):     ORDER="... X", X_OK=0, X_TRY=0; the other slots that
 *                    are OK get TRY=0, so the first of them boots next.
 *                    Refused when no other slot has OK=1: GRUB would have
 *                    nothing to boot
 *   get_primary:     the first slot of ORDER with OK=1 and TRY=0, else
 *                    (all tried) the first with OK=1, as grub.cfg does
 *   get_state(X):    good = X in ORDER, X_OK=1 and X_TRY=0
 *
 * A variable missing from the file reads as the grub.cfg defaults it:
 * ORDER = the configured bootnames, <slot>_TRY=0, and <slot>_OK=1 for the
 * factory slot (the first configured, A) but 0 for the others: on a fresh
 * device B may be empty, and only set_try_once() (after otad wrote and
 * verified it) makes it bootable. A missing grubenv reads the same (GRUB's
 * load_env fails and the defaults stand) but is not created: it may sit on
 * a /boot that is not mounted, where GRUB would never see it. Unrelated
 * variables in the file are kept.
 *
 * The grub.cfg is in otad.conf(5), BOOTLOADER SCHEMES, and only there:
 * tests/test-grub-boot.c runs that text in GRUB.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends.h"
#include "config.h"
#include "grubenv.h"
#include "log.h"
#include "macro.h"

static const char *grubenv_path(const struct bootloader *b) {
        return b->config->bootloader.grubenv;
}

/* The variables as GRUB sees them. A missing file is an empty environment
 * for a read (GRUB boots by the grub.cfg defaults then) and an error for a
 * write, which must edit the file GRUB reads. */
static int grub_load(struct bootloader *b, bool for_write, struct grubenv *ret) {
        int r = grubenv_read(grubenv_path(b), ret);

        if (r == -ENOENT && !for_write) {
                *ret = (struct grubenv) { 0 };
                return 0;
        }
        if (r == -ENOENT)
                return log_error_errno(r, "GRUB environment %s does not exist; create it when provisioning the device (grub-editenv %s create), otad does not",
                                       grubenv_path(b), grubenv_path(b));
        if (r == -EBADMSG)
                return log_error_errno(-EIO, "GRUB environment %s is not a %d-byte block starting with '%.24s' (torn write?), refusing to use it",
                                       grubenv_path(b), GRUBENV_SIZE, GRUBENV_HEADER);
        if (r < 0)
                return log_error_errno(r, "Failed to read GRUB environment %s: %m", grubenv_path(b));
        return 0;
}

/* Writes env, reads the file back and compares: the boot decision counts
 * only when the bytes on disk say what we meant. */
static int grub_store(struct bootloader *b, const struct grubenv *env) {
        struct grubenv back = { 0 };
        int r;

        r = grubenv_write(grubenv_path(b), env);
        if (r == -ENOSPC)
                return log_error_errno(r, "GRUB environment %s: the variables do not fit into %d bytes",
                                       grubenv_path(b), GRUBENV_SIZE);
        if (r < 0)
                return log_error_errno(r, "Failed to write GRUB environment %s: %m", grubenv_path(b));
        r = grubenv_read(grubenv_path(b), &back);
        if (r < 0)
                return log_error_errno(-EIO, "GRUB environment %s unreadable right after writing it: %s",
                                       grubenv_path(b), strerror(-r));
        r = grubenv_equal(env, &back);
        grubenv_done(&back);
        if (!r)
                return log_error_errno(-EIO, "GRUB environment %s reads back different from what was written, refusing to continue",
                                       grubenv_path(b));
        return 0;
}

static int flag_of(const struct grubenv *env, const char *bootname, const char *suffix, int fallback) {
        char name[128];
        const char *v;

        snprintf(name, sizeof(name), "%s_%s", bootname, suffix);
        v = grubenv_get(env, name);
        if (!v)
                return fallback;
        return strcmp(v, "1") == 0 ? 1 : 0;
}

/* <slot>_OK, defaulting as grub.cfg does: only the factory slot. */
static int slot_ok(const struct bootloader *b, const struct grubenv *env, const char *bootname) {
        return flag_of(env, bootname, "OK", strcmp(bootname, bootloader_factory_slot(b)) == 0);
}

static int set_flag(struct grubenv *env, const char *bootname, const char *suffix, int value) {
        char name[128];

        snprintf(name, sizeof(name), "%s_%s", bootname, suffix);
        return grubenv_set(env, name, value ? "1" : "0");
}

/* ORDER as GRUB sees it: the file's, or the configured default. */
static int current_order(const struct bootloader *b, const struct grubenv *env, char **ret) {
        const char *o = grubenv_get(env, "ORDER");

        if (o) {
                *ret = strdup(o);
                return *ret ? 0 : -ENOMEM;
        }
        return bootloader_order(b, NULL, NULL, NULL, false, ret);
}

static int grub_get_primary(struct bootloader *b, char **ret_bootname) {
        struct grubenv env = { 0 };
        _cleanup_free_ char *order = NULL;
        char *save = NULL, *found = NULL;
        int r;

        r = grub_load(b, false, &env);
        if (r < 0)
                return r;
        r = current_order(b, &env, &order);
        /* two passes, as grub.cfg: a slot not tried yet, else
         * (every slot tried) the first one not marked bad */
        for (int pass = 0; r >= 0 && pass < 2 && !found; pass++) {
                _cleanup_free_ char *words = strdup(order);

                if (!words) {
                        r = -ENOMEM;
                        break;
                }
                for (char *w = strtok_r(words, " \t", &save); w; w = strtok_r(NULL, " \t", &save))
                        if (bootloader_knows(b, w) && slot_ok(b, &env, w) &&
                            (pass == 1 || !flag_of(&env, w, "TRY", 0))) {
                                found = strdup(w);
                                r = found ? 0 : -ENOMEM;
                                break;
                        }
        }
        if (r >= 0 && !found)
                r = log_error_errno(-ENOENT, "GRUB environment %s: no slot of ORDER=\"%s\" is bootable",
                                    grubenv_path(b), order);
        if (r >= 0)
                *ret_bootname = take_ptr(&found);
        free(found);
        grubenv_done(&env);
        return r;
}

static int grub_get_state(struct bootloader *b, const char *bootname, bool *ret_good) {
        struct grubenv env = { 0 };
        _cleanup_free_ char *order = NULL;
        int r;

        r = grub_load(b, false, &env);
        if (r < 0)
                return r;
        r = current_order(b, &env, &order);
        if (r >= 0)
                *ret_good = bootloader_order_has(order, bootname) && slot_ok(b, &env, bootname) &&
                            !flag_of(&env, bootname, "TRY", 0);
        grubenv_done(&env);
        return r;
}

static int grub_make_primary(struct bootloader *b, const char *bootname) {
        struct grubenv env = { 0 };
        _cleanup_free_ char *order = NULL, *new_order = NULL;
        int r;

        r = grub_load(b, true, &env);
        if (r < 0)
                return r;
        r = current_order(b, &env, &order);
        if (r >= 0)
                r = bootloader_order(b, order, bootname, NULL, false, &new_order);
        if (r >= 0)
                r = grubenv_set(&env, "ORDER", new_order);
        if (r >= 0)
                r = set_flag(&env, bootname, "OK", 1);
        if (r >= 0)
                r = set_flag(&env, bootname, "TRY", 0);
        if (r >= 0)
                r = grub_store(b, &env);
        grubenv_done(&env);
        return r;
}

/* Before the reboot the new slot looks exactly like a good one; what makes
 * it "once" is GRUB setting its TRY=1 when it boots it. */
static int grub_set_try_once(struct bootloader *b, const char *bootname) {
        return grub_make_primary(b, bootname);
}

static int grub_mark_good(struct bootloader *b, const char *bootname) {
        return grub_make_primary(b, bootname);
}

static int grub_mark_bad(struct bootloader *b, const char *bootname) {
        struct grubenv env = { 0 };
        _cleanup_free_ char *order = NULL, *new_order = NULL;
        bool other_bootable = false;
        int r;

        r = grub_load(b, true, &env);
        if (r < 0)
                return r;
        r = current_order(b, &env, &order);
        if (r >= 0)
                r = bootloader_order(b, order, NULL, bootname, false, &new_order);
        if (r >= 0)
                r = grubenv_set(&env, "ORDER", new_order);
        if (r >= 0)
                r = set_flag(&env, bootname, "OK", 0);
        if (r >= 0)
                r = set_flag(&env, bootname, "TRY", 0);
        /* switch back: the slots not marked bad may boot again, even if
         * they were tried since they were last marked good */
        for (size_t i = 0; r >= 0 && i < b->n_bootnames; i++) {
                const char *other = b->bootnames[i];

                if (strcmp(other, bootname) == 0 || !slot_ok(b, &env, other))
                        continue;
                r = set_flag(&env, other, "TRY", 0);
                other_bootable = other_bootable || bootloader_order_has(new_order, other);
        }
        if (r >= 0 && !other_bootable)
                r = log_error_errno(-ENOENT, "GRUB environment %s: no slot but %s may boot (ORDER=\"%s\"), refusing to mark it bad: GRUB would have nothing to boot",
                                    grubenv_path(b), bootname, order);
        if (r >= 0)
                r = grub_store(b, &env);
        grubenv_done(&env);
        return r;
}

const struct bootloader_ops bootloader_grub_ops = {
        .name = "grub",
        .get_primary = grub_get_primary,
        .set_try_once = grub_set_try_once,
        .mark_good = grub_mark_good,
        .mark_bad = grub_mark_bad,
        .get_state = grub_get_state,
};
