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
 * With wanted ranges (download.h) it fetches only those on one keep-alive
 * connection: ranges coalesced over gaps cheaper to fetch than to split off,
 * several per request ("Range: bytes=a-b,c-d", answered as
 * multipart/byteranges, include/byteranges.h) where the server serves them,
 * else one per request back to back. S3 serves one range per GET (its URLs
 * are recognised); any other server shows it by its answer (200 with the
 * whole object, one part, fewer parts, parts out of order, a malformed
 * body), and from then on gets one range per request. A server that
 * ignores Range altogether is read through once, taking the wanted bytes.
 * Never logs a URL's query string (it is a credential), never writes a byte
 * past filesize, never decides whether the bytes are trusted (verify does).
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "download.h"
#include "otad.h"

struct http_download;

struct http_download_stats {
        uint64_t size;           /* filesize */
        uint64_t offset;         /* contiguous bytes written; with wanted ranges the offset below
                                  * which every wanted byte is written */
        uint64_t persisted;      /* the offset the progress record counts as durable (synced) */
        uint64_t resumed_from;   /* offset taken from the record at start */
        uint64_t bytes_received; /* body bytes received over all requests (with wanted ranges
                                  * also the gaps fetched along and the multipart framing) */
        unsigned requests;       /* GETs sent */
        unsigned retries;        /* requests repeated after a failure */
        unsigned url_refreshes;  /* fresh URLs asked for */
        unsigned restarts;       /* server ignored Range: started again at 0 */
        /* Wanted bytes (the whole file without wanted ranges), for the
         * journal, statusDetails and benchmarks. */
        uint64_t bytes_wanted;
        uint64_t bytes_resumed;      /* of them, counted by the progress record at the start */
        uint64_t bytes_written;      /* of them, written in this run */
        uint64_t header_bytes;       /* response headers received */
        uint64_t request_bytes;      /* requests sent (request line with the URL, headers) */
        uint64_t multipart_overhead; /* part delimiters and headers among bytes_received */
        uint64_t ranges_requested;   /* ranges named in Range headers, over all requests */
        unsigned multi_range_fallbacks; /* times a server's answer showed it serves one range */
        bool one_range_per_request;  /* at the end: S3's URL, or the server showed it */
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
 * no record). With wanted ranges the identity includes the set, and every
 * wanted byte below the offset is on the target.
 * The owner calls this before installer begin(resume) to know whether the
 * target's bytes count. */
uint64_t http_progress_resume_offset(const struct download_file *file);

/* "scheme://host[:port]/path" of url, without user info, query or fragment:
 * the only form of a presigned URL that may be logged. */
int http_url_for_log(const char *url, char **ret);
