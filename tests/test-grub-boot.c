/* SPDX-License-Identifier: MIT */
/* GRUB itself runs the grub.cfg documented in otad.conf(5) (taken from the
 * man page, so the documentation is what is tested) in QEMU with OVMF,
 * against a grubenv on an ext4 disk that otad's grub backend edits between
 * boots. Proves, with the real bootloader: a factory device (no grubenv, or
 * an empty one) boots A, and keeps booting A when nobody marks it good,
 * never the possibly empty B; a slot set with set_try_once boots once; if
 * not marked good it is not booted again; mark_good keeps it; mark_bad
 * switches back. The menuentry's linux/initrd lines are replaced by
 * printing the chosen slot and root label, and halting. Needs root (loop
 * mount) and qemu-system-x86, ovmf, grub-efi-amd64-bin, mtools, fdisk,
 * e2fsprogs; skips otherwise. About 7 s per boot. */
#include <signal.h>
#include <sys/mount.h>

#include "bootloader.h"
#include "installer-test-util.h"

static char *dir, *mnt, *env_img;
static bool mounted;

static void unmount_env(void) {
        if (mounted)
                (void) run("umount '%s'", mnt);
        mounted = false;
}

static void cleanup(void) {
        unmount_env();
        remove_scratch(dir);
}

/* meson's timeout (SIGTERM) must not leave the loop mount behind */
static void cleanup_and_die(int sig) {
        cleanup();
        signal(sig, SIG_DFL);
        raise(sig);
}

static bool mount_env(void) {
        if (!mounted && run("mount -o loop '%s' '%s'", env_img, mnt) == 0)
                mounted = true;
        return mounted;
}

/* Boots GRUB once; returns the slot it chose (new string) or NULL. */
static char *boot(void) {
        char *log = xprintf("%s/boot.log", dir), *out, *p, *slot = NULL;

        unmount_env();
        run("cp /usr/share/OVMF/OVMF_VARS_4M.fd '%s/vars.fd'", dir);
        run("timeout 120 qemu-system-x86_64 -accel tcg -machine q35 -m 256 -nographic -no-reboot"
            " -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
            " -drive if=pflash,format=raw,file='%s/vars.fd'"
            " -drive file='%s/esp.img',format=raw,if=virtio -drive file='%s',format=raw,if=virtio"
            " </dev/null >'%s' 2>&1",
            dir, dir, env_img, log);
        /* the menuentry prints the slot and the root label it picked */
        out = capture("tr -d '\\r' < '%s' | grep -a -o 'OTAD-GRUB-SLOT=[A-Z]* rlabel=root[A-Z]*' | tail -1", log);
        if (out && (p = strchr(out, '='))) {
                char *label = strstr(p, " rlabel=root");

                p[strcspn(p, " \n")] = '\0';
                /* the entry must boot the root of the slot it announces */
                if (label && strncmp(label + strlen(" rlabel=root"), p + 1, strlen(p + 1)) == 0)
                        slot = strdup(p + 1);
        }
        free(out);
        free(log);
        mount_env();
        return slot;
}

