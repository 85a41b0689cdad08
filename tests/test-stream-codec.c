/* SPDX-License-Identifier: MIT */
/*
 * The CBOR stream codec against the vectors of protocol.md §8.3-§8.5:
 * requests byte for byte as the reference agent sends them, service-style
 * (indefinite) and unit-test-style (definite) data responses, captured
 * rejections, and malformed input that must be refused without harm.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stream_codec.h"
#include "tap.h"

/* Hex text (spaces allowed) to bytes; returns the length. */
static size_t unhex(const char *hex, uint8_t *buf, size_t size) {
        size_t n = 0;

        while (*hex) {
                unsigned v;

                if (*hex == ' ') {
                        hex++;
                        continue;
                }
                if (sscanf(hex, "%2x", &v) != 1 || n >= size)
                        abort();
                buf[n++] = (uint8_t) v;
                hex += 2;
        }
        return n;
}

static void check_encoding(const struct stream_request *req, const char *want_hex, const char *name) {
        uint8_t want[512], got[512];
        size_t want_len = unhex(want_hex, want, sizeof want);
        int r = stream_encode_request(req, got, sizeof got);

        tap_ok(r == (int) want_len && memcmp(got, want, want_len) == 0, "encode %s (%d bytes, want %zu)", name, r,
               want_len);
}

static void test_encode(void) {
        uint8_t bitmap[64];
        uint8_t small[8];

        check_encoding(&(struct stream_request){ .client_token = "ThisIsAClientToken", .file_id = 1, .block_size = 4096,
                                                 .bitmap = (const uint8_t *) "\xaa\xaa\xaa\xaa", .bitmap_len = 4,
                                                 .n_blocks = 4 },
                       "a661637254686973497341436c69656e74546f6b656e616601616c191000616f00616244aaaaaaaa616e04",
                       "OTA-lib unit test request");
        check_encoding(&(struct stream_request){ .client_token = "rdy", .block_size = 4096,
                                                 .bitmap = (const uint8_t *) "\x07", .bitmap_len = 1, .n_blocks = 4 },
                       "a6616363726479616600616c191000616f0061624107616e04", "fresh 10000-byte file");
        check_encoding(&(struct stream_request){ .client_token = "rdy", .block_size = 4096,
                                                 .bitmap = (const uint8_t *) "\x06", .bitmap_len = 1, .n_blocks = 4 },
                       "a6616363726479616600616c191000616f0061624106616e04", "after block 0");

        /* 285 blocks, 0-9 received: 36-byte bitmap 00 fc ff ... 1f. */
        memset(bitmap, 0xff, 36);
        bitmap[0] = 0x00;
        bitmap[1] = 0xfc;
        bitmap[35] = 0x1f;
        check_encoding(&(struct stream_request){ .client_token = "rdy", .block_size = 4096, .bitmap = bitmap,
                                                 .bitmap_len = 36, .n_blocks = 8 },
                       "a6616363726479616600616c191000616f006162582400fcffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff1f616e08",
                       "285-block bitmap");
        check_encoding(&(struct stream_request){ .client_token = "rdy", .block_size = 4096, .offset = 5,
                                                 .bitmap = (const uint8_t *) "MQ==", .bitmap_len = 4, .n_blocks = 1 },
                       "a6616363726479616600616c191000616f056162444d513d3d616e01", "MFS-lib o=5");
        check_encoding(&(struct stream_request){ .client_token = "rdy", .block_size = 256, .offset = 20,
                                                 .bitmap = (const uint8_t *) "\x13\x00\x80", .bitmap_len = 3,
                                                 .n_blocks = 24 },
                       "a6616363726479616600616c190100616f14616243130080616e1818", "o=20 doc example");
        check_encoding(&(struct stream_request){ .file_id = 255, .block_size = 131072, .offset = 98304,
                                                 .bitmap = (const uint8_t *) "\x01", .bitmap_len = 1, .n_blocks = 1 },
                       "a5 6166 18ff 616c 1a00020000 616f 1a00018000 6162 4101 616e 01", "no token, wide integers");

        tap_is_int(stream_encode_request(&(struct stream_request){ .client_token = "rdy", .bitmap_len = 1,
                                                                    .bitmap = (const uint8_t *) "\x01" },
                                         small, sizeof small),
                   -ENOBUFS, "encode into a short buffer");
        tap_is_int(stream_encode_request(&(struct stream_request){ .client_token = "x", .bitmap_len = STREAM_BITMAP_MAX + 1,
                                                                    .bitmap = bitmap },
                                         small, sizeof small),
                   -EINVAL, "bitmap over 12287 bytes refused");
        tap_is_int(stream_encode_request(&(struct stream_request){
                                                 .client_token = "0123456789012345678901234567890123456789012345678901234567890123X",
                                                 .bitmap = bitmap, .bitmap_len = 1 },
                                         small, sizeof small),
                   -EINVAL, "token over 64 bytes refused");
}

