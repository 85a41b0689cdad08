/* SPDX-License-Identifier: MIT */
#include <cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bootloader.h"
#include "config.h"
#include "fileio.h"
#include "log.h"
#include "macro.h"
#include "slot.h"
#include "status.h"
#include "state.h"

#define SLOT_VERSION_MAX 128

static int slot_version_path(const struct otad_config *config, const char *bootname, char **ret) {
        return asprintf(ret, "%s/slot-%s.version", config->state.directory, bootname) < 0 ? -ENOMEM : 0;
}

int status_record_slot_version(const struct otad_config *config, const char *bootname, const char *version) {
        _cleanup_free_ char *path = NULL, *old = NULL;
        int r;

        r = slot_version_path(config, bootname, &path);
        if (r < 0)
                return r;
        if (read_file_full(path, SLOT_VERSION_MAX, &old, NULL) >= 0 && strcmp(old, version) == 0)
                return 0; /* unchanged: no write on every start */
        return write_file_atomic(path, version, strlen(version), 0600);
}

static cJSON *state_to_json(const struct state_record *s) {
        cJSON *o = cJSON_CreateObject();

        cJSON_AddStringToObject(o, "job_id", s->job_id);
        cJSON_AddStringToObject(o, "stage", stage_to_string(s->stage));
        cJSON_AddNumberToObject(o, "percent", s->total ? (double) (s->done * 100 / s->total) : 0);
        cJSON_AddNumberToObject(o, "bytes_done", (double) s->done);
        cJSON_AddNumberToObject(o, "bytes_total", (double) s->total);
        cJSON_AddNumberToObject(o, "bytes_fetched", (double) s->fetched);
        cJSON_AddNumberToObject(o, "bytes_reused", (double) s->reused);
        cJSON_AddNumberToObject(o, "file_index", s->file_index);
        cJSON_AddNumberToObject(o, "files", s->n_files);
        cJSON_AddStringToObject(o, "protocol", s->protocol);
        cJSON_AddStringToObject(o, "targets", s->targets);
        cJSON_AddStringToObject(o, "old_slot", s->old_slot);
        cJSON_AddStringToObject(o, "new_slot", s->new_slot);
        cJSON_AddStringToObject(o, "old_version", s->old_version);
        cJSON_AddStringToObject(o, "new_version", s->new_version);
        if (s->result[0]) {
                cJSON_AddStringToObject(o, "result", s->result);
                cJSON_AddStringToObject(o, "reason", s->reason);
                cJSON_AddStringToObject(o, "detail", s->detail);
                cJSON_AddBoolToObject(o, "reported", s->reported);
        }
        cJSON_AddNumberToObject(o, "updated_at", (double) s->updated_at);
        return o;
}

/* Everything `otad status` shows, gathered once; both forms print it. */
static cJSON *gather(const struct otad_config *config) {
        cJSON *root = cJSON_CreateObject(), *slots = cJSON_AddArrayToObject(root, "slots");
        struct bootloader *b = NULL;
        _cleanup_free_ char *primary = NULL;
        struct state_record s;

        if (config->bootloader.type != BOOTLOADER_NONE && bootloader_new(config, &b) >= 0)
                bootloader_get_primary(b, &primary);
        cJSON_AddStringToObject(root, "bootloader", bootloader_type_to_string(config->bootloader.type));
        cJSON_AddStringToObject(root, "primary_slot", primary ? primary : "");
        for (size_t i = 0; i < config->n_slots; i++) {
                const struct config_slot *slot = &config->slots[i], *booted = NULL;
                cJSON *o = cJSON_CreateObject();
                _cleanup_free_ char *path = NULL, *version = NULL;
                bool good = false;

                cJSON_AddStringToObject(o, "class", slot->class_name);
                cJSON_AddStringToObject(o, "name", slot->name);
                cJSON_AddStringToObject(o, "bootname", slot->bootname);
                cJSON_AddStringToObject(o, "device", slot->device);
                cJSON_AddBoolToObject(o, "booted", slot_booted(config, slot->class_name, NULL, &booted) >= 0 &&
                                                           booted == slot);
                cJSON_AddBoolToObject(o, "primary", primary && strcmp(primary, slot->bootname) == 0);
                if (b && bootloader_get_state(b, slot->bootname, &good) >= 0)
                        cJSON_AddStringToObject(o, "state", good ? "good" : "bad");
                else
                        cJSON_AddStringToObject(o, "state", "unknown");
                if (slot_version_path(config, slot->bootname, &path) >= 0 &&
                    read_file_full(path, SLOT_VERSION_MAX, &version, NULL) >= 0)
                        cJSON_AddStringToObject(o, "version", version);
                else
                        cJSON_AddNullToObject(o, "version");
                cJSON_AddItemToArray(slots, o);
        }
        bootloader_free(b);
        if (state_load(config->state.directory, STATE_CURRENT_FILE, &s) >= 0)
                cJSON_AddItemToObject(root, "job", state_to_json(&s));
        else
                cJSON_AddNullToObject(root, "job");
        if (state_load(config->state.directory, STATE_LAST_FILE, &s) >= 0)
                cJSON_AddItemToObject(root, "last", state_to_json(&s));
        else
                cJSON_AddNullToObject(root, "last");
        return root;
}

