/* SPDX-License-Identifier: MIT */
#include <cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <fnmatch.h>
#include <inttypes.h>
#include <stdarg.h>
#include <time.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-event.h>
#include <unistd.h>

#include "bootloader.h"
#include "config.h"
#include "download.h"
#include "fileio.h"
#include "http.h"
#include "installer.h"
#include "jobs.h"
#include "log.h"
#include "macro.h"
#include "ota.h"
#include "ota_document.h"
#include "ota_private.h"
#include "stream.h"
#include "update_state.h"
#include "verify.h"

/* The reference agent counts HTTP progress in 4 KiB blocks too. */
#define HTTP_PROGRESS_BLOCK 4096
/* Progress is checkpointed into update.json at most this often. */
#define SAVE_INTERVAL_USEC (2 * 1000000ULL)

static uint64_t monotonic_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000ULL + (uint64_t) ts.tv_nsec / 1000;
}

void ota_format_reason(char *buf, size_t size, const char *word, unsigned code, unsigned sub) {
        /* "<word>: 0x%08x" or "0x%08x: 0x%08x", 8 lowercase hex digits, as
         * the reference agent writes them. */
        if (word)
                snprintf(buf, size, "%s: 0x%08x", word, code);
        else
                snprintf(buf, size, "0x%08x: 0x%08x", code, sub);
}

int ota_running_version(const struct otad_config *config, char **ret) {
        _cleanup_free_ char *text = NULL;
        char *version = NULL;

        if (*config->update.version)
                version = strdup(config->update.version);
        else if (read_file_full(config->update.os_release, 64 * 1024, &text, NULL) >= 0) {
                for (char *line = strtok(text, "\n"); line && !version; line = strtok(NULL, "\n")) {
                        size_t n;

                        if (strncmp(line, "VERSION_ID=", 11) != 0)
                                continue;
                        line += 11;
                        n = strlen(line);
                        if (n >= 2 && (line[0] == '"' || line[0] == '\'') && line[n - 1] == line[0]) {
                                line[n - 1] = '\0';
                                line++;
                        }
                        version = strdup(line);
                }
        }
        if (!version)
                version = strdup("0");
        if (!version)
                return -ENOMEM;
        *ret = version;
        return 0;
}

int ota_version_compare(const char *a, const char *b) {
        while (*a || *b) {
                if (isdigit((unsigned char) *a) && isdigit((unsigned char) *b)) {
                        unsigned long long x = strtoull(a, (char **) &a, 10);
                        unsigned long long y = strtoull(b, (char **) &b, 10);

                        if (x != y)
                                return x < y ? -1 : 1;
                } else {
                        if (*a != *b)
                                return (unsigned char) *a < (unsigned char) *b ? -1 : 1;
                        a++;
                        b++;
                }
        }
        return 0;
}

void ota_version_updated_by(const char *version, char *buf, size_t size) {
        unsigned major, minor, build;
        char tail;

        if (sscanf(version, "%u.%u.%u%c", &major, &minor, &build, &tail) == 3 && major < 256 && minor < 256 &&
            build < 65536)
                snprintf(buf, size, "0x%08x", (major << 24) | (minor << 16) | build);
        else
                snprintf(buf, size, "%s", version);
}

static int on_kick(sd_event_source *s, void *userdata);

void ota_kick(struct ota *ota) {
        sd_event_source_set_enabled(ota->kick, SD_EVENT_ONESHOT);
}

int ota_report(struct ota *ota, enum job_status status, const struct status_detail *details, unsigned flags,
               jobs_update_done_fn done) {
        int r;

        if (!ota->job_id || !ota->job_present)
                return -ESRCH;
        r = jobs_update(ota->otad->jobs, ota->job_id, status, details, flags, done, ota);
        if (r < 0)
                log_job(LOG_WARNING, ota->job_id, "report", "Failed to send %s update: %s",
                        job_status_to_string(status), strerror(-r));
        return r;
}

static char *progress_path(struct ota *ota, unsigned index) {
        char *path;

        if (asprintf(&path, "%s/file-%u.progress", ota->otad->config->state.directory, index) < 0)
                return NULL;
        return path;
}

static void remove_progress_files(struct ota *ota) {
        for (unsigned i = 0; i < OTA_DOCUMENT_MAX_FILES; i++) {
                _cleanup_free_ char *path = progress_path(ota, i);

                if (path)
                        unlink(path);
        }
        fsync_directory(ota->otad->config->state.directory);
}

static void stop_transfer(struct ota *ota) {
        stream_download_free(ota->stream);
        ota->stream = NULL;
        http_download_free(ota->http);
        ota->http = NULL;
        ota->transfer_done = false;
}

