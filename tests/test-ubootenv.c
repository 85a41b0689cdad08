/* SPDX-License-Identifier: MIT */
/* Unit tests of the U-Boot bootloader backend (libubootenv) on plain files,
 * with fw_printenv/fw_setenv (libubootenv-tool) and mkenvimage (u-boot-tools)
 * as oracles: single and redundant environments, a blank environment
 * read as the boot script does and never written, a corrupted newest copy
 * falling back to the older one, the factory state. */
#include "bootloader.h"
#include "installer-test-util.h"

static char *dir;

static struct otad_config *uboot_config(const char *fw_env_config) {
        char *extra = xprintf("[bootloader]\ntype = uboot\nfw_env_config = %s\n\n"
                              "[slot.rootfs.a]\ndevice = /dev/null\nbootname = A\n\n"
                              "[slot.rootfs.b]\ndevice = /dev/null\nbootname = B\n",
                              fw_env_config);
        struct otad_config *c = load_config(dir, extra);

        free(extra);
        return c;
}

static char *printenv(const char *cfg, const char *name) {
        char *v = capture("fw_printenv -c '%s' -n %s 2>/dev/null", cfg, name);
        size_t len;

        if (!v)
                return NULL;
        len = strlen(v);
        while (len > 0 && v[len - 1] == '\n')
                v[--len] = '\0';
        return v;
}

static bool primary_is(struct bootloader *b, const char *want, const char *what) {
        char *p = NULL;
        int r = bootloader_get_primary(b, &p);
        bool ok = tap_ok(r == 0 && p && strcmp(p, want) == 0, "%s: primary is %s", what, want);

        if (!ok)
                tap_diag("  got r=%d primary=%s", r, p ? p : "(null)");
        free(p);
        return ok;
}

static bool var_is(const char *cfg, const char *name, const char *want) {
        char *v = printenv(cfg, name);
        bool ok = tap_is_str(v, want, name);

        free(v);
        return ok;
}

static void test_single_copy(void) {
        char *env = xprintf("%s/single.env", dir), *cfg = xprintf("%s/single.config", dir);
        char *defaults = xprintf("%s/defaults.txt", dir);
        struct otad_config *c;
        struct bootloader *b = NULL;
        bool good = true;
        char *before, *after;

        write_bytes(defaults, "bootcmd=run distro_bootcmd\nbootdelay=2\n", 40);
        run("echo '%s 0x0 0x4000' > '%s'", env, cfg);

        /* blank: refused, nothing written */
        run("head -c 16384 /dev/zero > '%s'", env);
        c = uboot_config(cfg);
        tap_ok(c && bootloader_new(c, &b) == 0, "uboot bootloader created");
        before = capture("sha256sum < '%s'", env);
        tap_is_int(bootloader_set_try_once(b, "B"), -EIO, "blank environment: set_try_once refused with -EIO");
        after = capture("sha256sum < '%s'", env);
        tap_is_str(after, before, "blank environment left untouched");
        free(before);
        free(after);

        /* made by mkenvimage: readable, and our writes keep its variables */
        tap_is_int(run("mkenvimage -s 0x4000 -o '%s' '%s'", env, defaults), 0, "mkenvimage writes an environment");
        primary_is(b, "A", "fresh environment (script defaults)");
        tap_is_int(bootloader_set_try_once(b, "B"), 0, "set_try_once(B)");
        var_is(cfg, "BOOT_ORDER", "B A");
        var_is(cfg, "BOOT_B_LEFT", "1");
        var_is(cfg, "bootcmd", "run distro_bootcmd");
        primary_is(b, "B", "after set_try_once(B)");

        /* U-Boot boots B and counts the try down */
        tap_is_int(run("fw_setenv -c '%s' BOOT_B_LEFT 0", cfg), 0, "fw_setenv BOOT_B_LEFT 0 (U-Boot used the try)");
        primary_is(b, "A", "B used its one try");
        tap_is_int(bootloader_get_state(b, "B", &good), 0, "get_state(B)");
        tap_ok(!good, "B has no tries left");

        tap_is_int(bootloader_mark_good(b, "B"), 0, "mark_good(B)");
        var_is(cfg, "BOOT_B_LEFT", "3");
        primary_is(b, "B", "after mark_good(B)");

        tap_is_int(bootloader_mark_bad(b, "B"), 0, "mark_bad(B)");
        var_is(cfg, "BOOT_ORDER", "A");
        var_is(cfg, "BOOT_B_LEFT", "0");
        primary_is(b, "A", "after mark_bad(B)");
        tap_is_int(bootloader_get_state(b, "B", &good), 0, "get_state(B)");
        tap_ok(!good, "B is bad");
        var_is(cfg, "bootdelay", "2");
        tap_is_int(bootloader_mark_good(b, "A"), 0, "mark_good(A) after mark_bad(B)");
        var_is(cfg, "BOOT_ORDER", "A");
        tap_is_int(bootloader_set_try_once(b, "B"), 0, "a new update: set_try_once(B)");
        var_is(cfg, "BOOT_ORDER", "B A");

        bootloader_free(b);
        config_free(c);
        free(env);
        free(cfg);
        free(defaults);
}

