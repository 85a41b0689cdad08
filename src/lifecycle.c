/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-event.h>

#include "bootloader.h"
#include "bundle_install.h"
#include "bundle_job.h"
#include "bundle_manifest.h"
#include "clock.h"
#include "config.h"
#include "health.h"
#include "images.h"
#include "installer.h"
#include "lifecycle.h"
#include "log.h"
#include "macro.h"
#include "ota_document.h"
#include "reboot.h"
#include "slot.h"
#include "state.h"
#include "status.h"
#include "transfer.h"
#include "verify.h"
#include "version.h"
#include "worker.h"

/* No update in hand: the state directory holds no record. */
#define STAGE_NONE _STAGE_MAX
/* A stage other than download that otad had to start again this often
 * (killed by the watchdog, crashed, powered off) ends the update instead of
 * looping: three tries cover an honest power cut or two. */
#define MAX_STARTS 3
/* How long a rollback on the new slot waits for the service to take the
 * result before it reboots anyway: the result is persisted and reported
 * again after the reboot. */
#define REPORT_WAIT_USEC (30 * USEC_PER_SEC)
/* Download progress goes into the record (for `otad status`) at most this
 * often; resuming relies on the transfer's own progress record. */
#define PROGRESS_SAVE_USEC (2 * USEC_PER_SEC)

/* The reference agent's reason codes (protocol.md §2.4), so that fleet
 * tooling written for FreeRTOS devices reads otad's results too. */
#define OTA_ERR_REQUEST_FILE_BLOCK 0x08
#define OTA_ERR_MOMENTUM_ABORT 0x0e
#define OTA_ERR_DOWNGRADE 0x0f
#define OTA_ERR_SAME_VERSION 0x10
#define OTA_PAL_SIGNATURE_CHECK_FAILED 0xe3
#define OTA_PAL_RX_FILE_CREATE_FAILED 0xe4
#define OTA_PAL_RX_FILE_TOO_LARGE 0xe5
#define OTA_PAL_BOOT_INFO_CREATE_FAILED 0xe6 /* the lifecycle record could not be written */
#define OTA_PAL_BAD_SIGNER_CERT 0xe7
#define OTA_PAL_COMMIT_FAILED 0xeb
#define OTA_PAL_ACTIVATE_FAILED 0xec

enum event {
        EV_TAKEN,         /* a new job's update starts */
        EV_RECEIVED,      /* files[file_index] is on its target */
        EV_VERIFIED_MORE, /* it verified, and another file follows */
        EV_VERIFIED,      /* it verified, and it was the last */
        EV_INSTALLED,     /* every image took effect without a reboot */
        EV_REBOOTING,     /* the reboot into the new slot is due */
        EV_BOOTED_NEW,    /* running from the new slot */
        EV_BOOTED_OLD,    /* running from the old slot after the switch */
        EV_HEALTHY,       /* the health check passed */
        EV_UNHEALTHY,     /* it failed, timed out, the version is refused, or
                           * the new slot could not be marked good */
        EV_FAILED,        /* a step failed */
        EV_RESTARTED,     /* otad started again in this stage */
        EV_CANCELLED,     /* the service no longer offers the job */
        EV_REPORTED,      /* the service took (or will never take) the result */
        _EV_MAX,
};

static const char *const event_names[_EV_MAX] = {
        [EV_TAKEN] = "job taken",
        [EV_RECEIVED] = "file received",
        [EV_VERIFIED_MORE] = "file verified",
        [EV_VERIFIED] = "last file verified",
        [EV_INSTALLED] = "installed",
        [EV_REBOOTING] = "reboot requested",
        [EV_BOOTED_NEW] = "booted the new slot",
        [EV_BOOTED_OLD] = "booted the old slot",
        [EV_HEALTHY] = "health check passed",
        [EV_UNHEALTHY] = "not healthy",
        [EV_FAILED] = "failed",
        [EV_RESTARTED] = "restarted",
        [EV_CANCELLED] = "cancelled",
        [EV_REPORTED] = "reported",
};

/* Every way an update may move, and no other. */
static const struct transition {
        unsigned char from, event, to;
} transitions[] = {
        { STAGE_NONE, EV_TAKEN, STAGE_DOWNLOAD },
        { STAGE_NONE, EV_FAILED, STAGE_FAIL },             /* the job cannot even start */
        { STAGE_DOWNLOAD, EV_RECEIVED, STAGE_VERIFY },
        { STAGE_DOWNLOAD, EV_FAILED, STAGE_FAIL },
        { STAGE_DOWNLOAD, EV_RESTARTED, STAGE_DOWNLOAD },
        { STAGE_DOWNLOAD, EV_CANCELLED, STAGE_NONE },
        { STAGE_VERIFY, EV_VERIFIED_MORE, STAGE_DOWNLOAD },
        { STAGE_VERIFY, EV_VERIFIED, STAGE_ACTIVATE },
        { STAGE_VERIFY, EV_FAILED, STAGE_FAIL },
        { STAGE_VERIFY, EV_RESTARTED, STAGE_VERIFY },
        { STAGE_VERIFY, EV_CANCELLED, STAGE_NONE },
        { STAGE_ACTIVATE, EV_INSTALLED, STAGE_COMMIT },
        { STAGE_ACTIVATE, EV_REBOOTING, STAGE_REBOOT },
        { STAGE_ACTIVATE, EV_BOOTED_NEW, STAGE_SELF_TEST }, /* power lost after the switch */
        { STAGE_ACTIVATE, EV_BOOTED_OLD, STAGE_ROLLBACK },  /* ... and the new slot did not come up */
        { STAGE_ACTIVATE, EV_FAILED, STAGE_FAIL },
        { STAGE_ACTIVATE, EV_RESTARTED, STAGE_ACTIVATE },
        { STAGE_ACTIVATE, EV_CANCELLED, STAGE_NONE },
        { STAGE_REBOOT, EV_BOOTED_NEW, STAGE_SELF_TEST },
        { STAGE_REBOOT, EV_BOOTED_OLD, STAGE_ROLLBACK },     /* the bootloader fell back */
        { STAGE_REBOOT, EV_FAILED, STAGE_ROLLBACK },         /* the reboot command failed */
        { STAGE_REBOOT, EV_RESTARTED, STAGE_REBOOT },        /* stopped before the reboot happened */
        { STAGE_REBOOT, EV_CANCELLED, STAGE_NONE },
        { STAGE_SELF_TEST, EV_HEALTHY, STAGE_COMMIT },
        { STAGE_SELF_TEST, EV_UNHEALTHY, STAGE_ROLLBACK },
        { STAGE_SELF_TEST, EV_BOOTED_OLD, STAGE_ROLLBACK },
        { STAGE_SELF_TEST, EV_RESTARTED, STAGE_SELF_TEST },
        { STAGE_COMMIT, EV_UNHEALTHY, STAGE_ROLLBACK },      /* marking the slot good failed */
        { STAGE_COMMIT, EV_BOOTED_OLD, STAGE_ROLLBACK },     /* power lost before the mark */
        { STAGE_COMMIT, EV_REPORTED, STAGE_NONE },
        { STAGE_ROLLBACK, EV_REPORTED, STAGE_NONE },
        { STAGE_FAIL, EV_REPORTED, STAGE_NONE },
};

struct lifecycle {
        struct otad *otad;
        const struct lifecycle_ops *ops;
        void *userdata;
        struct bootloader *bootloader; /* NULL: [bootloader] type=none */
        char *running_version;

        bool have_record;
        struct state_record rec;
        enum stage entered_from;       /* for the deferred entry action */
        bool entry_pending;
        sd_event_source *kick;         /* runs entry actions outside callbacks */

        /* What this run holds of the update in hand. */
        struct ota_document *doc;      /* NULL until the job is (re)delivered */
        enum ota_protocol protocol;
        struct images images;
        bool images_verified[OTA_DOCUMENT_MAX_FILES]; /* by this run, per image */
        struct transfer *transfer;
        struct worker *worker;
        struct verify_task *verify;
        /* An update bundle (bundle_job.h): step 0 (file_index 0) is its
         * manifest, step 1 its payload, installed as it arrives. */
        bool bundle;
        uint8_t *manifest_bytes;       /* files[0] as received */
        struct bundle_manifest *manifest;
        unsigned part_files[BUNDLE_PARTS_MAX];
        struct bundle_install *install;
        uint64_t fetched_before, reused_before; /* by earlier runs of the install */
        struct reboot *reboot;
        struct health_check *health;
        sd_event_source *report_wait;  /* rollback on the new slot */
        bool activating;               /* an installer's activation runs */
        bool back_to_old_slot;         /* a rollback decided on the new slot reboots */
        bool awaiting_ready;           /* ops->ready() sent, no answer yet */
        uint64_t last_save_usec;
};

static void schedule_entry(struct lifecycle *lc, enum stage from);
static int fire(struct lifecycle *lc, enum event ev, const char *reason, const char *detail);

static const char *state_dir(const struct lifecycle *lc) {
        return lc->otad->config->state.directory;
}

static const char *stage_name(enum stage s) {
        return s == STAGE_NONE ? "none" : stage_to_string(s);
}

