/* SPDX-License-Identifier: MIT */
/*
 * base64: decoding of the base64 text jobs carry (the sig-<hash>-<alg>
 * signatures). Owns the strictness rules; never logs.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

/* RFC 4648 base64 with padding; CR, LF, tab and space are skipped anywhere
 * (like the reference agent's decoder). Rejects other characters, missing or
 * misplaced padding and non-zero trailing bits with -EINVAL. *ret is a new
 * buffer; both outputs untouched on failure. */
int base64_decode(const char *text, size_t len, uint8_t **ret, size_t *ret_size);
