/* SPDX-License-Identifier: MIT */
/* Unit tests of slot detection with injected /proc/cmdline and mountinfo
 * files: otad.slot= over rauc.slot=, quoting, the [update] booted_slot
 * override, the inactive slot, classes that are not pairs. (Detection
 * through the mount table on real block devices is in test-installer-ab.) */
#include "installer-test-util.h"
#include "slot.h"

static char *dir;

static const char *booted_with(struct otad_config *c, const char *cmdline_text) {
        char *cmdline = xprintf("%s/cmdline", dir), *mountinfo = xprintf("%s/mountinfo", dir);
        const char *mi = "22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw\n";
        const struct config_slot *s = NULL;
        struct slot_sources src = { .cmdline = cmdline, .mountinfo = mountinfo };
        int r;

        write_bytes(cmdline, cmdline_text, strlen(cmdline_text));
        write_bytes(mountinfo, mi, strlen(mi));
        r = slot_booted(c, "rootfs", &src, &s);
        free(cmdline);
        free(mountinfo);
        return r < 0 ? NULL : s->bootname;
}

int main(void) {
        struct otad_config *c, *override, *three;
        const struct config_slot *pair[2], *s = NULL;
        char *slots;

        dir = make_scratch("test-slot");
        slots = xprintf("[slot.rootfs.a]\ndevice = %s/a.img\nbootname = system0\n\n"
                        "[slot.rootfs.b]\ndevice = %s/b.img\nbootname = system1\n\n"
                        "[slot.appfs.x]\ndevice = /dev/null\nbootname = X\n\n",
                        dir, dir);
        for (char name = 'a'; name <= 'b'; name++) {
                char *img = xprintf("%s/%c.img", dir, name);

                write_bytes(img, &name, 1);
                free(img);
        }
        c = load_config(dir, slots);
        tap_ok(c != NULL, "config loads");
        if (!c)
                return tap_done();

        tap_is_int(slot_class_pair(c, "rootfs", pair), 0, "rootfs is a pair");
        tap_is_str(pair[0]->bootname, "system0", "first slot of the pair");
        tap_is_int(slot_class_pair(c, "appfs", pair), -EINVAL, "a class with one slot is no pair");
        tap_is_int(slot_class_pair(c, "nope", pair), -ENOENT, "an unknown class");

        tap_is_str(booted_with(c, "root=/dev/sda2 otad.slot=system1 quiet\n"), "system1", "otad.slot=");
        tap_is_str(booted_with(c, "root=/dev/sda2 rauc.slot=system0\n"), "system0", "rauc.slot=");
        tap_is_str(booted_with(c, "rauc.slot=system0 otad.slot=system1\n"), "system1", "otad.slot= wins over rauc.slot=");
        tap_is_str(booted_with(c, "otad.slot=\"system0\" ro\n"), "system0", "a quoted value");
        tap_is_str(booted_with(c, "xotad.slot=system1 root=/dev/vda\n"), NULL, "a longer key does not count");
        tap_is_str(booted_with(c, "otad.slot=system7\n"), NULL, "an unknown bootname: no booted slot");
        tap_is_str(booted_with(c, "root=/dev/vda ro\n"), NULL, "no slot on the command line, / is no slot: unknown");

        {
                char *cmdline = xprintf("%s/cmdline", dir);
                struct slot_sources src = { .cmdline = cmdline, .mountinfo = "/nonexistent" };
                char *name = NULL;

                write_bytes(cmdline, "otad.slot=system1\n", 18);
                tap_is_int(slot_cmdline_bootname(&src, &name), 0, "slot_cmdline_bootname");
                tap_is_str(name, "system1", "bootname from the command line");
                free(name);
                tap_is_int(slot_inactive(c, "rootfs", &src, &s), 0, "slot_inactive");
                tap_is_str(s ? s->bootname : NULL, "system0", "the inactive slot is the other one");
                tap_is_int(slot_is_mounted(&c->slots[0], &src), -ENOENT, "an unreadable mount table is an error, not 'unmounted'");
                free(cmdline);
        }

        {
                char *extra = xprintf("[update]\nbooted_slot = b\n\n%s", slots);

                override = load_config(dir, extra);
                free(extra);
        }
        tap_is_str(override ? booted_with(override, "otad.slot=system0\n") : NULL, "system1",
                   "[update] booted_slot (a slot name) overrides the command line");

        {
                char *extra = xprintf("%s[slot.rootfs.c]\ndevice = /dev/null\nbootname = system2\n", slots);

                three = load_config(dir, extra);
                free(extra);
        }
        tap_ok(three && slot_booted(three, "rootfs", NULL, &s) == -EINVAL, "three slots in a class: refused");

        config_free(c);
        config_free(override);
        config_free(three);
        remove_scratch(dir);
        free(dir);
        free(slots);
        return tap_done();
}
