/* SPDX-License-Identifier: MIT */
/* The configuration parser: every error path is asserted by the message a
 * user would see, with its file and line. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "macro.h"
#include "tap.h"

static char dir[] = "/tmp/otad-test-config-XXXXXX";
static char conf_path[512];
static char captured[8192];

static void write_file(const char *path, const char *text, mode_t mode) {
        FILE *f = fopen(path, "w");

        if (!f) {
                perror(path);
                exit(2);
        }
        fputs(text, f);
        fclose(f);
        chmod(path, mode);
}

/* Runs fn(arg) with stderr captured into `captured`; returns fn's result. */
static int capture(int (*fn)(const void *arg, void *out), const void *arg, void *out) {
        char log_path[600];
        int saved, fd, r;
        ssize_t n;

        snprintf(log_path, sizeof(log_path), "%s/stderr", dir);
        fflush(stderr);
        saved = dup(STDERR_FILENO);
        fd = open(log_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
        dup2(fd, STDERR_FILENO);
        r = fn(arg, out);
        fflush(stderr);
        dup2(saved, STDERR_FILENO);
        close(saved);
        lseek(fd, 0, SEEK_SET);
        n = read(fd, captured, sizeof(captured) - 1);
        captured[n > 0 ? n : 0] = '\0';
        close(fd);
        return r;
}

static int do_load(const void *path, void *ret) {
        return config_load(path, ret);
}

static int do_check_files(const void *config, void *unused) {
        return config_check_files(config);
}

/* Loads text as a config file with stderr captured. */
static int load(const char *text, struct otad_config **ret) {
        write_file(conf_path, text, 0644);
        return capture(do_load, conf_path, ret);
}

static int check_files(const struct otad_config *c) {
        return capture(do_check_files, c, NULL);
}

static bool said(const char *what) {
        bool found = strstr(captured, what) != NULL;

        if (!found)
                tap_diag("expected \"%s\" in: %s", what, captured);
        return found;
}

static char *minimal(const char *extra) {
        char *s;

        if (asprintf(&s,
                     "# otad test\n"
                     "[mqtt]\n"
                     "endpoint = localhost\n"
                     "thing_name = gw-1\n"
                     "ca_file = %s/ca.crt\n"
                     "cert_file = %s/gw.crt\n"
                     "key_file = %s/gw.key\n"
                     "%s",
                     dir, dir, dir, extra) < 0)
                exit(2);
        return s;
}

/* Expects text to fail with message (matched as a substring). */
static void expect_error(const char *text, const char *message, const char *name) {
        struct otad_config *c = NULL;
        int r = load(text, &c);

        tap_ok(r < 0 && c == NULL && said(message), "%s", name);
}

static void test_defaults(void) {
        _cleanup_free_ char *text = minimal("");
        struct otad_config *c = NULL;

        tap_is_int(load(text, &c), 0, "a minimal config loads");
        if (!c)
                return;
        tap_is_int(c->mqtt.port, 8883, "port defaults to 8883");
        tap_is_str(c->mqtt.client_id, "gw-1", "client_id defaults to the thing name");
        tap_is_int(c->mqtt.keepalive, 60, "keepalive defaults to 60 s");
        tap_ok(c->mqtt.clean_session, "clean_session defaults to yes");
        tap_is_str(c->state.directory, "/var/lib/otad", "state directory defaults to /var/lib/otad");
        tap_is_int(c->log.level, LOG_INFO, "log level defaults to info");
        tap_is_int(c->ota.block_size, 32768, "block_size defaults to 32 KiB");
        tap_is_int(c->bootloader.type, BOOTLOADER_NONE, "no bootloader by default");
        tap_is_int((long long) c->n_targets, 0, "no targets by default");
        config_free(c);
}

static void test_values(void) {
        _cleanup_free_ char *text = minimal(
                "port = 443\n"
                "client_id = \"gw-1-otad\"\n"
                "keepalive = 5\n"
                "clean_session = no\n"
                "[log]\n"
                "level = debug\n"
                "[ota]\n"
                "protocol = http\n"
                "[bootloader]\n"
                "type = grub\n"
                "grubenv = /boot/efi/grubenv\n"
                "[slot.rootfs.a]\n"
                "device = /dev/mmcblk0p2\n"
                "bootname = A\n"
                "[target.rootfs]\n"
                "type = ab\n"
                "match_file_type = 0\n"
                "[slot.rootfs.b]\n"
                "device = /dev/mmcblk0p3\n"
                "bootname = B\n"
                "[target.app]\n"
                "type = file\n"
                "directory = /var/lib/app\n");
        struct otad_config *c = NULL;

        tap_is_int(load(text, &c), 0, "a full config loads");
        if (!c)
                return;
        tap_is_int(c->mqtt.port, 443, "port is read");
        tap_is_str(c->mqtt.client_id, "gw-1-otad", "quoted values lose their quotes");
        tap_is_int(c->mqtt.keepalive, 30, "keepalive below AWS's 30 s is raised to 30");
        tap_ok(said("outside AWS IoT's 30..1200 s"), "the keepalive clamp is logged");
        tap_ok(!c->mqtt.clean_session, "booleans accept no");
        tap_is_int(c->log.level, LOG_DEBUG, "log level is read");
        tap_is_int(c->ota.protocol, OTA_PROTOCOL_HTTP, "enums are read");
        tap_is_str(c->bootloader.grubenv, "/boot/efi/grubenv", "grubenv is read");
        tap_is_int((long long) c->n_targets, 2, "two targets, between slot sections");
        if (c->n_targets == 2) {
                tap_is_str(c->targets[1].directory, "/var/lib/app", "the second target's keys land in it");
                tap_is_str(c->targets[0].name, "rootfs", "target name from the section");
                tap_is_int(c->targets[0].type, TARGET_AB, "target type");
                tap_is_str(c->targets[0].slot_class, "rootfs", "slot_class defaults to rootfs");
                tap_is_str(c->targets[0].match_filepath, "*", "match_filepath defaults to *");
        }
        tap_is_int((long long) c->n_slots, 2, "two slots");
        tap_ok(config_find_slot(c, "rootfs", "b") && strcmp(config_find_slot(c, "rootfs", "b")->bootname, "B") == 0,
               "slots are found by class and name");
        config_free(c);
}

static void test_errors(void) {
        _cleanup_free_ char *typo = minimal("endpont = x\n");
        _cleanup_free_ char *bad_int = minimal("port = eighty\n");
        _cleanup_free_ char *big_int = minimal("port = 70000\n");
        _cleanup_free_ char *bad_bool = minimal("clean_session = maybe\n");
        _cleanup_free_ char *bad_enum = minimal("[ota]\nprotocol = ftp\n");
        _cleanup_free_ char *bad_level = minimal("[log]\nlevel = loud\n");
        _cleanup_free_ char *twice = minimal("port = 1\nport = 2\n");
        _cleanup_free_ char *section = minimal("[mqt]\n");
        _cleanup_free_ char *no_eq = minimal("port\n");
        _cleanup_free_ char *header = minimal("[ota\n");
        _cleanup_free_ char *relative = minimal("[state]\ndirectory = var/lib/otad\n");
        _cleanup_free_ char *file_target = minimal("[target.app]\ntype = file\n");
        _cleanup_free_ char *no_type = minimal("[target.app]\ndirectory = /tmp\n");
        _cleanup_free_ char *ab_no_slots = minimal("[bootloader]\ntype = grub\n[target.rootfs]\ntype = ab\n");
        _cleanup_free_ char *ab_no_boot = minimal("[target.rootfs]\ntype = ab\n[slot.rootfs.a]\ndevice = /a\nbootname = A\n"
                                                  "[slot.rootfs.b]\ndevice = /b\nbootname = B\n");
        _cleanup_free_ char *slot_name = minimal("[slot.rootfs]\ndevice = /a\n");
        _cleanup_free_ char *slot_dev = minimal("[slot.rootfs.a]\nbootname = A\n");
        _cleanup_free_ char *same_boot = minimal("[slot.rootfs.a]\ndevice = /a\nbootname = A\n"
                                                 "[slot.rootfs.b]\ndevice = /b\nbootname = A\n");
        _cleanup_free_ char *reconnect = minimal("reconnect_min = 60\nreconnect_max = 10\n");
        _cleanup_free_ char *bad_thing = NULL;
        char expect[1024];

        snprintf(expect, sizeof(expect), "%s:8: Unknown key 'endpont' in section [mqtt]", conf_path);
        expect_error(typo, expect, "a typo'd key fails with file:line");
        snprintf(expect, sizeof(expect), "%s:8: Invalid value 'eighty' for port in [mqtt]: expected an integer from 1 to 65535", conf_path);
        expect_error(bad_int, expect, "a bad integer fails with file:line and the expected range");
        expect_error(big_int, "Invalid value '70000' for port in [mqtt]", "an integer out of range fails");
        expect_error(bad_bool, "Invalid value 'maybe' for clean_session in [mqtt]: expected yes or no", "a bad boolean fails");
        expect_error(bad_enum, "Invalid value 'ftp' for protocol in [ota]: expected one of mqtt, http", "a bad enum names the choices");
        expect_error(bad_level, "Invalid value 'loud' for level in [log]", "a bad log level fails");
        snprintf(expect, sizeof(expect), "%s:9: Key 'port' in [mqtt] already set at line 8", conf_path);
        expect_error(twice, expect, "a key set twice fails with both lines");
        snprintf(expect, sizeof(expect), "%s:8: Unknown section [mqt]", conf_path);
        expect_error(section, expect, "an unknown section fails with file:line");
        expect_error(no_eq, ":8: Expected key = value", "a line without = fails");
        expect_error(header, ":8: Malformed section header", "a broken section header fails");
        expect_error("endpoint = x\n", ":1: Assignment outside of a section", "a key before any section fails");
        expect_error("[mqtt]\nthing_name = a\nca_file = /c\ncert_file = /c\nkey_file = /k\n",
                     ":1: Missing required key 'endpoint' in section [mqtt]", "a missing required key names the section's line");
        expect_error("[log]\nlevel = info\n", "Missing required key 'endpoint': there is no [mqtt] section",
                     "a missing section is named");
        bad_thing = minimal("");
        memcpy(strstr(bad_thing, "gw-1"), "g/w1", 4);
        expect_error(bad_thing, "thing_name 'g/w1' must be 1-128 of [a-zA-Z0-9:_-]", "an invalid thing name fails");
        expect_error(relative, "[state] directory must be an absolute path", "a relative state directory fails");
        expect_error(file_target, ":8: [target.app] type=file needs directory=", "a file target needs a directory");
        expect_error(no_type, ":8: [target.app] needs type=", "a target needs a type");
        expect_error(ab_no_slots, "[target.rootfs] type=ab needs exactly two [slot.rootfs.NAME] sections, found 0",
                     "an A/B target needs two slots");
        expect_error(ab_no_boot, "[target.rootfs] type=ab needs a [bootloader] type", "an A/B target needs a bootloader");
        expect_error(slot_name, ":8: Slot sections are named [slot.CLASS.NAME]", "a slot section needs class and name");
        expect_error(slot_dev, ":8: [slot.rootfs.a] needs device=", "a slot needs a device");
        expect_error(same_boot, "bootname 'A' already used by [slot.rootfs.a]", "bootnames are unique per class");
        expect_error(reconnect, "reconnect_min (60) is larger than reconnect_max (10)", "backoff bounds are ordered");
}

static void test_missing_file(void) {
        struct otad_config *c = NULL;
        char missing[600];
        int r;

        snprintf(missing, sizeof(missing), "%s/nope.conf", dir);
        r = capture(do_load, missing, &c);
        tap_ok(r == -ENOENT && said("Failed to open") && said("nope.conf: No such file or directory"),
               "a missing config file is named with the reason");
}

static void test_check_files(void) {
        _cleanup_free_ char *text = minimal("");
        char path[600];
        struct otad_config *c = NULL;

        if (load(text, &c) < 0) {
                tap_ok(false, "config for file checks loads");
                return;
        }
        tap_ok(check_files(c) == -ENOENT && said("ca_file") && said("/ca.crt: No such file or directory") &&
               said("cert_file") && said("/gw.crt: No such file or directory") && said("key_file"),
               "check-config names every missing certificate file");

        snprintf(path, sizeof(path), "%s/ca.crt", dir);
        write_file(path, "ca\n", 0644);
        snprintf(path, sizeof(path), "%s/gw.crt", dir);
        write_file(path, "cert\n", 0644);
        snprintf(path, sizeof(path), "%s/gw.key", dir);
        write_file(path, "key\n", 0644);
        tap_ok(check_files(c) == -EPERM && said("is accessible by group or others (mode 0644)") && said("chmod 600"),
               "a world-readable private key is refused with a fix");
        chmod(path, 0640);
        tap_ok(check_files(c) == -EPERM && said("(mode 0640)"), "a group-readable private key is refused");
        chmod(path, 0600);
        tap_is_int(check_files(c), 0, "present files with a private key pass");
        config_free(c);

        {
                _cleanup_free_ char *with_target = minimal("[target.app]\ntype = file\ndirectory = /nonexistent-otad-dir\n"
                                                           "[ota]\ntrust_dir = /nonexistent-otad-trust\n");
                if (load(with_target, &c) == 0) {
                        tap_ok(check_files(c) < 0 && said("trust_dir /nonexistent-otad-trust") &&
                               said("target directory /nonexistent-otad-dir"),
                               "check-config names a missing trust dir and target directory");
                        config_free(c);
                } else
                        tap_ok(false, "config with a target loads");
        }
}

int main(void) {
        if (!mkdtemp(dir)) {
                perror("mkdtemp");
                return 2;
        }
        snprintf(conf_path, sizeof(conf_path), "%s/otad.conf", dir);
        log_open();

        test_defaults();
        test_values();
        test_errors();
        test_missing_file();
        test_check_files();

        {
                char cmd[600];
                snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
                if (system(cmd) != 0)
                        tap_diag("failed to remove %s", dir);
        }
        return tap_done();
}
