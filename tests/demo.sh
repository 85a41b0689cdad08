#!/bin/sh
# The demo command of README.md: on a fresh Debian 12 machine, as root,
# installs what it needs, builds otad and runs its main job locally: a Debian
# root file system built by the demo, published with `otad bundle create`
# and installed on an A/B disk through a real TLS broker and the local AWS
# IoT stand-in, to the commit after a simulated reboot; then a one-package
# change the same way back into the other slot. Options go to tests/demo.py
# (--http, --one, --from-scratch, --aws-caps, --keep; --raw [--size MiB] for
# a random image as a plain OTA job). The root file systems are cached in
# $build/rootfs (or $OTAD_ROOTFS_CACHE).
set -eu

cd "$(dirname "$0")/.."
build=${OTAD_BUILD_DIR:-build-demo}

./tests/install-deps.sh
[ -d "$build" ] || meson setup "$build"
meson compile -C "$build"
case "$build" in /*) bin="$build/src/otad" ;; *) bin="$PWD/$build/src/otad" ;; esac
OTAD_BIN="$bin" OTAD_BUILD_ROOT="$(dirname "$(dirname "$bin")")" exec /usr/bin/python3 tests/demo.py "$@"
