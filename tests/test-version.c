/* SPDX-License-Identifier: MIT */
/* version: the running version from [update] version or os-release(5), the
 * numeric comparison that refuses downgrades, and the reference agent's
 * updatedBy form (protocol.md §2.4). */
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "installer-test-util.h"
#include "version.h"

static char *dir;

/* The version os_release with this content gives, [update] version unset. */
static char *running_from(const char *os_release) {
        struct otad_config c = { 0 };
        char *path = xprintf("%s/os-release", dir), *v = NULL;

        if (os_release)
                write_bytes(path, os_release, strlen(os_release));
        else
                unlink(path);
        c.update.version = (char *) "";
        c.update.os_release = path;
        if (version_running(&c, &v) < 0)
                v = NULL;
        free(path);
        return v;
}

static void is_running(const char *os_release, const char *want, const char *name) {
        char *got = running_from(os_release);

        tap_is_str(got, want, name);
        free(got);
}

static const char *updated_by(const char *version) {
        static char buf[64];

        version_updated_by(version, buf, sizeof(buf));
        return buf;
}

int main(void) {
        struct otad_config c = { 0 };
        char *v = NULL;

        dir = make_scratch("test-version");

        is_running("NAME=Gateway\nVERSION_ID=2.1.0\nID=gw\n", "2.1.0", "VERSION_ID unquoted");
        is_running("VERSION_ID=\"2.1.0\"\n", "2.1.0", "double quotes removed");
        is_running("VERSION_ID='2.1.0'\n", "2.1.0", "single quotes removed");
        is_running("VERSION_ID=\"2.1.0'\n", "\"2.1.0'", "mismatched quotes kept");
        is_running("VERSION_ID=\"\n", "\"", "a lone quote is kept");
        is_running("VERSION_ID=\"\"\n", "", "an empty quoted VERSION_ID is empty");
        is_running("# VERSION_ID=9.9.9\nVERSION_ID=1.0\n", "1.0", "a comment is not the value");
        is_running("#VERSION_ID=9.9.9\n", "0", "only a commented VERSION_ID: \"0\"");
        is_running("VERSION=\"1.2 (bookworm)\"\nVERSION_ID_LIKE=7\n", "0", "no VERSION_ID: \"0\"");
        is_running("\n\nVERSION_ID=3\n\n", "3", "blank lines skipped");
        is_running("VERSION_ID=1\nVERSION_ID=2\n", "1", "the first VERSION_ID counts");
        is_running("VERSION_ID=4.5.6", "4.5.6", "no newline at the end");
        is_running(NULL, "0", "no os-release file: \"0\"");

        c.update.version = (char *) "7.0.1";
        c.update.os_release = (char *) "/nonexistent/os-release";
        tap_is_int(version_running(&c, &v), 0, "version_running with [update] version");
        tap_is_str(v, "7.0.1", "[update] version wins over os-release");
        free(v);

        tap_ok(version_compare("1.10", "1.9") > 0, "1.10 > 1.9");
        tap_ok(version_compare("1.9", "1.10") < 0, "1.9 < 1.10");
        tap_is_int(version_compare("2.0.0", "2.0.0"), 0, "equal");
        tap_is_int(version_compare("1.01", "1.1"), 0, "leading zeros compare numerically");
        tap_ok(version_compare("1.0", "1.0.0") < 0, "1.0 < 1.0.0");
        tap_ok(version_compare("2", "10") < 0, "2 < 10");
        tap_ok(version_compare("1.0a", "1.0b") < 0, "text parts compare as text");
        tap_ok(version_compare("1.0-rc1", "1.0") > 0, "a suffix sorts after the bare version");
        tap_ok(version_compare("v2", "v10") < 0, "digits after a common prefix compare numerically");
        tap_is_int(version_compare("", ""), 0, "empty versions are equal");
        tap_ok(version_compare("0", "") > 0, "something > nothing");

        tap_is_str(updated_by("1.2.3"), "0x01020003", "x.y.z in the reference agent's form");
        tap_is_str(updated_by("255.255.65535"), "0xffffffff", "the widest x.y.z");
        tap_is_str(updated_by("256.0.0"), "256.0.0", "major over 255: text");
        tap_is_str(updated_by("1.2.65536"), "1.2.65536", "build over 65535: text");
        tap_is_str(updated_by("1.2.3-rc1"), "1.2.3-rc1", "a suffix: text");
        tap_is_str(updated_by("1.2"), "1.2", "two components: text");
        tap_is_str(updated_by("0"), "0", "\"0\" stays \"0\"");
        tap_is_str(updated_by("  v1.0.0"), "  v1.0.0", "text as it is");

        remove_scratch(dir);
        free(dir);
        return tap_done();
}
