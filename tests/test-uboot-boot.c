/* SPDX-License-Identifier: MIT */
/* U-Boot itself runs the boot script documented in otad.conf(5) (taken from
 * the man page, so the documentation is what is tested): Debian's
 * u-boot-qemu build for qemu_arm64 in qemu-system-aarch64 -M virt (TCG,
 * about 3 s a boot unloaded), finding the script as boot.scr on a virtio
 * disk through its default distro_bootcmd, against an environment otad's
 * uboot backend edits between boots. Proves, with the real bootloader: a
 * factory device (erased environment, or one provisioned with U-Boot's
 * defaults and nothing of ours) boots A, and keeps booting A when nobody
 * marks it good, never the possibly empty B; set_try_once(B) boots B once;
 * B not marked good falls back to A; mark_good keeps B; mark_bad switches
 * back; and `otad status` says what U-Boot will do.
 *
 * Where U-Boot reads and writes its environment:
 *  - It reads it with its own environment driver at power-on. This build
 *    keeps the environment in the second flash bank (CONFIG_ENV_IS_IN_FLASH,
 *    CONFIG_ENV_ADDR 0x4000000 = offset 0 of pflash unit 1, CONFIG_ENV_SIZE
 *    0x40000, no redundant copy). The test gives it flash.img, the same file
 *    otad's backend reads and writes through libubootenv (fw_env.config
 *    "flash.img 0x0 0x40000"). Erased (0xff), U-Boot reports a bad CRC and
 *    boots with its built-in default environment, as a factory device does.
 *  - It cannot write it back with saveenv: the pflash model of Debian 12's
 *    QEMU 7.2 takes the address of the write-to-buffer command as the start
 *    of the buffer, while U-Boot's CFI driver sends that command to the
 *    sector's base, so every buffer after the sector's first 2 KiB is
 *    aborted ("Flash buffer write timeout", saveenv fails). So the script's
 *    saveenv lines are replaced by "env export -c" (U-Boot's own binary
 *    environment with its CRC, what saveenv writes) into a raw area of the
 *    virtio disk, which the test copies into flash.img once QEMU has exited:
 *    the one step the test does in U-Boot's place.
 *  - The script's "no slot has boots left" branch ends in reset, which ends
 *    QEMU here (-no-reboot); the test copies the saved environment and
 *    powers on again, as the reset would have.
 * The script's load/booti lines (there is no kernel) are replaced by
 * printing the chosen slot and bootargs, and powering off.
 *
 * Needs qemu-system-arm (qemu-system-aarch64), u-boot-qemu, u-boot-tools
 * (mkimage), mtools, fdisk and libubootenv-tool; skips otherwise. */
#include <signal.h>

#include "bootloader.h"
#include "installer-test-util.h"

#define UBOOT_BIN "/usr/lib/u-boot/qemu_arm64/u-boot.bin"
/* this build's CONFIG_ENV_SIZE */
#define ENV_SIZE 0x40000
/* where the test's saveenv puts the environment: 512-byte blocks of the
 * disk's gap before its first partition (at 1 MiB) */
#define EXPORT_BLOCK 0x80
#define EXPORT_BLOCKS (ENV_SIZE / 512)

static char *dir, *flash, *disk, *fw_config;

static void cleanup(void) {
        remove_scratch(dir);
}

static void cleanup_and_die(int sig) {
        cleanup();
        signal(sig, SIG_DFL);
        raise(sig);
}

/* The boot script of otad.conf(5), between its begin/end comments, with
 * saveenv, load and booti replaced as said above, on a disk of one FAT
 * partition as boot.scr. */