static void free_images(struct ota *ota, bool abort_them) {
        for (size_t i = 0; i < ota->n_images; i++) {
                struct installer *in = ota->images[i].installer;

                if (in && abort_them && in->ops->abort)
                        in->ops->abort(in);
                installer_free(in);
        }
        memset(ota->images, 0, sizeof(ota->images));
        ota->n_images = 0;
}

/* Drops the job from memory: transfers stop, installers close. What is on
 * disk (state, partial files) is the caller's decision. */
void ota_forget_job(struct ota *ota) {
        stop_transfer(ota);
        free_images(ota, false);
        ota_document_free(ota->doc);
        ota->doc = NULL;
        free(ota->job_id);
        ota->job_id = NULL;
        ota->job_present = false;
        ota->activating = false;
        ota->needs_reboot = false;
        ota->activate_index = 0;
        ota->file_done = 0;
        ota->active_reported = false;
        ota->terminal_sent = false;
        ota->reboot_requested = false;
        memset(&ota->state, 0, sizeof(ota->state));
        otad_set_status(ota->otad, "idle, waiting for jobs");
}

/* A job that ends before any slot was activated: undo what it wrote,
 * report FAILED in the reference form plus a sentence, remember it. */
static void ota_fail(struct ota *ota, const char *reason, const char *format, ...)
        __attribute__((format(printf, 3, 4)));
static void ota_fail(struct ota *ota, const char *reason, const char *format, ...) {
        char detail[512];
        va_list ap;

        va_start(ap, format);
        vsnprintf(detail, sizeof(detail), format, ap);
        va_end(ap);
        stop_transfer(ota);
        free_images(ota, true);
        remove_progress_files(ota);
        update_finish(ota, UPDATE_FAILED, "FAILED", reason, detail);
}

static const struct config_target *route_file(const struct otad_config *config, const struct ota_document_file *f) {
        for (size_t i = 0; i < config->n_targets; i++) {
                const struct config_target *t = &config->targets[i];

                if (t->match_file_type >= 0 && (unsigned) t->match_file_type != f->file_type)
                        continue;
                if (fnmatch(t->match_filepath, f->image, 0) != 0)
                        continue;
                return t;
        }
        return NULL;
}

/* What identifies the job's files for resuming: an identical job delivered
 * again (with fresh presigned URLs) matches, a changed size, signature,
 * target or transfer does not. */
static void compute_identity(struct ota *ota, char ret[65]) {
        EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        unsigned char digest[32];
        unsigned len = 0;
        char buf[128];

        EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
        EVP_DigestUpdate(ctx, ota->job_id, strlen(ota->job_id) + 1);
        snprintf(buf, sizeof(buf), "%d", (int) ota->protocol);
        EVP_DigestUpdate(ctx, buf, strlen(buf) + 1);
        for (size_t i = 0; i < ota->doc->n_files; i++) {
                const struct ota_document_file *f = &ota->doc->files[i];

                snprintf(buf, sizeof(buf), "%u:%" PRIu32 ":%u:%" PRIu64, f->fileid, f->filesize, f->file_type,
                         f->part_offset);
                EVP_DigestUpdate(ctx, buf, strlen(buf) + 1);
                if (f->signature)
                        EVP_DigestUpdate(ctx, f->signature, strlen(f->signature) + 1);
                EVP_DigestUpdate(ctx, f->image, strlen(f->image) + 1);
        }
        for (size_t i = 0; i < ota->n_images; i++)
                EVP_DigestUpdate(ctx, ota->images[i].target->name, strlen(ota->images[i].target->name) + 1);
        EVP_DigestFinal_ex(ctx, digest, &len);
        EVP_MD_CTX_free(ctx);
        for (unsigned i = 0; i < 32; i++)
                snprintf(ret + 2 * i, 3, "%02x", digest[i]);
}

/* Groups files[] into images (a whole file, or consecutive parts of one)
 * and gives each the first target that accepts it. */
static int plan_images(struct ota *ota, char *detail, size_t size) {
        const struct ota_document *doc = ota->doc;

        for (unsigned i = 0; i < doc->n_files;) {
                const struct ota_document_file *f = &doc->files[i];
                struct ota_image *img = &ota->images[ota->n_images];
                unsigned n = 1;

                if (f->is_part)
                        while (i + n < doc->n_files && doc->files[i + n].is_part && doc->files[i + n].part_offset > 0)
                                n++;
                img->target = route_file(ota->otad->config, f);
                if (!img->target) {
                        snprintf(detail, size, "no [target.*] accepts files[%u] (filepath \"%.64s\", fileType %u)", i,
                                 f->image, f->file_type);
                        return -ENOENT;
                }
                /* A target holds one image: two would overwrite each other. */
                for (size_t k = 0; k < ota->n_images; k++)
                        if (ota->images[k].target == img->target) {
                                snprintf(detail, size, "files[%u] and files[%u] both go to [target.%s], which takes one image per job",
                                         ota->images[k].first, i, img->target->name);
                                return -EEXIST;
                        }
                img->first = i;
                img->count = n;
                img->size = f->is_part ? f->image_size : f->filesize;
                ota->n_images++;
                i += n;
        }
        /* A/B images activate last: a file or command target that fails
         * then leaves no slot armed for a reboot. */
        for (size_t i = 0, moved = 0; i + moved < ota->n_images;) {
                struct ota_image img = ota->images[i];

                if (img.target->type != TARGET_AB) {
                        i++;
                        continue;
                }
                memmove(&ota->images[i], &ota->images[i + 1], (ota->n_images - i - 1) * sizeof(img));
                ota->images[ota->n_images - 1] = img;
                moved++;
        }
        return 0;
}

