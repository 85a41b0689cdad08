/* SPDX-License-Identifier: MIT */
/* The bootloader backends, for bootloader.c's table. */
#pragma once

#include "bootloader.h"

extern const struct bootloader_ops bootloader_grub_ops;
extern const struct bootloader_ops bootloader_uboot_ops;
extern const struct bootloader_ops bootloader_custom_ops;

