/* SPDX-License-Identifier: MIT */
/*
 * utf8: decoding of one UTF-8 character, strictly (RFC 3629): no overlong
 * forms, no surrogates, nothing above U+10FFFF, no truncated sequences.
 * Owns no state and never allocates.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

/* Decodes the character at s (at most n bytes). Returns its length in
 * bytes (1..4) and stores the code point in *ret_cp, or -EILSEQ when s does
 * not start with a valid UTF-8 character (*ret_cp untouched). n == 0 is
 * -EILSEQ too. */
int utf8_decode(const char *s, size_t n, uint32_t *ret_cp);