static struct ota_image *image_of_file(struct ota *ota, unsigned file_index) {
        for (size_t i = 0; i < ota->n_images; i++)
                if (file_index >= ota->images[i].first && file_index < ota->images[i].first + ota->images[i].count)
                        return &ota->images[i];
        return NULL;
}

static int choose_protocol(struct ota *ota) {
        unsigned offered = ota->doc->protocols;
        enum ota_protocol preferred = ota->otad->config->ota.protocol;

        if (preferred == OTA_PROTOCOL_HTTP && (offered & OTA_DOCUMENT_HTTP))
                return OTA_PROTOCOL_HTTP;
        if ((offered & OTA_DOCUMENT_MQTT) && ota->doc->stream_name)
                return OTA_PROTOCOL_MQTT;
        if (offered & OTA_DOCUMENT_HTTP)
                return OTA_PROTOCOL_HTTP;
        return -EPROTONOSUPPORT;
}

/* download_ops: the transfer of files[state.file_index] */

static int on_transfer_write(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct ota *ota = userdata;
        const struct ota_document_file *f = &ota->doc->files[ota->state.file_index];
        struct ota_image *img = image_of_file(ota, ota->state.file_index);

        if (offset > f->filesize || len > f->filesize - offset)
                return -ERANGE;
        return img->installer->ops->write(img->installer, f->part_offset + offset, buf, len);
}

static int on_transfer_sync(void *userdata) {
        struct ota *ota = userdata;
        struct ota_image *img = image_of_file(ota, ota->state.file_index);
        uint64_t now = monotonic_usec();
        int r;

        r = img->installer->ops->sync(img->installer);
        if (r < 0)
                return r;
        /* update.json carries progress for `otad status`; the transfer's
         * own record is what resuming relies on. */
        if (now - ota->last_save_usec >= SAVE_INTERVAL_USEC) {
                ota->last_save_usec = now;
                update_state_save(ota->otad->config->state.directory, UPDATE_STATE_FILE, &ota->state);
        }
        return 0;
}

static void report_progress(struct ota *ota, uint64_t done_blocks, uint64_t total_blocks) {
        char receive[48];
        const struct status_detail details[] = {
                { "receive", receive },
                { NULL, NULL },
        };
        uint64_t now = monotonic_usec();
        uint64_t interval = (uint64_t) ota->otad->config->ota.progress_interval * 1000000ULL;

        /* The first block, the last one, and otherwise at most once per
         * progress_interval: the service gets a heartbeat, not a flood
         * (AWS counts every publish against 100/s per connection). */
        if (done_blocks == 0 ||
            (done_blocks != 1 && done_blocks != total_blocks && now - ota->last_progress_usec < interval))
                return;
        ota->last_progress_usec = now;
        snprintf(receive, sizeof(receive), "%" PRIu64 "/%" PRIu64, done_blocks, total_blocks);
        ota_report(ota, JOB_IN_PROGRESS, details, JOBS_UPDATE_PROGRESS, NULL);
}

static void on_transfer_progress(uint64_t done, uint64_t total, void *userdata) {
        struct ota *ota = userdata;
        const struct ota_document_file *f = &ota->doc->files[ota->state.file_index];
        uint64_t before = 0;
        unsigned percent;

        for (unsigned i = 0; i < ota->state.file_index; i++)
                before += ota->doc->files[i].filesize;
        if (ota->protocol == OTA_PROTOCOL_MQTT) {
                /* done/total count blocks; bytes are close enough for status. */
                ota->file_done = total ? f->filesize * done / total : 0;
                report_progress(ota, done, total);
        } else {
                ota->file_done = done;
                report_progress(ota, (done + HTTP_PROGRESS_BLOCK - 1) / HTTP_PROGRESS_BLOCK,
                                (total + HTTP_PROGRESS_BLOCK - 1) / HTTP_PROGRESS_BLOCK);
        }
        ota->state.done = before + ota->file_done;
        percent = ota->state.total ? (unsigned) (ota->state.done * 100 / ota->state.total) : 0;
        otad_set_status(ota->otad, "job %s: downloading file %u/%u over %s, %u%%", ota->job_id,
                        ota->state.file_index + 1, ota->state.n_files, ota->state.protocol, percent);
}

