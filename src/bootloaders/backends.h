/* SPDX-License-Identifier: MIT */
/* The bootloader backends, for bootloader.c's table. */
#pragma once

#include <stdbool.h>

#include "bootloader.h"

extern const struct bootloader_ops bootloader_grub_ops;
extern const struct bootloader_ops bootloader_uboot_ops;
extern const struct bootloader_ops bootloader_custom_ops;


/* Whether bootname is one of the blank-separated names of a boot order
 * variable (GRUB's ORDER, U-Boot's BOOT_ORDER). */
bool bootloader_order_has(const char *order, const char *bootname);
