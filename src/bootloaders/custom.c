/* SPDX-License-Identifier: MIT */
/*
 * The custom backend: [bootloader] command= is a program (split on blanks,
 * no shell) called with the verbs of RAUC's custom bootloader interface:
 *
 *   get-primary                  prints the bootname booted next
 *   set-primary <slot>           boot <slot> next (the script's own scheme
 *                                decides how often before it falls back)
 *   get-state <slot>             prints "good" or "bad"
 *   set-state <slot> good|bad
 *
 * Exit status 0 means success; anything else fails the call. What the script
 * writes to stderr goes to otad's stderr (the journal).
 *
 *   set_try_once(X): set-primary X
 *   mark_good(X):    set-state X good, then set-primary X unless X is primary
 *   mark_bad(X):     set-state X bad, then set-primary <the other> if X is
 *                    still primary
 *
 * Every set is followed by the matching get and a comparison (-EIO on a
 * mismatch), like the GRUB and U-Boot backends' read-back.
 *
 * The script runs synchronously with a 10 s deadline rather than in the
 * event loop: it is called only at the few points where the update waits
 * for its answer anyway (activate, commit, rollback), a bootloader variable
 * write takes milliseconds, and 10 s stay well inside the MQTT keepalive
 * (30 s minimum), so the session survives a stuck script, which is killed.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends.h"
#include "config.h"
#include "log.h"
#include "macro.h"
#include "subprocess.h"

#define CUSTOM_TIMEOUT_USEC (10ULL * 1000000ULL)
#define CUSTOM_OUTPUT_MAX   4096

/* Runs "command verb [slot [arg]]"; on success *ret_out (if non-NULL) is
 * its stdout without surrounding blanks. */
static int custom_call(struct bootloader *b, const char *verb, const char *slot, const char *arg,
                       char **ret_out) {
        const char *command = b->config->bootloader.command;
        char **argv = NULL;
        _cleanup_free_ char *out = NULL;
        size_t n = 0, len;
        char *start;
        int status, r;

        r = subprocess_split_command(command, &argv);
        if (r == -EINVAL)
                return log_error_errno(r, "[bootloader] type=custom needs command=");
        if (r < 0)
                return r;
        while (argv[n])
                n++;
        {
                char **grown = realloc(argv, (n + 4) * sizeof(char *));

                if (!grown) {
                        subprocess_argv_free(argv);
                        return -ENOMEM;
                }
                argv = grown;
        }
        argv[n++] = strdup(verb);
        argv[n++] = slot ? strdup(slot) : NULL;
        argv[n++] = slot && arg ? strdup(arg) : NULL;
        argv[n] = NULL;

        r = subprocess_run(argv, CUSTOM_TIMEOUT_USEC, CUSTOM_OUTPUT_MAX, &out, &status);
        subprocess_argv_free(argv);
        if (r == -ETIMEDOUT)
                return log_error_errno(-EIO, "Custom bootloader '%s %s%s%s' did not finish within %llu s, killed",
                                       command, verb, slot ? " " : "", slot ? slot : "",
                                       CUSTOM_TIMEOUT_USEC / 1000000ULL);
        if (r < 0)
                return log_error_errno(r, "Failed to run custom bootloader '%s': %m", command);
        if (status != 0)
                return log_error_errno(-EIO, "Custom bootloader '%s %s%s%s%s%s' failed with exit status %d",
                                       command, verb, slot ? " " : "", slot ? slot : "",
                                       arg ? " " : "", arg ? arg : "", status);
        if (!ret_out)
                return 0;
        start = out + strspn(out, " \t\r\n");
        len = strlen(start);
        while (len > 0 && strchr(" \t\r\n", start[len - 1]))
                start[--len] = '\0';
        *ret_out = strdup(start);
        return *ret_out ? 0 : -ENOMEM;
}

static int custom_get_primary(struct bootloader *b, char **ret_bootname) {
        char *out = NULL;
        int r;

        r = custom_call(b, "get-primary", NULL, NULL, &out);
        if (r < 0)
                return r;
        if (!bootloader_knows(b, out)) {
                r = log_error_errno(-EIO, "Custom bootloader get-primary printed '%s', which is no configured bootname", out);
                free(out);
                return r;
        }
        *ret_bootname = out;
        return 0;
}

static int custom_get_state(struct bootloader *b, const char *bootname, bool *ret_good) {
        _cleanup_free_ char *out = NULL;
        int r;

        r = custom_call(b, "get-state", bootname, NULL, &out);
        if (r < 0)
                return r;
        if (strcmp(out, "good") == 0)
                *ret_good = true;
        else if (strcmp(out, "bad") == 0)
                *ret_good = false;
        else
                return log_error_errno(-EIO, "Custom bootloader get-state %s printed '%s' instead of good or bad", bootname, out);
        return 0;
}

static int set_primary_checked(struct bootloader *b, const char *bootname) {
        _cleanup_free_ char *primary = NULL;
        int r;

        r = custom_call(b, "set-primary", bootname, NULL, NULL);
        if (r < 0)
                return r;
        r = custom_get_primary(b, &primary);
        if (r < 0)
                return -EIO;
        if (strcmp(primary, bootname) != 0)
                return log_error_errno(-EIO, "Custom bootloader: get-primary says %s right after set-primary %s, refusing to continue",
                                       primary, bootname);
        return 0;
}

static int set_state_checked(struct bootloader *b, const char *bootname, bool good) {
        bool now;
        int r;

        r = custom_call(b, "set-state", bootname, good ? "good" : "bad", NULL);
        if (r < 0)
                return r;
        r = custom_get_state(b, bootname, &now);
        if (r < 0)
                return -EIO;
        if (now != good)
                return log_error_errno(-EIO, "Custom bootloader: get-state %s says %s right after set-state %s, refusing to continue",
                                       bootname, now ? "good" : "bad", good ? "good" : "bad");
        return 0;
}

static int custom_set_try_once(struct bootloader *b, const char *bootname) {
        return set_primary_checked(b, bootname);
}

static int custom_mark_good(struct bootloader *b, const char *bootname) {
        _cleanup_free_ char *primary = NULL;
        int r;

        r = set_state_checked(b, bootname, true);
        if (r < 0)
                return r;
        r = custom_get_primary(b, &primary);
        if (r < 0)
                return r;
        if (strcmp(primary, bootname) == 0)
                return 0;
        return set_primary_checked(b, bootname);
}

static int custom_mark_bad(struct bootloader *b, const char *bootname) {
        _cleanup_free_ char *primary = NULL;
        int r;

        r = set_state_checked(b, bootname, false);
        if (r < 0)
                return r;
        r = custom_get_primary(b, &primary);
        if (r < 0)
                return r;
        if (strcmp(primary, bootname) != 0)
                return 0;
        for (size_t i = 0; i < b->n_bootnames; i++)
                if (strcmp(b->bootnames[i], bootname) != 0)
                        return set_primary_checked(b, b->bootnames[i]);
        return log_error_errno(-ENOENT, "Custom bootloader: no slot other than %s to switch back to", bootname);
}

const struct bootloader_ops bootloader_custom_ops = {
        .name = "custom",
        .get_primary = custom_get_primary,
        .set_try_once = custom_set_try_once,
        .mark_good = custom_mark_good,
        .mark_bad = custom_mark_bad,
        .get_state = custom_get_state,
};
