/* SPDX-License-Identifier: MIT */
/* libFuzzer: a bundle manifest as the first file of a job delivers it (any
 * bytes), through the parser, whose output is then checked for the bounds
 * the decoder and the lifecycle rely on, and formatted back. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bundle_manifest.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct bundle_manifest *m = NULL, *again = NULL;
        struct bundle_decision d;
        char err[256], *text = NULL;
        uint64_t offset = 0;

        if (bundle_manifest_parse(data, size, &m, err, sizeof(err)) < 0) {
                if (strlen(err) >= sizeof(err) || m)
                        __builtin_trap();
                return 0;
        }
        if (m->n_parts == 0 || m->n_parts > BUNDLE_PARTS_MAX || m->image_size == 0 ||
            m->image_size > BUNDLE_IMAGE_SIZE_MAX || m->header_size >= m->payload_size ||
            m->header_size > BUNDLE_HEADER_SIZE_MAX || m->chunk_size_max > BUNDLE_CHUNK_SIZE_MAX ||
            (uint64_t) m->chunk_count * m->chunk_size_max < m->image_size)
                __builtin_trap();
        for (size_t i = 0; i < m->n_parts; i++) {
                if (m->parts[i].offset != offset || m->parts[i].size == 0 || m->parts[i].size > BUNDLE_PART_SIZE_MAX)
                        __builtin_trap();
                offset += m->parts[i].size;
        }
        if (offset != m->payload_size)
                __builtin_trap();
        bundle_manifest_decide(m, &(struct bundle_policy) { .compatible = "x", .running_version = "1.0" }, &d);
        if (bundle_manifest_format(m, &text) == 0) {
                if (bundle_manifest_parse(text, strlen(text), &again, err, sizeof(err)) < 0 ||
                    again->payload_size != m->payload_size)
                        __builtin_trap();
                bundle_manifest_free(again);
                free(text);
        }
        bundle_manifest_free(m);
        return 0;
}
