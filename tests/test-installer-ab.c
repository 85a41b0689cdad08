/* SPDX-License-Identifier: MIT */
/* Unit tests of the A/B installer. On file-backed slots: only the inactive
 * slot is written, at the right offsets, read-back equals the image, too
 * small / unknown-booted / same-device slots are refused, activate asks for
 * a reboot without touching the bootloader (the lifecycle switches it,
 * after recording that it will). As root, also on a real loop device with a GPT
 * (sfdisk + partx -a, since this kernel reads no partition tables): an
 * exclusively held or mounted slot is refused, the booted slot is found
 * through the mount table. Every loop device and mount is undone at exit,
 * also when a check fails. */
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include "grubenv.h"
#include "installer-test-util.h"
#include "installer.h"
#include "otad.h"
#include "slot.h"

#define SLOT_SIZE  (1024 * 1024)
#define IMAGE_SIZE (300 * 1024 + 17)
#define BLOCK      4096

static char *dir;
static char loop_disk[64], loop_fs[64], mnt[512];

static char *slot_a, *slot_b, *grubenv;

static struct otad_config *ab_config(const char *a, const char *b, const char *booted) {
        char *extra = xprintf("[update]\nbooted_slot = %s\n\n[bootloader]\ntype = grub\ngrubenv = %s\n\n"
                              "[target.rootfs]\ntype = ab\n\n"
                              "[slot.rootfs.a]\ndevice = %s\nbootname = A\n\n"
                              "[slot.rootfs.b]\ndevice = %s\nbootname = B\n",
                              booted, grubenv, a, b);
        struct otad_config *c = load_config(dir, extra);

        free(extra);
        return c;
}

static int write_all_blocks(struct installer *in, const unsigned char *image, size_t size) {
        size_t nblocks = (size + BLOCK - 1) / BLOCK;

        /* odd blocks first, then even: arrival order of a lossy stream */
        for (int pass = 1; pass >= 0; pass--)
                for (size_t i = (size_t) pass; i < nblocks; i += 2) {
                        size_t off = i * BLOCK, len = off + BLOCK > size ? size - off : BLOCK;
                        int r = in->ops->write(in, off, image + off, len);

                        if (r < 0)
                                return r;
                }
        return 0;
}

static bool bytes_at(const char *path, uint64_t offset, const unsigned char *want, size_t len) {
        unsigned char *got = malloc(len);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        bool same = false;

        if (got && fd >= 0 && pread_all(fd, got, len, offset) == 0)
                same = memcmp(got, want, len) == 0;
        if (fd >= 0)
                close(fd);
        free(got);
        return same;
}

static char *digest(const char *path) {
        return capture("sha256sum < '%s'", path);
}

