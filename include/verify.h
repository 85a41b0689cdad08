/* SPDX-License-Identifier: MIT */
/*
 * verify: decides whether the bytes a target holds are the image the job
 * signed. Owns base64 decoding of the signature, the choice of the
 * code-signing certificate from the trust directory by the job's certfile
 * name, the optional chain check and SHA-256 + ECDSA over exactly filesize
 * bytes read back through a callback (protocol.md §5).
 * Never opens a path taken from a job, never writes, never logs: the caller
 * logs the outcome once with the report's reason.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

/* Reads bytes [offset, offset+len) of the data; 0 or a negative errno.
 * The installer's read op fits behind it. */
typedef int (*verify_read_fn)(uint64_t offset, void *buf, size_t len, void *userdata);

/* The only signature key otad accepts: SHA-256 over the file, ECDSA with a
 * P-256 or P-384 key, base64 of DER (AmazonFreeRTOS-Default signer). */
#define VERIFY_SIG_KEY "sig-sha256-ecdsa"

struct verify_request {
        const char *sig_key;       /* the file entry's "sig-<hash>-<alg>" key */
        const char *signature;     /* its value: base64 of a DER ECDSA signature */
        const char *certfile;      /* the job's certfile text, untrusted */
        const char *trust_dir;     /* [ota] trust_dir */
        const char *signing_ca;    /* [ota] signing_ca; NULL or "": no chain check */
        uint64_t size;             /* filesize: exactly this many bytes are verified */
        verify_read_fn read;
        void *userdata;
};

/* Filled in by verify_file() whatever the outcome (it is a report, not an
 * output parameter). */
struct verify_report {
        char reason[384];          /* why it failed, or "signature verified" */
        char sha256_hex[65];       /* of the data, when it was read completely */
        char cert_name[256];       /* the trust_dir entry certfile mapped to */
};

/* Returns 0 when the signature over the data verifies with the selected
 * certificate, else:
 *   -EOPNOTSUPP   sig_key other than "sig-sha256-ecdsa" (e.g. sig-sha1-rsa)
 *   -EINVAL       signature text is not valid base64 or not a plausible size
 *   -ENOKEY       certfile maps to no usable certificate in trust_dir
 *   -EKEYREJECTED the certificate fails the chain check, its key usage, or
 *                 is not an ECDSA P-256/P-384 key
 *   -EIO          the read callback failed (its error is in the reason)
 *   -EBADMSG      the signature does not match the data
 *   -ENOMEM
 * Memory is bounded: the data is read in 64 KiB chunks. */
int verify_file(const struct verify_request *req, struct verify_report *report);

/* Maps a job's certfile text to a file name inside trust_dir: its last path
 * component with every byte outside [A-Za-z0-9._-] replaced by '_'
 * ("/certs/x.pem" -> "x.pem", "Code Verify Key" -> "Code_Verify_Key").
 * -EINVAL when the result is empty, starts with '.', or is longer than 255
 * bytes; a name is never a path, so "../x" -> "x" and "/etc/passwd" ->
 * "passwd", both looked up in trust_dir only. */
int verify_cert_name(const char *certfile, char *ret_name, size_t size);

/* SHA-256 of size bytes read through read, as 64 lowercase hex digits. */
int verify_sha256(uint64_t size, verify_read_fn read, void *userdata, char ret_hex[static 65]);