static void format_reason(char *buf, size_t size, const char *word, unsigned code, unsigned sub) {
        /* "<word>: 0x%08x" or "0x%08x: 0x%08x", 8 lowercase hex digits, as
         * the reference agent writes them. */
        if (word)
                snprintf(buf, size, "%s: 0x%08x", word, code);
        else
                snprintf(buf, size, "0x%08x: 0x%08x", code, sub);
}

/* Ends the update in hand with a FAILED result (before activation) or a
 * rollback (after it). */
static void fail(struct lifecycle *lc, unsigned code, int error, const char *format, ...)
        __attribute__((format(printf, 4, 5)));
static void fail(struct lifecycle *lc, unsigned code, int error, const char *format, ...) {
        char reason[64], detail[512];
        va_list ap;

        va_start(ap, format);
        errno = error < 0 ? -error : error; /* for %m */
        vsnprintf(detail, sizeof(detail), format, ap);
        va_end(ap);
        format_reason(reason, sizeof(reason), NULL, code, (unsigned) (error < 0 ? -error : error));
        (void) fire(lc, EV_FAILED, reason, detail);
}

/* slots */

/* Whether the running system booted the update's new slot: 1 yes, 0 the
 * old one, <0 it cannot tell. */
static int booted_new_slot(struct lifecycle *lc) {
        const struct config_slot *booted = NULL;
        int r;

        r = slot_booted(lc->otad->config, lc->rec.slot_class, NULL, &booted);
        if (r < 0)
                return log_job_errno(LOG_ERR, r, lc->rec.job_id, stage_name(lc->rec.stage),
                                     "Cannot tell which slot of class %s is booted: %m", lc->rec.slot_class);
        return strcmp(booted->bootname, lc->rec.new_slot) == 0;
}

/* Whether the bootloader still has the new slot's one try ahead of it: the
 * reboot that otad asked for has not happened (otad was restarted before
 * it). Once the bootloader booted it, the try is spent (GRUB's X_TRY=1,
 * U-Boot's BOOT_X_LEFT=0), so running the old slot then means it fell
 * back. When the bootloader cannot tell, it is taken as spent: the safe
 * reading ends in a rollback, never in a second try. */
static bool new_slot_try_pending(struct lifecycle *lc) {
        bool good = false;

        if (!lc->bootloader || bootloader_get_state(lc->bootloader, lc->rec.new_slot, &good) < 0)
                return false;
        return good;
}

/* Undoing the switch is always allowed: the old slot is good. */
static void mark_new_slot_bad(struct lifecycle *lc) {
        int r;

        if (!lc->bootloader || !lc->rec.new_slot[0])
                return;
        r = bootloader_mark_bad(lc->bootloader, lc->rec.new_slot);
        if (r < 0)
                log_job_errno(LOG_CRIT, r, lc->rec.job_id, stage_name(lc->rec.stage),
                              "Failed to mark slot %s bad: %m; the bootloader falls back on its own, since the slot was never marked good",
                              lc->rec.new_slot);
}

/* With no update in flight, the booted slot is good: tell the bootloader on
 * every start, or schemes that count boots (U-Boot's BOOT_x_LEFT, GRUB's
 * x_TRY) would eventually fall back from a healthy slot (what
 * rauc-mark-good does). */
static void mark_booted_good(struct lifecycle *lc) {
        const struct otad_config *config = lc->otad->config;
        const struct config_slot *booted = NULL;

        if (!lc->bootloader)
                return;
        for (size_t i = 0; i < config->n_targets; i++) {
                int r;

                if (config->targets[i].type != TARGET_AB ||
                    slot_booted(config, config->targets[i].slot_class, NULL, &booted) < 0)
                        continue;
                r = bootloader_mark_good(lc->bootloader, booted->bootname);
                if (r < 0)
                        /* Nothing to undo: the next start tries again, and
                         * until then the bootloader may count a try. */
                        log_warning_errno(r, "Failed to mark the booted slot %s good: %m, ignoring",
                                          booted->bootname);
        }
}

/* `otad status` shows each slot's version as of its last boot. */
static void record_booted_versions(struct lifecycle *lc) {
        const struct otad_config *config = lc->otad->config;
        const struct config_slot *booted = NULL;

        for (size_t i = 0; i < config->n_targets; i++)
                if (config->targets[i].type == TARGET_AB &&
                    slot_booted(config, config->targets[i].slot_class, NULL, &booted) >= 0)
                        (void) status_record_slot_version(config, booted->bootname, lc->running_version);
}

/* what this run holds */

static void stop_work(struct lifecycle *lc) {
        transfer_free(lc->transfer);
        lc->transfer = NULL;
        bundle_install_free(lc->install);
        lc->install = NULL;
        worker_free(lc->worker);
        lc->worker = NULL;
        free(lc->verify);
        lc->verify = NULL;
        reboot_free(lc->reboot);
        lc->reboot = NULL;
        health_check_free(lc->health);
        lc->health = NULL;
        lc->report_wait = sd_event_source_disable_unref(lc->report_wait);
        lc->activating = false;
        lc->awaiting_ready = false;
}

static void forget_job(struct lifecycle *lc, bool abort_images) {
        stop_work(lc);
        free(lc->manifest_bytes);
        lc->manifest_bytes = NULL;
        bundle_manifest_free(lc->manifest);
        lc->manifest = NULL;
        lc->bundle = false;
        images_close(&lc->images, abort_images);
        memset(lc->images_verified, 0, sizeof(lc->images_verified));
        ota_document_free(lc->doc);
        lc->doc = NULL;
}

/* What only resumes the update in hand: the transfers' records, and a
 * bundle's kept manifest and chunk map. */
static void forget_progress(struct lifecycle *lc) {
        transfer_remove_progress(lc->otad->config);
        bundle_job_forget(lc->otad->config);
}

/* The record leaves: to last.json when it ended (retired), or nowhere when
 * the job was cancelled. */
static void leave(struct lifecycle *lc, bool retire) {
        int r;

        if (retire) {
                r = state_save(state_dir(lc), STATE_LAST_FILE, &lc->rec);
                if (r < 0)
                        log_job_errno(LOG_WARNING, r, lc->rec.job_id, stage_name(lc->rec.stage),
                                      "Failed to keep the result in %s/%s: %m, ignoring", state_dir(lc),
                                      STATE_LAST_FILE);
        }
        r = state_remove(state_dir(lc), STATE_CURRENT_FILE);
        if (r < 0)
                /* The next start finds it reported and retires it again. */
                log_job_errno(LOG_WARNING, r, lc->rec.job_id, stage_name(lc->rec.stage),
                              "Failed to remove %s/%s: %m, ignoring", state_dir(lc), STATE_CURRENT_FILE);
        /* Nothing resumes this update any more: a bundle's chunk map and
         * kept manifest go too, not to be read by the next install. */
        forget_progress(lc);
        /* The journal's "job finished" milestone is the Jobs client's, once
         * per job, when the final status goes out. */
        if (retire)
                log_job(LOG_INFO, lc->rec.job_id, stage_name(lc->rec.stage), "Update of job %s retired: %s (%s)",
                        lc->rec.job_id, lc->rec.result, lc->rec.reason);
        forget_job(lc, false);
        lc->have_record = false;
        lc->rec = (struct state_record){ 0 };
        /* No update in flight any more: what runs now is the good slot
         * (the committed new one, or the old one after a rollback or a
         * cancel), as at every start without one. */
        mark_booted_good(lc);
        lc->ops->idle(lc->userdata);
}

/* transitions */

static const struct transition *find_transition(enum stage from, enum event ev) {
        for (size_t i = 0; i < ELEMENTSOF(transitions); i++)
                if (transitions[i].from == from && transitions[i].event == ev)
                        return &transitions[i];
        return NULL;
}

static const char *milestone_of(enum stage to, enum event ev) {
        switch (to) {
        case STAGE_DOWNLOAD:
                return ev == EV_TAKEN ? OTAD_MID_UPDATE_STARTED : NULL;
        case STAGE_COMMIT:
                return OTAD_MID_COMMITTED;
        case STAGE_ROLLBACK:
                return OTAD_MID_ROLLED_BACK;
        case STAGE_FAIL:
                return OTAD_MID_UPDATE_FAILED;
        default:
                return NULL;
        }
}

static void log_transition(struct lifecycle *lc, enum stage from, enum event ev) {
        const struct state_record *r = &lc->rec;
        bool ended = stage_is_terminal(r->stage);
        int level = r->stage == STAGE_COMMIT ? LOG_NOTICE : ended ? LOG_ERR : LOG_INFO;
        char what[sizeof(r->reason) + sizeof(r->detail) + 8] = "";

        if (ev == EV_TAKEN)
                snprintf(what, sizeof(what), ": %u file(s), %" PRIu64 " bytes over %s", r->n_files, r->total,
                         r->protocol);
        else if (ended)
                snprintf(what, sizeof(what), ": %s%s%s", r->reason, r->detail[0] ? ", " : "", r->detail);
        else if (r->stage == STAGE_DOWNLOAD || r->stage == STAGE_VERIFY)
                snprintf(what, sizeof(what), ", files[%u] of %u", r->file_index, r->n_files);
        log_full(level, 0,
                 &(const struct log_fields){ .message_id = milestone_of(r->stage, ev), .job_id = r->job_id,
                                             .stage = stage_name(r->stage),
                                             .slot = r->new_slot[0] ? r->new_slot : NULL },
                 "Job %s %s (%s -> %s, %s)%s", r->job_id,
                 r->stage == STAGE_COMMIT ? "committed" : r->stage == STAGE_ROLLBACK ? "rolled back"
                 : r->stage == STAGE_FAIL ? "failed" : "moves on",
                 stage_name(from), stage_name(r->stage), event_names[ev], what);
}