/* The flag byte (offset 4) of each copy: the newer copy has the higher one. */
static int flag_at(const char *path, long offset) {
        unsigned char flag = 0;
        int fd = open(path, O_RDONLY | O_CLOEXEC);

        if (fd < 0)
                return -1;
        if (pread(fd, &flag, 1, offset + 4) != 1)
                flag = 0;
        close(fd);
        return flag;
}

static void test_redundant_copies(void) {
        char *env = xprintf("%s/redund.env", dir), *cfg = xprintf("%s/redund.config", dir);
        char *defaults = xprintf("%s/defaults.txt", dir);
        struct otad_config *c;
        struct bootloader *b = NULL;
        int f0, f1;
        long newest;

        run("head -c 32768 /dev/zero > '%s'", env);
        run("printf '%%s 0x0 0x4000\\n%%s 0x4000 0x4000\\n' '%s' '%s' > '%s'", env, env, cfg);
        tap_is_int(run("fw_setenv -c '%s' -f '%s' bootdelay 2 2>/dev/null", cfg, defaults), 0,
                   "fw_setenv -f initialises the redundant environment");
        c = uboot_config(cfg);
        tap_ok(c && bootloader_new(c, &b) == 0, "uboot bootloader created");

        tap_is_int(bootloader_mark_good(b, "A"), 0, "mark_good(A)");
        tap_is_int(bootloader_set_try_once(b, "B"), 0, "set_try_once(B)");
        var_is(cfg, "BOOT_ORDER", "B A");
        var_is(cfg, "bootcmd", "run distro_bootcmd");
        primary_is(b, "B", "redundant, after set_try_once(B)");

        /* tear the newest copy: both fw_printenv and we fall back to the
         * copy before it, written by mark_good(A) on a factory
         * environment (B not in BOOT_ORDER) */
        f0 = flag_at(env, 0);
        f1 = flag_at(env, 0x4000);
        tap_ok(f0 > 0 && f1 > 0 && f0 != f1, "two copies with different flags (%d, %d)", f0, f1);
        newest = f0 > f1 ? 0 : 0x4000;
        tap_is_int(run("printf 'XXXXXXXX' | dd of='%s' bs=1 seek=%ld conv=notrunc status=none", env, newest + 20), 0,
                   "corrupt the newest copy");
        var_is(cfg, "BOOT_ORDER", "A");
        primary_is(b, "A", "newest copy corrupt: the older copy counts");

        /* and the next write goes on from the older copy */
        tap_is_int(bootloader_set_try_once(b, "B"), 0, "set_try_once(B) again");
        var_is(cfg, "BOOT_ORDER", "B A");
        var_is(cfg, "BOOT_A_LEFT", "3");
        primary_is(b, "B", "after rewriting");

        bootloader_free(b);
        config_free(c);
        free(env);
        free(cfg);
        free(defaults);
}

static void test_two_files(void) {
        char *e1 = xprintf("%s/env1", dir), *e2 = xprintf("%s/env2", dir), *cfg = xprintf("%s/two.config", dir);
        char *defaults = xprintf("%s/defaults.txt", dir);
        struct otad_config *c;
        struct bootloader *b = NULL;

        run("head -c 8192 /dev/zero > '%s'; head -c 8192 /dev/zero > '%s'", e1, e2);
        run("printf '%%s 0x0 0x2000\\n%%s 0x0 0x2000\\n' '%s' '%s' > '%s'", e1, e2, cfg);
        run("fw_setenv -c '%s' -f '%s' bootdelay 2 2>/dev/null", cfg, defaults);
        c = uboot_config(cfg);
        tap_ok(c && bootloader_new(c, &b) == 0, "uboot bootloader created (two files)");
        tap_is_int(bootloader_set_try_once(b, "B"), 0, "set_try_once(B) on two files");
        var_is(cfg, "BOOT_ORDER", "B A");
        tap_is_int(run("fw_setenv -c '%s' BOOT_ORDER 'A B'", cfg), 0, "fw_setenv writes BOOT_ORDER=A B");
        primary_is(b, "A", "we read what fw_setenv wrote");
        bootloader_free(b);
        config_free(c);
        free(e1);
        free(e2);
        free(cfg);
        free(defaults);
}

static bool state_is(struct bootloader *b, const char *slot, bool want, const char *what) {
        bool good = !want;
        int r = bootloader_get_state(b, slot, &good);
        bool ok = tap_ok(r == 0 && good == want, "%s: %s is %s", what, slot, want ? "good" : "not bootable");

        if (!ok)
                tap_diag("  got r=%d good=%d", r, good);
        return ok;
}