static void on_transfer_need_url(void *userdata) {
        struct ota *ota = userdata;

        log_job(LOG_INFO, ota->job_id, "download", "Presigned URL refused, asking the service for the job again");
        jobs_request_refresh(ota->otad->jobs);
}

static void on_transfer_finished(int result, const char *reason, void *userdata) {
        struct ota *ota = userdata;

        ota->transfer_done = true;
        ota->transfer_result = result;
        snprintf(ota->transfer_reason, sizeof(ota->transfer_reason), "%s", reason ? reason : "");
        ota_kick(ota);
}

static const struct download_ops transfer_ops = {
        .write = on_transfer_write,
        .sync = on_transfer_sync,
        .progress = on_transfer_progress,
        .need_fresh_url = on_transfer_need_url,
        .finished = on_transfer_finished,
};

static int start_transfer(struct ota *ota) {
        unsigned index = ota->state.file_index;
        const struct ota_document_file *f = &ota->doc->files[index];
        struct ota_image *img = image_of_file(ota, index);
        _cleanup_free_ char *state_path = progress_path(ota, index);
        struct download_file file = {
                .job_id = ota->job_id,
                .file_index = index,
                .size = f->filesize,
                .signature = f->signature ? f->signature : "",
                .state_path = state_path,
        };
        int r;

        if (!state_path)
                return -ENOMEM;
        if (!img->begun) {
                /* resume: an earlier run of this very job may have written
                 * blocks the progress records still count. */
                r = img->installer->ops->begin(img->installer, img->size, true);
                if (r < 0)
                        return r;
                img->begun = true;
        }
        ota->file_done = 0;
        ota->transfer_done = false;
        if (ota->protocol == OTA_PROTOCOL_MQTT)
                r = stream_download_new(ota->otad, ota->doc->stream_name, f->fileid, &file, &transfer_ops, ota,
                                        &ota->stream);
        else {
                if (!f->update_data_url)
                        return -EPROTONOSUPPORT;
                r = http_download_new(ota->otad, f->update_data_url, &file, &transfer_ops, ota, &ota->http);
        }
        if (r < 0)
                return r;
        log_job(LOG_INFO, ota->job_id, "download", "Downloading files[%u] (%" PRIu32 " bytes) over %s into [target.%s]",
                index, f->filesize, ota->state.protocol, img->target->name);
        return 0;
}

struct part_reader {
        struct ota *ota;
        unsigned index;
};

static int read_part(uint64_t offset, void *buf, size_t len, void *userdata) {
        struct part_reader *reader = userdata;
        const struct ota_document_file *f = &reader->ota->doc->files[reader->index];
        struct ota_image *img = image_of_file(reader->ota, reader->index);

        return img->installer->ops->read(img->installer, f->part_offset + offset, buf, len);
}

/* The bytes of files[index] are on the target: check that they are what
 * the job signed, reading them back from the target itself. */
static int verify_file_at(struct ota *ota, unsigned index) {
        const struct ota_document_file *f = &ota->doc->files[index];
        const struct otad_config *config = ota->otad->config;
        struct part_reader reader = { ota, index };
        struct verify_report report = { 0 };
        struct verify_request req = {
                .sig_key = f->signature_key ? f->signature_key : "",
                .signature = f->signature ? f->signature : "",
                .certfile = f->certfile ? f->certfile : "",
                .trust_dir = config->ota.trust_dir,
                .signing_ca = config->ota.signing_ca,
                .size = f->filesize,
                .read = read_part,
                .userdata = &reader,
        };
        char reason[64];
        int r;

        if (!f->signature || !f->signature_key) {
                ota_format_reason(reason, sizeof(reason), NULL, OTA_PAL_SIGNATURE_CHECK_FAILED, EBADMSG);
                ota_fail(ota, reason, "files[%u] carries no signature; otad installs only signed images", index);
                return -EBADMSG;
        }
        r = verify_file(&req, &report);
        if (r < 0) {
                unsigned code = r == -ENOKEY || r == -EKEYREJECTED || r == -EOPNOTSUPP ? OTA_PAL_BAD_SIGNER_CERT
                                                                                    : OTA_PAL_SIGNATURE_CHECK_FAILED;

                ota_format_reason(reason, sizeof(reason), NULL, code, (unsigned) -r);
                ota_fail(ota, reason, "files[%u]: %s", index, report.reason);
                return r;
        }
        log_full(LOG_NOTICE, 0,
                 &(const struct log_fields){ .message_id = OTAD_MID_IMAGE_VERIFIED, .job_id = ota->job_id,
                                             .stage = "verify" },
                 "files[%u] verified: sha256 %s, signed by %s", index, report.sha256_hex,
                 report.cert_name);
        return 0;
}

