/* SPDX-License-Identifier: MIT */
/* The configuration parser and --check-config: every error path is
 * asserted by the message a user would see, with its file and line. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "config.h"
#include "config_check.h"
#include "log.h"
#include "macro.h"
#include "tap.h"

static char dir[] = "/tmp/otad-test-config-XXXXXX";
static char conf_path[512];
static char captured[8192];

static void write_bytes(const char *path, const char *data, size_t size, mode_t mode) {
        FILE *f = fopen(path, "w");

        if (!f || fwrite(data, 1, size, f) != size || fclose(f) != 0) {
                perror(path);
                exit(2);
        }
        chmod(path, mode);
}

static void write_file(const char *path, const char *text, mode_t mode) {
        write_bytes(path, text, strlen(text), mode);
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

/* Loads text as a config file with stderr captured. */
static int load(const char *text, struct otad_config **ret) {
        write_file(conf_path, text, 0644);
        return capture(do_load, conf_path, ret);
}

/* The same for text with bytes a C string cannot hold: each '@' becomes NUL. */
static int load_with_nul(const char *text, struct otad_config **ret) {
        _cleanup_free_ char *copy = strdup(text);
        size_t n = strlen(text);

        for (size_t i = 0; i < n; i++)
                if (copy[i] == '@')
                        copy[i] = '\0';
        write_bytes(conf_path, copy, n, 0644);
        return capture(do_load, conf_path, ret);
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
        snprintf(expect, sizeof(expect), "%s:4: thing_name 'g/w1' must be 1-128 of [a-zA-Z0-9:_-]", conf_path);
        expect_error(bad_thing, expect, "an invalid thing name fails at its line");
        expect_error(relative, ":9: [state] directory must be an absolute path", "a relative state directory fails");
        expect_error(file_target, ":8: [target.app] type=file needs directory=", "a file target needs a directory");
        expect_error(no_type, ":8: [target.app] needs type=", "a target needs a type");
        expect_error(ab_no_slots, "[target.rootfs] type=ab needs exactly two [slot.rootfs.NAME] sections, found 0",
                     "an A/B target needs two slots");
        expect_error(ab_no_boot, "[target.rootfs] type=ab needs a [bootloader] type", "an A/B target needs a bootloader");
        expect_error(slot_name, ":8: Invalid section [slot.rootfs]: slot sections are named [slot.CLASS.NAME]", "a slot section needs class and name");
        expect_error(slot_dev, ":8: [slot.rootfs.a] needs device=", "a slot needs a device");
        expect_error(same_boot, "bootname 'A' already used by [slot.rootfs.a]", "bootnames are unique per class");
        expect_error(reconnect, "reconnect_min (60) is larger than reconnect_max (10)", "backoff bounds are ordered");
}

/* Expects text to fail with "conf_path:line: message". */
static void expect_error_at(const char *text, unsigned line, const char *message, const char *name) {
        char expect[1024];

        snprintf(expect, sizeof(expect), "%s:%u: %s", conf_path, line, message);
        expect_error(text, expect, name);
}

/* The syntax rules of otad.conf(5): what the parser refuses, each with
 * file:line and the exact section, and what it accepts. */
static void test_syntax_refused(void) {
        struct otad_config *c = NULL;
        char expect[1024];
        _cleanup_free_ char *huge = NULL;
        _cleanup_free_ char *huge_text = NULL;
        int r;

        {
                _cleanup_free_ char *text = minimal("[target.app]\ntype = file\ndirectory = /var/lib/a@pp\n");
                r = load_with_nul(text, &c);
                snprintf(expect, sizeof(expect), "%s:10: NUL byte at column 23 in section [target.app]", conf_path);
                tap_ok(r == -EINVAL && !c && said(expect), "a NUL byte in a value is refused with file:line and the section");
        }
        {
                _cleanup_free_ char *text = minimal("[target.app]\ntype = \"file\ndirectory = /x\n");
                expect_error_at(text, 9, "The value of type in [target.app] has no closing quote",
                                "an unclosed quote is refused");
        }
        {
                _cleanup_free_ char *text = minimal("[slot.rootfs.a]\ndevice = \"/dev/sda2\" # root\nbootname = A\n");
                expect_error_at(text, 9, "Text after the closing quote of device in [slot.rootfs.a]: '# root'",
                                "text after a closing quote is refused");
        }
        huge = malloc(1024 * 1024 + 1);
        memset(huge, 'a', 1024 * 1024);
        huge[1024 * 1024] = '\0';
        if (asprintf(&huge_text, "[target.app]\ntype = file\ndirectory = /%s\n", huge) < 0)
                exit(2);
        {
                _cleanup_free_ char *text = minimal(huge_text);
                expect_error_at(text, 10, "Line longer than 4096 bytes in section [target.app]", "a 1 MiB value is refused");
        }
        {
                _cleanup_free_ char *text = minimal("[ota]\nwindow = 2\n[log]\nlevel = info\n[ota]\nblock_size = 1024\n");
                expect_error_at(text, 12, "Section [ota] already defined at line 8", "a repeated section header is refused");
        }
        {
                _cleanup_free_ char *text = minimal("port = 1\n[ota]\n[mqtt]\nport = 2\n");
                expect_error_at(text, 10, "Section [mqtt] already defined at line 2",
                                "a repeated [mqtt] is refused before its keys are compared");
        }
        {
                _cleanup_free_ char *text = minimal("[target.app]\ntype = file\ndirectroy = /x\n");
                expect_error_at(text, 10, "Unknown key 'directroy' in section [target.app]",
                                "an unknown key names [target.NAME], not [target]");
        }
        {
                _cleanup_free_ char *text = minimal("[slot.rootfs.a]\ndevice = /a\nbootnmae = A\n");
                expect_error_at(text, 10, "Unknown key 'bootnmae' in section [slot.rootfs.a]",
                                "an unknown key names [slot.CLASS.NAME]");
        }
        {
                _cleanup_free_ char *text = minimal("[target.app]\ntype = disk\n");
                expect_error_at(text, 9, "Invalid value 'disk' for type in [target.app]: expected one of file, ab, command",
                                "a bad value names [target.NAME]");
        }
        {
                _cleanup_free_ char *text = minimal("[slot.rootfs.a]\ndevice = /a\ndevice = /b\nbootname = A\n");
                expect_error_at(text, 10, "Key 'device' in [slot.rootfs.a] already set at line 9",
                                "a key set twice names [slot.CLASS.NAME]");
        }
        {
                _cleanup_free_ char *text = minimal("[target.app]\ntype = file\ndirectory\n");
                expect_error_at(text, 10, "Expected key = value in section [target.app]", "a key without = names the section");
        }
        {
                _cleanup_free_ char *text = minimal("[ota]\n= 4\n");
                expect_error_at(text, 9, "Empty key before '=' in section [ota]", "an empty key is refused");
        }
        {
                _cleanup_free_ char *text = minimal("[update]\nhealth_check = /bin/check\033[0m\n");
                expect_error_at(text, 9, "Control character 0x1b at column 26 in section [update]",
                                "a control character is refused with its column");
        }
        {
                _cleanup_free_ char *text = minimal("[update]\nversion = 1.0\x7f\n");
                expect_error_at(text, 9, "Control character 0x7f at column 14 in section [update]", "DEL is refused");
        }
        {
                _cleanup_free_ char *text = minimal("[update]\nversion = caf\xe9 1.0\n");
                expect_error_at(text, 9, "Invalid UTF-8 at column 14 in section [update]", "a Latin-1 byte is refused");
        }
        {
                _cleanup_free_ char *text = minimal("[update]\nversion = \xc0\xaf\n");
                expect_error_at(text, 9, "Invalid UTF-8 at column 11 in section [update]", "an overlong UTF-8 form is refused");
        }
        {
                _cleanup_free_ char *text = minimal("[ota] # transfers\n");
                expect_error_at(text, 8, "Text after the section header [ota]: '# transfers'",
                                "text after a section header is refused");
        }
        {
                _cleanup_free_ char *text = minimal("[target.app]\ntype = file\ndirectory = /a\n[target.app]\n");
                expect_error_at(text, 11, "Section [target.app] already defined at line 8", "a repeated [target.NAME] is refused");
        }
        {
                _cleanup_free_ char *text = minimal("[slot.rootfs.a]\ndevice = /a\nbootname = A\n[slot.rootfs.a]\n");
                expect_error_at(text, 11, "Section [slot.rootfs.a] already defined at line 8",
                                "a repeated [slot.CLASS.NAME] names the first line");
        }
        {
                _cleanup_free_ char *text = minimal("[slot.rootfs.a]\ndevice =   \nbootname = A\n");
                expect_error_at(text, 9, "device in [slot.rootfs.a] needs a value", "a blank required value is refused at its line");
        }
        {
                _cleanup_free_ char *text = minimal("[ota]\ntrust_dir = \"\"\n");
                expect_error_at(text, 9, "trust_dir in [ota] needs a value (remove the line for the default, /etc/otad/trust)",
                                "an empty value is refused where it means nothing");
        }
        {
                _cleanup_free_ char *text = minimal("port = +8883\n");
                expect_error_at(text, 8, "Invalid value '+8883' for port in [mqtt]: expected an integer from 1 to 65535",
                                "a number with a sign is refused");
        }
        {
                _cleanup_free_ char *text = minimal("[ota]\nwindow = \" 4\"\n");
                expect_error_at(text, 9, "Invalid value ' 4' for window in [ota]", "a number with blanks inside quotes is refused");
        }
        {
                _cleanup_free_ char *text = minimal("port = 8883 # TLS\n");
                expect_error_at(text, 8, "Invalid value '8883 # TLS' for port in [mqtt]",
                                "a comment after a value is part of it, so a number with one is refused");
        }
        {
                _cleanup_free_ char *text = minimal("keepalive = 99999999999999999999\n");
                expect_error_at(text, 8, "Invalid value '99999999999999999999' for keepalive in [mqtt]",
                                "a number beyond 64 bits is refused");
        }
        {
                _cleanup_free_ char *text = minimal("[update]\nallow_downgrade = enabled\n");
                expect_error_at(text, 9, "Invalid value 'enabled' for allow_downgrade in [update]: expected yes or no",
                                "a boolean other than the documented spellings is refused");
        }
        {
                _cleanup_free_ char *text = minimal("[update]\nhealth_check = \"check \\q\"\n");
                expect_error_at(text, 9, "Unknown escape '\\q' in the value of health_check in [update]",
                                "an unknown escape inside quotes is refused");
        }
        {
                _cleanup_free_ char *text = minimal("[target.this-name-is-far-too-long-for-a-target-0123456789012345678901234567890]\n");
                expect_error_at(text, 8, "Invalid target name 'this-name-is-far-too-long-for-a-target-0123456789012345678901234567890'",
                                "a target name longer than 64 is refused");
        }
        {
                _cleanup_free_ char *text = minimal("[update]\nreboot_policy = marker\n");
                expect_error_at(text, 9, "reboot_policy=marker in [update] needs reboot_marker=",
                                "a rule across keys names the line of the key");
        }
        {
                _cleanup_free_ char *text = minimal("reconnect_min = 60\nreconnect_max = 10\n");
                expect_error_at(text, 9, "reconnect_min (60) is larger than reconnect_max (10)",
                                "backoff bounds name the line");
        }
        {
                _cleanup_free_ char *text = minimal("[ota]\nwindow = 0\nwindow = 1\n[update]\nallow_downgrade = maybe\n");
                r = load(text, &c);
                snprintf(expect, sizeof(expect), "%s:9: Invalid value '0' for window", conf_path);
                tap_ok(r == -EINVAL && !c && said(expect) && !strstr(captured, "already set") &&
                       said(":12: Invalid value 'maybe' for allow_downgrade in [update]"),
                       "every syntax error is reported, not just the first");
        }
        {
                char junk[4096];

                for (size_t i = 0; i < sizeof(junk) - 1; i++)
                        junk[i] = i % 7 == 6 ? '\n' : (char) ('a' + i % 26);
                junk[sizeof(junk) - 1] = '\0';
                r = load(junk, &c);
                snprintf(expect, sizeof(expect), "%s: 20 errors, not reading further", conf_path);
                tap_ok(r == -EINVAL && !c && said(expect) && !strstr(captured, ":21:"),
                       "a file that is not a configuration stops after 20 errors");
        }
}