/* The factory state: a blank environment (erased storage, U-Boot runs on
 * its built-in default environment) or one without otad's variables means
 * what the documented boot script does with it: A boots, B is not bootable
 * until otad has written and verified it (set_try_once). */
static void test_factory_state(void) {
        char *env = xprintf("%s/factory.env", dir), *cfg = xprintf("%s/factory.config", dir);
        char *defaults = xprintf("%s/defaults.txt", dir);
        struct otad_config *c;
        struct bootloader *b = NULL;
        char *before, *after;

        run("echo '%s 0x0 0x4000' > '%s'", env, cfg);
        run("head -c 16384 /dev/zero | tr '\\0' '\\377' > '%s'", env); /* erased flash */
        c = uboot_config(cfg);
        tap_ok(c && bootloader_new(c, &b) == 0, "uboot bootloader on an erased environment");
        primary_is(b, "A", "erased environment");
        state_is(b, "A", true, "erased environment");
        state_is(b, "B", false, "erased environment");
        before = capture("sha256sum < '%s'", env);
        tap_is_int(bootloader_mark_good(b, "A"), -EIO, "erased environment: mark_good(A) refused (-EIO)");
        tap_is_int(bootloader_set_try_once(b, "B"), -EIO, "erased environment: set_try_once(B) refused (-EIO)");
        after = capture("sha256sum < '%s'", env);
        tap_is_str(after, before, "erased environment left untouched");
        free(before);
        free(after);

        /* provisioned on the device as otad.conf(5) says: U-Boot's defaults
         * from u-boot-initial-env, BOOT_ORDER=A */
        tap_is_int(run("fw_setenv -c '%s' -f '%s' BOOT_ORDER A 2>/dev/null", cfg, defaults), 0,
                   "fw_setenv -f u-boot-initial-env BOOT_ORDER A");
        var_is(cfg, "bootcmd", "run distro_bootcmd");
        primary_is(b, "A", "provisioned with fw_setenv -f");
        state_is(b, "A", true, "provisioned with fw_setenv -f");
        state_is(b, "B", false, "provisioned with fw_setenv -f");

        /* provisioned with U-Boot's default environment and nothing of ours */
        tap_is_int(run("mkenvimage -s 0x4000 -o '%s' '%s'", env, defaults), 0, "mkenvimage: U-Boot defaults only");
        primary_is(b, "A", "defaults only");
        state_is(b, "A", true, "defaults only");
        state_is(b, "B", false, "defaults only");
        /* U-Boot booted A three times and nobody marked it good: the script
         * gives the slots of BOOT_ORDER new tries, which is A alone */
        tap_is_int(run("fw_setenv -c '%s' BOOT_A_LEFT 0", cfg), 0, "fw_setenv BOOT_A_LEFT 0 (A used its tries)");
        primary_is(b, "A", "A out of tries on a factory device");
        state_is(b, "B", false, "A out of tries on a factory device");
        tap_is_int(bootloader_mark_good(b, "A"), 0, "mark_good(A)");
        var_is(cfg, "BOOT_ORDER", "A");
        var_is(cfg, "BOOT_A_LEFT", "3");
        var_is(cfg, "bootcmd", "run distro_bootcmd");
        state_is(b, "B", false, "after mark_good(A)");
        tap_ok(bootloader_mark_bad(b, "A") < 0, "mark_bad(A) with no bootable B is refused");
        var_is(cfg, "BOOT_ORDER", "A");
        tap_is_int(bootloader_set_try_once(b, "B"), 0, "set_try_once(B)");
        var_is(cfg, "BOOT_ORDER", "B A");
        var_is(cfg, "BOOT_B_LEFT", "1");
        primary_is(b, "B", "after set_try_once(B)");

        bootloader_free(b);
        config_free(c);
        free(env);
        free(cfg);
        free(defaults);
}

static void test_missing_config(void) {
        char *cfg = xprintf("%s/nonexistent.config", dir);
        struct otad_config *c = uboot_config(cfg);
        struct bootloader *b = NULL;
        char *p = NULL;

        tap_ok(c && bootloader_new(c, &b) == 0, "uboot bootloader created (missing fw_env.config)");
        tap_ok(bootloader_get_primary(b, &p) < 0 && !p, "missing fw_env.config: get_primary fails");
        bootloader_free(b);
        config_free(c);
        free(cfg);
}

int main(void) {
        if (!have_tool("fw_printenv") || !have_tool("fw_setenv") || !have_tool("mkenvimage")) {
                printf("1..0 # SKIP fw_printenv/fw_setenv (libubootenv-tool) or mkenvimage (u-boot-tools) missing\n");
                return 0;
        }
        dir = make_scratch("test-ubootenv");
        test_single_copy();
        test_redundant_copies();
        test_two_files();
        test_factory_state();
        test_missing_config();
        remove_scratch(dir);
        free(dir);
        return tap_done();
}
