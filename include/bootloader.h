/* SPDX-License-Identifier: MIT */
/*
 * bootloader: which slot the machine boots next. Owns the bootloader's
 * variables (a grubenv file, the U-Boot environment, or a custom script) and
 * the rule that every write is read back before it counts.
 * Never writes a slot's contents and never decides whether an update is good.
 * Backends live in src/bootloaders/ and are chosen by [bootloader] type.
 *
 * Slots are named by their bootname ([slot.CLASS.NAME] bootname=), the name
 * the bootloader script and the kernel command line (otad.slot=/rauc.slot=)
 * use. The schemes follow RAUC's, so a system set up for RAUC boots the same.
 *
 * Life of an update: set_try_once(new) -> reboot -> the bootloader boots new
 * once -> mark_good(new) (commit) or mark_bad(new) (rollback; the other slot
 * becomes primary). If the new slot never gets marked good, the next boot
 * falls back to the other slot by itself.
 *
 * A fresh device: with an empty environment (nothing of otad's in it) the
 * documented scripts boot the factory slot and treat the other as not
 * bootable, since it may be empty; the backends read such an environment
 * the same way. A slot becomes bootable only through set_try_once() and
 * stays so only through mark_good(). See otad.conf(5), FACTORY PROVISIONING.
 *
 * NOTE for callers: in both the GRUB and the U-Boot scheme the bootloader
 * counts every boot of a slot as a try (GRUB sets <slot>_TRY=1, U-Boot
 * decrements BOOT_<slot>_LEFT). The running system must call mark_good() on
 * the booted slot once it is up, on every boot (RAUC's rauc-mark-good does
 * the same), or the bootloader eventually treats the slot as failed.
 *
 * Every write is a critical section: the new variables are written to a
 * temporary copy (grub: grubenv.new + rename; U-Boot: the inactive redundant
 * copy through libubootenv), synced, then read back through a fresh read and
 * compared. On a mismatch the call returns -EIO and the caller must not go on
 * (no reboot, no commit).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "macro.h"

struct otad_config;
struct bootloader;

struct bootloader_ops {
        const char *name;
        /* The slot the bootloader boots next, by its own rules. */
        int (*get_primary)(struct bootloader *b, char **ret_bootname);
        /* Boot bootname on the next boot, once; unless it is marked good
         * while running, the boot after that goes back to the other slot. */
        int (*set_try_once)(struct bootloader *b, const char *bootname) _warn_unused_result_;
        /* bootname stays primary for good. */
        int (*mark_good)(struct bootloader *b, const char *bootname) _warn_unused_result_;
        /* bootname is never booted again until set_try_once() names it; the
         * other slot becomes primary. Refused (-ENOENT) when no other slot
         * is bootable: the bootloader would have nothing to boot. */
        int (*mark_bad)(struct bootloader *b, const char *bootname) _warn_unused_result_;
        /* ret_good: the bootloader would boot bootname (it is not marked bad
         * and has a try left). */
        int (*get_state)(struct bootloader *b, const char *bootname, bool *ret_good);
        void (*free)(struct bootloader *b);
};

struct bootloader {
        const struct bootloader_ops *ops;
        const struct otad_config *config;
        /* Every distinct bootname of the configured slots, in config order:
         * the slots a boot order lists. */
        char **bootnames;
        size_t n_bootnames;
        void *data; /* the backend's */
};

/* Creates the backend named by [bootloader] type. -EOPNOTSUPP (logged) for
 * type none: nothing can switch slots then. Nothing is read until the first
 * call. */
int bootloader_new(const struct otad_config *config, struct bootloader **ret) _warn_unused_result_;
void bootloader_free(struct bootloader *b);

/* Short forms of b->ops->X(b, ...). Each logs what it changed at info level;
 * backends log the cause of a failure. */
int bootloader_get_primary(struct bootloader *b, char **ret_bootname);
int bootloader_set_try_once(struct bootloader *b, const char *bootname) _warn_unused_result_;
int bootloader_mark_good(struct bootloader *b, const char *bootname) _warn_unused_result_;
int bootloader_mark_bad(struct bootloader *b, const char *bootname) _warn_unused_result_;
int bootloader_get_state(struct bootloader *b, const char *bootname, bool *ret_good);

/* For backends: the factory slot, the first configured bootname (A in the
 * documented scripts). With an empty environment the scripts boot it and
 * treat every other slot as not bootable: on a fresh device those may be
 * empty, and only set_try_once() makes them bootable. */
const char *bootloader_factory_slot(const struct bootloader *b);
/* For backends: is bootname one of b->bootnames? Unknown names are refused
 * with -EINVAL before anything is written. */
bool bootloader_knows(const struct bootloader *b, const char *bootname);
/* For backends: a boot order: first (may be NULL) in front, then the
 * names of current (space-separated; NULL means b->bootnames), each once;
 * last (may be NULL) goes to the end, or is left out when drop_last. A name
 * missing from current stays missing unless it is first or last (U-Boot
 * takes a slot marked bad out of BOOT_ORDER; marking another slot good must
 * not bring it back). New string, names separated by one space. */
int bootloader_order(const struct bootloader *b, const char *current, const char *first,
                     const char *last, bool drop_last, char **ret_order);
