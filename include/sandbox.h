/* SPDX-License-Identifier: MIT */
/*
 * sandbox: whether otad.service's sandbox (ProtectSystem=strict with a few
 * ReadWritePaths=) lets otad write a directory, and the drop-in that would.
 * Owns no state and never changes the sandbox; asks the kernel (inside the
 * sandbox) or systemd (outside it, for --check-config).
 */
#pragma once

#define OTAD_UNIT "otad.service"

/* 0 when otad.service may write path, or when that cannot be told (no
 * systemd to ask); -EROFS when its sandbox keeps path read-only: then logs
 * it, what (e.g. "[target.app] directory") and the drop-in to add. */
int sandbox_check_writable(const char *path, const char *what);

/* What a user does about a path the sandbox keeps read-only, as a sentence
 * for a job's reason: "otad.service keeps /srv/x read-only: add ..." (new
 * string; NULL when out of memory). */
char *sandbox_advice(const char *path);