/* Persisting failed: do nothing the record does not say. Before the switch
 * the update just fails; after it the new slot is marked bad (always
 * allowed) and the job fails as a rollback. The end itself is reported
 * even if it cannot be recorded either. */
static void end_unrecorded(struct lifecycle *lc, enum stage from, enum stage wanted, int error) {
        bool switched = from == STAGE_ACTIVATE || from == STAGE_REBOOT || from == STAGE_SELF_TEST ||
                        from == STAGE_COMMIT;
        int r;

        log_job_errno(LOG_ERR, error, lc->rec.job_id, stage_name(wanted),
                      "Failed to record stage %s of job %s in %s: %m; not acting on a state that is not on disk",
                      stage_name(wanted), lc->rec.job_id, state_dir(lc));
        /* In hand, if only in memory: it is reported and then retired. */
        lc->have_record = true;
        lc->rec.stage = switched ? STAGE_ROLLBACK : STAGE_FAIL;
        lc->rec.starts = 0;
        snprintf(lc->rec.result, sizeof(lc->rec.result), "FAILED");
        format_reason(lc->rec.reason, sizeof(lc->rec.reason), NULL, OTA_PAL_BOOT_INFO_CREATE_FAILED,
                      (unsigned) (error < 0 ? -error : error));
        errno = error < 0 ? -error : error;
        snprintf(lc->rec.detail, sizeof(lc->rec.detail),
                 "cannot record stage %s in the state directory %s: %m; otad acts only on what it recorded",
                 stage_name(wanted), state_dir(lc));
        lc->rec.reported = false;
        r = state_save(state_dir(lc), STATE_CURRENT_FILE, &lc->rec);
        if (r < 0)
                log_job_errno(LOG_ERR, r, lc->rec.job_id, stage_name(lc->rec.stage),
                              "Failed to record the failure either: %m; reporting it all the same");
        log_transition(lc, from, EV_FAILED);
        lc->ops->stage(&lc->rec, from, lc->userdata);
        schedule_entry(lc, from);
}

/* The one way an update changes stage: the new record is persisted first,
 * and only then acted on (the entry action runs from the loop). */
static int fire(struct lifecycle *lc, enum event ev, const char *reason, const char *detail) {
        enum stage from = lc->have_record ? lc->rec.stage : STAGE_NONE;
        const struct transition *t = find_transition(from, ev);
        struct state_record next = lc->rec;
        int r;

        if (!t) {
                /* A programming error, never an input: refuse it loudly
                 * rather than act on a state the table does not allow. */
                log_job(LOG_CRIT, lc->rec.job_id, stage_name(from), "BUG: no transition from %s on \"%s\", ignoring",
                        stage_name(from), event_names[ev]);
                return -EINVAL;
        }
        if (t->to == STAGE_NONE) {
                leave(lc, ev == EV_REPORTED);
                return 0;
        }
        next.stage = (enum stage) t->to;
        next.starts = ev == EV_RESTARTED ? next.starts + 1 : 0;
        if (ev == EV_VERIFIED_MORE)
                next.file_index++;
        if (stage_is_terminal(next.stage)) {
                snprintf(next.result, sizeof(next.result), "%s", next.stage == STAGE_COMMIT ? "SUCCEEDED" : "FAILED");
                snprintf(next.reason, sizeof(next.reason), "%s", reason ? reason : "");
                snprintf(next.detail, sizeof(next.detail), "%s", detail ? detail : "");
                next.reported = false;
                if (next.stage == STAGE_COMMIT)
                        snprintf(next.new_version, sizeof(next.new_version), "%s", lc->running_version);
        }
        r = state_save(state_dir(lc), STATE_CURRENT_FILE, &next);
        if (r < 0 && next.stage != STAGE_FAIL && next.stage != STAGE_ROLLBACK) {
                end_unrecorded(lc, from, next.stage, r);
                return r;
        }
        if (r < 0)
                /* Ending anyway: what ending does is always safe. */
                log_job_errno(LOG_ERR, r, next.job_id, stage_name(next.stage),
                              "Failed to record stage %s in %s: %m; ending the update all the same",
                              stage_name(next.stage), state_dir(lc));
        lc->have_record = true;
        lc->rec = next;
        lc->last_save_usec = clock_now_usec();
        log_transition(lc, from, ev);
        lc->ops->stage(&lc->rec, from, lc->userdata);
        schedule_entry(lc, from);
        return 0;
}

/* download */

static void on_transfer_progress(uint64_t done_units, uint64_t total_units, uint64_t done_bytes, void *userdata) {
        struct lifecycle *lc = userdata;
        uint64_t before = 0, now = clock_now_usec();

        for (unsigned i = 0; i < lc->rec.file_index; i++)
                before += lc->doc->files[i].filesize;
        lc->rec.done = before + done_bytes;
        if (now - lc->last_save_usec >= PROGRESS_SAVE_USEC) {
                int r = state_save(state_dir(lc), STATE_CURRENT_FILE, &lc->rec);

                lc->last_save_usec = now;
                if (r < 0)
                        /* Guards nothing: resuming relies on the transfer's record. */
                        log_job_errno(LOG_WARNING, r, lc->rec.job_id, "download",
                                      "Failed to record download progress in %s: %m, ignoring", state_dir(lc));
        }
        lc->ops->progress(&lc->rec, done_units, total_units, lc->userdata);
}

static void on_transfer_need_url(void *userdata) {
        struct lifecycle *lc = userdata;

        log_job(LOG_INFO, lc->rec.job_id, "download", "Presigned URL refused, asking the service for the job again");
        lc->ops->need_fresh_url(lc->userdata);
}

/* A download that ended in an error, in the reference agent's words: a
 * target too small for the file, data that is not what was signed (only a
 * bundle's chunks are checked as they come: a raw file's bad data is a
 * transfer that cannot go on), or the transfer given up. */
static void fail_download(struct lifecycle *lc, int result, bool checked_as_received, const char *detail) {
        char word[64];

        if (result == -ENOSPC || result == -EFBIG)
                format_reason(word, sizeof(word), NULL, OTA_PAL_RX_FILE_TOO_LARGE, (unsigned) -result);
        else if (result == -EBADMSG && checked_as_received)
                format_reason(word, sizeof(word), NULL, OTA_PAL_SIGNATURE_CHECK_FAILED, EBADMSG);
        else
                format_reason(word, sizeof(word), "aborted",
                              result == -ETIMEDOUT ? OTA_ERR_MOMENTUM_ABORT : OTA_ERR_REQUEST_FILE_BLOCK, 0);
        (void) fire(lc, EV_FAILED, word, detail);
}

static void on_transfer_finished(int result, const char *reason, void *userdata) {
        struct lifecycle *lc = userdata;
        unsigned index = lc->rec.file_index;
        const struct image *img = images_of_file(&lc->images, index);
        char detail[512];

        /* The target knows best what went wrong writing it ("cannot sync
         * slot /dev/sdb3: Input/output error"). reason lives in the
         * transfer: read before it is freed. */
        if (img && img->installer && img->installer->reason)
                snprintf(detail, sizeof(detail), "files[%u]: %s", index, img->installer->reason);
        else if (reason && *reason)
                snprintf(detail, sizeof(detail), "files[%u]: %s", index, reason);
        else {
                errno = -result;
                snprintf(detail, sizeof(detail), "files[%u]: %m", index);
        }
        transfer_free(lc->transfer);
        lc->transfer = NULL;
        if (result >= 0) {
                (void) fire(lc, EV_RECEIVED, NULL, NULL);
                return;
        }
        fail_download(lc, result, false, detail);
}

static const struct transfer_ops transfer_ops = {
        .progress = on_transfer_progress,
        .need_fresh_url = on_transfer_need_url,
        .finished = on_transfer_finished,
};

/* A target failed: the installer says why, or the errno does. */
static void fail_target(struct lifecycle *lc, unsigned code, int r, const struct image *img, const char *what) {
        if (img->installer && img->installer->reason)
                fail(lc, code, r, "%s[target.%s]: %s", what, img->target->name, img->installer->reason);
        else
                fail(lc, code, r, "%s[target.%s]: %m", what, img->target->name);
}

static void start_manifest(struct lifecycle *lc);
static void start_payload(struct lifecycle *lc);

static void start_download(struct lifecycle *lc) {
        unsigned index = lc->rec.file_index;
        struct image *img;
        int r;

        if (!lc->doc)
                return; /* resumes when the job is delivered again */
        if (lc->bundle) {
                if (index == 0)
                        start_manifest(lc);
                else
                        start_payload(lc);
                return;
        }
        img = images_of_file(&lc->images, index);
        /* begin(resume): an earlier run of this very job may have written
         * blocks its progress record still counts. */
        r = image_begin(img, true);
        if (r >= 0 && img->target->type == TARGET_AB && img->installer->slot)
                snprintf(lc->rec.new_slot, sizeof(lc->rec.new_slot), "%s", img->installer->slot->bootname);
        if (r >= 0) {
                struct transfer_sink sink;

                transfer_sink_installer(img->installer, lc->doc->files[index].part_offset, &sink);
                r = transfer_start(lc->otad, lc->doc, lc->protocol, index, &sink, NULL, 0, lc->rec.job_id,
                                   &transfer_ops, lc, &lc->transfer);
        }
        if (r < 0) {
                char what[32];

                snprintf(what, sizeof(what), "files[%u] into ", index);
                fail_target(lc, OTA_PAL_RX_FILE_CREATE_FAILED, r, img, what);
        }
}