static bool make_disk(void) {
        const char *src = getenv("OTAD_SOURCE_ROOT");
        char *rel = xprintf("%s/man/otad.conf.5", src ? src : ".");
        char *page = realpath(rel, NULL); /* the commands below run in dir */
        int r;

        free(rel);
        if (!page)
                return false;
        r = run("cd '%s' && sed -n '/^\\.\\\\\" begin boot.cmd/,/^\\.\\\\\" end boot.cmd/p' '%s'"
                " | grep -v '^[.]' | sed 's/\\\\-/-/g' > documented.cmd"
                " && ! grep -q '\\\\' documented.cmd"
                " && grep -q '^ *saveenv$' documented.cmd && grep -q '^load ' documented.cmd && grep -q '^booti ' documented.cmd"
                " && sed 's|^\\( *\\)saveenv$|\\1env export -c -s 0x%x ${kernel_addr_r} \\&\\& virtio write ${kernel_addr_r} 0x%x 0x%x \\&\\& echo OTAD-UBOOT-SAVED|;"
                "         s|^load .*|echo \"OTAD-UBOOT-SLOT=${slot} rootpart=${rootpart} bootargs=${bootargs}\"|;"
                "         s|^booti .*|poweroff|' documented.cmd > test.cmd"
                " && mkimage -A arm64 -T script -C none -d test.cmd boot.scr >/dev/null"
                " && truncate -s 16M disk.img"
                " && printf 'label: dos\\nstart=2048, type=c, bootable\\n' | sfdisk -q disk.img"
                " && mformat -i disk.img@@1M -v BOOT :: && mcopy -i disk.img@@1M boot.scr ::/boot.scr",
                dir, page, ENV_SIZE, EXPORT_BLOCK, EXPORT_BLOCKS);
        free(page);
        return r == 0;
}

/* Erased NOR flash reads 0xff. */
static bool erase_flash(void) {
        return run("head -c %d /dev/zero | tr '\\000' '\\377' > '%s' && truncate -s 64M '%s'", ENV_SIZE, flash,
                   flash) == 0;
}

/* Powers U-Boot on until its script picks a slot (at most three times: a
 * reset powers on again). Returns the slot (new string) or NULL; *ret_resets
 * counts the resets on the way. */
static char *boot(int *ret_resets) {
        char *log = xprintf("%s/boot.log", dir), *slot = NULL;

        *ret_resets = 0;
        for (int attempt = 0; attempt < 3 && !slot; attempt++) {
                char *line, *p;

                run("dd if=/dev/zero of='%s' bs=512 seek=%d count=%d conv=notrunc status=none", disk, EXPORT_BLOCK,
                    EXPORT_BLOCKS);
                run("timeout 120 qemu-system-aarch64 -M virt -cpu cortex-a57 -m 128 -nographic -nic none -no-reboot"
                    " -bios " UBOOT_BIN " -drive if=pflash,unit=1,format=raw,file='%s'"
                    " -drive if=virtio,format=raw,file='%s' </dev/null 2>&1 | tr -d '\\r' > '%s'",
                    flash, disk, log);
                /* the test's saveenv: what U-Boot exported goes into its flash */
                if (run("grep -a -q '^OTAD-UBOOT-SAVED' '%s'", log) == 0 &&
                    run("dd if='%s' of='%s' bs=512 skip=%d count=%d conv=notrunc status=none", disk, flash,
                        EXPORT_BLOCK, EXPORT_BLOCKS) != 0)
                        break;
                line = capture("grep -a '^OTAD-UBOOT-SLOT=' '%s' | tail -1", log);
                if (line && (p = strchr(line, '=')) && p[1]) {
                        char want_part = p[1] == 'A' ? '2' : p[1] == 'B' ? '3' : '?';
                        char *part = strstr(line, " rootpart="), *args = strstr(line, " bootargs=");
                        char *kernel_slot = xprintf("otad.slot=%c", p[1]);

                        /* the slot it announces is the one it boots, and
                         * the kernel is told so */
                        if (p[2] == ' ' && part && part[strlen(" rootpart=")] == want_part && args &&
                            strstr(args, kernel_slot))
                                slot = strndup(p + 1, 1);
                        else
                                tap_diag("  inconsistent: %s", line);
                        free(kernel_slot);
                }
                free(line);
                if (!slot) {
                        if (run("grep -a -q '^resetting' '%s'", log) != 0)
                                break;
                        (*ret_resets)++;
                }
        }
        if (!slot)
                run("echo '# U-Boot log:'; sed 's/^/#   /' '%s' | tail -40", log);
        free(log);
        return slot;
}

static bool boots(const char *want, const char *what) {
        int resets;
        char *got = boot(&resets);
        bool ok = tap_is_str(got, want, what);

        free(got);
        return ok;
}

static char *printenv(const char *name) {
        char *v = capture("fw_printenv -c '%s' -n %s 2>/dev/null", fw_config, name);
        size_t len;

        if (!v)
                return NULL;
        len = strlen(v);
        while (len > 0 && v[len - 1] == '\n')
                v[--len] = '\0';
        return v;
}

static bool var_is(const char *name, const char *want) {
        char *v = printenv(name);
        bool ok = tap_is_str(v, want, name);

        free(v);
        return ok;
}

