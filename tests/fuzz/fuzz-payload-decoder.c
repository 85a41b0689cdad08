/* SPDX-License-Identifier: MIT */
/* libFuzzer: the payload decoder's zchunk header parser and chunk path, past
 * the manifest's hash (the manifest is made here from the input so that any
 * header is "authentic"). Input: 10 bytes of manifest fields (header size,
 * chunk count, chunk_size_max, image size, little endian), then the payload.
 * Checks: every write stays inside the declared image, in chunk-sized
 * pieces, and a finished decode wrote exactly the image. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "bundle_manifest.h"
#include "payload_decoder.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct sink {
        uint64_t image_size, written;
        uint32_t chunk_max;
};

static int sink_write(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct sink *s = userdata;

        if (offset > s->image_size || len > s->image_size - offset || len == 0 || len > s->chunk_max)
                __builtin_trap();
        (void) buf;
        s->written += len;
        return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct bundle_manifest m = { 0 };
        struct payload_decoder *d = NULL;
        struct sink s;
        size_t half;

        if (size < 11)
                return 0;
        m.header_size = (uint32_t) (data[0] | data[1] << 8);
        m.chunk_count = (uint32_t) (data[2] | data[3] << 8);
        m.chunk_size_max = 4096 + (uint32_t) (data[4] | data[5] << 8);
        m.image_size = (uint64_t) data[6] | (uint64_t) data[7] << 8 | (uint64_t) data[8] << 16 | (uint64_t) data[9] << 24;
        data += 10;
        size -= 10;
        m.payload_size = size;
        /* What the manifest parser guarantees. */
        if (m.header_size == 0 || m.header_size >= size || m.chunk_count == 0 || m.image_size == 0 ||
            m.chunk_count > m.image_size || (uint64_t) m.chunk_count * m.chunk_size_max < m.image_size)
                return 0;
        EVP_Digest(data, m.header_size, m.header_sha256, NULL, EVP_sha256(), NULL);
        s = (struct sink) { .image_size = m.image_size, .chunk_max = m.chunk_size_max };
        if (payload_decoder_new(&m, sink_write, &s, &d) < 0)
                return 0;
        half = size / 2;
        if (payload_decoder_feed(d, data, half) == 0 && payload_decoder_feed(d, data + half, size - half) == 0 &&
            payload_decoder_finished(d) && s.written != m.image_size)
                __builtin_trap();
        payload_decoder_free(d);
        return 0;
}
