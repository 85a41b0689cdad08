/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer target for base64.c's base64_decode(), which reads the job
 * document's signature text, and verify.c's certfile mapping. Besides "no
 * crash", it checks the decoder is strict: whatever it accepts, re-encoded
 * by OpenSSL, is exactly the input without its skipped whitespace (one
 * canonical form, RFC 4648 §3.5), and the certfile mapping never yields a
 * path.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "base64.h"
#include "verify.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        uint8_t *out = NULL;
        size_t n = 0;

        if (base64_decode((const char *) data, size, &out, &n) == 0) {
                char *stripped = malloc(size + 1), *encoded = malloc(n / 3 * 4 + 5);
                size_t m = 0;

                if (!stripped || !encoded)
                        abort();
                for (size_t i = 0; i < size; i++)
                        if (!strchr(" \t\r\n", data[i]) || data[i] == '\0')
                                stripped[m++] = (char) data[i];
                stripped[m] = '\0';
                int e = EVP_EncodeBlock((unsigned char *) encoded, out, (int) n);
                if (e < 0 || (size_t) e != m || memcmp(encoded, stripped, m) != 0)
                        abort();
                free(stripped);
                free(encoded);
                free(out);
        }

        char text[512], name[256];
        size_t len = size < sizeof(text) - 1 ? size : sizeof(text) - 1;
        memcpy(text, data, len);
        text[len] = '\0';
        if (verify_cert_name(text, name, sizeof(name)) == 0 &&
            (strchr(name, '/') || name[0] == '.' || name[0] == '\0'))
                abort();
        return 0;
}
