/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-bus.h>
#include <unistd.h>

#include "log.h"
#include "macro.h"
#include "sandbox.h"

static void strv_freep(char ***p) {
        if (!*p)
                return;
        for (char **s = *p; *s; s++)
                free(*s);
        free(*p);
}

/* path is dir or below it; dir "/" holds everything. */
static bool path_under(const char *path, const char *dir) {
        size_t n = strlen(dir);

        while (n > 0 && dir[n - 1] == '/')
                n--;
        return strncmp(path, dir, n) == 0 && (path[n] == '\0' || path[n] == '/');
}

/* What ProtectSystem= mounts read-only (systemd.exec(5)); strict: all but
 * the API file systems. */
static bool protected_by(const char *protect_system, const char *path) {
        static const char *const yes[] = { "/usr", "/boot", "/efi", NULL };
        static const char *const full[] = { "/usr", "/boot", "/efi", "/etc", NULL };
        static const char *const strict_open[] = { "/dev", "/proc", "/sys", NULL };
        const char *const *list;

        if (strcmp(protect_system, "strict") == 0) {
                for (list = strict_open; *list; list++)
                        if (path_under(path, *list))
                                return false;
                return true;
        }
        list = strcmp(protect_system, "full") == 0 ? full : strcmp(protect_system, "yes") == 0 ? yes : NULL;
        for (; list && *list; list++)
                if (path_under(path, *list))
                        return true;
        return false;
}

/* The unit's ProtectSystem= and ReadWritePaths=, drop-ins included, from
 * systemd itself. As root through systemd's private socket, which needs no
 * D-Bus daemon (systemctl does the same). */
static int unit_sandbox(char **ret_protect_system, char ***ret_read_write) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_free_ char *object = NULL, *protect_system = NULL;
        char **read_write = NULL;
        int r;

        if (geteuid() == 0) {
                r = sd_bus_new(&bus);
                if (r >= 0)
                        r = sd_bus_set_address(bus, "unix:path=/run/systemd/private");
                if (r >= 0)
                        r = sd_bus_start(bus);
        } else
                r = sd_bus_open_system(&bus);
        if (r < 0)
                return r;
        r = sd_bus_path_encode("/org/freedesktop/systemd1/unit", OTAD_UNIT, &object);
        if (r < 0)
                return r;
        r = sd_bus_get_property_string(bus, "org.freedesktop.systemd1", object, "org.freedesktop.systemd1.Service",
                                       "ProtectSystem", &error, &protect_system);
        if (r < 0)
                return r;
        r = sd_bus_get_property_strv(bus, "org.freedesktop.systemd1", object, "org.freedesktop.systemd1.Service",
                                     "ReadWritePaths", &error, &read_write);
        if (r < 0)
                return r;
        *ret_protect_system = take_ptr(&protect_system);
        *ret_read_write = read_write;
        return 0;
}

char *sandbox_advice(const char *path) {
        char *advice;

        if (asprintf(&advice, "%s keeps %s read-only: %sadd \"ReadWritePaths=%s\" in a drop-in (systemctl edit %s) and restart otad",
                     OTAD_UNIT, path, access(path, F_OK) < 0 ? "create it, " : "", path, OTAD_UNIT) < 0)
                return NULL;
        return advice;
}

int sandbox_check_writable(const char *path, const char *what) {
        _cleanup_(strv_freep) char **read_write = NULL;
        _cleanup_free_ char *protect_system = NULL, *real = NULL, *advice = NULL;
        int r;

        /* Inside the sandbox (the service, or a check run under the same
         * properties) the kernel knows. */
        if (access(path, W_OK) < 0 && errno == EROFS)
                goto read_only;

        r = unit_sandbox(&protect_system, &read_write);
        if (r < 0) {
                log_full(LOG_DEBUG, r, NULL, "Cannot ask systemd about %s (%m), not checking %s %s against its sandbox",
                         OTAD_UNIT, what, path);
                return 0;
        }
        /* systemd mounts ReadWritePaths= where their symlinks lead. */
        real = realpath(path, NULL);
        if (!protected_by(protect_system, real ? real : path))
                return 0;
        for (char **p = read_write; p && *p; p++) {
                _cleanup_free_ char *entry = realpath(*p + strspn(*p, "-+"), NULL);

                if (path_under(real ? real : path, entry ? entry : *p + strspn(*p, "-+")))
                        return 0;
        }
read_only:
        advice = sandbox_advice(path);
        return log_error_errno(-EROFS, "%s %s: %s", what, path, advice ? advice : "read-only in the sandbox");
}