/* bundles: step 0 is the manifest, fetched into memory, checked and
 * decided on before a payload byte is fetched; step 1 is the payload,
 * installed as it arrives (bundle_install.h). */

static int on_manifest_bytes(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct lifecycle *lc = userdata;

        /* The transfer never writes past filesize, which is the buffer's. */
        memcpy(lc->manifest_bytes + offset, buf, len);
        return 0;
}

static int on_manifest_sync(void *userdata) {
        return 0;
}

static void start_manifest(struct lifecycle *lc) {
        const struct ota_document_file *f = &lc->doc->files[0];
        int r;

        if (f->filesize > BUNDLE_MANIFEST_MAX) {
                fail(lc, OTA_PAL_RX_FILE_TOO_LARGE, -EFBIG,
                     "the bundle's manifest (files[0]) is %" PRIu32 " bytes, a manifest is at most %u", f->filesize,
                     (unsigned) BUNDLE_MANIFEST_MAX);
                return;
        }
        free(lc->manifest_bytes);
        lc->manifest_bytes = malloc(f->filesize);
        if (!lc->manifest_bytes) {
                fail(lc, OTA_PAL_RX_FILE_CREATE_FAILED, -ENOMEM, "files[0]: %m");
                return;
        }
        /* The bytes live in memory only: an earlier run's record of this
         * transfer would skip bytes that are gone. */
        transfer_forget_progress(lc->otad->config, 0);
        r = transfer_start(lc->otad, lc->doc, lc->protocol, 0,
                           &(const struct transfer_sink){ .write = on_manifest_bytes, .sync = on_manifest_sync,
                                                          .userdata = lc },
                           NULL, 0, lc->rec.job_id, &transfer_ops, lc, &lc->transfer);
        if (r < 0)
                fail(lc, OTA_PAL_RX_FILE_CREATE_FAILED, r, "cannot fetch the bundle's manifest (files[0]): %m");
}

/* The manifest arrived: trusted, matching the job, and acceptable to this
 * device, or the update ends here having cost the manifest's bytes. */
static void accept_manifest(struct lifecycle *lc) {
        struct bundle_job_refusal why = { 0 };
        int r;

        bundle_manifest_free(lc->manifest);
        lc->manifest = NULL;
        r = bundle_job_accept(lc->otad->config, lc->doc, lc->running_version, lc->manifest_bytes,
                              lc->doc->files[0].filesize, &lc->manifest, lc->part_files, &why);
        free(lc->manifest_bytes);
        lc->manifest_bytes = NULL;
        if (r < 0) {
                (void) fire(lc, EV_FAILED, why.reason, why.detail);
                return;
        }
        log_full(LOG_NOTICE, 0,
                 &(const struct log_fields){ .message_id = OTAD_MID_IMAGE_VERIFIED, .job_id = lc->rec.job_id,
                                             .stage = "verify" },
                 "Bundle manifest verified: version %s for %s, an image of %" PRIu64 " bytes in %zu part(s) of %" PRIu64
                 " bytes",
                 lc->manifest->version, lc->manifest->compatible, lc->manifest->image_size, lc->manifest->n_parts,
                 lc->manifest->payload_size);
        (void) fire(lc, EV_VERIFIED_MORE, NULL, NULL);
}

/* A restart past the manifest: the copy the state directory kept,
 * checked again. */
static int load_manifest(struct lifecycle *lc) {
        struct bundle_job_refusal why = { 0 };
        int r;

        if (lc->manifest)
                return 0;
        r = bundle_job_load(lc->otad->config, lc->doc, lc->running_version, &lc->manifest, lc->part_files, &why);
        if (r < 0)
                (void) fire(lc, EV_FAILED, why.reason, why.detail);
        return r;
}

static void on_install_progress(const struct bundle_install_stats *st, void *userdata) {
        struct lifecycle *lc = userdata;
        uint64_t now = clock_now_usec();

        lc->rec.done = lc->doc->files[0].filesize + st->done_bytes;
        /* Over every run of this install, not just this one. */
        lc->rec.fetched = lc->fetched_before + st->fetched_bytes;
        lc->rec.reused = lc->reused_before + st->reused_bytes;
        if (now - lc->last_save_usec >= PROGRESS_SAVE_USEC) {
                int r = state_save(state_dir(lc), STATE_CURRENT_FILE, &lc->rec);

                lc->last_save_usec = now;
                if (r < 0)
                        log_job_errno(LOG_WARNING, r, lc->rec.job_id, "download",
                                      "Failed to record download progress in %s: %m, ignoring", state_dir(lc));
        }
        lc->ops->progress(&lc->rec, (st->done_bytes + 4095) / 4096, (st->payload_bytes + 4095) / 4096, lc->userdata);
}

static void on_install_need_url(void *userdata) {
        on_transfer_need_url(userdata);
}

static void on_install_finished(int result, const char *reason, void *userdata) {
        struct lifecycle *lc = userdata;
        struct bundle_install_stats st;
        char detail[512];

        bundle_install_get_stats(lc->install, &st);
        snprintf(detail, sizeof(detail), "the bundle's payload: %s", reason ? reason : "");
        bundle_install_free(lc->install);
        lc->install = NULL;
        if (result >= 0) {
                log_job(LOG_NOTICE, lc->rec.job_id, "download",
                        "Bundle installed into the target: %" PRIu64 " payload bytes fetched, %" PRIu64
                        " image bytes reused from the active slot, %u of %u chunks written before the restart",
                        st.fetched_bytes, st.reused_bytes, st.chunks_resumed, st.chunks);
                (void) fire(lc, EV_RECEIVED, NULL, NULL);
                return;
        }
        fail_download(lc, result, true, detail);
}

static const struct bundle_install_ops install_ops = {
        .progress = on_install_progress,
        .need_fresh_url = on_install_need_url,
        .finished = on_install_finished,
};

static void start_payload(struct lifecycle *lc) {
        struct image *img = &lc->images.v[0];
        const struct config_slot *active = NULL;
        int r;

        if (load_manifest(lc) < 0)
                return;
        img->size = lc->manifest->image_size;
        r = image_begin(img, true);
        if (r < 0) {
                fail_target(lc, r == -ENOSPC ? OTA_PAL_RX_FILE_TOO_LARGE : OTA_PAL_RX_FILE_CREATE_FAILED, r, img,
                            "the bundle's image into ");
                return;
        }
        if (img->target->type == TARGET_AB && img->installer->slot) {
                snprintf(lc->rec.new_slot, sizeof(lc->rec.new_slot), "%s", img->installer->slot->bootname);
                /* Chunks the running system already has are copied, not
                 * fetched (delta.h): its slot is read, never written. */
                if (slot_booted(lc->otad->config, lc->rec.slot_class, NULL, &active) < 0)
                        active = NULL;
        }
        lc->fetched_before = lc->rec.fetched;
        lc->reused_before = lc->rec.reused;
        r = bundle_install_start(lc->otad,
                                 &(const struct bundle_install_params){
                                         .doc = lc->doc,
                                         .protocol = lc->protocol,
                                         .manifest = lc->manifest,
                                         .part_files = lc->part_files,
                                         .target = img->installer,
                                         .active = active,
                                         .job_id = lc->rec.job_id,
                                 },
                                 &install_ops, lc, &lc->install);
        if (r < 0)
                fail(lc, OTA_PAL_RX_FILE_CREATE_FAILED, r, "cannot start installing the bundle's payload: %m");
}

/* verify: in a worker thread, since reading back a whole slot takes
 * minutes on slow storage and the watchdog must keep getting its pings. */

struct verify_task {
        struct installer *installer;
        bool finish;                   /* the image's last file: finish() first */
        unsigned first, count;         /* the files[] entries to verify */
        const struct ota_document *doc;
        const struct otad_config *config;
        /* A bundle's image: its SHA-256 against the manifest's, instead
         * of the files' signatures. NULL for files. */
        const uint8_t *image_sha256;
        uint64_t image_size;
        struct worker *worker;
        /* results, read on the loop after the thread ended */
        int finish_result;
        unsigned failed_index;
        struct verify_report report;
        char sha256[OTA_DOCUMENT_MAX_FILES][65];
        char cert_name[256];
};

struct part_reader {
        struct verify_task *task;
        uint64_t offset;
};

static int read_part(uint64_t offset, void *buf, size_t len, void *userdata) {
        struct part_reader *reader = userdata;

        if (worker_cancelled(reader->task->worker))
                return -ECANCELED;
        return reader->task->installer->ops->read(reader->task->installer, reader->offset + offset, buf, len);
}

