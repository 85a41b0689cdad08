/* SPDX-License-Identifier: MIT */
#include <cbor.h>
#include <errno.h>
#include <string.h>

#include "stream_codec.h"

/* ---- encoding ---------------------------------------------------------- */

struct writer {
        uint8_t *buf;
        size_t size, len;
        bool overflow;
};

/* libcbor's encoders write minimal heads and return 0 when out of room. */
static void put(struct writer *w, size_t n) {
        if (n == 0)
                w->overflow = true;
        w->len += n;
}

static void put_bytes(struct writer *w, const void *data, size_t n) {
        if (w->overflow || w->size - w->len < n) {
                w->overflow = true;
                return;
        }
        if (n > 0)
                memcpy(w->buf + w->len, data, n);
        w->len += n;
}

static void put_key(struct writer *w, const char *key) {
        if (w->overflow)
                return;
        put(w, cbor_encode_string_start(strlen(key), w->buf + w->len, w->size - w->len));
        put_bytes(w, key, strlen(key));
}

static void put_uint(struct writer *w, const char *key, uint64_t v) {
        put_key(w, key);
        if (!w->overflow)
                put(w, cbor_encode_uint(v, w->buf + w->len, w->size - w->len));
}

int stream_encode_request(const struct stream_request *req, uint8_t *buf, size_t size) {
        struct writer w = { .buf = buf, .size = size };
        size_t token_len = req->client_token ? strlen(req->client_token) : 0;

        if (token_len > STREAM_CLIENT_TOKEN_MAX || req->bitmap_len > STREAM_BITMAP_MAX)
                return -EINVAL;
        if (size == 0)
                return -ENOBUFS;

        /* The reference agent's order: c, f, l, o, b, n (protocol.md §3.2). */
        put(&w, cbor_encode_map_start(req->client_token ? 6 : 5, w.buf, w.size));
        if (req->client_token) {
                put_key(&w, "c");
                if (!w.overflow)
                        put(&w, cbor_encode_string_start(token_len, w.buf + w.len, w.size - w.len));
                put_bytes(&w, req->client_token, token_len);
        }
        put_uint(&w, "f", req->file_id);
        put_uint(&w, "l", req->block_size);
        put_uint(&w, "o", req->offset);
        put_key(&w, "b");
        if (!w.overflow)
                put(&w, cbor_encode_bytestring_start(req->bitmap_len, w.buf + w.len, w.size - w.len));
        put_bytes(&w, req->bitmap, req->bitmap_len);
        put_uint(&w, "n", req->n_blocks);

        if (w.overflow)
                return -ENOBUFS;
        return (int) w.len;
}

/* ---- decoding ---------------------------------------------------------- */

/* The service sends an indefinite map with keys in any order (§3.3, §9.13),
 * so messages are walked item by item with libcbor's streaming decoder,
 * which never allocates and hands out pointers into the message. One map is
 * accepted at the top; values of unknown keys may be anything and are
 * skipped, nested up to MAX_DEPTH. */

#define MAX_DEPTH 16

enum value_kind {
        VALUE_UINT,
        VALUE_TEXT,
        VALUE_BYTES,
        VALUE_OTHER, /* negative, float, simple, container, chunked string */
};

struct level {
        uint64_t remaining; /* items left; UINT64_MAX for indefinite */
        bool indefinite;
        bool chunks;        /* an indefinite string: only chunks, then break */
};

struct walker {
        size_t msg_len;
        struct level stack[MAX_DEPTH];
        unsigned depth;      /* 0: before the top map */
        bool done;           /* the top map ended */
        bool error;
        bool expect_key;     /* at depth 1 */
        const uint8_t *key;  /* the pending key */
        size_t key_len;
        void (*value)(struct walker *w, const uint8_t *key, size_t key_len, enum value_kind kind,
                      uint64_t u, const uint8_t *data, size_t len);
        void *userdata;
};

