#!/bin/sh
# Installs, from Debian 12's archive, everything otad needs to build, to run
# its tests and to run its demo. Idempotent; needs root. (qemu, ovmf and
# grub-efi run the documented grub.cfg in real GRUB: tests/test-grub-boot.c;
# qemu-system-arm and u-boot-qemu the documented boot script in real U-Boot:
# tests/test-uboot-boot.c;
# libzck, zstd, zchunk and python3-botocore: update bundles, tests/test-bundle.c
# and tests/integration/test_bundle_tool.py; zchunk also makes the pair of
# payloads tests/bench/bench_ranges.py measures against; debootstrap and
# rsync: the Debian root file systems of the demo and the benchmarks,
# tests/rootfs.py; bench_delta.py derives a new image from an old one.)
set -eu

packages="
  meson ninja-build pkg-config gcc libc6-dev
  libmosquitto-dev libssl-dev libcjson-dev libcbor-dev libsystemd-dev
  libcurl4-openssl-dev libubootenv-dev
  libzck-dev libzstd-dev zchunk zstd python3-botocore debootstrap rsync
  mosquitto mosquitto-clients openssl curl ca-certificates
  python3 python3-paho-mqtt python3-cbor2 python3-cryptography
  nginx-light grub-common libubootenv-tool u-boot-tools
  fdisk util-linux e2fsprogs procps iproute2 systemd man-db groff-base
  qemu-system-x86 ovmf grub-efi-amd64-bin mtools
  qemu-system-arm u-boot-qemu
"
# tests/ci.sh's clang debug build and fuzz runs: clang, its ASan/UBSan and
# libFuzzer runtimes, llvm-symbolizer for the file:line in their reports.
packages="$packages clang libclang-rt-14-dev llvm"
# tests/system/: the gateway it builds with debootstrap (kmod, cpio, binutils)
# and boots in systemd-nspawn and in QEMU with GRUB for BIOS (grub2-common).
packages="$packages systemd-container grub-pc-bin grub2-common kmod cpio binutils"

missing=
for p in $packages; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
        echo "Installing:$missing"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi
