/* SPDX-License-Identifier: MIT */
/*
 * stream_codec: the CBOR messages of AWS IoT MQTT file streams
 * (protocol.md §3.2-§3.6): GetStream requests encoded byte-for-byte like the
 * reference agent, data and rejected messages decoded by key whatever the
 * map form. Owns the wire format only; never validates a block against a
 * file (stream.c does) and never allocates: decoded bytes point into the
 * message.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define STREAM_CLIENT_TOKEN_MAX 64  /* longer tokens get InvalidRequest */
#define STREAM_BITMAP_MAX 12287     /* "b" must be below 12288 bytes */

/* A GetStream request. The bitmap is LSB-first relative to offset: bit
 * (k & 7) of byte k >> 3 asks for block offset + k (§3.4). */
struct stream_request {
        const char *client_token; /* "c", NULL to leave it out */
        uint32_t file_id;         /* "f" */
        uint32_t block_size;      /* "l" */
        uint32_t offset;          /* "o", in blocks */
        const uint8_t *bitmap;    /* "b", a CBOR byte string */
        size_t bitmap_len;
        uint32_t n_blocks;        /* "n" */
};

/* Encodes req as a definite map of 6 pairs in the order c, f, l, o, b, n
 * (5 without c) with minimal integers, exactly like the reference agent.
 * Returns the length written, -ENOBUFS when buf is too small, -EINVAL for a
 * token or bitmap over the service limits. */
int stream_encode_request(const struct stream_request *req, uint8_t *buf, size_t size);

/* One data message. payload points into the decoded message. */
struct stream_block {
        uint64_t file_id;       /* "f" */
        uint64_t index;         /* "i" */
        uint64_t length;        /* "l" as the service claims it */
        const uint8_t *payload; /* "p" */
        size_t payload_len;     /* len(p): compare with length */
        const char *client_token; /* "c", not NUL-terminated; NULL when absent */
        size_t client_token_len;
};

/* Decodes a data message: a definite or indefinite map, keys in any order,
 * unknown keys skipped. f, i, l must be unsigned integers and p a definite
 * byte string, each exactly once. -EBADMSG for anything else (including
 * trailing bytes); *ret untouched then. */
int stream_decode_block(const uint8_t *msg, size_t len, struct stream_block *ret);

/* A rejected message, copied out and made printable (control and non-ASCII
 * bytes become '?', long texts are truncated). */
struct stream_rejection {
        char code[64];     /* "o", or the legacy "code" */
        char message[256]; /* "m" / "message"; "" when absent */
        char client_token[STREAM_CLIENT_TOKEN_MAX + 1]; /* "c" / "clientToken" */
};

/* Decodes a rejected message; either key form is accepted, the short one
 * wins when both are present. -EBADMSG when malformed or without a code. */
int stream_decode_rejection(const uint8_t *msg, size_t len, struct stream_rejection *ret);
