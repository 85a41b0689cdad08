/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fnmatch.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "images.h"
#include "installer.h"
#include "macro.h"

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

int images_plan(struct images *images, const struct otad_config *config, const struct ota_document *doc,
                char *detail, size_t detail_size) {
        assert_return(images && config && doc, -EINVAL);

        *images = (struct images){ 0 };
        for (unsigned i = 0; i < doc->n_files;) {
                const struct ota_document_file *f = &doc->files[i];
                struct image *img = &images->v[images->n];
                unsigned n = 1;

                if (f->is_part)
                        while (i + n < doc->n_files && doc->files[i + n].is_part && doc->files[i + n].part_offset > 0)
                                n++;
                img->target = route_file(config, f);
                if (!img->target) {
                        snprintf(detail, detail_size,
                                 "no [target.*] accepts files[%u] (filepath \"%.64s\", fileType %u); "
                                 "add a target whose match_filepath and match_file_type accept it",
                                 i, f->image, f->file_type);
                        return -ENOENT;
                }
                /* A target holds one image: two would overwrite each other. */
                for (size_t k = 0; k < images->n; k++)
                        if (images->v[k].target == img->target) {
                                snprintf(detail, detail_size,
                                         "files[%u] and files[%u] both go to [target.%s], which takes one image per job",
                                         images->v[k].first, i, img->target->name);
                                return -EEXIST;
                        }
                img->first = i;
                img->count = n;
                img->size = f->is_part ? f->image_size : f->filesize;
                images->n++;
                i += n;
        }
        /* A/B images activate last: a file or command target that fails
         * then leaves no slot armed for a reboot. */
        for (size_t i = 0, moved = 0; i + moved < images->n;) {
                struct image img = images->v[i];

                if (img.target->type != TARGET_AB) {
                        i++;
                        continue;
                }
                memmove(&images->v[i], &images->v[i + 1], (images->n - i - 1) * sizeof(img));
                images->v[images->n - 1] = img;
                moved++;
        }
        return 0;
}

int images_plan_bundle(struct images *images, const struct otad_config *config, const struct ota_document *doc,
                       char *detail, size_t detail_size) {
        const struct ota_document_file *f;

        assert_return(images && config && doc && doc->n_files > 0, -EINVAL);
        *images = (struct images){ 0 };
        f = &doc->files[0];
        images->v[0].target = route_file(config, f);
        if (!images->v[0].target) {
                snprintf(detail, detail_size,
                         "no [target.*] accepts the bundle's manifest files[0] (filepath \"%.64s\", fileType %u); "
                         "add a target whose match_filepath and match_file_type accept it",
                         f->image, f->file_type);
                return -ENOENT;
        }
        images->v[0].first = 0;
        images->v[0].count = (unsigned) doc->n_files;
        images->n = 1;
        return 0;
}

int images_open(struct images *images, struct otad *otad, const char *job_id) {
        for (size_t i = 0; i < images->n; i++) {
                int r = installer_new(otad, images->v[i].target, job_id, &images->v[i].installer);

                if (r < 0)
                        return r;
        }
        return 0;
}

void images_close(struct images *images, bool abort) {
        for (size_t i = 0; i < images->n; i++) {
                struct installer *in = images->v[i].installer;

                if (in && abort && in->ops->abort)
                        in->ops->abort(in);
                installer_free(in);
        }
        *images = (struct images){ 0 };
}

struct image *images_of_file(struct images *images, unsigned file_index) {
        for (size_t i = 0; i < images->n; i++)
                if (file_index >= images->v[i].first && file_index < images->v[i].first + images->v[i].count)
                        return &images->v[i];
        return NULL;
}

int image_begin(struct image *image, bool resume) {
        int r;

        if (image->begun)
                return 0;
        r = image->installer->ops->begin(image->installer, image->size, resume);
        if (r < 0)
                return r;
        image->begun = true;
        return 0;
}

void images_identity(const struct images *images, const struct ota_document *doc, const char *job_id,
                     enum ota_protocol protocol, char ret[static 65]) {
        EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        unsigned char digest[32] = { 0 };
        unsigned len = 0;
        char buf[128];

        EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
        EVP_DigestUpdate(ctx, job_id, strlen(job_id) + 1);
        snprintf(buf, sizeof(buf), "%d", (int) protocol);
        EVP_DigestUpdate(ctx, buf, strlen(buf) + 1);
        for (size_t i = 0; i < doc->n_files; i++) {
                const struct ota_document_file *f = &doc->files[i];

                snprintf(buf, sizeof(buf), "%u:%" PRIu32 ":%u:%" PRIu64, f->fileid, f->filesize, f->file_type,
                         f->part_offset);
                EVP_DigestUpdate(ctx, buf, strlen(buf) + 1);
                if (f->signature)
                        EVP_DigestUpdate(ctx, f->signature, strlen(f->signature) + 1);
                EVP_DigestUpdate(ctx, f->image, strlen(f->image) + 1);
        }
        for (size_t i = 0; i < images->n; i++)
                EVP_DigestUpdate(ctx, images->v[i].target->name, strlen(images->v[i].target->name) + 1);
        EVP_DigestFinal_ex(ctx, digest, &len);
        EVP_MD_CTX_free(ctx);
        for (unsigned i = 0; i < 32; i++)
                snprintf(ret + 2 * i, 3, "%02x", digest[i]);
}

void images_target_names(const struct images *images, char *buf, size_t size) {
        buf[0] = '\0';
        for (size_t i = 0; i < images->n; i++) {
                size_t len = strlen(buf);

                snprintf(buf + len, size - len, "%s%s", len ? "," : "", images->v[i].target->name);
        }
}

void images_discard(struct otad *otad, const char *job_id, const char *target_names) {
        _cleanup_free_ char *names = strdup(target_names);
        char *save = NULL;

        for (char *name = names ? strtok_r(names, ",", &save) : NULL; name; name = strtok_r(NULL, ",", &save))
                for (size_t i = 0; i < otad->config->n_targets; i++) {
                        const struct config_target *t = &otad->config->targets[i];
                        struct installer *in = NULL;

                        /* The inactive slot keeps what was written: it is
                         * not selected for boot and the next update
                         * overwrites it. */
                        if (strcmp(t->name, name) != 0 || t->type == TARGET_AB ||
                            installer_new(otad, t, job_id, &in) < 0)
                                continue;
                        if (in->ops->abort)
                                in->ops->abort(in);
                        installer_free(in);
                }
}
