#!/bin/sh
# The demo command of README.md: on a fresh Debian 12 machine, as root,
# installs what it needs, builds otad and runs its main job locally: a signed
# OTA update of an A/B disk through a real TLS broker and the local AWS IoT
# stand-in, to the commit after a simulated reboot. Options go to
# tests/demo.py (--http, --size MiB, --keep).
set -eu

cd "$(dirname "$0")/.."
build=${OTAD_BUILD_DIR:-build-demo}

./tests/install-deps.sh
[ -d "$build" ] || meson setup "$build"
meson compile -C "$build"
case "$build" in /*) bin="$build/src/otad" ;; *) bin="$PWD/$build/src/otad" ;; esac
OTAD_BIN="$bin" exec /usr/bin/python3 tests/demo.py "$@"
