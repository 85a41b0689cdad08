/* SPDX-License-Identifier: MIT */
/* Unit tests of the grubenv format and the GRUB bootloader backend, with
 * grub-editenv (grub-common) as the oracle in both directions. */
#include "bootloader.h"
#include "grubenv.h"
#include "installer-test-util.h"

static char *dir;

static struct otad_config *grub_config(const char *grubenv) {
        char *extra = xprintf("[bootloader]\ntype = grub\ngrubenv = %s\n\n"
                              "[slot.rootfs.a]\ndevice = /dev/null\nbootname = A\n\n"
                              "[slot.rootfs.b]\ndevice = /dev/null\nbootname = B\n",
                              grubenv);
        struct otad_config *c = load_config(dir, extra);

        free(extra);
        return c;
}

/* grub-editenv list, as one string */
static char *oracle_list(const char *path) {
        return capture("grub-editenv '%s' list 2>&1", path);
}

static void test_reads_what_grub_editenv_writes(void) {
        char *f = xprintf("%s/oracle.env", dir);
        struct grubenv env = { 0 };

        tap_is_int(run("grub-editenv '%s' create && grub-editenv '%s' set a=1 'note=a b=c' 'path=x\\y' empty=", f, f), 0,
                   "grub-editenv creates and sets");
        tap_is_int(grubenv_read(f, &env), 0, "a block made by grub-editenv parses");
        tap_is_int((long long) env.n, 4, "four variables");
        tap_is_str(grubenv_get(&env, "a"), "1", "a=1");
        tap_is_str(grubenv_get(&env, "note"), "a b=c", "value with '=' and spaces");
        tap_is_str(grubenv_get(&env, "path"), "x\\y", "value with a backslash (escaped in the file)");
        tap_is_str(grubenv_get(&env, "empty"), "", "empty value");
        grubenv_done(&env);
        free(f);
}

static void test_grub_editenv_reads_what_we_write(void) {
        char *f = xprintf("%s/ours.env", dir);
        struct grubenv env = { 0 };
        char *list;
        struct stat st;

        grubenv_set(&env, "ORDER", "A B");
        grubenv_set(&env, "note", "x = y z");
        grubenv_set(&env, "back", "a\\b");
        tap_is_int(grubenv_write(f, &env), 0, "our writer writes");
        tap_ok(stat(f, &st) == 0 && st.st_size == GRUBENV_SIZE, "exactly %d bytes", GRUBENV_SIZE);
        list = oracle_list(f);
        tap_is_str(list, "ORDER=A B\nnote=x = y z\nback=a\\b\n", "grub-editenv list shows our variables");
        free(list);
        tap_is_int(run("grub-editenv '%s' set extra=1", f), 0, "grub-editenv can edit our block");
        list = oracle_list(f);
        tap_ok(list && strstr(list, "extra=1\n") && strstr(list, "ORDER=A B\n"), "and keeps our variables");
        free(list);
        {
                char *tmp = xprintf("%s/ours.env.new", dir);

                tap_ok(access(tmp, F_OK) < 0, "no .new file left behind");
                free(tmp);
        }
        grubenv_done(&env);
        free(f);
}

static void test_refuses_torn_and_foreign_blocks(void) {
        char *f = xprintf("%s/torn.env", dir);
        struct grubenv env = { 0 };
        char block[2 * GRUBENV_SIZE];
        struct otad_config *c;
        struct bootloader *b = NULL;
        char *primary = NULL, *before, *after;

        run("grub-editenv '%s' create && grub-editenv '%s' set ORDER='A B' keep=me", f, f);
        tap_is_int(run("truncate -s 700 '%s'", f), 0, "cut the block to 700 bytes");
        tap_is_int(grubenv_read(f, &env), -EBADMSG, "a short (torn) block is refused");

        memset(block, '#', sizeof(block));
        write_bytes(f, block, GRUBENV_SIZE);
        tap_is_int(grubenv_read(f, &env), -EBADMSG, "a block without the header is refused");

        memcpy(block, GRUBENV_HEADER, strlen(GRUBENV_HEADER));
        write_bytes(f, block, sizeof(block));
        tap_is_int(grubenv_read(f, &env), -EBADMSG, "a 2048-byte file is refused");

        memcpy(block + strlen(GRUBENV_HEADER), "ORDER=A B", 9);
        memset(block + strlen(GRUBENV_HEADER) + 9, 'x', GRUBENV_SIZE); /* no newline before the end */
        write_bytes(f, block, GRUBENV_SIZE);
        tap_is_int(grubenv_read(f, &env), -EBADMSG, "a variable cut by the end of the block is refused");

        /* the backend refuses to work on it, and does not overwrite it */
        run("grub-editenv '%s' create && grub-editenv '%s' set keep=me && truncate -s 1000 '%s'", f, f, f);
        c = grub_config(f);
        tap_ok(c && bootloader_new(c, &b) == 0, "grub bootloader created");
        before = capture("sha256sum < '%s'", f);
        tap_is_int(bootloader_set_try_once(b, "B"), -EIO, "set_try_once on a torn grubenv: -EIO");
        tap_is_int(bootloader_get_primary(b, &primary), -EIO, "get_primary on a torn grubenv: -EIO");
        after = capture("sha256sum < '%s'", f);
        tap_is_str(after, before, "the torn file was left as it was");
        bootloader_free(b);
        config_free(c);
        free(before);
        free(after);
        free(f);
}