static void test_file_slots(void) {
        static unsigned char image[IMAGE_SIZE], back[IMAGE_SIZE], slot_fill[SLOT_SIZE];
        struct otad_config *c;
        struct otad o = { 0 };
        struct installer *in = NULL;
        struct grubenv env = { 0 };
        char *a_before, *a_after;

        fill_pattern(image, sizeof(image), 7);
        fill_pattern(slot_fill, sizeof(slot_fill), 99);
        write_bytes(slot_a, slot_fill, SLOT_SIZE);
        write_bytes(slot_b, slot_fill, SLOT_SIZE);
        grubenv_write(grubenv, &env);

        c = ab_config(slot_a, slot_b, "A");
        tap_ok(c != NULL, "config with file-backed slots loads");
        if (!c)
                return;
        o.config = c;
        a_before = digest(slot_a);

        tap_is_int(installer_new(&o, &c->targets[0], "job-ab", &in), 0, "installer_new(ab)");
        tap_is_int(in->ops->begin(in, IMAGE_SIZE, false), 0, "begin with A booted");
        tap_ok(in->slot && strcmp(in->slot->bootname, "B") == 0, "the slot written is B, the inactive one");
        tap_is_int(write_all_blocks(in, image, IMAGE_SIZE), 0, "blocks written out of order");
        tap_is_int(in->ops->write(in, IMAGE_SIZE, image, 1), -ERANGE, "a write past the image: -ERANGE");
        tap_is_int(in->ops->finish(in), 0, "finish (sync + drop cache)");
        tap_is_int(in->ops->read(in, 0, back, IMAGE_SIZE), 0, "read back");
        tap_ok(memcmp(back, image, IMAGE_SIZE) == 0, "read-back equals the image");
        tap_ok(bytes_at(slot_b, 0, image, IMAGE_SIZE), "slot B's file holds the image at offset 0");
        tap_ok(bytes_at(slot_b, IMAGE_SIZE, slot_fill + IMAGE_SIZE, SLOT_SIZE - IMAGE_SIZE),
               "the rest of slot B is untouched");
        a_after = digest(slot_a);
        tap_is_str(a_after, a_before, "the booted slot A is untouched");
        tap_is_int(in->ops->activate(in), 1, "activate returns 1: reboot needed");
        grubenv_read(grubenv, &env);
        tap_ok(grubenv_get(&env, "ORDER") == NULL || strcmp(grubenv_get(&env, "ORDER"), "B A") != 0,
               "the grubenv does not boot B: switching is not the installer's");
        grubenv_done(&env);
        installer_free(in);
        in = NULL;
        config_free(c);
        free(a_before);
        free(a_after);

        /* booted B: A is written */
        c = ab_config(slot_a, slot_b, "B");
        o.config = c;
        tap_is_int(installer_new(&o, &c->targets[0], "job-ab2", &in), 0, "installer_new with B booted");
        tap_is_int(in->ops->begin(in, IMAGE_SIZE, false), 0, "begin");
        tap_ok(in->slot && strcmp(in->slot->bootname, "A") == 0, "with B booted, A is written");
        in->ops->abort(in);
        installer_free(in);
        in = NULL;

        /* too small */
        tap_is_int(installer_new(&o, &c->targets[0], "job-big", &in), 0, "installer_new");
        tap_is_int(in->ops->begin(in, 2 * SLOT_SIZE, false), -ENOSPC, "an image larger than the slot: -ENOSPC");
        tap_ok(in->reason && strstr(in->reason, "holds"), "reason: %s", in->reason ? in->reason : "(none)");
        installer_free(in);
        in = NULL;
        config_free(c);

        /* booted slot unknown: nothing is written */
        c = ab_config(slot_a, slot_b, "");
        o.config = c;
        {
                char *cmdline = NULL;

                if (read_file_full("/proc/cmdline", 65536, &cmdline, NULL) == 0 && !strstr(cmdline, "otad.slot=") &&
                    !strstr(cmdline, "rauc.slot=")) {
                        a_before = digest(slot_a);
                        char *b_before = digest(slot_b);

                        tap_is_int(installer_new(&o, &c->targets[0], "job-unknown", &in), 0, "installer_new");
                        tap_is_int(in->ops->begin(in, IMAGE_SIZE, false), -ENODEV,
                                   "booted slot unknown (no otad.slot=, / is no slot): -ENODEV");
                        a_after = digest(slot_a);
                        char *b_after = digest(slot_b);
                        tap_ok(strcmp(a_before, a_after) == 0 && strcmp(b_before, b_after) == 0, "neither slot written");
                        free(a_before);
                        free(a_after);
                        free(b_before);
                        free(b_after);
                        installer_free(in);
                        in = NULL;
                } else
                        tap_skip("the kernel command line names a slot", "booted slot unknown");
                free(cmdline);
        }
        config_free(c);

        /* misconfiguration: both slots on the same device */
        c = ab_config(slot_a, slot_a, "A");
        o.config = c;
        tap_is_int(installer_new(&o, &c->targets[0], "job-same", &in), 0, "installer_new");
        tap_is_int(in->ops->begin(in, IMAGE_SIZE, false), -EBUSY, "both slots on one device: -EBUSY");
        installer_free(in);
        config_free(c);
}

/* ---- root only: loop devices ---- */

static void undo_loops(void) {
        if (mnt[0]) {
                (void) umount2(mnt, MNT_DETACH);
                mnt[0] = '\0';
        }
        if (loop_fs[0]) {
                (void) run("losetup -d %s 2>/dev/null", loop_fs);
                loop_fs[0] = '\0';
        }
        if (loop_disk[0]) {
                (void) run("partx -d %s 2>/dev/null; losetup -d %s 2>/dev/null", loop_disk, loop_disk);
                loop_disk[0] = '\0';
        }
        if (dir) {
                remove_scratch(dir);
                free(dir);
                dir = NULL;
        }
}