/* One item of the current level is complete; pops every level it ends. */
static void item_done(struct walker *w) {
        while (w->depth > 0) {
                struct level *l = &w->stack[w->depth - 1];

                if (l->indefinite)
                        return;
                if (--l->remaining > 0)
                        return;
                w->depth--;
                if (w->depth == 0) {
                        w->done = true;
                        return;
                }
                if (w->depth == 1)
                        w->expect_key = true; /* a skipped container value ended */
        }
}

/* Every item (scalar or container start) of the message. */
static void item(struct walker *w, enum value_kind kind, uint64_t u, const uint8_t *data, size_t len) {
        if (w->error)
                return;
        if (w->done || w->depth == 0) { /* trailing items, or a top that is not a map */
                w->error = true;
                return;
        }
        if (w->stack[w->depth - 1].chunks) {
                /* Inside an indefinite string only its chunks may appear. */
                if (kind != VALUE_BYTES && kind != VALUE_TEXT)
                        w->error = true;
                return;
        }
        if (w->depth == 1) {
                if (w->expect_key) {
                        if (kind != VALUE_TEXT) {
                                w->error = true;
                                return;
                        }
                        w->key = data;
                        w->key_len = len;
                        w->expect_key = false;
                } else {
                        w->value(w, w->key, w->key_len, kind, u, data, len);
                        w->expect_key = true;
                }
        }
        item_done(w);
}

static void push(struct walker *w, uint64_t items, bool indefinite, bool chunks) {
        if (w->error)
                return;
        if (w->depth == 0 && (chunks || w->done)) {
                w->error = true;
                return;
        }
        if (w->depth >= MAX_DEPTH || (!indefinite && items > w->msg_len)) {
                /* Each item takes at least one byte: a larger count is a lie. */
                w->error = true;
                return;
        }
        if (w->depth >= 1 && w->stack[w->depth - 1].chunks) {
                w->error = true; /* nested chunked strings */
                return;
        }
        if (w->depth == 1) {
                if (w->expect_key) {
                        w->error = true; /* keys are definite text */
                        return;
                }
                /* A container (or chunked string) value: never one we want. */
                w->value(w, w->key, w->key_len, VALUE_OTHER, 0, NULL, 0);
                w->expect_key = true;
        }
        if (!indefinite && items == 0) {
                if (w->depth == 0) {
                        w->done = true;
                        return;
                }
                item_done(w);
                return;
        }
        w->stack[w->depth++] = (struct level){ .remaining = items, .indefinite = indefinite, .chunks = chunks };
        if (w->depth == 1)
                w->expect_key = true;
}

static void on_break(void *ctx) {
        struct walker *w = ctx;

        if (w->error)
                return;
        if (w->depth == 0 || !w->stack[w->depth - 1].indefinite || (w->depth == 1 && !w->expect_key)) {
                w->error = true; /* break without an open indefinite item, or a key without value */
                return;
        }
        w->depth--;
        if (w->depth == 0) {
                w->done = true;
                return;
        }
        if (w->depth == 1)
                w->expect_key = true;
        item_done(w);
}

