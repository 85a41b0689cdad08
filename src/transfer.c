/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "download.h"
#include "fileio.h"
#include "http.h"
#include "installer.h"
#include "log.h"
#include "ota_document.h"
#include "stream.h"
#include "transfer.h"

/* The reference agent counts HTTPS progress in 4 KiB blocks too. */
#define HTTP_PROGRESS_BLOCK 4096

struct transfer {
        struct otad *otad;
        const struct ota_document_file *file;
        struct transfer_sink sink;
        bool ranges;                   /* wanted ranges: progress counts wanted bytes */
        enum ota_protocol protocol;
        struct stream_download *stream;
        struct http_download *http;
        const struct transfer_ops *ops;
        void *userdata;
};

static char *progress_path(const struct otad_config *config, unsigned index) {
        char *path;

        if (asprintf(&path, "%s/file-%u.progress", config->state.directory, index) < 0)
                return NULL;
        return path;
}

void transfer_forget_progress(const struct otad_config *config, unsigned file_index) {
        _cleanup_free_ char *path = progress_path(config, file_index);

        if (path)
                (void) unlink(path);
}

void transfer_remove_progress(const struct otad_config *config) {
        for (unsigned i = 0; i < OTA_DOCUMENT_MAX_FILES; i++)
                transfer_forget_progress(config, i);
        (void) fsync_directory(config->state.directory);
}

static int installer_write(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct installer *in = userdata;

        return in->ops->write(in, offset, buf, len);
}

static int installer_sync(void *userdata) {
        struct installer *in = userdata;

        return in->ops->sync(in);
}

void transfer_sink_installer(struct installer *in, uint64_t base, struct transfer_sink *ret) {
        *ret = (struct transfer_sink){ .write = installer_write, .sync = installer_sync, .userdata = in, .base = base };
}

static int on_write(uint64_t offset, const void *buf, size_t len, void *userdata) {
        struct transfer *t = userdata;

        if (offset > t->file->filesize || len > t->file->filesize - offset)
                return -ERANGE;
        return t->sink.write(t->sink.base + offset, buf, len, t->sink.userdata);
}

static int on_sync(void *userdata) {
        struct transfer *t = userdata;

        return t->sink.sync(t->sink.userdata);
}

static void on_progress(uint64_t done, uint64_t total, void *userdata) {
        struct transfer *t = userdata;

        if (t->protocol == OTA_PROTOCOL_MQTT && !t->ranges)
                /* done/total count blocks; bytes are close enough for status. */
                t->ops->progress(done, total, total ? t->file->filesize * done / total : 0, t->userdata);
        else
                t->ops->progress((done + HTTP_PROGRESS_BLOCK - 1) / HTTP_PROGRESS_BLOCK,
                                 (total + HTTP_PROGRESS_BLOCK - 1) / HTTP_PROGRESS_BLOCK, done, t->userdata);
}

static void on_need_url(void *userdata) {
        struct transfer *t = userdata;

        t->ops->need_fresh_url(t->userdata);
}

static void on_finished(int result, const char *reason, void *userdata) {
        struct transfer *t = userdata;

        t->ops->finished(result, reason, t->userdata);
}

static const struct download_ops download_ops = {
        .write = on_write,
        .sync = on_sync,
        .progress = on_progress,
        .need_fresh_url = on_need_url,
        .finished = on_finished,
};

int transfer_start(struct otad *otad, const struct ota_document *doc, enum ota_protocol protocol,
                   unsigned file_index, const struct transfer_sink *sink, const struct download_range *wanted,
                   size_t n_wanted, const char *job_id, const struct transfer_ops *ops, void *userdata,
                   struct transfer **ret) {
        const struct ota_document_file *f;
        _cleanup_free_ char *state_path = NULL;
        struct transfer *t;
        struct download_file file;
        int r;

        assert_return(otad && doc && sink && sink->write && sink->sync && job_id && ops && ret, -EINVAL);
        assert_return(file_index < doc->n_files, -EINVAL);
        f = &doc->files[file_index];
        state_path = progress_path(otad->config, file_index);
        if (!state_path)
                return -ENOMEM;
        if (protocol == OTA_PROTOCOL_HTTP && !f->update_data_url)
                return -EPROTONOSUPPORT;
        t = calloc(1, sizeof(*t));
        if (!t)
                return -ENOMEM;
        *t = (struct transfer){ .otad = otad, .file = f, .sink = *sink, .ranges = wanted != NULL,
                                .protocol = protocol, .ops = ops, .userdata = userdata };
        file = (struct download_file){
                .job_id = job_id,
                .file_index = file_index,
                .size = f->filesize,
                .signature = f->signature ? f->signature : "",
                .state_path = state_path,
                .wanted = wanted,
                .n_wanted = n_wanted,
        };
        if (protocol == OTA_PROTOCOL_MQTT)
                r = stream_download_new(otad, doc->stream_name, f->fileid, &file, &download_ops, t, &t->stream);
        else
                r = http_download_new(otad, f->update_data_url, &file, &download_ops, t, &t->http);
        if (r < 0) {
                free(t);
                return r;
        }
        log_job(LOG_INFO, job_id, "download", "Downloading files[%u] (%" PRIu32 " bytes%s) over %s", file_index,
                f->filesize, wanted ? ", the wanted ranges of it" : "", protocol == OTA_PROTOCOL_MQTT ? "mqtt" : "http");
        *ret = t;
        return 0;
}

void transfer_free(struct transfer *t) {
        if (!t)
                return;
        stream_download_free(t->stream);
        http_download_free(t->http);
        free(t);
}

int transfer_set_url(struct transfer *t, const char *url) {
        if (!t || !t->http)
                return 0;
        return http_download_set_url(t->http, url);
}