static void test_too_big(void) {
        struct grubenv env = { 0 };
        char block[GRUBENV_SIZE];
        char big[1100];

        memset(big, 'v', sizeof(big) - 1);
        big[sizeof(big) - 1] = '\0';
        {
                struct grubenv dup = { 0 };

                memset(block, '#', sizeof(block));
                memcpy(block, GRUBENV_HEADER "x=1\nx=2\n", strlen(GRUBENV_HEADER) + 8);
                tap_is_int(grubenv_parse(block, sizeof(block), &dup), 0, "a block with a name twice parses");
                tap_ok(dup.n == 1 && strcmp(grubenv_get(&dup, "x"), "2") == 0,
                       "the last value wins, as GRUB's load_env sets them in turn");
                grubenv_done(&dup);
        }
        grubenv_set(&env, "big", big);
        tap_is_int(grubenv_format(&env, block), -ENOSPC, "variables larger than the block: -ENOSPC");
        tap_is_int(grubenv_set(&env, "a=b", "x"), -EINVAL, "a name with '=' is refused");
        grubenv_done(&env);
}

static void test_rauc_scheme(void) {
        char *f = xprintf("%s/grubenv", dir);
        struct otad_config *c;
        struct bootloader *b = NULL;
        char *primary = NULL, *list;
        bool good = false;

        run("grub-editenv '%s' create && grub-editenv '%s' set saved_entry=rescue 'kernel_args=quiet a=b'", f, f);
        c = grub_config(f);
        tap_ok(c && bootloader_new(c, &b) == 0, "grub bootloader created");

        /* a fresh env reads as grub.cfg defaults it */
        tap_is_int(bootloader_get_primary(b, &primary), 0, "fresh env: get_primary");
        tap_is_str(primary, "A", "fresh env: A is primary (config order, OK=1 TRY=0 by default)");
        free(primary);
        primary = NULL;

        tap_is_int(bootloader_set_try_once(b, "B"), 0, "set_try_once(B)");
        list = oracle_list(f);
        tap_ok(list && strstr(list, "ORDER=B A\n") && strstr(list, "B_OK=1\n") && strstr(list, "B_TRY=0\n"),
               "grub-editenv sees ORDER=B A, B_OK=1, B_TRY=0");
        tap_ok(list && strstr(list, "saved_entry=rescue\n") && strstr(list, "kernel_args=quiet a=b\n"),
               "unrelated variables preserved");
        free(list);
        tap_is_int(bootloader_get_primary(b, &primary), 0, "get_primary");
        tap_is_str(primary, "B", "B boots next");
        free(primary);
        primary = NULL;

        /* GRUB boots B and sets B_TRY=1: the next boot would be A */
        run("grub-editenv '%s' set B_TRY=1", f);
        tap_is_int(bootloader_get_primary(b, &primary), 0, "get_primary after GRUB tried B");
        tap_is_str(primary, "A", "a tried, unconfirmed B falls back to A");
        free(primary);
        primary = NULL;
        tap_is_int(bootloader_get_state(b, "B", &good), 0, "get_state(B)");
        tap_ok(!good, "B is not good while on trial");

        tap_is_int(bootloader_mark_good(b, "B"), 0, "mark_good(B)");
        tap_is_int(bootloader_get_state(b, "B", &good), 0, "get_state(B)");
        tap_ok(good, "B is good");
        tap_is_int(bootloader_get_primary(b, &primary), 0, "get_primary");
        tap_is_str(primary, "B", "B stays primary");
        free(primary);
        primary = NULL;

        /* a rollback: B bad, A (tried at its last boot) primary again */
        run("grub-editenv '%s' set A_TRY=1", f);
        tap_is_int(bootloader_mark_bad(b, "B"), 0, "mark_bad(B)");
        list = oracle_list(f);
        tap_ok(list && strstr(list, "B_OK=0\n") && strstr(list, "ORDER=A B\n") && strstr(list, "A_TRY=0\n"),
               "grub-editenv sees B_OK=0, ORDER=A B, A_TRY=0");
        free(list);
        tap_is_int(bootloader_get_primary(b, &primary), 0, "get_primary");
        tap_is_str(primary, "A", "A is primary after mark_bad(B)");
        free(primary);
        primary = NULL;
        tap_is_int(bootloader_get_state(b, "B", &good), 0, "get_state(B)");
        tap_ok(!good, "B is bad");
        run("grub-editenv '%s' set A_TRY=1", f);
        tap_is_int(bootloader_get_primary(b, &primary), 0, "get_primary with every good slot tried");
        tap_is_str(primary, "A", "all tried: the first slot not marked bad (grub.cfg starts over)");
        free(primary);
        tap_is_int(bootloader_set_try_once(b, "C"), -EINVAL, "an unknown bootname is refused");

        bootloader_free(b);
        config_free(c);
        free(f);
}