static int verify_in_thread(struct worker *w, void *arg) {
        struct verify_task *task = arg;

        task->worker = w;
        if (task->finish) {
                /* Syncing a whole slot is as slow as reading it back. */
                task->finish_result = task->installer->ops->finish(task->installer);
                if (task->finish_result < 0)
                        return task->finish_result;
        }
        if (task->image_sha256) {
                struct part_reader reader = { task, 0 };
                char want[65];
                int r;

                r = verify_sha256(task->image_size, read_part, &reader, task->sha256[0]);
                if (r < 0) {
                        errno = -r;
                        snprintf(task->report.reason, sizeof(task->report.reason), "cannot read the image back: %m");
                        return r;
                }
                bundle_sha256_hex(task->image_sha256, want);
                if (strcmp(want, task->sha256[0]) != 0) {
                        snprintf(task->report.reason, sizeof(task->report.reason),
                                 "the image read back is sha256 %s, the bundle's manifest says %s", task->sha256[0],
                                 want);
                        return -EBADMSG;
                }
                return 0;
        }
        for (unsigned i = task->first; i < task->first + task->count; i++) {
                const struct ota_document_file *f = &task->doc->files[i];
                struct part_reader reader = { task, f->part_offset };
                struct verify_request req = {
                        .sig_key = f->signature_key ? f->signature_key : "",
                        .signature = f->signature ? f->signature : "",
                        .certfile = f->certfile ? f->certfile : "",
                        .trust_dir = task->config->ota.trust_dir,
                        .signing_ca = task->config->ota.signing_ca,
                        .size = f->filesize,
                        .read = read_part,
                        .userdata = &reader,
                };
                int r;

                task->failed_index = i;
                if (!f->signature || !f->signature_key) {
                        snprintf(task->report.reason, sizeof(task->report.reason),
                                 "files[%u] carries no signature; otad installs only signed images", i);
                        return -EBADMSG;
                }
                r = verify_file(&req, &task->report);
                if (r < 0)
                        return r;
                memcpy(task->sha256[i], task->report.sha256_hex, sizeof(task->sha256[i]));
        }
        return 0;
}

static void on_verified(int result, void *userdata);

/* Verifies files [first, first+count) of img (finishing it first when
 * finish), reading them back from the target. */
static void start_verify(struct lifecycle *lc, struct image *img, unsigned first, unsigned count, bool finish) {
        struct verify_task *task;
        int r;

        task = calloc(1, sizeof(*task));
        if (!task) {
                fail(lc, OTA_PAL_SIGNATURE_CHECK_FAILED, -ENOMEM, "cannot verify files[%u]: %m", first);
                return;
        }
        *task = (struct verify_task){ .installer = img->installer, .finish = finish, .first = first, .count = count,
                                      .doc = lc->doc, .config = lc->otad->config };
        if (lc->bundle) {
                task->image_sha256 = lc->manifest->image_sha256;
                task->image_size = lc->manifest->image_size;
        }
        r = worker_start(lc->otad->event, verify_in_thread, task, on_verified, lc, &lc->worker);
        if (r < 0) {
                free(task);
                fail(lc, OTA_PAL_SIGNATURE_CHECK_FAILED, r, "cannot start verifying files[%u]: %m", first);
                return;
        }
        lc->verify = task;
        if (lc->bundle)
                log_job(LOG_INFO, lc->rec.job_id, "verify", "Verifying the bundle's image on [target.%s]%s",
                        img->target->name, finish ? " after syncing it" : "");
        else
                log_job(LOG_INFO, lc->rec.job_id, "verify", "Verifying files[%u..%u] on [target.%s]%s", first,
                        first + count - 1, img->target->name, finish ? " after syncing it" : "");
}

static void on_verified(int result, void *userdata) {
        struct lifecycle *lc = userdata;
        struct verify_task *task = lc->verify;
        struct image *img = images_of_file(&lc->images, task->first);
        bool last_of_image = task->first + task->count == img->first + img->count;
        unsigned index = task->failed_index;

        lc->worker = NULL;
        lc->verify = NULL;
        if (task->finish && task->finish_result < 0)
                fail_target(lc, OTA_PAL_RX_FILE_CREATE_FAILED, task->finish_result, img, "");
        else if (result < 0) {
                unsigned code = result == -ENOKEY || result == -EKEYREJECTED || result == -EOPNOTSUPP
                                        ? OTA_PAL_BAD_SIGNER_CERT
                                        : OTA_PAL_SIGNATURE_CHECK_FAILED;

                if (task->image_sha256)
                        fail(lc, OTA_PAL_SIGNATURE_CHECK_FAILED, result, "[target.%s]: %s", img->target->name,
                             task->report.reason);
                else
                        fail(lc, code, result, "files[%u]: %s", index, task->report.reason);
        } else {
                if (task->image_sha256)
                        log_full(LOG_NOTICE, 0,
                                 &(const struct log_fields){ .message_id = OTAD_MID_IMAGE_VERIFIED,
                                                             .job_id = lc->rec.job_id, .stage = "verify" },
                                 "Image verified: sha256 %s, the bundle manifest's (version %s), read back from [target.%s]",
                                 task->sha256[0], lc->manifest->version, img->target->name);
                for (unsigned i = task->first; !task->image_sha256 && i < task->first + task->count; i++)
                        log_full(LOG_NOTICE, 0,
                                 &(const struct log_fields){ .message_id = OTAD_MID_IMAGE_VERIFIED,
                                                             .job_id = lc->rec.job_id, .stage = "verify" },
                                 "files[%u] verified: sha256 %s, signed by %s", i, task->sha256[i],
                                 task->report.cert_name);
                if (last_of_image)
                        lc->images_verified[img - lc->images.v] = true;
                if (lc->rec.stage == STAGE_VERIFY) {
                        bool more = !lc->bundle && lc->rec.file_index + 1 < lc->rec.n_files;

                        if (fire(lc, more ? EV_VERIFIED_MORE : EV_VERIFIED, NULL, NULL) >= 0)
                                /* The record now says this file is done: its
                                 * progress record is no longer needed. */
                                transfer_forget_progress(lc->otad->config, index);
                } else
                        schedule_entry(lc, lc->rec.stage); /* activation goes on */
        }
        free(task);
}

static void verify_current_file(struct lifecycle *lc) {
        unsigned index = lc->rec.file_index;
        struct image *img;
        int r;

        if (!lc->doc)
                return; /* resumes when the job is delivered again */
        if (lc->bundle && index == 0) {
                if (!lc->manifest_bytes) {
                        /* Restarted between its arrival and its check: the
                         * bytes were in memory only. */
                        start_manifest(lc);
                        return;
                }
                accept_manifest(lc);
                return;
        }
        if (lc->bundle && load_manifest(lc) < 0)
                return;
        img = images_of_file(&lc->images, index);
        if (lc->bundle)
                img->size = lc->manifest->image_size;
        r = image_begin(img, true);
        if (r < 0) {
                fail_target(lc, OTA_PAL_RX_FILE_CREATE_FAILED, r, img, "");
                return;
        }
        /* A bundle's payload parts are the rest of its image's files (the
         * manifest is files[0]): all of them, so that on_verified counts the
         * image as verified and activation does not read it back again. */
        start_verify(lc, img, index, lc->bundle ? img->first + img->count - index : 1,
                     lc->bundle || index + 1 == img->first + img->count);
}

/* activate */

static void on_activate_done(struct installer *in, int r, void *userdata);

static void activated_one(struct lifecycle *lc) {
        int r;

        lc->rec.activated++;
        r = state_save(state_dir(lc), STATE_CURRENT_FILE, &lc->rec);
        if (r < 0) {
                end_unrecorded(lc, STAGE_ACTIVATE, STAGE_ACTIVATE, r);
                return;
        }
        schedule_entry(lc, STAGE_ACTIVATE);
}

static void on_ready_reported(struct lifecycle *lc);

/* Makes each verified image take effect, in plan order (A/B last); the
 * bootloader switch is the last act, and the record says so before it. */
static void activate_step(struct lifecycle *lc) {
        const struct config_slot *booted = NULL;

        if (lc->activating || lc->worker || lc->awaiting_ready || lc->reboot)
                return;
        if (lc->rec.activated < lc->rec.n_images) {
                struct image *img;
                int r;

                if (!lc->doc)
                        return; /* an unfinished activation resumes when the job is delivered */
                img = &lc->images.v[lc->rec.activated];
                /* Nothing is handed on for activation that was not
                 * verified by this run: after a restart it is read back
                 * once more. */
                if (!lc->images_verified[lc->rec.activated]) {
                        if (lc->bundle) {
                                if (load_manifest(lc) < 0)
                                        return;
                                img->size = lc->manifest->image_size;
                        }
                        r = image_begin(img, true);
                        if (r < 0) {
                                fail_target(lc, OTA_PAL_RX_FILE_CREATE_FAILED, r, img, "");
                                return;
                        }
                        start_verify(lc, img, img->first, img->count, true);
                        return;
                }
                installer_set_activate_done(img->installer, on_activate_done, lc);
                r = img->installer->ops->activate(img->installer);
                if (r == -EINPROGRESS) {
                        lc->activating = true;
                        return;
                }
                on_activate_done(img->installer, r, lc);
                return;
        }
        if (!lc->rec.new_slot[0]) {
                char reason[80], detail[160];

                snprintf(reason, sizeof(reason), "accepted  v%s", lc->running_version);
                snprintf(detail, sizeof(detail), "%u file(s) installed", lc->rec.n_files);
                (void) fire(lc, EV_INSTALLED, reason, detail);
                return;
        }
        if (slot_booted(lc->otad->config, lc->rec.slot_class, NULL, &booted) >= 0)
                snprintf(lc->rec.old_slot, sizeof(lc->rec.old_slot), "%s", booted->bootname);
        lc->awaiting_ready = true;
        lc->ops->ready(&lc->rec, lc->userdata);
}