static const char *text(const cJSON *o, const char *key) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);

        return cJSON_IsString(v) ? v->valuestring : "";
}

static double number(const cJSON *o, const char *key) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);

        return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

static void print_human(const cJSON *root) {
        const cJSON *slot, *job = cJSON_GetObjectItemCaseSensitive(root, "job");
        const cJSON *last = cJSON_GetObjectItemCaseSensitive(root, "last");

        printf("Bootloader:  %s%s%s\n", text(root, "bootloader"), *text(root, "primary_slot") ? ", boots " : "",
               text(root, "primary_slot"));
        cJSON_ArrayForEach(slot, cJSON_GetObjectItemCaseSensitive(root, "slots")) {
                const cJSON *version = cJSON_GetObjectItemCaseSensitive(slot, "version");

                printf("Slot %-6s  %s.%s %s, %s%s%s, version %s\n", text(slot, "bootname"), text(slot, "class"),
                       text(slot, "name"), text(slot, "device"), text(slot, "state"),
                       cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(slot, "booted")) ? ", booted" : "",
                       cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(slot, "primary")) ? ", primary" : "",
                       cJSON_IsString(version) ? version->valuestring : "unknown");
        }
        if (cJSON_IsObject(job))
                printf("Job:         %s: %s, %.0f%% (%.0f of %.0f bytes, file %.0f of %.0f over %s)\n",
                       text(job, "job_id"), text(job, "stage"), number(job, "percent"), number(job, "bytes_done"),
                       number(job, "bytes_total"), number(job, "file_index") + (number(job, "file_index") <
                                                                                 number(job, "files")),
                       number(job, "files"), text(job, "protocol"));
        else
                printf("Job:         none\n");
        if (cJSON_IsObject(job) && (number(job, "bytes_fetched") > 0 || number(job, "bytes_reused") > 0))
                printf("             %.0f bytes fetched, %.0f bytes reused from the running slot\n",
                       number(job, "bytes_fetched"), number(job, "bytes_reused"));
        if (cJSON_IsObject(last)) {
                time_t when = (time_t) number(last, "updated_at");
                char stamp[32];

                strftime(stamp, sizeof(stamp), "%Y-%m-%d %H:%M:%S", localtime(&when));
                printf("Last result: %s: %s, %s%s%s%s (%s)\n", text(last, "job_id"), text(last, "result"),
                       text(last, "reason"), *text(last, "detail") ? " (" : "", text(last, "detail"),
                       *text(last, "detail") ? ")" : "", stamp);
        } else
                printf("Last result: none\n");
}

int status_print(const struct otad_config *config, bool json) {
        cJSON *root = gather(config);
        char *out;

        if (!root)
                return -ENOMEM;
        if (json) {
                out = cJSON_Print(root);
                if (out)
                        printf("%s\n", out);
                free(out);
        } else
                print_human(root);
        cJSON_Delete(root);
        return 0;
}