/* The factory state: an empty grubenv (or none) means what the documented
 * grub.cfg does with it: A boots, B is not bootable until otad has written
 * and verified it (set_try_once) -- never because GRUB gave up on A. */
static void test_factory_state(void) {
        char *f = xprintf("%s/factory.env", dir), *missing = xprintf("%s/missing/grubenv", dir);
        struct otad_config *c, *cm;
        struct bootloader *b = NULL, *bm = NULL;
        char *primary = NULL, *list;
        bool good = false;

        run("grub-editenv '%s' create", f);
        c = grub_config(f);
        tap_ok(c && bootloader_new(c, &b) == 0, "grub bootloader on an empty grubenv");
        tap_is_int(bootloader_get_state(b, "A", &good), 0, "factory: get_state(A)");
        tap_ok(good, "factory: A is good");
        good = true;
        tap_is_int(bootloader_get_state(b, "B", &good), 0, "factory: get_state(B)");
        tap_ok(!good, "factory: B is not bootable (it may be empty)");
        tap_is_int(bootloader_get_primary(b, &primary), 0, "factory: get_primary");
        tap_is_str(primary, "A", "factory: A is primary");
        free(primary);
        primary = NULL;

        /* GRUB booted A (A_TRY=1) and nobody marked it good: still A */
        run("grub-editenv '%s' set A_TRY=1", f);
        tap_is_int(bootloader_get_primary(b, &primary), 0, "factory, A tried, not marked good: get_primary");
        tap_is_str(primary, "A", "factory, A tried, not marked good: A again, never B");
        free(primary);
        primary = NULL;

        /* the first boot's mark_good(A) does not make B bootable */
        tap_is_int(bootloader_mark_good(b, "A"), 0, "factory: mark_good(A)");
        good = true;
        tap_is_int(bootloader_get_state(b, "B", &good), 0, "get_state(B) after mark_good(A)");
        tap_ok(!good, "B still not bootable after mark_good(A)");
        list = oracle_list(f);
        tap_ok(list && !strstr(list, "B_OK=1"), "grub-editenv sees no B_OK=1");
        free(list);

        /* mark_bad(A) on a device whose B was never written: refused, A stays */
        tap_ok(bootloader_mark_bad(b, "A") < 0, "mark_bad(A) with no bootable B is refused");
        tap_is_int(bootloader_get_primary(b, &primary), 0, "get_primary after the refused mark_bad(A)");
        tap_is_str(primary, "A", "A stays primary");
        free(primary);
        primary = NULL;

        /* only set_try_once makes B bootable */
        tap_is_int(bootloader_set_try_once(b, "B"), 0, "set_try_once(B)");
        tap_is_int(bootloader_get_primary(b, &primary), 0, "get_primary");
        tap_is_str(primary, "B", "B boots next");
        free(primary);
        primary = NULL;
        bootloader_free(b);
        config_free(c);

        /* no grubenv at all: GRUB's load_env fails and the defaults boot A;
         * we read it the same way, and refuse to create it (a missing file
         * may be an unmounted /boot: GRUB would never see ours) */
        cm = grub_config(missing);
        tap_ok(cm && bootloader_new(cm, &bm) == 0, "grub bootloader on a missing grubenv");
        tap_is_int(bootloader_get_primary(bm, &primary), 0, "missing grubenv: get_primary");
        tap_is_str(primary, "A", "missing grubenv: A is primary");
        free(primary);
        good = true;
        tap_is_int(bootloader_get_state(bm, "B", &good), 0, "missing grubenv: get_state(B)");
        tap_ok(!good, "missing grubenv: B is not bootable");
        tap_ok(bootloader_set_try_once(bm, "B") < 0, "missing grubenv: set_try_once(B) refused");
        tap_ok(access(missing, F_OK) < 0, "and no grubenv was created");
        bootloader_free(bm);
        config_free(cm);
        free(f);
        free(missing);
}

int main(void) {
        if (!have_tool("grub-editenv")) {
                printf("1..0 # SKIP grub-editenv (grub-common) not installed\n");
                return 0;
        }
        dir = make_scratch("test-grubenv");
        test_reads_what_grub_editenv_writes();
        test_grub_editenv_reads_what_we_write();
        test_refuses_torn_and_foreign_blocks();
        test_too_big();
        test_rauc_scheme();
        test_factory_state();
        remove_scratch(dir);
        free(dir);
        return tap_done();
}