static int decode_hex(const char *hex, struct stream_block *b) {
        static uint8_t buf[8192];
        size_t n = unhex(hex, buf, sizeof buf);

        return stream_decode_block(buf, n, b);
}

static void test_decode_blocks(void) {
        static uint8_t msg[4200];
        struct stream_block b;
        size_t n;
        int bad = 0;

        tap_is_int(decode_hex("a4616600616902616c04617044deadbeef", &b), 0, "definite f,i,l,p decodes");
        tap_ok(b.file_id == 0 && b.index == 2 && b.length == 4 && b.payload_len == 4 &&
               memcmp(b.payload, "\xde\xad\xbe\xef", 4) == 0 && !b.client_token, "definite values");

        tap_is_int(decode_hex("bf616363726479616600616902616c04617044deadbeefff", &b), 0, "indefinite with c decodes");
        tap_ok(b.index == 2 && b.length == 4 && b.client_token_len == 3 && memcmp(b.client_token, "rdy", 3) == 0,
               "indefinite values and echoed token");

        tap_is_int(decode_hex("a46170 44deadbeef 616c04 616902 616607", &b), 0, "keys in any order");
        tap_ok(b.file_id == 7 && b.index == 2 && b.length == 4, "any-order values");

        tap_is_int(decode_hex("bf 6178 a1 6161 82 01 9f 02 ff 6179 5f 41aa 41bb ff 6166 00 6169 00 616c 01 6170 41ff 617a f6 ff", &b),
                   0, "unknown keys with nested values skipped");
        tap_ok(b.length == 1 && b.payload_len == 1 && b.payload[0] == 0xff, "values after skipped keys");

        /* Service style, 4096-byte block 0: 4120 bytes like the real log. */
        n = unhex("bf616363726479616600616900616c1910006170591000", msg, sizeof msg);
        for (size_t i = 0; i < 4096; i++)
                msg[n + i] = (uint8_t) (i % 255);
        n += 4096;
        msg[n++] = 0xff;
        tap_is_int((long long) n, 4120, "service-style message is 4120 bytes");
        tap_is_int(stream_decode_block(msg, n, &b), 0, "service-style 4096-byte block decodes");
        tap_ok(b.length == 4096 && b.payload_len == 4096 && b.payload == msg + 23 && b.payload[300] == 300 % 255,
               "payload points into the message");

        /* Every truncation of it is refused. */
        for (size_t k = 0; k < n; k++)
                if (stream_decode_block(msg, k, &b) != -EBADMSG)
                        bad++;
        tap_is_int(bad, 0, "every truncated prefix refused");

        /* rustot's capture: block 0, 1024 bytes, no c. */
        n = unhex("bf616600616900616c1904006170590400 8d3e1cf650c10200000200", msg, sizeof msg);
        memset(msg + n, 0, 1024 - 11);
        n += 1024 - 11;
        msg[n++] = 0xff;
        tap_is_int((long long) n, 1042, "rustot message is 1042 bytes");
        tap_ok(stream_decode_block(msg, n, &b) == 0 && b.length == 1024 && b.payload_len == 1024 &&
               b.payload[0] == 0x8d, "rustot capture decodes");

        struct {
                const char *hex, *name;
        } malformed[] = {
                { "a4616600616902616c04617044deadbeef00", "trailing byte" },
                { "a3616600616902616c04", "missing p" },
                { "a3616902616c04617044deadbeef", "missing f" },
                { "a5616600616600616902616c04617044deadbeef", "repeated f" },
                { "a4616620616902616c04617044deadbeef", "negative f" },
                { "a4616600616902616c04617064deadbeef", "p as text" },
                { "a4616600616902616c046170 5f 42dead 42beef ff", "chunked p" },
                { "a4616600616902616cf97c00617044deadbeef", "l as float" },
                { "bf616600616902616c04617044deadbeef", "indefinite map without break" },
                { "bf616600616902616c04617044deadbeef6178ff", "key without value before break" },
                { "a4616600616902616c04617044deadbeefff", "break without indefinite" },
                { "bbffffffffffffffff616600", "map claiming 2^64-1 pairs" },
                { "a4616600616902616c046170 5bffffffffffffffff", "bytes claiming 2^64-1 length" },
                { "a4616600616902616c046170 5a00010000 dead", "bytes longer than the message" },
                { "84616600616902616c04617044deadbeef", "array at the top" },
                { "a401006169 02616c04617044deadbeef", "integer key" },
                { "bf 6178 818181818181818181818181818181818181 00 ff", "nesting deeper than 16" },
                { "a4 7f6166ff 00616902616c04617044deadbeef", "chunked key" },
                { "", "empty message" },
                { "ff", "lone break" },
                { "a0", "empty map" },
                { "1c", "reserved additional info" },
        };
        for (size_t i = 0; i < sizeof malformed / sizeof malformed[0]; i++)
                tap_is_int(decode_hex(malformed[i].hex, &b), -EBADMSG, malformed[i].name);
}

