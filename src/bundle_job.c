/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bundle_install.h"
#include "bundle_job.h"
#include "bundle_manifest.h"
#include "config.h"
#include "fileio.h"
#include "macro.h"
#include "ota_document.h"
#include "verify.h"

#define MANIFEST_FILE "bundle.manifest"
#define MANIFEST_SUFFIX ".manifest"

/* Reference agent codes (protocol.md §2.4) for what the manifest's checks
 * find: a signature that fails, a certificate that is not trusted, and a
 * job document whose files do not match the manifest. */
#define OTA_ERR_JOB_PARSER 0x0c
#define OTA_JOB_PARSE_NON_CONFORMING 0x04
#define OTA_PAL_SIGNATURE_CHECK_FAILED 0xe3
#define OTA_PAL_BOOT_INFO_CREATE_FAILED 0xe6
#define OTA_PAL_BAD_SIGNER_CERT 0xe7

bool bundle_job_is_bundle(const struct ota_document *doc) {
        const char *name;
        size_t n;

        if (!doc || doc->n_files < 2 || doc->files[0].is_part)
                return false;
        name = doc->files[0].image;
        n = strlen(name);
        return n > strlen(MANIFEST_SUFFIX) && strcmp(name + n - strlen(MANIFEST_SUFFIX), MANIFEST_SUFFIX) == 0;
}

static int refuse(struct bundle_job_refusal *refusal, int error, const char *word, unsigned code, unsigned sub,
                  const char *format, ...) __attribute__((format(printf, 6, 7)));
static int refuse(struct bundle_job_refusal *refusal, int error, const char *word, unsigned code, unsigned sub,
                  const char *format, ...) {
        va_list ap;

        if (word)
                snprintf(refusal->reason, sizeof(refusal->reason), "%s: 0x%08x", word, code);
        else
                snprintf(refusal->reason, sizeof(refusal->reason), "0x%08x: 0x%08x", code, sub);
        va_start(ap, format);
        errno = error < 0 ? -error : error; /* for %m */
        vsnprintf(refusal->detail, sizeof(refusal->detail), format, ap);
        va_end(ap);
        return error < 0 ? error : -error;
}

struct memory {
        const uint8_t *data;
        size_t size;
};

static int read_memory(uint64_t offset, void *buf, size_t len, void *userdata) {
        const struct memory *m = userdata;

        if (offset > m->size || len > m->size - offset)
                return -ERANGE;
        memcpy(buf, m->data + offset, len);
        return 0;
}

/* The manifest is a job file like any other: signed over its bytes, with
 * the job's sig-sha256-ecdsa, by a certificate of trust_dir. */
static int check_signature(const struct otad_config *config, const struct ota_document_file *f, const void *bytes,
                           size_t size, struct bundle_job_refusal *refusal) {
        struct memory mem = { bytes, size };
        struct verify_report report = { 0 };
        int r;

        if (!f->signature || !f->signature_key)
                return refuse(refusal, -EBADMSG, NULL, OTA_PAL_SIGNATURE_CHECK_FAILED, EBADMSG,
                              "the bundle's manifest (files[0]) carries no signature; otad installs only signed bundles");
        r = verify_file(&(const struct verify_request){
                                .sig_key = f->signature_key,
                                .signature = f->signature,
                                .certfile = f->certfile ? f->certfile : "",
                                .trust_dir = config->ota.trust_dir,
                                .signing_ca = config->ota.signing_ca,
                                .size = size,
                                .read = read_memory,
                                .userdata = &mem,
                        },
                        &report);
        if (r < 0)
                return refuse(refusal, r, NULL,
                              r == -ENOKEY || r == -EKEYREJECTED || r == -EOPNOTSUPP ? OTA_PAL_BAD_SIGNER_CERT
                                                                                     : OTA_PAL_SIGNATURE_CHECK_FAILED,
                              (unsigned) -r, "the bundle's manifest (files[0]): %s", report.reason);
        return 0;
}

/* A bundle that otad bundle create makes is a job a device takes. */
_Static_assert(BUNDLE_PARTS_MAX + 1 <= OTA_DOCUMENT_MAX_FILES, "the manifest and every part fit in one job");

/* The job's files after the manifest are the manifest's parts, in order,
 * each named and sized as the manifest says: a part from another bundle is
 * refused before a byte of it is fetched. */