static void test_syntax_accepted(void) {
        _cleanup_free_ char *text = minimal(
                "\tport\t=\t443\t\r\n"
                "client_id = \"  gw 1  \"\n"
                "clean_session = OFF\n"
                "[update]\n"
                "version = 1.0 # not a comment\n"
                "health_check = grep -q \"ok\" /run/state\n"
                "reboot_command = \"\\\"/opt/my tools/reboot\\\" --now \\\\\"\n"
                "allow_downgrade = Yes\n"
                "reboot_marker = \"\"\n"
                "booted_slot = \"B\" \n"
                "os_release = /etc/os-r\xc3\xa9lease\n");
        _cleanup_free_ char *bom = NULL;
        struct otad_config *c = NULL;

        tap_is_int(load(text, &c), 0, "documented syntax loads");
        if (c) {
                tap_is_int(c->mqtt.port, 443, "tabs are blanks and a CRLF line ending is accepted");
                tap_is_str(c->mqtt.client_id, "  gw 1  ", "quotes keep leading and trailing blanks");
                tap_ok(!c->mqtt.clean_session, "booleans are read in any case");
                tap_ok(c->update.allow_downgrade, "Yes is yes");
                tap_is_str(c->update.version, "1.0 # not a comment", "a # after a value is part of it");
                tap_is_str(c->update.health_check, "grep -q \"ok\" /run/state", "quotes inside a bare value are kept");
                tap_is_str(c->update.reboot_command, "\"/opt/my tools/reboot\" --now \\", "\\\" and \\\\ are escapes inside quotes");
                tap_is_str(c->update.reboot_marker, "", "\"\" is the empty string");
                tap_is_str(c->update.booted_slot, "B", "blanks after a closing quote are dropped");
                tap_is_str(c->update.os_release, "/etc/os-r\xc3\xa9lease", "UTF-8 is accepted");
                config_free(c);
        }
        bom = minimal("");
        {
                _cleanup_free_ char *with_bom = NULL;

                if (asprintf(&with_bom, "\xef\xbb\xbf%s", bom) < 0)
                        exit(2);
                c = NULL;
                tap_is_int(load(with_bom, &c), 0, "a UTF-8 byte order mark at the start is ignored");
                config_free(c);
        }
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

static void path_in_dir(char *buf, size_t size, const char *name) {
        snprintf(buf, size, "%s/%s", dir, name);
}

/* Test PKI made here with OpenSSL: P-256 keys, self-signed certificates
 * valid from now + from_days until now + to_days. */
static EVP_PKEY *new_key(const char *type) {
        EVP_PKEY *key = strcmp(type, "EC") == 0 ? EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256")
                                                : EVP_PKEY_Q_keygen(NULL, NULL, type);
        if (!key)
                exit(2);
        return key;
}

static X509 *new_cert(EVP_PKEY *key, const char *cn, long from_days, long to_days) {
        X509 *x = X509_new();

        if (!x || X509_set_version(x, 2) != 1 || ASN1_INTEGER_set(X509_get_serialNumber(x), 1) != 1 ||
            !X509_gmtime_adj(X509_getm_notBefore(x), from_days * 86400) ||
            !X509_gmtime_adj(X509_getm_notAfter(x), to_days * 86400) || X509_set_pubkey(x, key) != 1 ||
            X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_ASC, (const unsigned char *) cn, -1, -1, 0) != 1 ||
            X509_set_issuer_name(x, X509_get_subject_name(x)) != 1 || X509_sign(x, key, EVP_sha256()) <= 0)
                exit(2);
        return x;
}