static void on_uint8(void *ctx, uint8_t v) { item(ctx, VALUE_UINT, v, NULL, 0); }
static void on_uint16(void *ctx, uint16_t v) { item(ctx, VALUE_UINT, v, NULL, 0); }
static void on_uint32(void *ctx, uint32_t v) { item(ctx, VALUE_UINT, v, NULL, 0); }
static void on_uint64(void *ctx, uint64_t v) { item(ctx, VALUE_UINT, v, NULL, 0); }
static void on_negint8(void *ctx, uint8_t v) { item(ctx, VALUE_OTHER, 0, NULL, 0); }
static void on_negint16(void *ctx, uint16_t v) { item(ctx, VALUE_OTHER, 0, NULL, 0); }
static void on_negint32(void *ctx, uint32_t v) { item(ctx, VALUE_OTHER, 0, NULL, 0); }
static void on_negint64(void *ctx, uint64_t v) { item(ctx, VALUE_OTHER, 0, NULL, 0); }
static void on_bytes(void *ctx, cbor_data data, size_t len) { item(ctx, VALUE_BYTES, 0, data, len); }
static void on_text(void *ctx, cbor_data data, size_t len) { item(ctx, VALUE_TEXT, 0, data, len); }
static void on_chunked(void *ctx) { push(ctx, 0, true, true); }
static void on_array(void *ctx, size_t n) { push(ctx, n, false, false); }
static void on_indef_array(void *ctx) { push(ctx, 0, true, false); }
static void on_map(void *ctx, size_t n) {
        /* A map of n pairs holds 2n items; n above the message size is a lie. */
        struct walker *w = ctx;

        if (n > w->msg_len) {
                w->error = true;
                return;
        }
        push(ctx, 2 * (uint64_t) n, false, false);
}
static void on_indef_map(void *ctx) { push(ctx, 0, true, false); }
static void on_tag(void *ctx, uint64_t tag) { /* the tagged item follows and counts */ }
static void on_float(void *ctx, float f) { item(ctx, VALUE_OTHER, 0, NULL, 0); }
static void on_double(void *ctx, double d) { item(ctx, VALUE_OTHER, 0, NULL, 0); }
static void on_simple(void *ctx) { item(ctx, VALUE_OTHER, 0, NULL, 0); }
static void on_bool(void *ctx, bool b) { item(ctx, VALUE_OTHER, 0, NULL, 0); }

static const struct cbor_callbacks walker_callbacks = {
        .uint8 = on_uint8,
        .uint16 = on_uint16,
        .uint32 = on_uint32,
        .uint64 = on_uint64,
        .negint8 = on_negint8,
        .negint16 = on_negint16,
        .negint32 = on_negint32,
        .negint64 = on_negint64,
        .byte_string_start = on_chunked,
        .byte_string = on_bytes,
        .string = on_text,
        .string_start = on_chunked,
        .indef_array_start = on_indef_array,
        .array_start = on_array,
        .indef_map_start = on_indef_map,
        .map_start = on_map,
        .tag = on_tag,
        .float2 = on_float,
        .float4 = on_float,
        .float8 = on_double,
        .undefined = on_simple,
        .null = on_simple,
        .boolean = on_bool,
        .indef_break = on_break,
};

static int walk(struct walker *w, const uint8_t *msg, size_t len) {
        size_t pos = 0;

        w->msg_len = len;
        while (!w->done && !w->error) {
                struct cbor_decoder_result r;

                if (pos >= len)
                        return -EBADMSG; /* truncated */
                r = cbor_stream_decode(msg + pos, len - pos, &walker_callbacks, w);
                if (r.status != CBOR_DECODER_FINISHED || r.read == 0)
                        return -EBADMSG;
                pos += r.read;
        }
        if (w->error || pos != len)
                return -EBADMSG;
        return 0;
}

static bool key_is(const uint8_t *key, size_t key_len, const char *name) {
        return key_len == strlen(name) && memcmp(key, name, key_len) == 0;
}

/* Data message ---------------------------------------------------------- */

enum {
        SEEN_F = 1 << 0,
        SEEN_I = 1 << 1,
        SEEN_L = 1 << 2,
        SEEN_P = 1 << 3,
        SEEN_C = 1 << 4,
};

struct block_walk {
        struct stream_block block;
        unsigned seen;
};

static bool first_time(struct walker *w, unsigned *seen, unsigned bit) {
        if (*seen & bit) {
                w->error = true; /* a repeated key: which one would be true? */
                return false;
        }
        *seen |= bit;
        return true;
}

