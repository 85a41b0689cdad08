/* SPDX-License-Identifier: MIT */
/*
 * slot: the A/B slot classes of [slot.CLASS.NAME]: which slot of a class is
 * booted, which one may be written, and whether a slot is mounted.
 * Owns the reading of the kernel command line and the mount table for that;
 * never opens a slot for writing and never touches a bootloader.
 */
#pragma once

#include <stdbool.h>

struct otad_config;
struct config_slot;

/* Where detection looks. Tests point these at fixture files; a NULL member
 * (or a NULL struct) means the running system's file. */
struct slot_sources {
        const char *cmdline;   /* default /proc/cmdline */
        const char *mountinfo; /* default /proc/self/mountinfo */
};

/* The two slots of class_name, in config order. -ENOENT when the class has
 * no slots, -EINVAL when it has other than exactly two. */
int slot_class_pair(const struct otad_config *config, const char *class_name,
                    const struct config_slot *ret_pair[2]);

/* The slot of class_name the running system booted from, decided in this
 * order: [update] booted_slot (a bootname or slot name; for tests), the
 * kernel command line's otad.slot=BOOTNAME or rauc.slot=BOOTNAME, else the
 * slot whose device is mounted at "/". -ENODEV when none of these names a
 * slot of the class: then nothing may be written. */
int slot_booted(const struct otad_config *config, const char *class_name,
                const struct slot_sources *src, const struct config_slot **ret_slot);

/* The other slot of class_name: the one an update may write. */
int slot_inactive(const struct otad_config *config, const char *class_name,
                  const struct slot_sources *src, const struct config_slot **ret_slot);

/* 1 when slot's device is mounted anywhere in this mount namespace (compared
 * by device number, so /dev/root and symlinks count), 0 when not, negative
 * errno when the device or the mount table cannot be read. A regular file
 * used as a slot (tests) counts as mounted when a loop device backed by it
 * is mounted. */
int slot_is_mounted(const struct config_slot *slot, const struct slot_sources *src);

/* The bootname given on the kernel command line (otad.slot= wins over
 * rauc.slot=), in a new string; -ENOENT when neither is there. */
int slot_cmdline_bootname(const struct slot_sources *src, char **ret_bootname);
