/* SPDX-License-Identifier: MIT */
/*
 * stream: downloads one file of an AWS IoT MQTT file stream (protocol.md
 * §3, §6.3-6.5) as a transfer of include/download.h. Owns the GetStream
 * request window, pacing, timeouts, momentum, reactions to rejections, block
 * validation and the block map that lets a restarted otad fetch only what is
 * missing (recorded per request's worth of blocks, synced per MiB or second,
 * see download.h; a resumed run first takes the answers still coming to its
 * predecessor's requests). A block whose length contradicts filesize ends
 * the transfer at once (-EBADMSG): the stream and the job disagree.
 * With wanted ranges (download.h) it asks only for the blocks holding
 * wanted bytes, up to a request's worth (128 KiB) of them per request
 * however sparse (one bitmap spans up to 8192 blocks, "n" = blocks asked
 * for), records only those blocks (a record names the set), writes only
 * the wanted bytes of each, and picks the block size per job
 * (ranges_stream_block_size(): the configured one is the largest). Never
 * decides where bytes go (ops->write) or what the result means
 * (ops->finished); never stops the daemon.
 *
 * Uses [ota] block_size, window, max_requests_per_second, request_timeout
 * and momentum from the configuration.
 */
#pragma once

#include <stdint.h>

#include "download.h"
#include "otad.h"

struct stream_download;

/* What one transfer did, for the journal and benchmarks. */
struct stream_stats {
        uint64_t blocks_received;  /* new blocks written in this run */
        uint64_t blocks_resumed;   /* blocks a progress record already counted */
        uint64_t duplicates;       /* blocks that arrived again, ignored */
        uint64_t bad_blocks;       /* undecodable or invalid, dropped unwritten */
        uint64_t requests;         /* GetStream requests published */
        uint64_t timeouts;         /* requests given up after request_timeout */
        uint64_t rejections;       /* messages on rejected/cbor */
        uint32_t block_size;       /* current; smaller after BlockSizeOutOfBounds */
        uint64_t blocks_unwanted;  /* valid blocks without a wanted byte, dropped unwritten */
        /* Bytes, for the journal, statusDetails and benchmarks. "Wanted"
         * is the whole file without wanted ranges. */
        uint64_t bytes_wanted;     /* wanted bytes of the file */
        uint64_t bytes_resumed;    /* of them, counted by the progress record at the start */
        uint64_t bytes_written;    /* of them, written in this run */
        uint64_t bytes_fetched;    /* payloads of the new blocks of this run: the wanted bytes in
                                    * them and the rest of the blocks at the ranges' edges */
        uint64_t bytes_on_wire;    /* every data message as received, duplicates, dropped and
                                    * unwanted ones and CBOR framing included (MQTT and TLS
                                    * framing excluded: not seen here) */
        uint64_t request_bytes;    /* GetStream requests as published */
};

/* Starts fetching file file_id of stream_name, described by file (copied).
 * A progress record at file->state_path for the same job, file index, size
 * and signature is resumed; any other is discarded. The result arrives
 * through ops->finished(), never synchronously from this call; the owner may
 * free the transfer from inside finished(). */
int stream_download_new(struct otad *otad, const char *stream_name, unsigned file_id,
                        const struct download_file *file, const struct download_ops *ops, void *userdata,
                        struct stream_download **ret);
/* Stops the transfer (if still running) without calling finished(). NULL
 * is fine. The progress record stays for a later resume. */
void stream_download_free(struct stream_download *d);

void stream_download_get_stats(const struct stream_download *d, struct stream_stats *ret);
