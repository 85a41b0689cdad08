/* SPDX-License-Identifier: MIT */
/* libFuzzer: an otad.conf as an editor, a truncated write or a wrong path
 * may leave it. The parser must refuse or accept without crashing, leaking
 * or reading past a line; what it accepts must hold only text values. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "config.h"
#include "log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_text(const char *s) {
        for (; s && *s; s++)
                if ((unsigned char) *s < 0x20 && *s != '\t')
                        __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct otad_config *c = NULL;
        char path[64];
        int fd;

        log_set_max_level(LOG_EMERG); /* every refusal would be logged */
        fd = memfd_create("otad.conf", MFD_CLOEXEC);
        if (fd < 0 || write(fd, data, size) != (ssize_t) size)
                __builtin_trap();
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        if (config_load(path, &c) == 0) {
                check_text(c->mqtt.endpoint);
                check_text(c->mqtt.thing_name);
                check_text(c->update.health_check);
                for (size_t i = 0; i < c->n_targets; i++) {
                        check_text(c->targets[i].name);
                        check_text(c->targets[i].directory);
                }
                for (size_t i = 0; i < c->n_slots; i++)
                        check_text(c->slots[i].device);
                config_free(c);
        }
        close(fd);
        return 0;
}
