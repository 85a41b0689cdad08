/* SPDX-License-Identifier: MIT */
#include "installer.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "installers/backends.h"
#include "log.h"
#include "macro.h"

static const struct {
        enum target_type type;
        const struct installer_ops *ops;
} backends[] = {
        { TARGET_FILE, &installer_file_ops },
        { TARGET_AB, &installer_ab_ops },
        { TARGET_COMMAND, &installer_command_ops },
};

int installer_new(struct otad *otad, const struct config_target *target, const char *job_id,
                  struct installer **ret) {
        const struct installer_ops *ops = NULL;
        struct installer *in;

        for (size_t i = 0; i < ELEMENTSOF(backends); i++)
                if (backends[i].type == target->type)
                        ops = backends[i].ops;
        if (!ops)
                return log_error_errno(-EOPNOTSUPP, "[target.%s]: no installer for type %d", target->name,
                                       (int) target->type);
        in = calloc(1, sizeof(*in));
        if (!in)
                return -ENOMEM;
        in->ops = ops;
        in->target = target;
        in->otad = otad;
        in->job_id = strdup(job_id);
        if (!in->job_id) {
                free(in);
                return -ENOMEM;
        }
        *ret = in;
        return 0;
}

void installer_free(struct installer *in) {
        if (!in)
                return;
        if (in->ops->free)
                in->ops->free(in);
        free(in->job_id);
        free(in->reason);
        free(in);
}

void installer_set_activate_done(struct installer *in, installer_activate_done_t cb, void *userdata) {
        in->activate_done = cb;
        in->activate_userdata = userdata;
}

int installer_fail(struct installer *in, int error, const char *format, ...) {
        char *reason = NULL;
        va_list ap;

        va_start(ap, format);
        errno = error < 0 ? -error : error; /* for %m */
        if (vasprintf(&reason, format, ap) < 0)
                reason = NULL;
        va_end(ap);
        if (reason) {
                free(in->reason);
                in->reason = reason;
        }
        log_full(LOG_ERR, 0, &(const struct log_fields){ .job_id = in->job_id },
                 "[target.%s]: %s", in->target->name, reason ? reason : format);
        return error < 0 ? error : -error;
}

void installer_remove_private_file(const struct installer *in, const char *dir, const char *suffix) {
        _cleanup_free_ char *name = NULL, *path = NULL;

        if (installer_private_name(in, suffix, &name) < 0 || asprintf(&path, "%s/%s", dir, name) < 0)
                return;
        if (unlink(path) >= 0)
                log_job(LOG_DEBUG, in->job_id, NULL, "[target.%s]: removed %s", in->target->name, path);
}

int installer_private_name(const struct installer *in, const char *suffix, char **ret) {
        char *name;

        if (asprintf(&name, ".%s-%s.%s", in->target->name, in->job_id, suffix) < 0)
                return -ENOMEM;
        for (char *p = name + 1; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                      *p == '.' || *p == '_' || *p == '-'))
                        *p = '_';
        *ret = name;
        return 0;
}