static void switch_to_new_slot(struct lifecycle *lc, struct installer *in) {
        int r;

        if (!lc->bootloader) {
                fail(lc, OTA_PAL_ACTIVATE_FAILED, -EOPNOTSUPP,
                     "[target.%s]: [bootloader] type=none cannot boot slot %s; configure grub, uboot or custom",
                     in->target->name, lc->rec.new_slot);
                return;
        }
        /* The record in the state directory names new_slot as the slot
         * being activated (written when this stage was entered): after a
         * power cut from here on, the next start knows it is on trial. */
        r = bootloader_set_try_once(lc->bootloader, lc->rec.new_slot);
        if (r < 0) {
                mark_new_slot_bad(lc);
                fail(lc, OTA_PAL_ACTIVATE_FAILED, r, "[target.%s]: the bootloader refused to select slot %s: %m",
                     in->target->name, lc->rec.new_slot);
                return;
        }
        log_full(LOG_NOTICE, 0,
                 &(const struct log_fields){ .message_id = OTAD_MID_SLOT_ACTIVATED, .job_id = lc->rec.job_id,
                                             .stage = "activate", .slot = lc->rec.new_slot },
                 "[target.%s]: slot %s boots once on the next boot", in->target->name, lc->rec.new_slot);
        activated_one(lc);
}

static void on_activate_done(struct installer *in, int r, void *userdata) {
        struct lifecycle *lc = userdata;

        lc->activating = false;
        if (r < 0) {
                fail_target(lc, OTA_PAL_ACTIVATE_FAILED, r, &lc->images.v[lc->rec.activated], "");
                return;
        }
        if (r > 0) {
                /* An A/B image is synced and closed: now the switch. */
                switch_to_new_slot(lc, in);
                return;
        }
        activated_one(lc);
}

static void on_reboot_due(void *userdata) {
        struct lifecycle *lc = userdata;

        if (lc->rec.stage == STAGE_ACTIVATE)
                (void) fire(lc, EV_REBOOTING, NULL, NULL);
        else if (reboot_run(lc->reboot) < 0) /* a rollback going back to the old slot */
                log_job(LOG_ERR, lc->rec.job_id, "rollback", "Cannot reboot into the old slot; it boots on the next reboot");
}

static void on_reboot_failed(const char *detail, void *userdata);

static int ensure_reboot(struct lifecycle *lc) {
        if (lc->reboot)
                return 0;
        return reboot_new(lc->otad, lc->rec.job_id, on_reboot_failed, lc, &lc->reboot);
}

static void on_reboot_failed(const char *detail, void *userdata) {
        struct lifecycle *lc = userdata;
        char reason[64];

        if (lc->rec.stage != STAGE_REBOOT)
                return; /* a rollback's reboot: the old slot is primary whenever it happens */
        format_reason(reason, sizeof(reason), NULL, OTA_PAL_ACTIVATE_FAILED, 0);
        (void) fire(lc, EV_FAILED, reason, detail);
}

static void schedule_reboot(struct lifecycle *lc, const char *why) {
        int r;

        r = ensure_reboot(lc);
        if (r >= 0)
                r = reboot_schedule(lc->reboot, why, on_reboot_due);
        if (r < 0 && r != -EALREADY)
                log_job_errno(LOG_ERR, r, lc->rec.job_id, stage_name(lc->rec.stage), "Cannot schedule the reboot: %m");
}

static void on_ready_reported(struct lifecycle *lc) {
        schedule_reboot(lc, "boot the new slot");
}

/* self-test */

static void on_health_done(bool passed, const char *detail, void *userdata) {
        struct lifecycle *lc = userdata;
        char reason[80], committed[160];

        health_check_free(lc->health);
        lc->health = NULL;
        if (!passed) {
                (void) fire(lc, EV_UNHEALTHY, "rejected: 0x00000000", detail);
                return;
        }
        log_job(LOG_NOTICE, lc->rec.job_id, "self-test", "Health check passed");
        snprintf(reason, sizeof(reason), "accepted  v%s", lc->running_version);
        snprintf(committed, sizeof(committed), "slot %s committed", lc->rec.new_slot);
        (void) fire(lc, EV_HEALTHY, reason, committed);
}

static void start_self_test(struct lifecycle *lc) {
        const struct otad_config *config = lc->otad->config;
        int cmp = version_compare(lc->running_version, lc->rec.old_version);
        char reason[64], detail[256];
        int r;

        log_job(LOG_NOTICE, lc->rec.job_id, "self-test", "Booted slot %s with version %s (was %s)", lc->rec.new_slot,
                lc->running_version, lc->rec.old_version);
        if (cmp == 0 && !config->update.allow_same_version) {
                format_reason(reason, sizeof(reason), "rejected", OTA_ERR_SAME_VERSION, 0);
                snprintf(detail, sizeof(detail), "the new slot runs the same version %s as before; set [update] allow_same_version=yes to accept that",
                         lc->running_version);
                (void) fire(lc, EV_UNHEALTHY, reason, detail);
                return;
        }
        if (cmp < 0 && !config->update.allow_downgrade) {
                format_reason(reason, sizeof(reason), "rejected", OTA_ERR_DOWNGRADE, 0);
                snprintf(detail, sizeof(detail), "downgrade from %s to %s refused; set [update] allow_downgrade=yes to accept it",
                         lc->rec.old_version, lc->running_version);
                (void) fire(lc, EV_UNHEALTHY, reason, detail);
                return;
        }
        lc->ops->active(&lc->rec, lc->userdata);
        r = health_check_start(lc->otad, lc->rec.job_id, on_health_done, lc, &lc->health);
        if (r == 1) {
                log_job(LOG_NOTICE, lc->rec.job_id, "self-test", "No health check configured; committing");
                on_health_done(true, NULL, lc);
        } else if (r < 0) {
                errno = -r;
                snprintf(detail, sizeof(detail), "cannot run the health check: %m");
                (void) fire(lc, EV_UNHEALTHY, "rejected: 0x00000000", detail);
        }
}

/* the end */

static void commit(struct lifecycle *lc) {
        char reason[64], detail[256];
        int r;

        if (lc->rec.new_slot[0] && lc->bootloader) {
                r = bootloader_mark_good(lc->bootloader, lc->rec.new_slot);
                if (r < 0) {
                        format_reason(reason, sizeof(reason), NULL, OTA_PAL_COMMIT_FAILED, (unsigned) -r);
                        errno = -r;
                        snprintf(detail, sizeof(detail), "the health check passed but marking slot %s good failed: %m",
                                 lc->rec.new_slot);
                        (void) fire(lc, EV_UNHEALTHY, reason, detail);
                        return;
                }
        }
        if (!lc->rec.reported)
                lc->ops->finished(&lc->rec, lc->userdata);
}

static int on_report_wait_over(sd_event_source *s, uint64_t usec, void *userdata) {
        struct lifecycle *lc = userdata;

        lc->report_wait = sd_event_source_disable_unref(lc->report_wait);
        log_job(LOG_WARNING, lc->rec.job_id, "rollback",
                "The service has not confirmed the result yet; rebooting anyway, it is reported after the reboot");
        schedule_reboot(lc, "roll back to the previous slot");
        return 0;
}

static void roll_back(struct lifecycle *lc) {
        int on_new;

        mark_new_slot_bad(lc);
        on_new = lc->rec.new_slot[0] ? booted_new_slot(lc) : 0;
        lc->back_to_old_slot = on_new > 0;
        if (on_new > 0 && !lc->report_wait && !lc->reboot) {
                /* Back to the old slot once the service has the result, or
                 * after REPORT_WAIT_USEC. */
                if (lc->rec.reported)
                        schedule_reboot(lc, "roll back to the previous slot");
                else if (sd_event_add_time_relative(lc->otad->event, &lc->report_wait, CLOCK_MONOTONIC,
                                                    REPORT_WAIT_USEC, 0, on_report_wait_over, lc) < 0)
                        schedule_reboot(lc, "roll back to the previous slot");
        }
        if (!lc->rec.reported)
                lc->ops->finished(&lc->rec, lc->userdata);
        else if (on_new <= 0)
                (void) fire(lc, EV_REPORTED, NULL, NULL);
}

static void fail_cleanup(struct lifecycle *lc, enum stage from) {
        stop_work(lc);
        /* Activation may have switched the bootloader already. */
        if (from == STAGE_ACTIVATE)
                mark_new_slot_bad(lc);
        if (lc->images.n)
                images_close(&lc->images, true);
        else
                images_discard(lc->otad, lc->rec.job_id, lc->rec.targets);
        forget_progress(lc);
        if (!lc->rec.reported)
                lc->ops->finished(&lc->rec, lc->userdata);
        else
                (void) fire(lc, EV_REPORTED, NULL, NULL);
}

/* entry actions, from the loop */

