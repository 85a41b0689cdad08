/* SPDX-License-Identifier: MIT */
/* Unit tests of the custom bootloader backend: a script with RAUC's verbs
 * keeping its state in files, and a script that lies (ignores set-primary),
 * which the read-back catches with -EIO. */
#include "bootloader.h"
#include "installer-test-util.h"

static char *dir;

static struct otad_config *custom_config(const char *script) {
        char *extra = xprintf("[bootloader]\ntype = custom\ncommand = %s\n\n"
                              "[slot.rootfs.a]\ndevice = /dev/null\nbootname = A\n\n"
                              "[slot.rootfs.b]\ndevice = /dev/null\nbootname = B\n",
                              script);
        struct otad_config *c = load_config(dir, extra);

        free(extra);
        return c;
}

static char *make_script(const char *name, const char *set_primary) {
        char *path = xprintf("%s/%s", dir, name);
        char *text = xprintf("#!/bin/sh\n"
                             "S='%s'\n"
                             "case \"$1\" in\n"
                             "get-primary) cat \"$S/primary\" 2>/dev/null || echo A ;;\n"
                             "set-primary) %s ;;\n"
                             "get-state) cat \"$S/state-$2\" 2>/dev/null || echo good ;;\n"
                             "set-state) echo \"$3\" > \"$S/state-$2\" ;;\n"
                             "*) echo \"unknown verb $1\" >&2; exit 2 ;;\n"
                             "esac\n",
                             dir, set_primary);

        write_bytes(path, text, strlen(text));
        chmod(path, 0755);
        free(text);
        return path;
}

int main(void) {
        struct otad_config *c, *liar_c;
        struct bootloader *b = NULL, *liar = NULL;
        char *script, *liar_script, *p = NULL;
        bool good = false;

        dir = make_scratch("test-bootloader-custom");
        script = make_script("boot.sh", "echo \"$2\" > \"$S/primary\"");
        liar_script = make_script("liar.sh", "true");
        c = custom_config(script);
        liar_c = custom_config(liar_script);
        tap_ok(c && liar_c && bootloader_new(c, &b) == 0 && bootloader_new(liar_c, &liar) == 0,
               "custom bootloaders created");
        if (!b || !liar)
                return tap_done();

        tap_is_int(bootloader_get_primary(b, &p), 0, "get-primary");
        tap_is_str(p, "A", "A is primary");
        free(p);
        p = NULL;
        tap_is_int(bootloader_set_try_once(b, "B"), 0, "set_try_once(B) = set-primary B");
        tap_is_int(bootloader_get_primary(b, &p), 0, "get-primary");
        tap_is_str(p, "B", "B is primary");
        free(p);
        p = NULL;
        tap_is_int(bootloader_mark_bad(b, "B"), 0, "mark_bad(B)");
        tap_is_int(bootloader_get_state(b, "B", &good), 0, "get-state B");
        tap_ok(!good, "B is bad");
        tap_is_int(bootloader_get_primary(b, &p), 0, "get-primary");
        tap_is_str(p, "A", "mark_bad(B) switched back to A");
        free(p);
        p = NULL;
        tap_is_int(bootloader_mark_good(b, "B"), 0, "mark_good(B)");
        tap_is_int(bootloader_get_state(b, "B", &good), 0, "get-state B");
        tap_ok(good, "B is good");
        tap_is_int(bootloader_get_primary(b, &p), 0, "get-primary");
        tap_is_str(p, "B", "mark_good(B) made B primary");
        free(p);
        p = NULL;

        {
                char *state = xprintf("%s/primary", dir);

                write_bytes(state, "A\n", 2);
                tap_is_int(bootloader_set_try_once(liar, "B"), -EIO, "a script that ignores set-primary: -EIO");

                write_bytes(state, "Z\n", 2);
                tap_ok(bootloader_get_primary(b, &p) == -EIO && !p, "get-primary printing an unknown bootname: -EIO");
                free(state);
        }

        bootloader_free(b);
        bootloader_free(liar);
        config_free(c);
        config_free(liar_c);
        remove_scratch(dir);
        free(dir);
        free(script);
        free(liar_script);
        return tap_done();
}
