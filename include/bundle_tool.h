/* SPDX-License-Identifier: MIT */
/*
 * bundle_tool: `otad bundle create|inspect|verify`, the command a user builds
 * and checks update bundles with (as `rauc bundle`). Owns the command line,
 * the bundle directory's layout (manifest, payload parts, .sig files,
 * ota-update.json, create-stream.json, upload.sh), signing with the user's
 * key, and the messages a person reads. Runs on the build host, never inside
 * the daemon; the device-side reading is bundle_manifest.c and
 * payload_decoder.c, which verify uses exactly as the daemon does.
 */
#pragma once

/* argv[0] is "bundle". Returns the process exit status. */
int bundle_tool_main(int argc, char *argv[]);
