/* SPDX-License-Identifier: MIT */
/* libFuzzer: data and rejected messages as they come off the network, and
 * the request encoder with hostile sizes. */
#include <stdint.h>
#include <string.h>

#include "stream_codec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct stream_block b;
        struct stream_rejection rej;
        uint8_t out[256];

        if (stream_decode_block(data, size, &b) == 0) {
                /* The payload must lie inside the message: touch every byte. */
                volatile uint8_t sum = 0;

                if (b.payload < data || b.payload + b.payload_len > data + size)
                        __builtin_trap();
                for (size_t i = 0; i < b.payload_len; i++)
                        sum ^= b.payload[i];
                (void) sum;
        }
        if (stream_decode_rejection(data, size, &rej) == 0 &&
            (strlen(rej.code) >= sizeof rej.code || strlen(rej.message) >= sizeof rej.message))
                __builtin_trap();

        if (size >= 12) {
                struct stream_request req;
                uint32_t v[3];

                memcpy(v, data, sizeof v);
                req = (struct stream_request){ .client_token = "rdy", .file_id = v[0] & 0xff, .block_size = v[1],
                                               .offset = v[2], .bitmap = data + 12, .bitmap_len = size - 12,
                                               .n_blocks = v[1] >> 8 };
                (void) stream_encode_request(&req, out, sizeof out);
        }
        return 0;
}
