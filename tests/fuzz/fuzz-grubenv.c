/* SPDX-License-Identifier: MIT */
/* libFuzzer: a grubenv block as it may be found on disk (torn, foreign,
 * hostile). Whatever parses must format back into a block that parses to
 * the same variables: what otad writes, GRUB must read the same way. */
#include <stdint.h>
#include <string.h>

#include "grubenv.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct grubenv env = { 0 }, again = { 0 };
        char block[GRUBENV_SIZE];
        char input[GRUBENV_SIZE];

        /* mostly full blocks behind a valid header, so the fuzzer gets past it */
        if (size > 0 && data[0] == 'H') {
                memset(input, '#', sizeof(input));
                memcpy(input, GRUBENV_HEADER, strlen(GRUBENV_HEADER));
                size_t n = size - 1 < sizeof(input) - strlen(GRUBENV_HEADER) ? size - 1 : sizeof(input) - strlen(GRUBENV_HEADER);
                memcpy(input + strlen(GRUBENV_HEADER), data + 1, n);
                data = (const uint8_t *) input;
                size = sizeof(input);
        }
        if (grubenv_parse((const char *) data, size, &env) < 0)
                return 0;
        if (grubenv_format(&env, block) == 0) {
                if (grubenv_parse(block, sizeof(block), &again) < 0 || !grubenv_equal(&env, &again))
                        __builtin_trap();
                grubenv_done(&again);
        }
        grubenv_done(&env);
        return 0;
}
