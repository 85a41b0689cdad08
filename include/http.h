/* SPDX-License-Identifier: MIT */
/*
 * http: downloads one job file from a presigned HTTPS URL (protocol.md §4),
 * the HTTP side of download.h. Owns the libcurl multi handle driven by the
 * daemon's sd-event loop (no thread, no blocking call), one streaming GET
 * with Range to resume, certificate verification, low-speed abort, bounded
 * retries with backoff (backoff.h), asking its owner for a fresh URL when S3
 * refuses the old one, and the progress record {identity, boot id, bytes
 * written, bytes durable} in download_file.state_path (download.h says why
 * two counts: a kill -9 loses at most the last 256 KiB and what was on its
 * way, a power cut what came since the last sync).
 * Never logs a URL's query string (it is a credential), never writes a byte
 * past filesize, never decides whether the bytes are trusted (verify does).
 */
#pragma once

#include <stdint.h>

#include "download.h"
#include "otad.h"

struct http_download;

struct http_download_stats {
        uint64_t size;           /* filesize */
        uint64_t offset;         /* contiguous bytes written */
        uint64_t persisted;      /* bytes the progress record counts as durable (synced) */
        uint64_t resumed_from;   /* offset taken from the record at start */
        uint64_t bytes_received; /* body bytes written, over all requests */
        unsigned requests;       /* GETs sent */
        unsigned retries;        /* requests repeated after a failure */
        unsigned url_refreshes;  /* fresh URLs asked for */
        unsigned restarts;       /* server ignored Range: started again at 0 */
};

/* Starts downloading file from url (https only) on otad->event, resuming
 * from file->state_path when its record matches file's identity (job id,
 * index, size, signature); a record for anything else is replaced. Uses
 * [ota] http_low_speed_limit/_time, http_retries and http_ca_file.
 * ops->finished() is called exactly once, never from inside this call or
 * http_download_set_url(). Returns -EINVAL for a non-https URL or size 0. */
int http_download_new(struct otad *otad, const char *url, const struct download_file *file,
                      const struct download_ops *ops, void *userdata, struct http_download **ret);

/* A fresh presigned URL for the same file, after ops->need_fresh_url():
 * the transfer continues from where it stopped. At any other time, the URL
 * is used from the next request on. */
int http_download_set_url(struct http_download *d, const char *url);

void http_download_get_stats(const struct http_download *d, struct http_download_stats *ret);

/* Stops the transfer (no finished callback) and frees it; the progress
 * record stays, so a later http_download_new() resumes. NULL is fine. */
void http_download_free(struct http_download *d);

/* The offset a new transfer of file would resume from: the record's bytes
 * written when it matches file's identity and was made in this boot, its
 * durable bytes when made in an earlier boot, else 0 (also when there is
 * no record).
 * The owner calls this before installer begin(resume) to know whether the
 * target's bytes count. */
uint64_t http_progress_resume_offset(const struct download_file *file);

/* "scheme://host[:port]/path" of url, without user info, query or fragment:
 * the only form of a presigned URL that may be logged. */
int http_url_for_log(const char *url, char **ret);
