/* SPDX-License-Identifier: MIT */
#include <errno.h>

#include "utf8.h"

int utf8_decode(const char *s, size_t n, uint32_t *ret_cp) {
        const unsigned char *p = (const unsigned char *) s;
        uint32_t cp, min;
        size_t len;

        if (n == 0)
                return -EILSEQ;
        if (p[0] < 0x80) {
                *ret_cp = p[0];
                return 1;
        }
        if ((p[0] & 0xe0) == 0xc0)
                len = 2, cp = p[0] & 0x1f, min = 0x80;
        else if ((p[0] & 0xf0) == 0xe0)
                len = 3, cp = p[0] & 0x0f, min = 0x800;
        else if ((p[0] & 0xf8) == 0xf0)
                len = 4, cp = p[0] & 0x07, min = 0x10000;
        else
                return -EILSEQ; /* a continuation byte, or 0xf8..0xff */
        if (len > n)
                return -EILSEQ;
        for (size_t i = 1; i < len; i++) {
                if ((p[i] & 0xc0) != 0x80)
                        return -EILSEQ;
                cp = cp << 6 | (p[i] & 0x3f);
        }
        /* RFC 3629 §3: the shortest form only, and no UTF-16 surrogates. */
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
                return -EILSEQ;
        *ret_cp = cp;
        return (int) len;
}