static void finish_transfer(struct ota *ota) {
        unsigned index = ota->state.file_index;
        struct ota_image *img = image_of_file(ota, index);
        char reason[64];
        int r;

        stop_transfer(ota);
        if (ota->transfer_result < 0) {
                unsigned code = ota->transfer_result == -ETIMEDOUT ? OTA_ERR_MOMENTUM_ABORT : OTA_ERR_REQUEST_FILE_BLOCK;

                if (ota->transfer_result == -ENOSPC || ota->transfer_result == -EFBIG)
                        ota_format_reason(reason, sizeof(reason), NULL, OTA_PAL_RX_FILE_TOO_LARGE,
                                          (unsigned) -ota->transfer_result);
                else
                        ota_format_reason(reason, sizeof(reason), "aborted", code, 0);
                ota_fail(ota, reason, "files[%u]: %s", index,
                         ota->transfer_reason[0] ? ota->transfer_reason : strerror(-ota->transfer_result));
                return;
        }
        if (index + 1 == img->first + img->count) {
                r = img->installer->ops->finish(img->installer);
                if (r < 0) {
                        ota_format_reason(reason, sizeof(reason), NULL, OTA_PAL_RX_FILE_CREATE_FAILED, (unsigned) -r);
                        ota_fail(ota, reason, "[target.%s]: %s", img->target->name,
                                 img->installer->reason ? img->installer->reason : strerror(-r));
                        return;
                }
        }
        if (verify_file_at(ota, index) < 0)
                return;
        ota->state.file_index++;
        ota->state.done = 0;
        for (unsigned i = 0; i < ota->state.file_index; i++)
                ota->state.done += ota->doc->files[i].filesize;
        if (ota->state.file_index == ota->state.n_files)
                ota->state.stage = UPDATE_VERIFIED;
        r = update_state_save(ota->otad->config->state.directory, UPDATE_STATE_FILE, &ota->state);
        if (r < 0)
                log_job(LOG_WARNING, ota->job_id, "verify", "Failed to save state: %s", strerror(-r));
        else {
                /* update.json now says this file is done: its block map is
                 * no longer needed for resuming. */
                _cleanup_free_ char *done = progress_path(ota, index);

                if (done)
                        unlink(done);
        }
        ota_kick(ota);
}

static void on_activate_done(struct installer *in, int r, void *userdata);

/* Makes each verified image take effect, in plan order (A/B last). */
static void activate_next(struct ota *ota) {
        char reason[64];

        while (ota->activate_index < ota->n_images) {
                struct ota_image *img = &ota->images[ota->activate_index];
                int r;

                if (img->target->type == TARGET_AB) {
                        const struct config_slot *slot = img->installer->slot;

                        /* Persist the intent before the bootloader switches:
                         * after a power cut between the two, the next boot
                         * knows which slot was being tried. */
                        snprintf(ota->state.target, sizeof(ota->state.target), "%s", img->target->name);
                        snprintf(ota->state.slot_class, sizeof(ota->state.slot_class), "%s", img->target->slot_class);
                        snprintf(ota->state.new_slot, sizeof(ota->state.new_slot), "%s", slot ? slot->bootname : "");
                        ota->state.stage = UPDATE_ACTIVATED;
                        update_state_save(ota->otad->config->state.directory, UPDATE_STATE_FILE, &ota->state);
                }
                installer_set_activate_done(img->installer, on_activate_done, ota);
                r = img->installer->ops->activate(img->installer);
                if (r == -EINPROGRESS) {
                        ota->activating = true;
                        return;
                }
                if (r < 0) {
                        ota_format_reason(reason, sizeof(reason), NULL, OTA_PAL_ACTIVATE_FAILED, (unsigned) -r);
                        if (img->target->type == TARGET_AB)
                                ota->state.stage = UPDATE_VERIFIED;
                        ota_fail(ota, reason, "[target.%s]: %s", img->target->name,
                                 img->installer->reason ? img->installer->reason : strerror(-r));
                        return;
                }
                if (r > 0)
                        ota->needs_reboot = true;
                ota->activate_index++;
        }
        update_activated(ota);
}

