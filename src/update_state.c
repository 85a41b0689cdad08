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
#include "update_state.h"

static const char *const stage_names[_UPDATE_STAGE_MAX] = {
        [UPDATE_DOWNLOADING] = "downloading",
        [UPDATE_VERIFIED] = "verified",
        [UPDATE_ACTIVATED] = "activated",
        [UPDATE_TESTING] = "testing",
        [UPDATE_COMMITTED] = "committed",
        [UPDATE_ROLLED_BACK] = "rolled-back",
        [UPDATE_FAILED] = "failed",
};

const char *update_stage_to_string(enum update_stage stage) {
        return (unsigned) stage < _UPDATE_STAGE_MAX ? stage_names[stage] : NULL;
}

int update_stage_from_string(const char *s) {
        for (int i = 0; i < _UPDATE_STAGE_MAX; i++)
                if (strcmp(stage_names[i], s) == 0)
                        return i;
        return -EINVAL;
}

bool update_stage_is_terminal(enum update_stage stage) {
        return stage == UPDATE_COMMITTED || stage == UPDATE_ROLLED_BACK || stage == UPDATE_FAILED;
}

/* The record's text fields, by name, so that load and save cannot drift. */
#define TEXT_FIELDS(X) \
        X(job_id) X(identity) X(protocol) X(target) X(slot_class) X(old_slot) X(new_slot) \
        X(old_version) X(new_version) X(targets) X(result) X(reason) X(detail)

static int path_of(const char *dir, const char *name, char **ret) {
        return asprintf(ret, "%s/%s", dir, name) < 0 ? -ENOMEM : 0;
}

static void copy_text(char *dest, size_t size, const cJSON *obj, const char *key) {
        const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);

        if (cJSON_IsString(item))
                snprintf(dest, size, "%s", item->valuestring);
}

static int64_t get_number(const cJSON *obj, const char *key) {
        const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);

        return cJSON_IsNumber(item) ? (int64_t) item->valuedouble : 0;
}

int update_state_load(const char *dir, const char *name, struct update_state *ret) {
        _cleanup_free_ char *path = NULL, *text = NULL;
        struct update_state s = { 0 };
        const cJSON *stage;
        cJSON *root;
        int r;

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
        r = cJSON_IsString(stage) ? update_stage_from_string(stage->valuestring) : -EBADMSG;
        if (r < 0) {
                cJSON_Delete(root);
                return -EBADMSG;
        }
        s.stage = (enum update_stage) r;
#define LOAD_TEXT(f) copy_text(s.f, sizeof(s.f), root, #f);
        TEXT_FIELDS(LOAD_TEXT)
#undef LOAD_TEXT
        s.execution_number = get_number(root, "execution_number");
        s.file_index = (unsigned) get_number(root, "file_index");
        s.n_files = (unsigned) get_number(root, "n_files");
        s.done = (uint64_t) get_number(root, "done");
        s.total = (uint64_t) get_number(root, "total");
        s.updated_at = get_number(root, "updated_at");
        s.reported = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "reported"));
        s.reboot_requested = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "reboot_requested"));
        cJSON_Delete(root);
        if (!s.job_id[0])
                return -EBADMSG;
        *ret = s;
        return 0;
}

int update_state_save(const char *dir, const char *name, struct update_state *s) {
        _cleanup_free_ char *path = NULL, *text = NULL;
        cJSON *root;
        int r;

        r = path_of(dir, name, &path);
        if (r < 0)
                return r;
        s->updated_at = (int64_t) time(NULL);
        root = cJSON_CreateObject();
        if (!root)
                return -ENOMEM;
        cJSON_AddStringToObject(root, "stage", update_stage_to_string(s->stage));
#define SAVE_TEXT(f) cJSON_AddStringToObject(root, #f, s->f);
        TEXT_FIELDS(SAVE_TEXT)
#undef SAVE_TEXT
        cJSON_AddNumberToObject(root, "execution_number", (double) s->execution_number);
        cJSON_AddNumberToObject(root, "file_index", s->file_index);
        cJSON_AddNumberToObject(root, "n_files", s->n_files);
        cJSON_AddNumberToObject(root, "done", (double) s->done);
        cJSON_AddNumberToObject(root, "total", (double) s->total);
        cJSON_AddBoolToObject(root, "reported", s->reported);
        cJSON_AddBoolToObject(root, "reboot_requested", s->reboot_requested);
        cJSON_AddNumberToObject(root, "updated_at", (double) s->updated_at);
        text = cJSON_Print(root);
        cJSON_Delete(root);
        if (!text)
                return -ENOMEM;
        return write_file_atomic(path, text, strlen(text), 0600);
}

int update_state_remove(const char *dir, const char *name) {
        _cleanup_free_ char *path = NULL;
        int r;

        r = path_of(dir, name, &path);
        if (r < 0)
                return r;
        if (unlink(path) < 0 && errno != ENOENT)
                return -errno;
        return fsync_directory(dir);
}