static void block_value(struct walker *w, const uint8_t *key, size_t key_len, enum value_kind kind,
                        uint64_t u, const uint8_t *data, size_t len) {
        struct block_walk *b = w->userdata;
        uint64_t *target = NULL;
        unsigned bit = 0;

        if (key_is(key, key_len, "f"))
                target = &b->block.file_id, bit = SEEN_F;
        else if (key_is(key, key_len, "i"))
                target = &b->block.index, bit = SEEN_I;
        else if (key_is(key, key_len, "l"))
                target = &b->block.length, bit = SEEN_L;

        if (target) {
                if (kind != VALUE_UINT || !first_time(w, &b->seen, bit)) {
                        w->error = true;
                        return;
                }
                *target = u;
        } else if (key_is(key, key_len, "p")) {
                if (kind != VALUE_BYTES || !first_time(w, &b->seen, SEEN_P)) {
                        w->error = true;
                        return;
                }
                b->block.payload = data;
                b->block.payload_len = len;
        } else if (key_is(key, key_len, "c")) {
                if (kind != VALUE_TEXT || !first_time(w, &b->seen, SEEN_C)) {
                        w->error = true;
                        return;
                }
                b->block.client_token = (const char *) data;
                b->block.client_token_len = len;
        }
}

int stream_decode_block(const uint8_t *msg, size_t len, struct stream_block *ret) {
        struct block_walk b = { .seen = 0 };
        struct walker w = { .value = block_value, .userdata = &b };
        int r;

        r = walk(&w, msg, len);
        if (r < 0)
                return r;
        if ((b.seen & (SEEN_F | SEEN_I | SEEN_L | SEEN_P)) != (SEEN_F | SEEN_I | SEEN_L | SEEN_P))
                return -EBADMSG;
        *ret = b.block;
        return 0;
}

/* Rejected message ------------------------------------------------------ */

struct rejection_walk {
        struct stream_rejection rej;
        int code_rank, message_rank, token_rank; /* 2: short key, 1: legacy key */
};

static void copy_text(char *dst, size_t size, const uint8_t *src, size_t len) {
        size_t n = len < size - 1 ? len : size - 1;

        for (size_t i = 0; i < n; i++)
                dst[i] = src[i] >= 0x20 && src[i] < 0x7f ? (char) src[i] : '?';
        dst[n] = '\0';
}

static void rejection_value(struct walker *w, const uint8_t *key, size_t key_len, enum value_kind kind,
                            uint64_t u, const uint8_t *data, size_t len) {
        struct rejection_walk *r = w->userdata;
        char *dst = NULL;
        size_t size = 0;
        int *rank = NULL, this_rank = 0;

        if (key_is(key, key_len, "o") || key_is(key, key_len, "code")) {
                dst = r->rej.code, size = sizeof r->rej.code, rank = &r->code_rank;
                this_rank = key_len == 1 ? 2 : 1;
        } else if (key_is(key, key_len, "m") || key_is(key, key_len, "message")) {
                dst = r->rej.message, size = sizeof r->rej.message, rank = &r->message_rank;
                this_rank = key_len == 1 ? 2 : 1;
        } else if (key_is(key, key_len, "c") || key_is(key, key_len, "clientToken")) {
                dst = r->rej.client_token, size = sizeof r->rej.client_token, rank = &r->token_rank;
                this_rank = key_len == 1 ? 2 : 1;
        } else
                return;

        if (kind != VALUE_TEXT) {
                w->error = true;
                return;
        }
        if (this_rank <= *rank)
                return;
        copy_text(dst, size, data, len);
        *rank = this_rank;
}

int stream_decode_rejection(const uint8_t *msg, size_t len, struct stream_rejection *ret) {
        struct rejection_walk r = { .code_rank = 0 };
        struct walker w = { .value = rejection_value, .userdata = &r };
        int k;

        k = walk(&w, msg, len);
        if (k < 0)
                return k;
        if (r.code_rank == 0 || r.rej.code[0] == '\0')
                return -EBADMSG;
        *ret = r.rej;
        return 0;
}