/* Writes the certificates (NULL-terminated) to dir/name. */
static void write_certs(const char *name, X509 *const *certs) {
        char path[600];
        FILE *f;

        path_in_dir(path, sizeof(path), name);
        f = fopen(path, "w");
        for (; f && *certs; certs++)
                if (PEM_write_X509(f, *certs) != 1)
                        exit(2);
        if (!f || fclose(f) != 0)
                exit(2);
        chmod(path, 0644);
}

static void write_cert(const char *name, EVP_PKEY *key, long from_days, long to_days) {
        X509 *cert = new_cert(key, name, from_days, to_days);

        write_certs(name, (X509 *const[]){ cert, NULL });
        X509_free(cert);
}

static void write_key(const char *name, EVP_PKEY *key, const char *passphrase) {
        char path[600];
        FILE *f;

        path_in_dir(path, sizeof(path), name);
        f = fopen(path, "w");
        if (!f || PEM_write_PrivateKey(f, key, passphrase ? EVP_aes_256_cbc() : NULL, NULL, 0, NULL,
                                       (void *) passphrase) != 1 || fclose(f) != 0)
                exit(2);
        chmod(path, 0600);
}

static unsigned check_warnings;

static int do_check(const void *config, void *unused) {
        check_warnings = 0;
        return config_check(config, &check_warnings);
}