static void run_entry(struct lifecycle *lc, enum stage from) {
        switch (lc->rec.stage) {
        case STAGE_DOWNLOAD:
                if (!lc->transfer)
                        start_download(lc);
                break;
        case STAGE_VERIFY:
                if (!lc->worker)
                        verify_current_file(lc);
                break;
        case STAGE_ACTIVATE:
                activate_step(lc);
                break;
        case STAGE_REBOOT: {
                /* The policy's wait is over and the record says so: go. */
                int r = ensure_reboot(lc);

                if (r >= 0)
                        r = reboot_run(lc->reboot);
                if (r < 0 && r != -EALREADY)
                        fail(lc, OTA_PAL_ACTIVATE_FAILED, r, "cannot run the reboot command: %m");
                break;
        }
        case STAGE_SELF_TEST:
                if (!lc->health)
                        start_self_test(lc);
                break;
        case STAGE_COMMIT:
                commit(lc);
                break;
        case STAGE_ROLLBACK:
                if (from != STAGE_ROLLBACK) {
                        stop_work(lc);
                        images_close(&lc->images, false);
                }
                roll_back(lc);
                break;
        case STAGE_FAIL:
                fail_cleanup(lc, from);
                break;
        default:
                break;
        }
}

static int on_kick(sd_event_source *s, void *userdata) {
        struct lifecycle *lc = userdata;

        if (!lc->have_record || !lc->entry_pending)
                return 0;
        lc->entry_pending = false;
        run_entry(lc, lc->entered_from);
        return 0;
}

static void schedule_entry(struct lifecycle *lc, enum stage from) {
        lc->entered_from = from;
        lc->entry_pending = true;
        (void) sd_event_source_set_enabled(lc->kick, SD_EVENT_ONESHOT);
}

/* otad started again in this stage: count it, and give up a stage that
 * never finishes (a watchdog kill loop, a crash on every try). */
static void restarted(struct lifecycle *lc) {
        char detail[256];

        if (lc->rec.stage != STAGE_DOWNLOAD && lc->rec.starts >= MAX_STARTS) {
                snprintf(detail, sizeof(detail),
                         "otad was started %u times in stage %s without finishing it (killed by the watchdog, crashed or powered off each time); giving up",
                         lc->rec.starts + 1, stage_name(lc->rec.stage));
                if (lc->rec.stage == STAGE_SELF_TEST)
                        (void) fire(lc, EV_UNHEALTHY, "rejected: 0x00000000", detail);
                else
                        fail(lc, lc->rec.stage == STAGE_VERIFY ? OTA_PAL_SIGNATURE_CHECK_FAILED : OTA_PAL_ACTIVATE_FAILED,
                             -ELOOP, "%s", detail);
                return;
        }
        (void) fire(lc, EV_RESTARTED, NULL, NULL);
}

/* The bootloader spent the new slot's try and booted the old one: the new
 * kernel or init failed, or a watchdog reset the board. */
static void fire_fell_back(struct lifecycle *lc) {
        char detail[256];

        snprintf(detail, sizeof(detail),
                 "booted slot %s although slot %s was activated for one boot: the bootloader fell back",
                 lc->rec.old_slot[0] ? lc->rec.old_slot : "the old one", lc->rec.new_slot);
        (void) fire(lc, EV_BOOTED_OLD, "rejected: 0x00000010", detail);
}

/* What the state directory holds at start, continued as far as it can be
 * without the job document. */
static void resume(struct lifecycle *lc) {
        struct state_record *r = &lc->rec;
        int on_new = 0;

        log_job(LOG_NOTICE, r->job_id, stage_name(r->stage), "Found the update of job %s in stage %s", r->job_id,
                stage_name(r->stage));
        if (r->new_slot[0] && r->stage >= STAGE_ACTIVATE) {
                on_new = booted_new_slot(lc);
                if (on_new < 0) {
                        /* Nothing may be marked good on a guess. */
                        fail(lc, OTA_PAL_ACTIVATE_FAILED, on_new, "cannot tell which slot is booted: %m");
                        return;
                }
        }
        switch (r->stage) {
        case STAGE_DOWNLOAD:
        case STAGE_VERIFY:
                return; /* the job's next delivery resumes it */
        case STAGE_ACTIVATE:
                if (on_new)
                        (void) fire(lc, EV_BOOTED_NEW, NULL, NULL);
                else if (r->activated < r->n_images)
                        return; /* an unfinished activation needs the job document */
                else if (!r->new_slot[0] || new_slot_try_pending(lc))
                        /* Every image took effect: what is left (the report,
                         * the reboot) needs no document. */
                        restarted(lc);
                else
                        fire_fell_back(lc);
                return;
        case STAGE_REBOOT:
                if (on_new)
                        (void) fire(lc, EV_BOOTED_NEW, NULL, NULL);
                else if (new_slot_try_pending(lc))
                        restarted(lc); /* otad stopped before the reboot happened: reboot again */
                else
                        fire_fell_back(lc);
                return;
        case STAGE_SELF_TEST:
                if (on_new)
                        restarted(lc);
                else
                        (void) fire(lc, EV_BOOTED_OLD, "rejected: 0x00000000",
                                    "booted the old slot during the self-test: the new slot did not come up again");
                return;
        case STAGE_COMMIT:
                if (r->new_slot[0] && !on_new && !r->reported) {
                        (void) fire(lc, EV_BOOTED_OLD, "rejected: 0x00000000",
                                    "power was lost before the new slot was marked good; the bootloader fell back");
                        return;
                }
                break;
        default:
                break;
        }
        /* Ended: report what is not reported yet, retire what is. A
         * rollback's mark may not have reached the bootloader (it could not
         * write then): it is repeated, it is idempotent. */
        if (r->reported && !(r->stage == STAGE_ROLLBACK && on_new > 0)) {
                if (r->stage == STAGE_ROLLBACK)
                        mark_new_slot_bad(lc);
                (void) fire(lc, EV_REPORTED, NULL, NULL);
        } else
                schedule_entry(lc, r->stage);
}

int lifecycle_new(struct otad *otad, const struct lifecycle_ops *ops, void *userdata, struct lifecycle **ret) {
        struct lifecycle *lc;
        int r;

        assert_return(otad && ops && ret, -EINVAL);
        lc = calloc(1, sizeof(*lc));
        if (!lc)
                return -ENOMEM;
        lc->otad = otad;
        lc->ops = ops;
        lc->userdata = userdata;
        r = version_running(otad->config, &lc->running_version);
        if (r < 0)
                goto fail;
        if (otad->config->bootloader.type != BOOTLOADER_NONE) {
                r = bootloader_new(otad->config, &lc->bootloader);
                if (r < 0)
                        goto fail;
        }
        r = sd_event_add_defer(otad->event, &lc->kick, on_kick, lc);
        if (r < 0)
                goto fail;
        (void) sd_event_source_set_enabled(lc->kick, SD_EVENT_OFF);
        log_info("Running version %s", lc->running_version);
        record_booted_versions(lc);

        r = state_load(state_dir(lc), STATE_CURRENT_FILE, &lc->rec);
        if (r == -ENOENT)
                mark_booted_good(lc);
        else if (r < 0)
                /* Which slot is on trial is unknown: marking the booted one
                 * good could commit an untested slot. */
                log_error_errno(r, "Failed to read %s/%s: %m; marking no slot good. Check `otad status`, then remove the file to go on",
                                state_dir(lc), STATE_CURRENT_FILE);
        else {
                lc->have_record = true;
                resume(lc);
        }
        *ret = lc;
        return 0;
fail:
        lifecycle_free(lc);
        return r;
}

void lifecycle_free(struct lifecycle *lc) {
        if (!lc)
                return;
        forget_job(lc, false);
        sd_event_source_disable_unref(lc->kick);
        bootloader_free(lc->bootloader);
        free(lc->running_version);
        free(lc);
}

const struct state_record *lifecycle_record(const struct lifecycle *lc) {
        return lc && lc->have_record ? &lc->rec : NULL;
}

bool lifecycle_busy_with_other(const struct lifecycle *lc, const char *job_id) {
        const struct state_record *r = lifecycle_record(lc);

        if (!r || strcmp(r->job_id, job_id) == 0 || r->stage < STAGE_ACTIVATE)
                return false;
        /* Going on by itself without its job: through the reboot and the
         * self-test, and a rollback back to the old slot. An activation
         * that still needs its job (the service offers another one, so it
         * is gone) is discarded instead: waiting for it would wedge. */
        return r->stage == STAGE_REBOOT || r->stage == STAGE_SELF_TEST ||
               (r->stage == STAGE_COMMIT && !r->reported) || (r->stage == STAGE_ROLLBACK && lc->back_to_old_slot);
}

bool lifecycle_needs_document(const struct lifecycle *lc) {
        const struct state_record *r = lifecycle_record(lc);

        if (!r || lc->doc || stage_is_terminal(r->stage))
                return false;
        return r->stage == STAGE_DOWNLOAD || r->stage == STAGE_VERIFY ||
               (r->stage == STAGE_ACTIVATE && r->activated < r->n_images);
}