static void on_activate_done(struct installer *in, int r, void *userdata) {
        struct ota *ota = userdata;
        char reason[64];

        ota->activating = false;
        if (r < 0) {
                ota_format_reason(reason, sizeof(reason), NULL, OTA_PAL_ACTIVATE_FAILED, (unsigned) -r);
                ota_fail(ota, reason, "[target.%s]: %s", in->target->name, in->reason ? in->reason : strerror(-r));
                return;
        }
        if (r > 0)
                ota->needs_reboot = true;
        ota->activate_index++;
        ota_kick(ota);
}

/* A job found verified at start (otad stopped between verification and
 * activation): open its images again and verify them once more, since
 * nothing is handed on for activation that was not verified by this run. */
static int reopen_verified(struct ota *ota) {
        char reason[64];

        for (size_t i = 0; i < ota->n_images; i++) {
                struct ota_image *img = &ota->images[i];
                int r;

                if (img->begun)
                        continue;
                r = img->installer->ops->begin(img->installer, img->size, true);
                if (r >= 0)
                        r = img->installer->ops->finish(img->installer);
                if (r < 0) {
                        ota_format_reason(reason, sizeof(reason), NULL, OTA_PAL_RX_FILE_CREATE_FAILED, (unsigned) -r);
                        ota_fail(ota, reason, "[target.%s]: %s", img->target->name,
                                 img->installer->reason ? img->installer->reason : strerror(-r));
                        return r;
                }
                img->begun = true;
                for (unsigned f = img->first; f < img->first + img->count; f++) {
                        r = verify_file_at(ota, f);
                        if (r < 0)
                                return r;
                }
        }
        return 0;
}

/* One step of the job in hand, always from the event loop, never from
 * inside a transfer's or installer's callback. */
static int on_kick(sd_event_source *s, void *userdata) {
        struct ota *ota = userdata;
        char reason[64];
        int r;

        if (!ota->job_id || !ota->doc)
                return 0;
        switch (ota->state.stage) {
        case UPDATE_DOWNLOADING:
                if (ota->transfer_done) {
                        finish_transfer(ota);
                        return 0;
                }
                if (ota->stream || ota->http)
                        return 0;
                r = start_transfer(ota);
                if (r < 0) {
                        struct ota_image *img = image_of_file(ota, ota->state.file_index);

                        ota_format_reason(reason, sizeof(reason), NULL, OTA_PAL_RX_FILE_CREATE_FAILED, (unsigned) -r);
                        ota_fail(ota, reason, "files[%u] into [target.%s]: %s", ota->state.file_index,
                                 img->target->name,
                                 img->installer->reason ? img->installer->reason : strerror(-r));
                }
                return 0;
        case UPDATE_VERIFIED:
                if (ota->activating)
                        return 0;
                if (ota->activate_index == 0 && reopen_verified(ota) < 0)
                        return 0;
                activate_next(ota);
                return 0;
        case UPDATE_ACTIVATED:
                if (!ota->activating && ota->activate_index < ota->n_images)
                        activate_next(ota);
                return 0;
        default:
                return 0;
        }
}

/* A different job (or none) replaces what the state directory remembers:
 * its partial files go, so that nothing of it is resumed by mistake. */
static void discard_previous(struct ota *ota, const struct update_state *old) {
        _cleanup_free_ char *targets = strdup(old->targets);

        log_job(LOG_NOTICE, old->job_id, "download", "Discarding the progress of job %s (stage %s)", old->job_id,
                update_stage_to_string(old->stage));
        /* Partial files of that job's file and command targets go too. */
        for (char *name = targets ? strtok(targets, ",") : NULL; name; name = strtok(NULL, ",")) {
                for (size_t i = 0; i < ota->otad->config->n_targets; i++) {
                        const struct config_target *t = &ota->otad->config->targets[i];
                        struct installer *in = NULL;

                        if (strcmp(t->name, name) != 0 || t->type == TARGET_AB ||
                            installer_new(ota->otad, t, old->job_id, &in) < 0)
                                continue;
                        if (in->ops->abort)
                                in->ops->abort(in);
                        installer_free(in);
                }
        }
        remove_progress_files(ota);
        update_state_remove(ota->otad->config->state.directory, UPDATE_STATE_FILE);
}

static int open_installers(struct ota *ota) {
        for (size_t i = 0; i < ota->n_images; i++) {
                int r = installer_new(ota->otad, ota->images[i].target, ota->job_id, &ota->images[i].installer);

                if (r < 0)
                        return r;
        }
        return 0;
}

/* Another job's activated update is not decided yet (its job was cancelled
 * during the reboot, or the service offers another one first): the new job
 * waits for that decision. A decided one is retired: the service moved on,
 * nobody asks for its result any more. */
static bool other_update_pending(struct ota *ota, const char *job_id) {
        if (!ota->state.job_id[0] || strcmp(ota->state.job_id, job_id) == 0 || ota->state.stage < UPDATE_ACTIVATED)
                return false;
        if (!update_stage_is_terminal(ota->state.stage))
                return true;
        if (ota->state.stage == UPDATE_ROLLED_BACK && ota->state.reboot_requested)
                return true; /* back to the old slot first */
        update_retire(ota);
        return false;
}

