/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "byteranges.h"

/* A part's header block and a preamble are a few hundred bytes from any
 * real server; more is not a byteranges body. */
#define HEADERS_MAX 4096
#define PREAMBLE_MAX 4096
/* Empty lines tolerated between a part's data and the next delimiter: the
 * CRLF that belongs to the delimiter, and one more from a sloppy server. */
#define DELIMITER_BLANK_LINES_MAX 2

static bool is_space(char c) {
        return c == ' ' || c == '\t';
}

static bool is_digit(char c) {
        return c >= '0' && c <= '9';
}

/* Digits at *p, at most UINT64_MAX; advances *p. */
static bool parse_number(const char **p, const char *end, uint64_t *ret) {
        uint64_t v = 0;
        const char *s = *p;

        if (s >= end || !is_digit(*s))
                return false;
        for (; s < end && is_digit(*s); s++) {
                unsigned d = (unsigned) (*s - '0');

                if (v > (UINT64_MAX - d) / 10)
                        return false;
                v = v * 10 + d;
        }
        *p = s;
        *ret = v;
        return true;
}

int byteranges_content_range(const char *value, size_t len, uint64_t *ret_first, uint64_t *ret_last,
                             uint64_t *ret_complete) {
        const char *p = value, *end = value + len;
        uint64_t first, last, complete = UINT64_MAX;

        while (p < end && is_space(*p))
                p++;
        while (end > p && (is_space(end[-1]) || end[-1] == '\r' || end[-1] == '\n'))
                end--;
        if (end - p < 6 || strncasecmp(p, "bytes ", 6) != 0)
                return -EBADMSG;
        p += 6;
        while (p < end && is_space(*p))
                p++;
        if (!parse_number(&p, end, &first) || p >= end || *p++ != '-' || !parse_number(&p, end, &last) ||
            p >= end || *p++ != '/' || last < first)
                return -EBADMSG;
        if (p < end && *p == '*')
                p++;
        else if (!parse_number(&p, end, &complete) || complete <= last)
                return -EBADMSG;
        if (p != end)
                return -EBADMSG;
        *ret_first = first;
        *ret_last = last;
        *ret_complete = complete;
        return 0;
}

int byteranges_boundary(const char *content_type, size_t len, char *ret) {
        static const char type[] = "multipart/byteranges";
        const char *p = content_type, *end = content_type + len;

        while (p < end && is_space(*p))
                p++;
        while (end > p && (is_space(end[-1]) || end[-1] == '\r' || end[-1] == '\n'))
                end--;
        if ((size_t) (end - p) < sizeof type - 1 || strncasecmp(p, type, sizeof type - 1) != 0)
                return -ENOMSG;
        p += sizeof type - 1;
        if (p < end && *p != ';' && !is_space(*p))
                return -ENOMSG; /* e.g. multipart/byterangesX */

        /* Parameters: ; name=value, value a token or a quoted string. */
        while (p < end) {
                const char *name, *value;
                size_t name_len, value_len;
                bool quoted = false;

                while (p < end && (is_space(*p) || *p == ';'))
                        p++;
                name = p;
                while (p < end && *p != '=' && *p != ';' && !is_space(*p))
                        p++;
                name_len = (size_t) (p - name);
                while (p < end && is_space(*p))
                        p++;
                if (p >= end || *p != '=') {
                        if (name_len == 0)
                                break;
                        continue; /* a parameter without a value: skip it */
                }
                p++;
                while (p < end && is_space(*p))
                        p++;
                if (p < end && *p == '"') {
                        quoted = true;
                        value = ++p;
                        while (p < end && *p != '"') {
                                if (*p == '\\')
                                        return -EBADMSG; /* no quoted-pair in a boundary (RFC 2046 bchars) */
                                p++;
                        }
                        if (p >= end)
                                return -EBADMSG;
                        value_len = (size_t) (p - value);
                        p++;
                } else {
                        value = p;
                        while (p < end && *p != ';' && !is_space(*p))
                                p++;
                        value_len = (size_t) (p - value);
                }
                if (name_len != 8 || strncasecmp(name, "boundary", 8) != 0)
                        continue;
                if (value_len == 0 || value_len > BYTERANGES_BOUNDARY_MAX || (quoted && value[value_len - 1] == ' '))
                        return -EBADMSG;
                for (size_t i = 0; i < value_len; i++)
                        if ((unsigned char) value[i] < 0x20 || (unsigned char) value[i] >= 0x7f)
                                return -EBADMSG;
                memcpy(ret, value, value_len);
                ret[value_len] = '\0';
                return 0;
        }
        return -EBADMSG;
}

void byteranges_init(struct byteranges *p, const char *boundary, uint64_t file_size) {
        *p = (struct byteranges){ .file_size = file_size, .state = BYTERANGES_PREAMBLE };
        strncpy(p->boundary, boundary, BYTERANGES_BOUNDARY_MAX);
}