static void test_decode_rejections(void) {
        uint8_t msg[512];
        struct stream_rejection rej;
        size_t n;

        n = unhex("bf64636f64656b496e76616c696443626f72616f6b496e76616c696443626f72676d65737361676574496e76616c69642043424f52206d657373616765616d74496e76616c69642043424f52206d657373616765ff",
                  msg, sizeof msg);
        tap_is_int(stream_decode_rejection(msg, n, &rej), 0, "captured InvalidCbor rejection decodes");
        tap_is_str(rej.code, "InvalidCbor", "rejection code");
        tap_is_str(rej.message, "Invalid CBOR message", "rejection message");
        tap_is_str(rej.client_token, "", "no client token");

        /* {"clientToken":"rdy","c":"rdy","code":"InvalidRequest","o":"InvalidRequest","m":"out of range"} */
        n = unhex("a5 6b636c69656e74546f6b656e 63726479 6163 63726479 64636f6465 6e496e76616c696452657175657374"
                  " 616f 6e496e76616c696452657175657374 616d 6c6f7574206f662072616e6765", msg, sizeof msg);
        tap_ok(stream_decode_rejection(msg, n, &rej) == 0 && strcmp(rej.code, "InvalidRequest") == 0 &&
               strcmp(rej.client_token, "rdy") == 0 && strcmp(rej.message, "out of range") == 0,
               "both key forms: %s / %s", rej.code, rej.message);

        /* legacy only: {"code":"ResourceNotFound","message":"x\ny"} */
        n = unhex("a2 64636f6465 70 5265736f757263654e6f74466f756e64 676d657373616765 63 780a79", msg, sizeof msg);
        tap_ok(stream_decode_rejection(msg, n, &rej) == 0 && strcmp(rej.code, "ResourceNotFound") == 0 &&
               strcmp(rej.message, "x?y") == 0, "legacy keys, control character made printable");

        /* short key wins whichever comes first */
        n = unhex("a2 616f 6141 64636f6465 6142", msg, sizeof msg);
        tap_ok(stream_decode_rejection(msg, n, &rej) == 0 && strcmp(rej.code, "A") == 0, "o wins over code");

        n = unhex("a1 616d 6178", msg, sizeof msg);
        tap_is_int(stream_decode_rejection(msg, n, &rej), -EBADMSG, "rejection without code refused");
        n = unhex("a1 616f 05", msg, sizeof msg);
        tap_is_int(stream_decode_rejection(msg, n, &rej), -EBADMSG, "numeric code refused");
        n = unhex("bf 616f 6141", msg, sizeof msg);
        tap_is_int(stream_decode_rejection(msg, n, &rej), -EBADMSG, "truncated rejection refused");

        /* A long message is truncated, not overflowed. */
        n = unhex("a2 616f 6141 616d 790190", msg, sizeof msg);
        memset(msg + n, 'z', 400);
        tap_ok(stream_decode_rejection(msg, n + 400, &rej) == 0 && strlen(rej.message) == sizeof rej.message - 1,
               "long message truncated to %zu", strlen(rej.message));
}

/* Random mutations of valid messages: nothing may crash or read outside
 * (run under ASan by the fuzz build), and whatever decodes is consistent. */
static void test_mutations(void) {
        uint8_t base[64], msg[64];
        size_t n = unhex("bf616363726479616600616902616c04617044deadbeefff", base, sizeof base);
        struct stream_block b;
        struct stream_rejection rej;
        unsigned seed = 1, inconsistent = 0;

        for (int round = 0; round < 200000; round++) {
                size_t len = n;

                memcpy(msg, base, n);
                for (int k = 0; k < 1 + round % 4; k++) {
                        seed = seed * 1103515245u + 12345u;
                        msg[(seed >> 8) % n] = (uint8_t) (seed >> 16);
                }
                if (round % 7 == 0)
                        len = (seed >> 4) % (n + 1);
                if (stream_decode_block(msg, len, &b) == 0 &&
                    (b.payload < msg || b.payload + b.payload_len > msg + len))
                        inconsistent++;
                (void) stream_decode_rejection(msg, len, &rej);
        }
        tap_is_int(inconsistent, 0, "200000 mutated messages: payloads always inside the message");
}

int main(void) {
        test_encode();
        test_decode_blocks();
        test_decode_rejections();
        test_mutations();
        return tap_done();
}