static bool primary_is(struct bootloader *b, const char *want, const char *what) {
        char *p = NULL;
        bool ok;

        bootloader_get_primary(b, &p);
        ok = tap_is_str(p, want, what);
        free(p);
        return ok;
}

static bool state_is(struct bootloader *b, const char *slot, bool want, const char *what) {
        bool good = !want;
        int r = bootloader_get_state(b, slot, &good);

        return tap_ok(r == 0 && good == want, "%s: otad reads %s as %s", what, slot, want ? "good" : "not bootable");
}

/* What `otad status --json` says of the bootloader: "primary=A A=good B=bad". */
static bool status_is(const char *want, const char *what) {
        const char *otad = getenv("OTAD_BIN");
        char *got;
        bool ok;

        if (!otad) {
                tap_skip("OTAD_BIN not set (meson test sets it)", what);
                return true;
        }
        got = capture("'%s' status --json -c '%s/otad.conf' 2>/dev/null | python3 -c 'import json, sys; d = json.load(sys.stdin);"
                      " print(\" \".join([\"primary=\" + d[\"primary_slot\"]] + [s[\"bootname\"] + \"=\" + s[\"state\"] for s in d[\"slots\"]]))'",
                      otad, dir);
        if (got)
                got[strcspn(got, "\n")] = '\0';
        ok = tap_is_str(got, want, what);
        free(got);
        return ok;
}

