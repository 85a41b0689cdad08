/* SPDX-License-Identifier: MIT */
/*
 * daemon: creates the context, wires the modules into the one event loop,
 * runs it and tears everything down in reverse order. Owns signals, the
 * watchdog and sd_notify; never parses configuration or protocol.
 */
#pragma once

#include "otad.h"

/* Takes ownership of nothing: config must outlive the context. */
int otad_new(struct otad_config *config, struct otad **ret);
/* Sends READY=1 and runs until SIGTERM/SIGINT. */
int otad_run(struct otad *otad);
void otad_free(struct otad *otad);
