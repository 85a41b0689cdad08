/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>

#include "base64.h"
#include "macro.h"

static int base64_value(char c) {
        if (c >= 'A' && c <= 'Z')
                return c - 'A';
        if (c >= 'a' && c <= 'z')
                return c - 'a' + 26;
        if (c >= '0' && c <= '9')
                return c - '0' + 52;
        if (c == '+')
                return 62;
        if (c == '/')
                return 63;
        return -1;
}

static bool base64_skipped(char c) {
        return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

int base64_decode(const char *text, size_t len, uint8_t **ret, size_t *ret_size) {
        _cleanup_free_ uint8_t *out = NULL;
        size_t n = 0, quad_len = 0, padding = 0;
        uint32_t quad = 0;

        /* Upper bound: 3 bytes per 4 characters (+1 so malloc(0) never happens). */
        out = malloc(len / 4 * 3 + 3);
        if (!out)
                return -ENOMEM;

        for (size_t i = 0; i < len; i++) {
                char c = text[i];
                if (base64_skipped(c))
                        continue;
                if (c == '=') {
                        /* Padding only completes the last quad: "xx==" or "xxx=". */
                        if (quad_len + padding < 2)
                                return -EINVAL;
                        padding++;
                        if (quad_len + padding > 4)
                                return -EINVAL;
                        continue;
                }
                int v = base64_value(c);
                if (v < 0 || padding > 0)
                        return -EINVAL; /* a bad character, or data after '=' */
                quad = quad << 6 | (uint32_t) v;
                if (++quad_len == 4) {
                        out[n++] = (uint8_t) (quad >> 16);
                        out[n++] = (uint8_t) (quad >> 8);
                        out[n++] = (uint8_t) quad;
                        quad = 0;
                        quad_len = 0;
                }
        }

        if (padding > 0) {
                if (quad_len + padding != 4)
                        return -EINVAL;
                if (quad_len == 2) {
                        if (quad & 0xf) /* non-canonical: trailing bits set */
                                return -EINVAL;
                        out[n++] = (uint8_t) (quad >> 4);
                } else {
                        if (quad & 0x3)
                                return -EINVAL;
                        out[n++] = (uint8_t) (quad >> 10);
                        out[n++] = (uint8_t) (quad >> 2);
                }
        } else if (quad_len != 0)
                return -EINVAL; /* RFC 4648 padding is required */

        *ret = take_ptr(&out);
        *ret_size = n;
        return 0;
}