static int ota_start(const struct job *job, char *reason, size_t reason_size, void *userdata) {
        struct ota *ota = userdata;
        struct update_state saved = { 0 };
        char parse_reason[256], detail[256];
        bool have_saved;
        int r;

        have_saved = update_state_load(ota->otad->config->state.directory, UPDATE_STATE_FILE, &saved) >= 0;
        if (have_saved && strcmp(saved.job_id, job->id) == 0 && saved.stage >= UPDATE_ACTIVATED) {
                /* The update this device already activated: the lifecycle
                 * after the reboot owns it. */
                if (!ota->job_id) {
                        ota->job_id = strdup(job->id);
                        ota->state = saved;
                }
                ota->job_present = true;
                update_job_delivered(ota);
                return 0;
        }

        if (other_update_pending(ota, job->id)) {
                log_job(LOG_NOTICE, job->id, "download", "Job %s waits until the update of job %s is decided", job->id,
                        ota->state.job_id);
                ota->job_waiting = true;
                return 0;
        }

        ota_forget_job(ota);
        ota->job_id = strdup(job->id);
        if (!ota->job_id)
                return -ENOMEM;
        ota->job_present = true;
        snprintf(ota->state.job_id, sizeof(ota->state.job_id), "%s", job->id);
        ota->state.execution_number = job->execution_number;
        snprintf(ota->state.old_version, sizeof(ota->state.old_version), "%s", ota->running_version);

        r = ota_document_parse(job->document, &ota->doc, parse_reason, sizeof(parse_reason));
        if (r == -EPROTONOSUPPORT) {
                ota_format_reason(reason, reason_size, "aborted", OTA_ERR_INVALID_DATA_PROTOCOL, 0);
                ota_fail(ota, reason, "job document: %s", parse_reason);
                return 0;
        }
        if (r < 0) {
                ota_format_reason(reason, reason_size, NULL, OTA_ERR_JOB_PARSER, OTA_JOB_PARSE_NON_CONFORMING);
                ota_fail(ota, reason, "job document: %s", parse_reason);
                return 0;
        }
        r = choose_protocol(ota);
        if (r < 0) {
                ota_format_reason(reason, reason_size, "aborted", OTA_ERR_INVALID_DATA_PROTOCOL, 0);
                ota_fail(ota, reason, "the job offers no protocol otad can use (MQTT needs a streamname, HTTP an update_data_url)");
                return 0;
        }
        ota->protocol = (enum ota_protocol) r;
        snprintf(ota->state.protocol, sizeof(ota->state.protocol), "%s", r == OTA_PROTOCOL_MQTT ? "mqtt" : "http");
        r = plan_images(ota, detail, sizeof(detail));
        if (r < 0) {
                ota_format_reason(reason, reason_size, NULL, OTA_PAL_RX_FILE_CREATE_FAILED, (unsigned) -r);
                ota_fail(ota, reason, "%s", detail);
                return 0;
        }
        ota->state.n_files = (unsigned) ota->doc->n_files;
        for (size_t i = 0; i < ota->n_images; i++) {
                size_t len = strlen(ota->state.targets);

                snprintf(ota->state.targets + len, sizeof(ota->state.targets) - len, "%s%s", len ? "," : "",
                         ota->images[i].target->name);
        }
        for (size_t i = 0; i < ota->doc->n_files; i++)
                ota->state.total += ota->doc->files[i].filesize;
        compute_identity(ota, ota->state.identity);

        if (have_saved && (strcmp(saved.job_id, job->id) != 0 || strcmp(saved.identity, ota->state.identity) != 0 ||
                           update_stage_is_terminal(saved.stage)))
                discard_previous(ota, &saved);
        else if (have_saved) {
                ota->state.file_index = saved.file_index;
                ota->state.stage = saved.stage;
                ota->state.done = saved.done;
                log_job(LOG_NOTICE, job->id, "download", "Resuming job %s at files[%u] (stage %s)", job->id,
                        saved.file_index, update_stage_to_string(saved.stage));
        }

        r = open_installers(ota);
        if (r < 0) {
                ota_format_reason(reason, reason_size, NULL, OTA_PAL_RX_FILE_CREATE_FAILED, (unsigned) -r);
                ota_fail(ota, reason, "cannot prepare the targets: %s", strerror(-r));
                return 0;
        }
        r = update_state_save(ota->otad->config->state.directory, UPDATE_STATE_FILE, &ota->state);
        if (r < 0)
                log_job(LOG_WARNING, job->id, "download", "Failed to save state, a restart will start over: %s",
                        strerror(-r));
        log_full(LOG_NOTICE, 0,
                 &(const struct log_fields){ .message_id = OTAD_MID_UPDATE_STARTED, .job_id = job->id,
                                             .stage = "download" },
                 "Update job %s: %u file(s), %" PRIu64 " bytes over %s", job->id, ota->state.n_files,
                 ota->state.total, ota->state.protocol);
        /* The reference agent stays silent until the first block; a job
         * that looks QUEUED for minutes worries operators, so say so now. */
        ota_report(ota, JOB_IN_PROGRESS, NULL, 0, NULL);
        ota_kick(ota);
        return 0;
}

