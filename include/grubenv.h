/* SPDX-License-Identifier: MIT */
/*
 * grubenv: GRUB's environment block file (what load_env/save_env and
 * grub-editenv use): exactly 1024 bytes, "# GRUB Environment Block\n", then
 * "name=value\n" lines (backslash and newline in a value escaped with a
 * backslash), padded with '#'. No checksum.
 * Owns parsing, formatting and the crash-safe replacement of that file;
 * never decides what the variables mean (the grub bootloader backend does).
 */
#pragma once

#include <stddef.h>

#define GRUBENV_SIZE   1024
#define GRUBENV_HEADER "# GRUB Environment Block\n"

/* The variables of one block, in file order. */
struct grubenv {
        char **names;
        char **values;
        size_t n;
};

/* Parses one block. -EBADMSG when it is not exactly GRUBENV_SIZE bytes or
 * does not start with GRUBENV_HEADER (a torn or foreign file). */
int grubenv_parse(const char *block, size_t size, struct grubenv *ret);
/* -ENOENT when path is missing, -EBADMSG as grubenv_parse. */
int grubenv_read(const char *path, struct grubenv *ret);
/* Formats env into one block. -ENOSPC when the variables do not fit. */
int grubenv_format(const struct grubenv *env, char block[GRUBENV_SIZE]);
/* Replaces path with env: path.new is written (GRUBENV_SIZE bytes), fsynced
 * and renamed over path, then the directory is fsynced. The caller reads
 * back and compares (grubenv_equal). */
int grubenv_write(const char *path, const struct grubenv *env);

/* NULL when name is not set. */
const char *grubenv_get(const struct grubenv *env, const char *name);
/* Sets or adds name=value; -EINVAL for a name GRUB could not parse back
 * (empty, or containing '=', '\n', '#' first). */
int grubenv_set(struct grubenv *env, const char *name, const char *value);
int grubenv_unset(struct grubenv *env, const char *name);
/* 1 when a and b hold the same variables with the same values (order
 * ignored), else 0. */
int grubenv_equal(const struct grubenv *a, const struct grubenv *b);
void grubenv_done(struct grubenv *env);