static int choose_protocol(const struct lifecycle *lc, const struct ota_document *doc) {
        unsigned offered = doc->protocols;

        if (lc->otad->config->ota.protocol == OTA_PROTOCOL_HTTP && (offered & OTA_DOCUMENT_HTTP))
                return OTA_PROTOCOL_HTTP;
        if ((offered & OTA_DOCUMENT_MQTT) && doc->stream_name)
                return OTA_PROTOCOL_MQTT;
        if (offered & OTA_DOCUMENT_HTTP)
                return OTA_PROTOCOL_HTTP;
        return -EPROTONOSUPPORT;
}

/* A different job replaces what the state directory remembers: its partial
 * files go, so that nothing of it is resumed by mistake. */
static void discard_remembered(struct lifecycle *lc) {
        int r;

        log_job(LOG_NOTICE, lc->rec.job_id, stage_name(lc->rec.stage), "Discarding the progress of job %s (stage %s)",
                lc->rec.job_id, stage_name(lc->rec.stage));
        forget_job(lc, false);
        /* An activation may have switched the bootloader already. */
        if (lc->rec.stage == STAGE_ACTIVATE)
                mark_new_slot_bad(lc);
        images_discard(lc->otad, lc->rec.job_id, lc->rec.targets);
        forget_progress(lc);
        r = state_remove(state_dir(lc), STATE_CURRENT_FILE);
        if (r < 0)
                log_job_errno(LOG_WARNING, r, lc->rec.job_id, stage_name(lc->rec.stage),
                              "Failed to remove %s/%s: %m; the new job's first record replaces it", state_dir(lc),
                              STATE_CURRENT_FILE);
        lc->have_record = false;
        lc->rec = (struct state_record){ 0 };
}

static void new_record(struct lifecycle *lc, const char *job_id, int64_t execution_number) {
        lc->rec = (struct state_record){ .execution_number = execution_number };
        snprintf(lc->rec.job_id, sizeof(lc->rec.job_id), "%s", job_id);
        snprintf(lc->rec.old_version, sizeof(lc->rec.old_version), "%s", lc->running_version);
}

void lifecycle_refuse(struct lifecycle *lc, const char *job_id, int64_t execution_number, const char *reason,
                      const char *detail) {
        if (lc->have_record && strcmp(lc->rec.job_id, job_id) != 0 && !lifecycle_busy_with_other(lc, job_id)) {
                if (stage_is_terminal(lc->rec.stage))
                        leave(lc, true);
                else
                        discard_remembered(lc);
        }
        if (lc->have_record)
                return;
        new_record(lc, job_id, execution_number);
        (void) fire(lc, EV_FAILED, reason, detail);
}

int lifecycle_take(struct lifecycle *lc, const char *job_id, int64_t execution_number, struct ota_document *doc) {
        char identity[65], detail[256], reason[64];
        bool resume_it;
        int r;

        assert_return(lc && job_id && doc, -EINVAL);
        if (lifecycle_busy_with_other(lc, job_id)) {
                ota_document_free(doc);
                return -EBUSY;
        }
        if (lc->have_record && strcmp(lc->rec.job_id, job_id) != 0) {
                if (stage_is_terminal(lc->rec.stage))
                        leave(lc, true); /* the service moved on: nobody asks for that result */
                else
                        discard_remembered(lc);
        }
        forget_job(lc, false);
        lc->doc = doc;
        r = choose_protocol(lc, doc);
        if (r < 0) {
                if (!lc->have_record)
                        new_record(lc, job_id, execution_number);
                format_reason(reason, sizeof(reason), "aborted", 0x0d, 0);
                (void) fire(lc, EV_FAILED, reason,
                            "the job offers no protocol otad can use (MQTT needs a streamname, HTTP an update_data_url)");
                return 0;
        }
        lc->protocol = (enum ota_protocol) r;
        lc->bundle = bundle_job_is_bundle(doc);
        r = lc->bundle ? images_plan_bundle(&lc->images, lc->otad->config, doc, detail, sizeof(detail))
                       : images_plan(&lc->images, lc->otad->config, doc, detail, sizeof(detail));
        if (r < 0) {
                if (!lc->have_record)
                        new_record(lc, job_id, execution_number);
                format_reason(reason, sizeof(reason), NULL, OTA_PAL_RX_FILE_CREATE_FAILED, (unsigned) -r);
                (void) fire(lc, EV_FAILED, reason, detail);
                return 0;
        }
        images_identity(&lc->images, doc, job_id, lc->protocol, identity);
        resume_it = lc->have_record && !stage_is_terminal(lc->rec.stage) && strcmp(lc->rec.identity, identity) == 0;
        if (lc->have_record && !resume_it)
                discard_remembered(lc);
        if (!resume_it) {
                new_record(lc, job_id, execution_number);
                memcpy(lc->rec.identity, identity, sizeof(identity));
                snprintf(lc->rec.protocol, sizeof(lc->rec.protocol), "%s",
                         lc->protocol == OTA_PROTOCOL_MQTT ? "mqtt" : "http");
                lc->rec.n_files = (unsigned) doc->n_files;
                for (size_t i = 0; i < doc->n_files; i++)
                        lc->rec.total += doc->files[i].filesize;
                images_target_names(&lc->images, lc->rec.targets, sizeof(lc->rec.targets));
                lc->rec.n_images = (unsigned) lc->images.n;
                for (size_t i = 0; i < lc->images.n; i++)
                        if (lc->images.v[i].target->type == TARGET_AB) {
                                const struct config_target *t = lc->images.v[i].target;

                                snprintf(lc->rec.target, sizeof(lc->rec.target), "%s", t->name);
                                snprintf(lc->rec.slot_class, sizeof(lc->rec.slot_class), "%s",
                                         t->slot_class && *t->slot_class ? t->slot_class : "rootfs");
                        }
        }
        r = images_open(&lc->images, lc->otad, job_id);
        if (r < 0) {
                format_reason(reason, sizeof(reason), NULL, OTA_PAL_RX_FILE_CREATE_FAILED, (unsigned) -r);
                errno = -r;
                snprintf(detail, sizeof(detail), "cannot prepare the targets: %m");
                (void) fire(lc, EV_FAILED, reason, detail);
                return 0;
        }
        if (resume_it) {
                log_job(LOG_NOTICE, job_id, stage_name(lc->rec.stage), "Resuming job %s at files[%u] (stage %s)",
                        job_id, lc->rec.file_index, stage_name(lc->rec.stage));
                restarted(lc);
        } else
                (void) fire(lc, EV_TAKEN, NULL, NULL);
        return 0;
}

void lifecycle_refresh(struct lifecycle *lc, const struct ota_document *doc) {
        if (lc->install) {
                bundle_install_set_url(lc->install, doc);
                return;
        }
        if (!lc->transfer || lc->rec.file_index >= doc->n_files || !doc->files[lc->rec.file_index].update_data_url)
                return;
        (void) transfer_set_url(lc->transfer, doc->files[lc->rec.file_index].update_data_url);
}

void lifecycle_cancel(struct lifecycle *lc) {
        if (!lc->have_record || stage_is_terminal(lc->rec.stage))
                return;
        if (lc->rec.stage == STAGE_SELF_TEST) {
                /* Booted the new slot already: the self-test decides, only
                 * the report has nobody to go to. */
                log_job(LOG_NOTICE, lc->rec.job_id, "self-test", "Job %s is no longer offered; the self-test still decides",
                        lc->rec.job_id);
                return;
        }
        log_job(LOG_NOTICE, lc->rec.job_id, stage_name(lc->rec.stage),
                "Job %s was cancelled or removed; stopping its update", lc->rec.job_id);
        stop_work(lc);
        if (lc->rec.stage >= STAGE_ACTIVATE)
                mark_new_slot_bad(lc);
        images_close(&lc->images, true);
        forget_progress(lc);
        (void) fire(lc, EV_CANCELLED, NULL, NULL);
}

void lifecycle_ready_reported(struct lifecycle *lc, int result) {
        if (!lc->awaiting_ready || lc->rec.stage != STAGE_ACTIVATE)
                return;
        lc->awaiting_ready = false;
        if (result < 0)
                log_job(LOG_WARNING, lc->rec.job_id, "activate",
                        "The service did not take \"self_test\":\"ready\"; rebooting all the same, the self-test reports after the boot");
        on_ready_reported(lc);
}

void lifecycle_reported(struct lifecycle *lc, int result) {
        int r;

        if (!lc->have_record || !stage_is_terminal(lc->rec.stage))
                return;
        if (result < 0)
                log_job_errno(LOG_WARNING, result, lc->rec.job_id, stage_name(lc->rec.stage),
                              "The service did not take the final status: %m");
        lc->rec.reported = result >= 0;
        if (lc->rec.stage == STAGE_ROLLBACK && lc->back_to_old_slot && !lc->reboot) {
                /* Back to the old slot now that the service knows; the
                 * record is retired after that boot. */
                lc->report_wait = sd_event_source_disable_unref(lc->report_wait);
                r = state_save(state_dir(lc), STATE_CURRENT_FILE, &lc->rec);
                if (r < 0)
                        log_job_errno(LOG_WARNING, r, lc->rec.job_id, "rollback",
                                      "Failed to record that the result was reported: %m; it is reported again after the reboot");
                schedule_reboot(lc, "roll back to the previous slot");
                return;
        }
        if (lc->rec.stage == STAGE_ROLLBACK && lc->back_to_old_slot)
                return; /* rebooting into the old slot; retired after that boot */
        (void) fire(lc, EV_REPORTED, NULL, NULL);
}
