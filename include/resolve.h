/* SPDX-License-Identifier: MIT */
/*
 * resolve: looks up a host name without blocking the event loop
 * (getaddrinfo in a short-lived thread that hands its answer back through an
 * eventfd) and returns every address in the resolver's order, as numeric
 * strings. Owns the thread and the answer; never connects anywhere.
 */
#pragma once

#include <stddef.h>
#include <systemd/sd-event.h>

struct resolve_query;

/* error is 0 or an EAI_* code (EAI_SYSTEM with errno in sys_errno);
 * addresses are numeric ("192.0.2.1", "2001:db8::1"), de-duplicated, valid
 * only during the call. */
typedef void (*resolve_done_fn)(int error, int sys_errno, char *const *addresses, size_t n, void *userdata);

/* Starts looking up host for TCP, IPv4 and IPv6 alike. done is called once
 * from the event loop, unless the query is cancelled first; the query is
 * freed before done runs, so forget *ret there. */
int resolve_start(sd_event *event, const char *host, resolve_done_fn done, void *userdata,
                  struct resolve_query **ret);
/* A query whose done has not run yet: done is never called; the thread,
 * if still waiting on the resolver, cleans up after itself. NULL is fine. */
void resolve_cancel(struct resolve_query *q);