static bool attach(const char *image, char *ret, size_t size) {
        char *out = capture("losetup -f --show '%s' 2>/dev/null", image);
        size_t len;

        if (!out)
                return false;
        len = strcspn(out, "\n");
        out[len] = '\0';
        snprintf(ret, size, "%s", out);
        free(out);
        return len > 0;
}

static bool wait_for(const char *path) {
        struct stat st;

        for (int i = 0; i < 200; i++) {
                if (stat(path, &st) == 0 && S_ISBLK(st.st_mode))
                        return true;
                usleep(10000);
        }
        return false;
}

static uint64_t partition_start_bytes(const char *disk, int n) {
        char *out = capture("partx -g -o START -n %d '%s'", n, disk);
        uint64_t start = out ? strtoull(out, NULL, 10) * 512 : 0;

        free(out);
        return start;
}

static void test_loop_devices(void) {
        static unsigned char image[IMAGE_SIZE], back[IMAGE_SIZE];
        char *disk = xprintf("%s/disk.img", dir), *fsimg = xprintf("%s/fs.img", dir);
        char *p1 = NULL, *p2 = NULL, *fixture = NULL, *cmdline = NULL, *line = NULL;
        struct otad_config *c = NULL;
        struct otad o = { 0 };
        struct installer *in = NULL;
        const struct config_slot *booted = NULL;
        struct slot_sources src;
        struct stat st;
        uint64_t p2_start;
        int hold = -1;

        if (geteuid() != 0 || !have_tool("losetup") || !have_tool("sfdisk") || !have_tool("partx") ||
            !have_tool("mkfs.ext4")) {
                tap_skip("needs root, losetup, sfdisk, partx, mkfs.ext4", "loop-device slots");
                return;
        }
        fill_pattern(image, sizeof(image), 11);
        run("truncate -s 12M '%s' && printf 'label: gpt\\nsize=4MiB, type=L, name=slotA\\nsize=4MiB, type=L, name=slotB\\n'"
            " | sfdisk -q '%s' >/dev/null 2>&1", disk, disk);
        if (!tap_ok(attach(disk, loop_disk, sizeof(loop_disk)), "losetup attaches the GPT disk image (%s)", loop_disk))
                goto out;
        tap_is_int(run("partx -a %s", loop_disk), 0, "partx -a adds the partitions");
        p1 = xprintf("%sp1", loop_disk);
        p2 = xprintf("%sp2", loop_disk);
        if (!tap_ok(wait_for(p1) && wait_for(p2), "%s and %s exist", p1, p2))
                goto out;

        c = ab_config(p1, p2, "A");
        o.config = c;
        tap_is_int(installer_new(&o, &c->targets[0], "job-loop", &in), 0, "installer_new on loop partitions");
        tap_is_int(in->ops->begin(in, IMAGE_SIZE, false), 0, "begin opens p2");
        tap_ok(in->slot && strcmp(in->slot->device, p2) == 0, "the inactive partition is p2");
        tap_is_int(write_all_blocks(in, image, IMAGE_SIZE), 0, "blocks written");
        tap_is_int(in->ops->finish(in), 0, "finish");
        tap_is_int(in->ops->read(in, 0, back, IMAGE_SIZE), 0, "read back from the device");
        tap_ok(memcmp(back, image, IMAGE_SIZE) == 0, "read-back equals the image");
        installer_free(in);
        in = NULL;
        p2_start = partition_start_bytes(loop_disk, 2);
        tap_ok(p2_start > 0 && bytes_at(disk, p2_start, image, IMAGE_SIZE),
               "the disk image holds the image at p2's offset (%llu)", (unsigned long long) p2_start);

        /* O_EXCL: someone else holds the slot exclusively */
        hold = open(p2, O_RDONLY | O_EXCL | O_CLOEXEC);
        tap_ok(hold >= 0, "hold p2 with O_EXCL");
        tap_is_int(installer_new(&o, &c->targets[0], "job-excl", &in), 0, "installer_new");
        tap_is_int(in->ops->begin(in, IMAGE_SIZE, false), -EBUSY, "a slot held exclusively elsewhere: -EBUSY");
        installer_free(in);
        in = NULL;
        close(hold);
        config_free(c);
        c = NULL;

        /* the booted slot from the mount table: "/" on p1 */
        tap_is_int(stat(p1, &st), 0, "stat p1");
        fixture = xprintf("%s/mountinfo", dir);
        cmdline = xprintf("%s/cmdline", dir);
        /* one line with an optional field, one without */
        line = xprintf("30 22 0:5 / /dev rw - devtmpfs devtmpfs rw\n"
                       "22 1 %u:%u / / rw,relatime shared:1 - ext4 /dev/root rw\n",
                       major(st.st_rdev), minor(st.st_rdev));
        write_bytes(fixture, line, strlen(line));
        write_bytes(cmdline, "BOOT_IMAGE=/vmlinuz root=/dev/root ro quiet\n", 44);
        c = ab_config(p1, p2, "");
        src = (struct slot_sources){ .cmdline = cmdline, .mountinfo = fixture };
        tap_is_int(slot_booted(c, "rootfs", &src, &booted), 0, "slot_booted from the mount table");
        tap_ok(booted && strcmp(booted->bootname, "A") == 0, "/ on p1 (listed as /dev/root): A is booted");
        tap_is_int(slot_is_mounted(&c->slots[0], &src), 1, "p1 counts as mounted (fixture)");
        tap_is_int(slot_is_mounted(&c->slots[1], &src), 0, "p2 is not mounted (fixture)");
        config_free(c);
        c = NULL;

        /* a mounted slot: ext4 on another loop device */
        run("truncate -s 4M '%s' && mkfs.ext4 -q -F '%s' >/dev/null 2>&1", fsimg, fsimg);
        if (!tap_ok(attach(fsimg, loop_fs, sizeof(loop_fs)), "losetup attaches an ext4 image (%s)", loop_fs))
                goto out;
        snprintf(mnt, sizeof(mnt), "%s/mnt", dir);
        mkdir(mnt, 0755);
        if (!tap_is_int(mount(loop_fs, mnt, "ext4", 0, NULL), 0, "mount it")) {
                mnt[0] = '\0';
                goto out;
        }
        c = ab_config(p1, loop_fs, "A");
        o.config = c;
        if (!tap_is_int(slot_is_mounted(&c->slots[1], NULL), 1, "slot_is_mounted sees the mounted slot")) {
                char *mi = capture("grep loop /proc/self/mountinfo; ls -l %s", c->slots[1].device);

                tap_diag("%s", mi ? mi : "(none)");
                free(mi);
        }
        tap_is_int(installer_new(&o, &c->targets[0], "job-mounted", &in), 0, "installer_new");
        tap_is_int(in->ops->begin(in, IMAGE_SIZE, false), -EBUSY, "a mounted slot: -EBUSY");
        tap_ok(in->reason && strstr(in->reason, "mounted"), "reason: %s", in->reason ? in->reason : "(none)");
        installer_free(in);
        in = NULL;
        config_free(c);
        c = NULL;

        /* a regular file slot counts as mounted when a loop device on it is */
        c = ab_config(p1, fsimg, "A");
        tap_is_int(slot_is_mounted(&c->slots[1], NULL), 1, "a file whose loop device is mounted counts as mounted");
out:
        config_free(c);
        free(disk);
        free(fsimg);
        free(p1);
        free(p2);
        free(fixture);
        free(cmdline);
        free(line);
}

/* meson's timeout (SIGTERM) or a crash must not leave loop devices behind
 * either; system() in a handler is no async-signal-safe code, but the test
 * is dying anyway and this is its last chance to clean up. */
static void undo_and_die(int sig) {
        undo_loops();
        signal(sig, SIG_DFL);
        raise(sig);
}

int main(void) {
        const int fatal[] = { SIGTERM, SIGINT, SIGSEGV, SIGABRT, SIGBUS };

        dir = make_scratch("test-installer-ab");
        atexit(undo_loops);
        for (size_t i = 0; i < ELEMENTSOF(fatal); i++)
                signal(fatal[i], undo_and_die);
        slot_a = xprintf("%s/slotA.img", dir);
        slot_b = xprintf("%s/slotB.img", dir);
        grubenv = xprintf("%s/grubenv", dir);
        test_file_slots();
        test_loop_devices();
        undo_loops();
        tap_ok(!loop_disk[0] && !loop_fs[0] && !mnt[0], "every loop device and mount undone");
        free(slot_a);
        free(slot_b);
        free(grubenv);
        return tap_done();
}
