/* SPDX-License-Identifier: MIT */
/*
 * A one-pass JSON reader without a tree: an explicit state machine and one
 * bit per open container (object or array), so that nesting of any depth
 * costs no stack and the scan can report where cJSON's limit was passed and
 * carry on to members that come after the deep part.
 */
#include <assert.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "json_scan.h"

enum expect {
        EXPECT_VALUE,
        EXPECT_VALUE_OR_CLOSE, /* after '[' */
        EXPECT_KEY_OR_CLOSE,   /* after '{' */
        EXPECT_KEY,            /* after ',' in an object */
        EXPECT_COLON,
        EXPECT_COMMA_OR_CLOSE,
        EXPECT_END,
};

struct key {
        size_t start, len;
        bool plain;
};

struct scan {
        const char *text;
        size_t len, i;
        size_t depth;
        uint8_t *objects; /* bit d-1 set: the container at depth d is an object */
        struct key keys[JSON_SCAN_PATH_MAX + 1];        /* [d]: current key of the object at depth d */
        bool object_path[JSON_SCAN_PATH_MAX + 1];       /* [d]: containers 1..d are all objects */
        int open_member[JSON_SCAN_PATH_MAX + 2];         /* [d]: member whose value is the container at depth d */
        struct json_scan_member *members;
        size_t n_members;
        struct json_scan_result *result;
};

/* The length of the valid UTF-8 sequence at p, or 0 (RFC 3629: no overlong
 * forms, no surrogates, nothing above U+10FFFF). */
static size_t utf8_sequence(const unsigned char *p, size_t left) {
        unsigned char c = p[0];
        size_t n;

        if (c < 0x80)
                return 1;
        if (c < 0xc2)
                return 0;
        n = c < 0xe0 ? 2 : c < 0xf0 ? 3 : c < 0xf5 ? 4 : 0;
        if (n == 0 || left < n)
                return 0;
        for (size_t k = 1; k < n; k++)
                if ((p[k] & 0xc0) != 0x80)
                        return 0;
        if ((c == 0xe0 && p[1] < 0xa0) || (c == 0xed && p[1] >= 0xa0) || (c == 0xf0 && p[1] < 0x90) ||
            (c == 0xf4 && p[1] >= 0x90))
                return 0;
        return n;
}

size_t json_scan_utf8_invalid(const char *text, size_t len) {
        const unsigned char *p = (const unsigned char *) text;

        assert(text || len == 0);

        for (size_t i = 0; i < len;) {
                size_t n = utf8_sequence(p + i, len - i);

                if (n == 0)
                        return i;
                i += n;
        }
        return len;
}

static bool fail(struct scan *s, size_t offset, const char *what) {
        s->result->error = what;
        s->result->error_offset = offset;
        return false;
}