static bool boots(const char *want, const char *what) {
        char *got = boot();
        bool ok = tap_is_str(got, want, what);

        free(got);
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

/* The grub.cfg of otad.conf(5), between its begin/end comments, with the
 * env file on the test disk (found by its label, so that it is found with
 * no grubenv on it too). */
static bool make_esp(void) {
        const char *src = getenv("OTAD_SOURCE_ROOT");
        char *rel = xprintf("%s/man/otad.conf.5", src ? src : ".");
        char *page = realpath(rel, NULL); /* the commands below run in dir */
        int r;

        free(rel);
        if (!page)
                return false;

        r = run("cd '%s' && sed -n '/^\\.\\\\\" begin grub.cfg/,/^\\.\\\\\" end grub.cfg/p' '%s'"
                " | grep -v '^[.]' | sed 's/\\\\-/-/g' > snippet.cfg"
                " && ! grep -q '\\\\' snippet.cfg && grep -q '^save_env' snippet.cfg"
                " && { echo 'set timeout=0'; echo 'search --no-floppy --label otadenv --set=envdisk';"
                "      echo 'set envdir=($envdisk)';"
                "      sed 's/\\$prefix/$envdir/g;"
                "           s|^  linux .*|  echo \"OTAD-GRUB-SLOT=$slot rlabel=$rlabel\"|; s|^  initrd .*|  halt|' snippet.cfg;"
                "    } > test.cfg"
                " && grep -q OTAD-GRUB-SLOT test.cfg"
                " && grub-mkstandalone -O x86_64-efi -o BOOTX64.EFI"
                "    --modules='part_gpt ext2 fat search search_fs_file search_label loadenv test echo halt normal configfile'"
                "    boot/grub/grub.cfg=test.cfg"
                " && truncate -s 40M esp.img"
                " && printf 'label: gpt\\nstart=2048, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\\n' | sfdisk -q esp.img"
                " && mformat -i esp.img@@1M -F -v ESP :: && mmd -i esp.img@@1M ::/EFI ::/EFI/BOOT"
                " && mcopy -i esp.img@@1M BOOTX64.EFI ::/EFI/BOOT/BOOTX64.EFI"
                " && truncate -s 8M env.img && mkfs.ext4 -q -F -L otadenv env.img",
                dir, page);
        free(page);
        return r == 0;
}

int main(void) {
        const char *tools[] = { "qemu-system-x86_64", "grub-mkstandalone", "mformat", "mcopy", "sfdisk", "mkfs.ext4" };
        struct otad_config *c = NULL;
        struct bootloader *b = NULL;
        char *extra, *grubenv;
        bool good = true;

        for (size_t i = 0; i < ELEMENTSOF(tools); i++)
                if (!have_tool(tools[i])) {
                        printf("1..0 # SKIP %s missing (qemu-system-x86, grub-efi-amd64-bin, mtools)\n", tools[i]);
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
        if (geteuid() != 0 || access("/usr/share/OVMF/OVMF_CODE_4M.fd", R_OK) < 0 ||
            access("/usr/lib/grub/x86_64-efi", R_OK) < 0) {
                printf("1..0 # SKIP needs root, ovmf and grub-efi-amd64-bin\n");
                return 0;
        }
        dir = make_scratch("test-grub-boot");
        atexit(cleanup);
        signal(SIGTERM, cleanup_and_die);
        signal(SIGINT, cleanup_and_die);
        mnt = xprintf("%s/mnt", dir);
        env_img = xprintf("%s/env.img", dir);
        grubenv = xprintf("%s/grubenv", mnt);
        mkdir(mnt, 0755);
        if (!tap_ok(make_esp(), "GRUB EFI image with the grub.cfg of otad.conf(5), ESP and env disk built") ||
            !tap_ok(mount_env(), "env disk mounted"))
                return tap_done();
        extra = xprintf("[bootloader]\ntype = grub\ngrubenv = %s\n\n"
                        "[slot.rootfs.a]\ndevice = /dev/null\nbootname = A\n\n"
                        "[slot.rootfs.b]\ndevice = /dev/null\nbootname = B\n",
                        grubenv);
        c = load_config(dir, extra);
        free(extra);
        if (!tap_ok(c && bootloader_new(c, &b) == 0, "grub bootloader on the env disk"))
                return tap_done();

        /* a factory device: B may be empty and must never boot */
        boots("A", "boot 1, no grubenv at all: A (load_env fails, the defaults stand)");
        tap_ok(access(grubenv, F_OK) < 0, "GRUB did not create a grubenv");
        primary_is(b, "A", "no grubenv: otad reads A as primary");
        tap_ok(bootloader_get_state(b, "B", &good) == 0 && !good, "no grubenv: otad reads B as not bootable");
        tap_ok(bootloader_set_try_once(b, "B") < 0 && access(grubenv, F_OK) < 0,
               "no grubenv: otad refuses to switch, and creates none");

        if (!tap_is_int(run("grub-editenv '%s' create", grubenv), 0, "factory provisioning: grub-editenv create"))
                return tap_done();
        boots("A", "boot 2, empty grubenv: A");
        tap_ok(bootloader_get_state(b, "B", &good) == 0 && !good, "B is not bootable");
        boots("A", "boot 3, nobody marked A good: A again, not the empty B");
        primary_is(b, "A", "A is primary");
        tap_ok(bootloader_get_state(b, "B", &good) == 0 && !good, "B is still not bootable");
        tap_is_int(bootloader_mark_good(b, "A"), 0, "otad on A marks A good (every boot)");
        tap_ok(bootloader_get_state(b, "B", &good) == 0 && !good, "B is not bootable after mark_good(A)");

        tap_is_int(bootloader_set_try_once(b, "B"), 0, "update: set_try_once(B)");
        boots("B", "boot 4: B, once");
        primary_is(b, "A", "on B before commit, the primary is A again (B_TRY=1)");
        tap_ok(bootloader_get_state(b, "B", &good) == 0 && !good, "B is on trial, not good");

        boots("A", "boot 5, B was not marked good: back to A");
        tap_is_int(bootloader_mark_bad(b, "B"), 0, "otad on A after the fallback: mark_bad(B)");
        tap_is_int(bootloader_mark_good(b, "A"), 0, "and mark_good(A)");
        boots("A", "boot 6: still A");

        tap_is_int(bootloader_set_try_once(b, "B"), 0, "second update: set_try_once(B)");
        boots("B", "boot 7: B, once");
        tap_is_int(bootloader_mark_good(b, "B"), 0, "health check passed: mark_good(B)");
        boots("B", "boot 8: committed B stays");
        tap_is_int(bootloader_mark_good(b, "B"), 0, "otad on B marks B good (every boot)");

        tap_is_int(bootloader_set_try_once(b, "A"), 0, "third update: set_try_once(A)");
        boots("A", "boot 9: A, once");
        tap_is_int(bootloader_mark_bad(b, "A"), 0, "health check failed: mark_bad(A)");
        boots("B", "boot 10: rolled back to B");
        primary_is(b, "B", "B is primary");

        bootloader_free(b);
        config_free(c);
        free(grubenv);
        return tap_done();
}
