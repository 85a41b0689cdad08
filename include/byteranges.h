/* SPDX-License-Identifier: MIT */
/*
 * byteranges: a streaming reader of multipart/byteranges bodies (RFC 9110
 * §14.6, RFC 2046 §5.1), the answer of a server that serves several ranges
 * in one response. Owns the boundary syntax, the part headers and each
 * part's Content-Range; hands out part bytes with their file offsets as
 * they arrive, in whatever pieces the body comes in. Never allocates, never
 * buffers part data (each part's length is known from its Content-Range, so
 * no byte of it is scanned for the boundary), never decides whether the
 * parts are the ones asked for (http.c does).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BYTERANGES_BOUNDARY_MAX 70 /* RFC 2046 §5.1.1 */
#define BYTERANGES_LINE_MAX 512    /* a part header line, or a preamble line */

/* The boundary parameter of a Content-Type value ("multipart/byteranges;
 * boundary=..." or its quoted form), into ret (BYTERANGES_BOUNDARY_MAX + 1
 * bytes). -ENOMSG: not multipart/byteranges; -EBADMSG: no usable boundary. */
int byteranges_boundary(const char *content_type, size_t len, char *ret);

enum byteranges_state {
        BYTERANGES_PREAMBLE,
        BYTERANGES_HEADERS,
        BYTERANGES_DATA,
        BYTERANGES_DELIMITER, /* after a part's data: CRLF, then the next delimiter */
        BYTERANGES_DONE,      /* after the close delimiter: the epilogue is ignored */
};

struct byteranges {
        char boundary[BYTERANGES_BOUNDARY_MAX + 1];
        uint64_t file_size;        /* each part's complete-length must be this (or "*") */
        enum byteranges_state state;
        char line[BYTERANGES_LINE_MAX + 1];
        size_t line_len;
        size_t header_bytes;       /* of the current part, bounded */
        size_t preamble_bytes;     /* bounded */
        unsigned blank_lines;      /* between a part's data and the next delimiter */
        int error;                 /* sticky: feed() returns it again */
        bool have_range;
        uint64_t part_start, part_end; /* [start, end) of the current part */
        uint64_t part_pos;         /* next byte of the current part */
        unsigned parts;            /* parts begun */
        uint64_t data_bytes;       /* part bytes handed out */
        uint64_t other_bytes;      /* everything else: delimiters, headers, CRLFs, preamble, epilogue */
        uint64_t complete_length;  /* a part's complete-length that differed from file_size */
};

/* A Content-Range value (RFC 9110 §14.4), "bytes first-last/complete" with
 * complete "*" when unknown (then *ret_complete = UINT64_MAX): 0, or
 * -EBADMSG for anything else: last < first, complete <= last, and the
 * unsatisfied form (an asterisk for the range) that only a 416 carries. */
int byteranges_content_range(const char *value, size_t len, uint64_t *ret_first, uint64_t *ret_last,
                             uint64_t *ret_complete);

void byteranges_init(struct byteranges *p, const char *boundary, uint64_t file_size);

/* Receives bytes [offset, offset + len) of the file from a part. 0, or a
 * negative errno that stops the reader and comes back from feed(). */
typedef int (*byteranges_data_fn)(uint64_t offset, const void *buf, size_t len, void *userdata);

/* Consumes the next len body bytes. 0, the callback's error, -EBADMSG for
 * a malformed body, -EMSGSIZE for a part whose Content-Range names another
 * complete length than file_size (in complete_length). An error sticks:
 * every later call returns it. */
int byteranges_feed(struct byteranges *p, const void *buf, size_t len, byteranges_data_fn data, void *userdata);

/* The close delimiter was read: every part is complete. */
bool byteranges_complete(const struct byteranges *p);