static int match_parts(const struct ota_document *doc, const struct bundle_manifest *m,
                       unsigned part_files[static BUNDLE_PARTS_MAX], struct bundle_job_refusal *refusal) {
        if (doc->n_files != m->n_parts + 1)
                return refuse(refusal, -EBADMSG, NULL, OTA_ERR_JOB_PARSER, OTA_JOB_PARSE_NON_CONFORMING,
                              "the job has %zu file(s) after the manifest, the manifest names %zu part(s)",
                              doc->n_files - 1, m->n_parts);
        for (size_t i = 0; i < m->n_parts; i++) {
                const struct ota_document_file *f = &doc->files[i + 1];

                if (strcmp(f->image, m->parts[i].file) != 0 || f->filesize != m->parts[i].size)
                        return refuse(refusal, -EBADMSG, NULL, OTA_ERR_JOB_PARSER, OTA_JOB_PARSE_NON_CONFORMING,
                                      "files[%zu] is \"%.64s\" of %" PRIu32 " bytes, the manifest's part %zu is \"%s\" of %" PRIu64
                                      " bytes: the job and the bundle disagree",
                                      i + 1, f->image, f->filesize, i, m->parts[i].file, m->parts[i].size);
                part_files[i] = (unsigned) (i + 1);
        }
        return 0;
}

static int check(const struct otad_config *config, const struct ota_document *doc, const char *running_version,
                 const void *bytes, size_t size, struct bundle_manifest **ret_manifest,
                 unsigned part_files[static BUNDLE_PARTS_MAX], struct bundle_job_refusal *refusal) {
        struct bundle_manifest *m = NULL;
        struct bundle_decision decision;
        char err[256] = "";
        int r;

        r = check_signature(config, &doc->files[0], bytes, size, refusal);
        if (r < 0)
                return r;
        r = bundle_manifest_parse(bytes, size, &m, err, sizeof(err));
        if (r < 0)
                return refuse(refusal, r, NULL, OTA_ERR_JOB_PARSER, OTA_JOB_PARSE_NON_CONFORMING,
                              "the bundle's manifest: %s", err[0] ? err : "not a manifest otad reads");
        r = match_parts(doc, m, part_files, refusal);
        if (r < 0)
                goto fail;
        bundle_manifest_decide(m,
                               &(const struct bundle_policy){
                                       .compatible = config->update.compatible,
                                       .running_version = running_version,
                                       .allow_downgrade = config->update.allow_downgrade,
                                       .allow_same_version = config->update.allow_same_version,
                               },
                               &decision);
        if (decision.verdict != BUNDLE_ACCEPT) {
                r = refuse(refusal, -EPERM, decision.word, decision.code, decision.sub_code, "%s", decision.detail);
                goto fail;
        }
        *ret_manifest = m;
        return 0;
fail:
        bundle_manifest_free(m);
        return r;
}

static int manifest_path(const struct otad_config *config, char **ret) {
        return asprintf(ret, "%s/%s", config->state.directory, MANIFEST_FILE) < 0 ? -ENOMEM : 0;
}

int bundle_job_accept(const struct otad_config *config, const struct ota_document *doc, const char *running_version,
                      const void *bytes, size_t size, struct bundle_manifest **ret_manifest,
                      unsigned ret_part_files[static BUNDLE_PARTS_MAX], struct bundle_job_refusal *refusal) {
        _cleanup_free_ char *path = NULL;
        struct bundle_manifest *m = NULL;
        int r;

        assert_return(config && doc && bytes && ret_manifest && refusal, -EINVAL);
        r = check(config, doc, running_version, bytes, size, &m, ret_part_files, refusal);
        if (r < 0)
                return r;
        r = manifest_path(config, &path);
        if (r >= 0)
                r = write_file_atomic(path, bytes, size, 0600);
        if (r < 0) {
                bundle_manifest_free(m);
                return refuse(refusal, r, NULL, OTA_PAL_BOOT_INFO_CREATE_FAILED, (unsigned) -r,
                              "cannot keep the bundle's manifest in the state directory %s: %m", config->state.directory);
        }
        *ret_manifest = m;
        return 0;
}

int bundle_job_load(const struct otad_config *config, const struct ota_document *doc, const char *running_version,
                    struct bundle_manifest **ret_manifest, unsigned ret_part_files[static BUNDLE_PARTS_MAX],
                    struct bundle_job_refusal *refusal) {
        _cleanup_free_ char *path = NULL, *bytes = NULL;
        size_t size = 0;
        int r;

        assert_return(config && doc && ret_manifest && refusal, -EINVAL);
        r = manifest_path(config, &path);
        if (r >= 0)
                r = read_file_full(path, BUNDLE_MANIFEST_MAX, &bytes, &size);
        if (r < 0)
                return refuse(refusal, r, NULL, OTA_PAL_BOOT_INFO_CREATE_FAILED, (unsigned) -r,
                              "cannot read the bundle's manifest kept in %s: %m", config->state.directory);
        return check(config, doc, running_version, bytes, size, ret_manifest, ret_part_files, refusal);
}

void bundle_job_forget(const struct otad_config *config) {
        _cleanup_free_ char *path = NULL;

        if (manifest_path(config, &path) >= 0)
                (void) unlink(path);
        bundle_install_forget(config);
}