static bool is_hex(char c) {
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* At s->i == '"'; leaves s->i after the closing quote. */
static bool scan_string(struct scan *s, bool *ret_plain) {
        const unsigned char *p = (const unsigned char *) s->text;
        bool plain = true;

        for (s->i++; s->i < s->len;) {
                unsigned char c = p[s->i];

                if (c == '"') {
                        s->i++;
                        *ret_plain = plain;
                        return true;
                }
                if (c < 0x20)
                        return fail(s, s->i, "a control character in a string");
                if (c == '\\') {
                        plain = false;
                        if (s->i + 1 >= s->len)
                                break;
                        c = p[s->i + 1];
                        if (c == 'u') {
                                for (size_t k = 2; k < 6; k++) {
                                        if (s->i + k >= s->len)
                                                return fail(s, s->len, "the text ends inside a string");
                                        if (!is_hex((char) p[s->i + k]))
                                                return fail(s, s->i, "an invalid \\u escape");
                                }
                                s->i += 6;
                        } else if (c && strchr("\"\\/bfnrt", c)) {
                                s->i += 2;
                        } else
                                return fail(s, s->i, "an invalid escape");
                        continue;
                }
                if (c >= 0x80) {
                        size_t n = utf8_sequence(p + s->i, s->len - s->i);

                        if (n == 0)
                                return fail(s, s->i, "invalid UTF-8");
                        s->i += n;
                        continue;
                }
                s->i++;
        }
        return fail(s, s->len, "the text ends inside a string");
}

static bool scan_digits(struct scan *s) {
        size_t start = s->i;

        while (s->i < s->len && s->text[s->i] >= '0' && s->text[s->i] <= '9')
                s->i++;
        return s->i > start;
}

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
static bool scan_number(struct scan *s) {
        size_t start = s->i;

        if (s->text[s->i] == '-')
                s->i++;
        if (s->i < s->len && s->text[s->i] == '0')
                s->i++;
        else if (!scan_digits(s))
                return fail(s, s->i < s->len ? s->i : s->len, "an invalid number");
        if (s->i < s->len && s->text[s->i] == '.') {
                s->i++;
                if (!scan_digits(s))
                        return fail(s, start, "an invalid number");
        }
        if (s->i < s->len && (s->text[s->i] == 'e' || s->text[s->i] == 'E')) {
                s->i++;
                if (s->i < s->len && (s->text[s->i] == '+' || s->text[s->i] == '-'))
                        s->i++;
                if (!scan_digits(s))
                        return fail(s, start, "an invalid number");
        }
        return true;
}

static bool scan_literal(struct scan *s) {
        static const char *const literals[] = { "true", "false", "null" };

        for (size_t k = 0; k < 3; k++) {
                size_t n = strlen(literals[k]);

                if (literals[k][0] != s->text[s->i])
                        continue;
                if (s->len - s->i < n && memcmp(s->text + s->i, literals[k], s->len - s->i) == 0)
                        return fail(s, s->len, "the text ends inside a literal");
                if (s->len - s->i >= n && memcmp(s->text + s->i, literals[k], n) == 0) {
                        s->i += n;
                        return true;
                }
        }
        return fail(s, s->i, "an unexpected character");
}

/* The member whose path leads to a value starting now, or -1. */
static int member_here(struct scan *s) {
        size_t d = s->depth;

        if (d == 0 || d > JSON_SCAN_PATH_MAX || !s->object_path[d])
                return -1;
        for (size_t m = 0; m < s->n_members; m++) {
                struct json_scan_member *mb = &s->members[m];
                size_t l;

                if (mb->type != JSON_SCAN_NONE)
                        continue;
                for (l = 1; l <= d; l++) {
                        const char *want = mb->path[l - 1];
                        const struct key *k = &s->keys[l];

                        if (!want || !k->plain || strlen(want) != k->len ||
                            memcmp(s->text + k->start, want, k->len) != 0)
                                break;
                }
                if (l == d + 1 && !mb->path[d])
                        return (int) m;
        }
        return -1;
}

static void push(struct scan *s, bool object) {
        size_t d = ++s->depth;

        if (object)
                s->objects[(d - 1) / 8] |= (uint8_t) (1u << ((d - 1) % 8));
        else
                s->objects[(d - 1) / 8] &= (uint8_t) ~(1u << ((d - 1) % 8));
        if (d <= JSON_SCAN_PATH_MAX) {
                s->object_path[d] = object && s->object_path[d - 1];
                s->keys[d] = (struct key){ 0 };
        }
        if (d <= JSON_SCAN_PATH_MAX + 1)
                s->open_member[d] = -1;
        if (d > s->result->depth_max)
                s->result->depth_max = d;
}

static bool top_is_object(const struct scan *s) {
        size_t d = s->depth;

        return s->objects[(d - 1) / 8] & (1u << ((d - 1) % 8));
}

static void pop(struct scan *s) {
        size_t d = s->depth;

        if (d <= JSON_SCAN_PATH_MAX + 1 && s->open_member[d] >= 0)
                s->members[s->open_member[d]].end = s->i + 1;
        s->depth--;
}

int json_scan(const char *text, size_t len, size_t max_depth, struct json_scan_member *members, size_t n_members,
              struct json_scan_result *ret) {
        struct scan s = {
                .text = text,
                .len = len,
                .members = members,
                .n_members = n_members,
                .result = ret,
        };
        enum expect expect = EXPECT_VALUE;

        assert(text || len == 0);
        assert(members || n_members == 0);
        assert(ret);

        *ret = (struct json_scan_result){ 0 };
        for (size_t m = 0; m < n_members; m++) {
                members[m].type = JSON_SCAN_NONE;
                members[m].start = members[m].end = 0;
                members[m].value[0] = '\0';
                members[m].plain = false;
        }
        /* A container needs at least one byte: len bits are always enough. */
        s.objects = calloc(len / 8 + 1, 1);
        if (!s.objects)
                return -ENOMEM;
        s.object_path[0] = true;

        for (;;) {
                char c;

                while (s.i < len && (text[s.i] == ' ' || text[s.i] == '\t' || text[s.i] == '\n' || text[s.i] == '\r'))
                        s.i++;
                if (s.i == len) {
                        if (expect != EXPECT_END)
                                fail(&s, len, "the text ends before the JSON value does");
                        break;
                }
                c = text[s.i];

                if (expect == EXPECT_END) {
                        fail(&s, s.i, "text after the JSON value");
                        break;
                }
                if (expect == EXPECT_COLON) {
                        if (c != ':') {
                                fail(&s, s.i, "an unexpected character (expected ':')");
                                break;
                        }
                        s.i++;
                        expect = EXPECT_VALUE;
                        continue;
                }
                if (expect == EXPECT_COMMA_OR_CLOSE) {
                        if (c == ',') {
                                s.i++;
                                expect = top_is_object(&s) ? EXPECT_KEY : EXPECT_VALUE;
                                continue;
                        }
                        if (c != (top_is_object(&s) ? '}' : ']')) {
                                fail(&s, s.i, top_is_object(&s) ? "an unexpected character (expected ',' or '}')"
                                                                : "an unexpected character (expected ',' or ']')");
                                break;
                        }
                        pop(&s);
                        s.i++;
                        expect = s.depth ? EXPECT_COMMA_OR_CLOSE : EXPECT_END;
                        continue;
                }
                if (expect == EXPECT_KEY_OR_CLOSE || expect == EXPECT_KEY) {
                        size_t start = s.i + 1;
                        bool plain;

                        if (c == '}' && expect == EXPECT_KEY_OR_CLOSE) {
                                pop(&s);
                                s.i++;
                                expect = s.depth ? EXPECT_COMMA_OR_CLOSE : EXPECT_END;
                                continue;
                        }
                        if (c != '"') {
                                fail(&s, s.i, "an unexpected character (expected a member name)");
                                break;
                        }
                        if (!scan_string(&s, &plain))
                                break;
                        if (s.depth <= JSON_SCAN_PATH_MAX)
                                s.keys[s.depth] = (struct key){ start, s.i - 1 - start, plain };
                        expect = EXPECT_COLON;
                        continue;
                }

                /* EXPECT_VALUE or EXPECT_VALUE_OR_CLOSE */
                if (c == ']' && expect == EXPECT_VALUE_OR_CLOSE) {
                        pop(&s);
                        s.i++;
                        expect = s.depth ? EXPECT_COMMA_OR_CLOSE : EXPECT_END;
                        continue;
                }
                {
                        int m = member_here(&s);
                        struct json_scan_member *mb = m >= 0 ? &members[m] : NULL;
                        size_t start = s.i;
                        bool plain = false, ok;

                        if (c == '{' || c == '[') {
                                push(&s, c == '{');
                                if (s.depth > max_depth && !ret->depth_exceeded) {
                                        ret->depth_exceeded = true;
                                        ret->depth_offset = s.i;
                                }
                                if (mb) {
                                        mb->type = c == '{' ? JSON_SCAN_OBJECT : JSON_SCAN_ARRAY;
                                        mb->start = start;
                                        if (s.depth <= JSON_SCAN_PATH_MAX + 1)
                                                s.open_member[s.depth] = m;
                                }
                                s.i++;
                                expect = c == '{' ? EXPECT_KEY_OR_CLOSE : EXPECT_VALUE_OR_CLOSE;
                                continue;
                        }
                        if (c == '"')
                                ok = scan_string(&s, &plain);
                        else if (c == '-' || (c >= '0' && c <= '9'))
                                ok = scan_number(&s);
                        else
                                ok = scan_literal(&s);
                        if (!ok)
                                break;
                        if (mb) {
                                mb->type = c == '"' ? JSON_SCAN_STRING
                                         : (c == '-' || (c >= '0' && c <= '9')) ? JSON_SCAN_NUMBER
                                                                                : JSON_SCAN_LITERAL;
                                mb->start = start;
                                mb->end = s.i;
                                if (c == '"' && plain && s.i - start - 2 <= JSON_SCAN_VALUE_MAX) {
                                        memcpy(mb->value, text + start + 1, s.i - start - 2);
                                        mb->value[s.i - start - 2] = '\0';
                                        mb->plain = true;
                                }
                        }
                        expect = s.depth ? EXPECT_COMMA_OR_CLOSE : EXPECT_END;
                }
        }
        free(s.objects);
        return 0;
}
