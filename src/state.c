/* SPDX-License-Identifier: MIT */
#include <cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fileio.h"
#include "macro.h"
#include "state.h"

static const char *const stage_names[_STAGE_MAX] = {
        [STAGE_DOWNLOAD] = "download",
        [STAGE_VERIFY] = "verify",
        [STAGE_ACTIVATE] = "activate",
        [STAGE_REBOOT] = "reboot",
        [STAGE_SELF_TEST] = "self-test",
        [STAGE_COMMIT] = "commit",
        [STAGE_ROLLBACK] = "rollback",
        [STAGE_FAIL] = "fail",
};

const char *stage_to_string(enum stage stage) {
        return (unsigned) stage < _STAGE_MAX ? stage_names[stage] : NULL;
}

int stage_from_string(const char *s) {
        for (int i = 0; i < _STAGE_MAX; i++)
                if (strcmp(stage_names[i], s) == 0)
                        return i;
        return -EINVAL;
}

bool stage_is_terminal(enum stage stage) {
        return stage == STAGE_COMMIT || stage == STAGE_ROLLBACK || stage == STAGE_FAIL;
}

/* The record's fields, by name, so that load and save cannot drift. */
#define TEXT_FIELDS(X) \
        X(job_id) X(identity) X(protocol) X(targets) X(target) X(slot_class) X(old_slot) X(new_slot) \
        X(old_version) X(new_version) X(result) X(reason) X(detail)
#define NUMBER_FIELDS(X) \
        X(execution_number) X(starts) X(file_index) X(n_files) X(n_images) X(activated) X(done) X(total) X(fetched) X(reused) X(updated_at)

static int path_of(const char *dir, const char *name, char **ret) {
        return asprintf(ret, "%s/%s", dir, name) < 0 ? -ENOMEM : 0;
}

static void copy_text(char *dest, size_t size, const cJSON *obj, const char *key) {
        const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);

        if (cJSON_IsString(item))
                snprintf(dest, size, "%s", item->valuestring);
}

static double get_number(const cJSON *obj, const char *key) {
        const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);

        return cJSON_IsNumber(item) && item->valuedouble >= 0 ? item->valuedouble : 0;
}

int state_load(const char *dir, const char *name, struct state_record *ret) {
        _cleanup_free_ char *path = NULL, *text = NULL;
        struct state_record s = { 0 };
        const cJSON *stage;
        cJSON *root;
        int r;

        assert_return(dir && name && ret, -EINVAL);
        r = path_of(dir, name, &path);
        if (r < 0)
                return r;
        r = read_file_full(path, 64 * 1024, &text, NULL);
        if (r < 0)
                return r;
        root = cJSON_Parse(text);
        if (!cJSON_IsObject(root)) {
                cJSON_Delete(root);
                return -EBADMSG;
        }
        stage = cJSON_GetObjectItemCaseSensitive(root, "stage");
        r = cJSON_IsString(stage) ? stage_from_string(stage->valuestring) : -EBADMSG;
        if (r < 0) {
                cJSON_Delete(root);
                return -EBADMSG;
        }
        s.stage = (enum stage) r;
#define LOAD_TEXT(f) copy_text(s.f, sizeof(s.f), root, #f);
        TEXT_FIELDS(LOAD_TEXT)
#undef LOAD_TEXT
#define LOAD_NUMBER(f) s.f = (__typeof__(s.f)) get_number(root, #f);
        NUMBER_FIELDS(LOAD_NUMBER)
#undef LOAD_NUMBER
        s.reported = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "reported"));
        cJSON_Delete(root);
        if (!s.job_id[0])
                return -EBADMSG;
        *ret = s;
        return 0;
}

int state_save(const char *dir, const char *name, struct state_record *s) {
        _cleanup_free_ char *path = NULL, *text = NULL;
        cJSON *root;
        int r;

        assert_return(dir && name && s, -EINVAL);
        r = path_of(dir, name, &path);
        if (r < 0)
                return r;
        s->updated_at = (int64_t) time(NULL);
        root = cJSON_CreateObject();
        if (!root)
                return -ENOMEM;
        cJSON_AddStringToObject(root, "stage", stage_to_string(s->stage));
#define SAVE_TEXT(f) cJSON_AddStringToObject(root, #f, s->f);
        TEXT_FIELDS(SAVE_TEXT)
#undef SAVE_TEXT
#define SAVE_NUMBER(f) cJSON_AddNumberToObject(root, #f, (double) s->f);
        NUMBER_FIELDS(SAVE_NUMBER)
#undef SAVE_NUMBER
        cJSON_AddBoolToObject(root, "reported", s->reported);
        text = cJSON_Print(root);
        cJSON_Delete(root);
        if (!text)
                return -ENOMEM;
        return write_file_atomic(path, text, strlen(text), 0600);
}

int state_remove(const char *dir, const char *name) {
        _cleanup_free_ char *path = NULL;
        int r;

        assert_return(dir && name, -EINVAL);
        r = path_of(dir, name, &path);
        if (r < 0)
                return r;
        if (unlink(path) < 0 && errno != ENOENT)
                return -errno;
        return fsync_directory(dir);
}