static int check(const struct otad_config *c) {
        return capture(do_check, c, NULL);
}

/* said(), formatted. */
static bool saidf(const char *format, ...) __attribute__((format(printf, 1, 2)));
static bool saidf(const char *format, ...) {
        char what[1024];
        va_list ap;

        va_start(ap, format);
        vsnprintf(what, sizeof(what), format, ap);
        va_end(ap);
        return said(what);
}

static void test_check_files(void) {
        _cleanup_free_ char *text = minimal("");
        char path[600];
        struct otad_config *c = NULL;

        if (load(text, &c) < 0) {
                tap_ok(false, "config for file checks loads");
                return;
        }
        tap_ok(check(c) == -ENOENT && said("ca_file") && said("/ca.crt: No such file or directory") &&
               said("cert_file") && said("/gw.crt: No such file or directory") && said("key_file"),
               "check-config names every missing certificate file");

        {
                EVP_PKEY *key = new_key("EC"), *ca_key = new_key("EC");

                write_cert("ca.crt", ca_key, -1, 365);
                write_cert("gw.crt", key, -1, 365);
                write_key("gw.key", key, NULL);
                EVP_PKEY_free(key);
                EVP_PKEY_free(ca_key);
        }
        path_in_dir(path, sizeof(path), "gw.key");
        chmod(path, 0644);
        tap_ok(check(c) == -EPERM && said("is accessible by group or others (mode 0644)") && said("chmod 600"),
               "a world-readable private key is refused with a fix");
        chmod(path, 0640);
        tap_ok(check(c) == -EPERM && said("(mode 0640)"), "a group-readable private key is refused");
        chmod(path, 0600);
        tap_ok(check(c) == 0 && check_warnings == 0 && captured[0] == '\0', "a valid certificate and its key pass, silently");
        config_free(c);

        {
                _cleanup_free_ char *with_target = minimal("[target.app]\ntype = file\ndirectory = /nonexistent-otad-dir\n"
                                                           "[ota]\ntrust_dir = /nonexistent-otad-trust\n");
                if (load(with_target, &c) == 0) {
                        tap_ok(check(c) < 0 && said("trust_dir /nonexistent-otad-trust") &&
                               said("target directory /nonexistent-otad-dir"),
                               "check-config names a missing trust dir and target directory");
                        config_free(c);
                } else
                        tap_ok(false, "config with a target loads");
        }
}