int main(void) {
        const char *tools[] = { "qemu-system-aarch64", "mkimage", "mformat", "mcopy", "sfdisk", "fw_printenv", "python3" };
        struct otad_config *c = NULL;
        struct bootloader *b = NULL;
        char *extra, *before, *after;
        int resets = 0;

        for (size_t i = 0; i < ELEMENTSOF(tools); i++)
                if (!have_tool(tools[i])) {
                        printf("1..0 # SKIP %s missing (qemu-system-arm, u-boot-tools, mtools, fdisk, libubootenv-tool)\n",
                               tools[i]);
                        return 0;
                }
        if (access(UBOOT_BIN, R_OK) < 0) {
                printf("1..0 # SKIP %s missing (u-boot-qemu)\n", UBOOT_BIN);
                return 0;
        }
        {
                const char *src = getenv("OTAD_SOURCE_ROOT");
                char *page = xprintf("%s/man/otad.conf.5", src ? src : ".");
                bool found = access(page, R_OK) == 0;

                free(page);
                if (!found) {
                        printf("1..0 # SKIP man/otad.conf.5 not found: set OTAD_SOURCE_ROOT (meson test does)\n");
                        return 0;
                }
        }
        dir = make_scratch("test-uboot-boot");
        atexit(cleanup);
        signal(SIGTERM, cleanup_and_die);
        signal(SIGINT, cleanup_and_die);
        flash = xprintf("%s/flash.img", dir);
        disk = xprintf("%s/disk.img", dir);
        fw_config = xprintf("%s/fw_env.config", dir);
        if (!tap_ok(make_disk(), "boot.scr with the boot script of otad.conf(5) on a virtio disk") ||
            !tap_ok(erase_flash(), "environment flash erased (factory)") ||
            !tap_ok(run("echo '%s 0x0 0x%x' > '%s'", flash, ENV_SIZE, fw_config) == 0, "fw_env.config written"))
                return tap_done();
        extra = xprintf("[bootloader]\ntype = uboot\nfw_env_config = %s\n\n"
                        "[slot.rootfs.a]\ndevice = /dev/null\nbootname = A\n\n"
                        "[slot.rootfs.b]\ndevice = /dev/null\nbootname = B\n",
                        fw_config);
        c = load_config(dir, extra);
        free(extra);
        if (!tap_ok(c && bootloader_new(c, &b) == 0, "uboot bootloader on the flash image"))
                return tap_done();

        /* a factory device, environment erased: B may be empty and must
         * never boot */
        primary_is(b, "A", "erased environment: otad reads A as primary");
        state_is(b, "A", true, "erased environment");
        state_is(b, "B", false, "erased environment");
        status_is("primary=A A=good B=bad", "erased environment: otad status");
        before = capture("sha256sum < '%s'", flash);
        tap_ok(bootloader_set_try_once(b, "B") < 0, "erased environment: otad refuses to write it");
        after = capture("sha256sum < '%s'", flash);
        tap_is_str(after, before, "the erased flash is left as it was");
        free(before);
        free(after);

        boots("A", "boot 1, erased environment: A (U-Boot's default environment)");
        var_is("BOOT_ORDER", "A");
        var_is("BOOT_A_LEFT", "2");
        var_is("BOOT_B_LEFT", "0");
        var_is("bootcmd", "run distro_bootcmd");
        state_is(b, "B", false, "after boot 1");
        boots("A", "boot 2, nobody marked A good: A");
        boots("A", "boot 3, nobody marked A good: A");
        {
                char *got = boot(&resets);

                tap_is_str(got, "A", "boot 4, A out of boots: A again, never the empty B");
                tap_is_int(resets, 1, "the script gave BOOT_ORDER's slots new boots and reset once");
                free(got);
        }
        var_is("BOOT_ORDER", "A");
        var_is("BOOT_B_LEFT", "0");
        state_is(b, "B", false, "after boot 4");
        status_is("primary=A A=good B=bad", "after boot 4: otad status");

        /* the other factory provisioning: U-Boot's own defaults (here as
         * U-Boot saved them, without the script's variables) in an image */
        tap_is_int(run("fw_printenv -c '%s' | grep -v -E '^(BOOT_[A-Z_]*|slot|rootpart)=' > '%s/u-boot-initial-env'"
                       " && mkenvimage -s 0x%x -o '%s/uboot-env.bin' '%s/u-boot-initial-env'"
                       " && dd if='%s/uboot-env.bin' of='%s' conv=notrunc status=none",
                       fw_config, dir, ENV_SIZE, dir, dir, dir, flash),
                   0, "factory image: mkenvimage of u-boot-initial-env written to the flash");
        tap_ok(run("fw_printenv -c '%s' | grep -q -E '^(BOOT_|slot=)'", fw_config) != 0 &&
                       run("fw_printenv -c '%s' | grep -q '^bootcmd='", fw_config) == 0,
               "factory image: U-Boot's variables, none of the script's");
        state_is(b, "B", false, "factory image");
        boots("A", "boot 5, factory image: A");
        boots("A", "boot 6, nobody marked A good: A");
        var_is("BOOT_A_LEFT", "1");
        var_is("BOOT_B_LEFT", "0");
        tap_is_int(bootloader_mark_good(b, "A"), 0, "otad on A marks A good (every boot)");
        var_is("BOOT_ORDER", "A");
        var_is("BOOT_A_LEFT", "3");
        state_is(b, "B", false, "after mark_good(A)");

        /* boot once, fall back */
        tap_is_int(bootloader_set_try_once(b, "B"), 0, "update: set_try_once(B)");
        status_is("primary=B A=good B=good", "after set_try_once(B): otad status");
        boots("B", "boot 7: B, once");
        var_is("BOOT_B_LEFT", "0");
        primary_is(b, "A", "on B before commit, the primary is A again (BOOT_B_LEFT=0)");
        state_is(b, "B", false, "B on trial");
        boots("A", "boot 8, B was not marked good: back to A");
        tap_is_int(bootloader_mark_bad(b, "B"), 0, "otad on A after the fallback: mark_bad(B)");
        tap_is_int(bootloader_mark_good(b, "A"), 0, "and mark_good(A)");
        var_is("BOOT_ORDER", "A");

        /* commit */
        tap_is_int(bootloader_set_try_once(b, "B"), 0, "second update: set_try_once(B)");
        boots("B", "boot 9: B, once");
        tap_is_int(bootloader_mark_good(b, "B"), 0, "health check passed: mark_good(B)");
        boots("B", "boot 10: committed B stays");
        tap_is_int(bootloader_mark_good(b, "B"), 0, "otad on B marks B good (every boot)");
        status_is("primary=B A=good B=good", "committed B: otad status");

        /* rollback */
        tap_is_int(bootloader_set_try_once(b, "A"), 0, "third update: set_try_once(A)");
        boots("A", "boot 11: A, once");
        tap_is_int(bootloader_mark_bad(b, "A"), 0, "health check failed: mark_bad(A)");
        boots("B", "boot 12: rolled back to B");
        primary_is(b, "B", "B is primary");
        status_is("primary=B A=bad B=good", "after the rollback: otad status");

        bootloader_free(b);
        config_free(c);
        free(flash);
        free(disk);
        free(fw_config);
        return tap_done();
}
