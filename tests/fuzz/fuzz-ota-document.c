/* SPDX-License-Identifier: MIT */
/* libFuzzer: job documents as the broker delivers them (any bytes, parsed
 * by cJSON), through the afr_ota parser, whose output is then checked for
 * the limits the rest of otad relies on. */
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ota_document.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct ota_document *doc = NULL;
        char reason[128];
        cJSON *root;

        root = cJSON_ParseWithLength((const char *) data, size);
        if (!root)
                return 0;
        if (ota_document_parse(root, &doc, reason, sizeof reason) == 0) {
                if (doc->n_files == 0 || doc->n_files > OTA_DOCUMENT_MAX_FILES || doc->protocols == 0)
                        __builtin_trap();
                for (size_t i = 0; i < doc->n_files; i++) {
                        const struct ota_document_file *f = &doc->files[i];

                        if (f->filesize == 0 || f->fileid > 255 || f->file_type > 255 ||
                            f->signature_len > OTA_DOCUMENT_SIGNATURE_MAX || strlen(f->filepath) > OTA_DOCUMENT_FILEPATH_MAX ||
                            f->part_offset + f->filesize > f->image_size)
                                __builtin_trap();
                }
                ota_document_free(doc);
        } else if (strlen(reason) >= sizeof reason)
                __builtin_trap();
        cJSON_Delete(root);
        return 0;
}