/* The device certificate and key as the broker will judge them. */
static void test_check_client_certificate(void) {
        _cleanup_free_ char *text = minimal("");
        EVP_PKEY *key = new_key("EC"), *other = new_key("EC"), *ed = new_key("ED25519");
        struct otad_config *c = NULL;
        char path[600];

        if (load(text, &c) < 0) {
                tap_ok(false, "config for certificate checks loads");
                return;
        }
        write_cert("ca.crt", other, -1, 365);
        write_key("gw.key", key, NULL);

        path_in_dir(path, sizeof(path), "gw.crt");
        write_file(path, "cert\n", 0644);
        tap_ok(check(c) == -EBADMSG && saidf("cert_file %s/gw.crt holds no PEM certificate", dir),
               "a certificate file without a certificate is refused");

        write_file(path, "-----BEGIN CERTIFICATE-----\nMIIBnotbase64!!\n-----END CERTIFICATE-----\n", 0644);
        tap_ok(check(c) == -EBADMSG && saidf("cert_file %s/gw.crt: certificate 1 does not parse", dir),
               "a broken certificate block is refused");

        write_cert("gw.crt", key, -30, -1);
        tap_ok(check(c) == -EKEYEXPIRED && saidf("cert_file %s/gw.crt has expired: valid from 20", dir) &&
               said(" UTC until 20") && said("The broker will refuse it"),
               "an expired certificate is refused with its validity period");

        write_cert("gw.crt", key, 1, 30);
        tap_ok(check(c) == -EKEYEXPIRED && saidf("cert_file %s/gw.crt is not valid yet: valid from 20", dir) &&
               said("now is 20") && said("check the system clock"),
               "a certificate not valid yet is refused with the clock as the suspect");

        write_cert("gw.crt", key, -300, 10);
        tap_ok(check(c) == 0 && check_warnings == 1 && saidf("cert_file %s/gw.crt expires on 20", dir) &&
               said(", in 10 days: the broker will refuse it after that"),
               "a certificate expiring in 10 days passes with a warning");

        write_cert("gw.crt", key, -300, 45);
        tap_ok(check(c) == 0 && check_warnings == 0, "a certificate valid for 45 more days passes without a warning");

        write_key("gw.key", other, NULL);
        tap_ok(check(c) == -EKEYREJECTED && said("does not belong to cert_file") && saidf("key_file %s/gw.key", dir),
               "a key that is not the certificate's is refused");

        write_key("gw.key", ed, NULL);
        tap_ok(check(c) == -EKEYREJECTED && said("is an ED25519 key but cert_file") && said("holds an EC public key"),
               "a key of another type than the certificate's is refused");

        write_key("gw.key", key, "secret");
        tap_ok(check(c) == -EKEYREJECTED && said("is encrypted and otad cannot ask for its passphrase"),
               "an encrypted key is refused");

        path_in_dir(path, sizeof(path), "gw.key");
        write_file(path, "-----BEGIN PRIVATE KEY-----\n", 0644);
        tap_ok(check(c) == -EPERM && said("(mode 0644)") && said("holds no PEM private key"),
               "a readable, broken key names both problems");

        write_key("gw.key", other, NULL);
        chmod(path, 0644);
        tap_ok(check(c) == -EPERM && said("(mode 0644)") && said("does not belong to cert_file"),
               "a readable key of another certificate names both problems");

        write_key("gw.key", key, NULL);
        tap_ok(check(c) == 0, "the certificate's own key passes");

        EVP_PKEY_free(key);
        EVP_PKEY_free(other);
        EVP_PKEY_free(ed);
        config_free(c);
}

/* CA files: the broker's (ca_file), the HTTPS server's (http_ca_file),
 * the code signers' (signing_ca), and the code-signing certificates in
 * trust_dir. */