bool byteranges_complete(const struct byteranges *p) {
        return p->state == BYTERANGES_DONE;
}

/* "--boundary" (close: "--boundary--"), then only transport padding. */
static bool is_delimiter(const struct byteranges *p, bool close) {
        size_t blen = strlen(p->boundary), i;

        if (p->line_len < 2 + blen || memcmp(p->line, "--", 2) != 0 || memcmp(p->line + 2, p->boundary, blen) != 0)
                return false;
        i = 2 + blen;
        if (close) {
                if (p->line_len < i + 2 || memcmp(p->line + i, "--", 2) != 0)
                        return false;
                i += 2;
        }
        for (; i < p->line_len; i++)
                if (!is_space(p->line[i]))
                        return false;
        return true;
}

static void part_begin(struct byteranges *p) {
        p->state = BYTERANGES_HEADERS;
        p->have_range = false;
        p->header_bytes = 0;
}

/* One complete line (without its CRLF) of a non-data state. */
static int on_line(struct byteranges *p) {
        static const char cr[] = "content-range:";
        uint64_t first, last, complete;

        switch (p->state) {
        case BYTERANGES_PREAMBLE:
                if (is_delimiter(p, false)) {
                        part_begin(p);
                        return 0;
                }
                if (is_delimiter(p, true)) {
                        p->state = BYTERANGES_DONE;
                        return 0;
                }
                p->preamble_bytes += p->line_len + 2;
                return p->preamble_bytes > PREAMBLE_MAX ? -EBADMSG : 0;

        case BYTERANGES_HEADERS:
                p->header_bytes += p->line_len + 2;
                if (p->header_bytes > HEADERS_MAX)
                        return -EBADMSG;
                if (p->line_len == 0) {
                        if (!p->have_range)
                                return -EBADMSG; /* a part must say which bytes it holds */
                        p->state = BYTERANGES_DATA;
                        p->part_pos = p->part_start;
                        p->parts++;
                        return 0;
                }
                if (p->line_len < sizeof cr - 1 || strncasecmp(p->line, cr, sizeof cr - 1) != 0)
                        return 0; /* Content-Type and anything else */
                if (p->have_range ||
                    byteranges_content_range(p->line + sizeof cr - 1, p->line_len - (sizeof cr - 1), &first, &last,
                                             &complete) < 0)
                        return -EBADMSG;
                if (complete != UINT64_MAX && complete != p->file_size) {
                        p->complete_length = complete;
                        return -EMSGSIZE;
                }
                if (last >= p->file_size)
                        return -EBADMSG;
                p->have_range = true;
                p->part_start = first;
                p->part_end = last + 1;
                return 0;

        case BYTERANGES_DELIMITER:
                if (p->line_len == 0)
                        return ++p->blank_lines > DELIMITER_BLANK_LINES_MAX ? -EBADMSG : 0;
                if (p->blank_lines == 0)
                        return -EBADMSG; /* data longer than its Content-Range */
                if (is_delimiter(p, false)) {
                        part_begin(p);
                        return 0;
                }
                if (is_delimiter(p, true)) {
                        p->state = BYTERANGES_DONE;
                        return 0;
                }
                return -EBADMSG;

        default:
                return -EBADMSG;
        }
}

int byteranges_feed(struct byteranges *p, const void *buf, size_t len, byteranges_data_fn data, void *userdata) {
        const char *b = buf;
        int r;

        if (p->error < 0)
                return p->error;
        while (len > 0) {
                if (p->state == BYTERANGES_DONE) {
                        p->other_bytes += len; /* the epilogue */
                        return 0;
                }
                if (p->state == BYTERANGES_DATA) {
                        uint64_t left = p->part_end - p->part_pos;
                        size_t n = len < left ? len : (size_t) left;

                        r = data(p->part_pos, b, n, userdata);
                        if (r < 0)
                                return (p->error = r);
                        p->part_pos += n;
                        p->data_bytes += n;
                        b += n;
                        len -= n;
                        if (p->part_pos == p->part_end) {
                                p->state = BYTERANGES_DELIMITER;
                                p->line_len = 0;
                                p->blank_lines = 0;
                        }
                        continue;
                }

                /* Line states: up to the next LF, CR before it dropped. */
                const char *nl = memchr(b, '\n', len);
                size_t n = nl ? (size_t) (nl - b) : len;

                if (p->line_len + n > BYTERANGES_LINE_MAX)
                        return (p->error = -EBADMSG);
                memcpy(p->line + p->line_len, b, n);
                p->line_len += n;
                p->other_bytes += n + (nl ? 1 : 0);
                b += n + (nl ? 1 : 0);
                len -= n + (nl ? 1 : 0);
                if (!nl)
                        continue;
                if (p->line_len > 0 && p->line[p->line_len - 1] == '\r')
                        p->line_len--;
                p->line[p->line_len] = '\0';
                r = on_line(p);
                p->line_len = 0;
                if (r < 0)
                        return (p->error = r);
        }
        return 0;
}