static void ota_refresh(const struct job *job, void *userdata) {
        struct ota *ota = userdata;
        struct ota_document *doc = NULL;
        char reason[256];

        if (!ota->job_id && !ota->job_waiting) {
                /* The job that waited for another update's decision, asked
                 * for again once that was decided. */
                ota_start(job, reason, sizeof(reason), ota);
                return;
        }
        if (!ota->job_id || strcmp(ota->job_id, job->id) != 0 || !ota->doc)
                return;
        if (ota->state.stage >= UPDATE_ACTIVATED) {
                update_job_delivered(ota);
                return;
        }
        /* The same job again, with fresh presigned URLs: hand the new URL
         * of the file in flight to its transfer. */
        if (!ota->http || ota_document_parse(job->document, &doc, reason, sizeof(reason)) < 0)
                return;
        if (ota->state.file_index < doc->n_files && doc->files[ota->state.file_index].update_data_url)
                http_download_set_url(ota->http, doc->files[ota->state.file_index].update_data_url);
        ota_document_free(doc);
}

static void ota_cancel(const struct job *job, void *userdata) {
        struct ota *ota = userdata;

        if (!ota->job_id || strcmp(ota->job_id, job->id) != 0)
                return;
        ota->job_present = false;
        if (ota->state.stage >= UPDATE_TESTING) {
                /* Booted the new slot already: the self-test decides, only
                 * the report has nobody to go to. */
                log_job(LOG_NOTICE, ota->job_id, "self-test", "Job %s is no longer offered; the self-test still decides",
                        ota->job_id);
                return;
        }
        log_job(LOG_NOTICE, ota->job_id, "cancel", "Job %s was cancelled or removed; stopping its update", ota->job_id);
        if (ota->state.stage == UPDATE_ACTIVATED && ota->bootloader && ota->state.new_slot[0])
                bootloader_mark_bad(ota->bootloader, ota->state.new_slot);
        stop_transfer(ota);
        free_images(ota, true);
        remove_progress_files(ota);
        update_stop(ota);
        update_state_remove(ota->otad->config->state.directory, UPDATE_STATE_FILE);
        ota_forget_job(ota);
}

static bool ota_accepts(const cJSON *document, void *userdata) {
        return ota_document_is_afr_ota(document);
}

int ota_new(struct otad *otad, struct ota **ret) {
        struct ota *ota;
        int r;

        ota = calloc(1, sizeof(*ota));
        if (!ota)
                return log_error_errno(-ENOMEM, "Out of memory");
        ota->otad = otad;
        ota->child = -1;
        r = ota_running_version(otad->config, &ota->running_version);
        if (r < 0)
                goto fail;
        if (otad->config->bootloader.type != BOOTLOADER_NONE) {
                r = bootloader_new(otad->config, &ota->bootloader);
                if (r < 0)
                        goto fail;
        }
        r = sd_event_add_defer(otad->event, &ota->kick, on_kick, ota);
        if (r < 0)
                goto fail;
        sd_event_source_set_enabled(ota->kick, SD_EVENT_OFF);

        ota->handler = (struct job_handler){
                .name = "afr_ota",
                .accepts = ota_accepts,
                .start = ota_start,
                .refresh = ota_refresh,
                .cancel = ota_cancel,
                .userdata = ota,
        };
        r = jobs_register_handler(otad->jobs, &ota->handler);
        if (r < 0)
                goto fail;
        log_info("Running version %s", ota->running_version);
        update_resume(ota);
        *ret = ota;
        return 0;
fail:
        log_error_errno(r, "Failed to set up the OTA handler: %m");
        ota_free(ota);
        return r;
}

void ota_free(struct ota *ota) {
        if (!ota)
                return;
        if (ota->otad->jobs)
                jobs_unregister_handler(ota->otad->jobs, ota->handler.name);
        update_stop(ota);
        stop_transfer(ota);
        free_images(ota, false);
        ota_document_free(ota->doc);
        free(ota->job_id);
        sd_event_source_unref(ota->kick);
        bootloader_free(ota->bootloader);
        free(ota->running_version);
        free(ota);
}