static void test_check_ca_files(void) {
        EVP_PKEY *key = new_key("EC"), *ca_key = new_key("EC");
        X509 *expired = new_cert(ca_key, "Old CA", -400, -1), *valid = new_cert(ca_key, "Current CA", -1, 400);
        _cleanup_free_ char *text = NULL;
        struct otad_config *c = NULL;
        char path[600], trust[600];
        int r;

        path_in_dir(trust, sizeof(trust), "trust");
        mkdir(trust, 0755);
        if (asprintf(&text, "[ota]\ntrust_dir = %s\nsigning_ca = %s/signing-ca.crt\nhttp_ca_file = %s/http-ca.crt\n"
                            "[target.app]\ntype = file\ndirectory = %s\n",
                     trust, dir, dir, dir) < 0)
                exit(2);
        {
                _cleanup_free_ char *full = minimal(text);

                if (load(full, &c) < 0) {
                        tap_ok(false, "config for CA checks loads");
                        return;
                }
        }
        write_cert("gw.crt", key, -1, 365);
        write_key("gw.key", key, NULL);
        write_certs("ca.crt", (X509 *const[]){ valid, NULL });
        write_certs("signing-ca.crt", (X509 *const[]){ valid, NULL });
        write_certs("http-ca.crt", (X509 *const[]){ expired, valid, NULL });

        tap_ok(check(c) == 0 && check_warnings == 2 &&
               saidf("http_ca_file %s/http-ca.crt: certificate /CN=Old CA is valid from 20", dir) &&
               saidf("trust_dir %s/trust holds no code-signing certificate: every OTA job will fail", dir),
               "an expired CA beside a current one and an empty trust_dir are warnings");

        path_in_dir(path, sizeof(path), "ca.crt");
        write_file(path, "AmazonRootCA1\n", 0644);
        tap_ok(check(c) == -EBADMSG && saidf("ca_file %s/ca.crt holds no PEM certificate", dir) &&
               said("the broker's certificate cannot be verified"),
               "a ca_file without a certificate is refused");

        write_certs("ca.crt", (X509 *const[]){ expired, NULL });
        tap_ok(check(c) == -EKEYEXPIRED && saidf("ca_file %s/ca.crt: none of its certificates is valid now", dir),
               "a ca_file whose only certificate expired is refused");
        write_certs("ca.crt", (X509 *const[]){ valid, NULL });

        path_in_dir(path, sizeof(path), "signing-ca.crt");
        write_file(path, "", 0644);
        tap_ok(check(c) == -EBADMSG && saidf("signing_ca %s/signing-ca.crt holds no PEM certificate", dir) &&
               said("code-signing certificates cannot be verified"),
               "an empty signing_ca is refused");
        write_certs("signing-ca.crt", (X509 *const[]){ valid, NULL });

        {
                X509 *signer = new_cert(key, "signer", -400, -1), *current = new_cert(key, "signer", -1, 400);
                char link[700];

                write_certs("trust/old-signer.pem", (X509 *const[]){ signer, NULL });
                write_certs("trust/signer.pem", (X509 *const[]){ current, NULL });
                path_in_dir(path, sizeof(path), "trust/notes.txt");
                write_file(path, "not a certificate\n", 0644);
                snprintf(link, sizeof(link), "%s/linked.pem", trust);
                path_in_dir(path, sizeof(path), "ca.crt");
                if (symlink(path, link) < 0)
                        exit(2);
                r = check(c);
                tap_ok(r == 0 && check_warnings == 4 &&
                       saidf("trust_dir %s/trust: code-signing certificate old-signer.pem is valid from 20", dir) &&
                       said("jobs signed with it will fail the chain check against signing_ca") &&
                       saidf("trust_dir %s/trust: linked.pem is a symlink, which otad refuses to follow", dir) &&
                       saidf("trust_dir %s/trust: notes.txt holds no PEM certificate", dir) &&
                       !strstr(captured, "certificate signer.pem"),
                       "trust_dir: an expired signer, a symlink and a stray file are warnings, a current signer is not");
                X509_free(signer);
                X509_free(current);
        }

        X509_free(expired);
        X509_free(valid);
        EVP_PKEY_free(key);
        EVP_PKEY_free(ca_key);
        config_free(c);
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
        test_syntax_refused();
        test_syntax_accepted();
        test_missing_file();
        test_check_files();
        test_check_client_certificate();
        test_check_ca_files();

        {
                char cmd[600];
                snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
                if (system(cmd) != 0)
                        tap_diag("failed to remove %s", dir);
        }
        return tap_done();
}
