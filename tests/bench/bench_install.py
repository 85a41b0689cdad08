#!/usr/bin/python3
"""Install time under AWS IoT's caps, measured end to end (issues 12 and
13): the demo's root file system installed three ways into the inactive
slot of an A/B device, each by a real otad through the AWS IoT stand-in
with its per-connection caps on (512 KiB/s and 100 publishes/s, both
directions), over MQTT streams, side by side in one run. A benchmark, not
a test: it never fails on a figure (a figure off its target is marked
MISS); it exits non-zero only when an install itself breaks.

Images: the demo's (tests/demo.py's build_images(), tests/rootfs.py):
Debian 12 minbase + systemd as a 320 MiB reproducible ext4 image, 1.0.0,
and 2.0.0 = 1.0.0 + `less`, derived from 1.0.0's image; taken from the
demo's cache ($OTAD_ROOTFS_CACHE, else build-demo/rootfs of the source
tree if the demo ran there, else <build>/rootfs), built there otherwise
(root, debootstrap from deb.debian.org, a few minutes once).

Each install gets its own stand-in (tests/standin Stack: TLS mosquitto,
Jobs, streams), its own A/B disk (demo.Disk: GPT partitions on a loop
device) and a fresh otad with the demo's otad.conf (demo.Device: grub
bootloader, otad's default stream settings). One publisher key signs
everything; each device trusts it.
  raw       2.0.0's image as a plain afr_ota job of one file, as
            demo.sh --raw queues its image; slot A holds 1.0.0 (a raw
            install reuses nothing anyway). AWS IoT carries a 335 MB
            image only cut into parts: a stream file holds at most 24 MB
            (16 MB through CreateOTAUpdate), a job up to 50 files, so 14-21
            `image#part=` files, each signed by hand. The stand-in's
            stream-file cap is lifted for this job instead (as
            bench_download.py does for its 128 MiB runs); its rate caps
            are not: the same bytes on the wire at the same rate.
  full      2.0.0's bundle (`otad bundle create`) on a device with nothing
            to reuse: both slots filled with random bytes before otad
            starts, so no chunk of the new image is found, not even a run
            of zeros (a slot of zeros would hold the image's empty space,
            and an older real release most of it). otad still scans slot
            A (it always does), so its scan is in the local work.
  adaptive  the same bundle with slot A holding 1.0.0, slot B empty (the
            demo's first update, as a device in the field meets it).

Measured per install, from the stand-in's record:
  * bytes served (block payloads) and the stream messages' bytes (data
    and descriptions, MQTT payloads);
  * transfer: from otad's first stream request to the last block sent,
    less any pause of 1 s or more without stream traffic (otad working
    locally: the adaptive scan between the payload header and the missing
    chunks); the span without that subtraction is printed too;
  * job queued (the stand-in's notify-next) to otad's `self_test: ready`
    status (the last thing otad sends before it asks for the reboot: the
    transfer plus the local work: scan, copy, decode, read-back, boot-once);
  * peak RssAnon (sampled every 20 ms) and CPU seconds of that otad, from
    before the job is queued to the reboot request.
The bundle installs then go on through the simulated reboot to the commit
(demo.install); the raw one stops at its reboot request once slot B is
checked byte for byte (its commit is the same as theirs).

Knobs (environment): BENCH_INSTALL_RAW_MIB=N sends only the first N MiB of
the image as the raw job (the ~11 minutes of the whole one at 512 KiB/s
are most of the run); its ratios are then taken against its figures scaled
to the whole image, marked so. BENCH_INSTALL_CAPS=0 runs without the caps
(a quick check of the machinery; the figures then mean little).

Needs root (loop devices; building the images). Run:
  meson test -C build --benchmark -v install   (about 15 minutes)
  OTAD_BUILD_ROOT=build OTAD_BIN=build/src/otad /usr/bin/python3 tests/bench/bench_install.py
"""

import hashlib
import os
import shutil
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "standin"))
import bench_download as bd  # noqa: E402
import demo  # noqa: E402
from harness import Stack  # noqa: E402
import streams as streams_mod  # noqa: E402
from pki import Pki  # noqa: E402

MIB = 1024 * 1024
PAUSE = 1.0                 # seconds without stream traffic that are not transfer
TARGET_S = 10.0             # issue 13: the adaptive update's transfer
RAW_JOB = "AFR_OTA-raw-2_0_0"


def say(text):
    print("# " + text, flush=True)


def rootfs_cache():
    """The demo's cache: $OTAD_ROOTFS_CACHE, or demo.sh's build-demo/ when
    the demo ran in this source tree, else <build>/rootfs (rootfs.py)."""
    if not os.environ.get("OTAD_ROOTFS_CACHE"):
        source = os.environ.get("OTAD_SOURCE_ROOT", os.path.join(HERE, "..", ".."))
        demo_cache = os.path.join(source, "build-demo", "rootfs")
        if os.path.isdir(demo_cache):
            os.environ["OTAD_ROOTFS_CACHE"] = os.path.abspath(demo_cache)


class MeasuredDevice(demo.Device):
    """The demo's device; the first otad it starts (the one that installs)
    is sampled: peak RssAnon, and CPU seconds until it is stopped after its
    reboot request."""

    def __init__(self, stack, disk, publisher):
        super().__init__(stack, disk)
        shutil.copy(publisher.signer_cert, os.path.join(self.trust, "ota-signer.crt"))
        self.sampler = None
        self.cpu = None

    def power_on(self):
        booted, version = super().power_on()
        if self.sampler is None:
            self.otad.wait_for_log(r"Connected to", 30)
            self.cpu0 = bd.cpu_seconds(self.otad.pid)
            self.sampler = bd.RssSampler(self.otad.pid)
            self.sampler.start()
        return booted, version

    def power_off(self):
        if self.sampler and self.cpu is None and self.otad:
            self.cpu = bd.cpu_seconds(self.otad.pid) - self.cpu0
            self.sampler.stop()
        super().power_off()


def fill_random(path, nbytes):
    with open(path, "r+b") as f:
        while nbytes > 0:
            n = min(nbytes, 4 * MIB)
            f.write(os.urandom(n))
            nbytes -= n
        os.fsync(f.fileno())


def install_raw(stack, device, image, limit, publisher):
    """2.0.0's image (its first `limit` bytes) as a plain afr_ota job of
    one file; returns when otad asked for the reboot, slot B checked."""
    svc = stack.service
    with open(image, "rb") as f:
        data = f.read(limit)
    streams_mod.MAX_FILE = max(streams_mod.MAX_FILE, len(data))
    svc.queue_ota_job(demo.THING, RAW_JOB, data, protocols=["MQTT"], filepath="rootfs.ext4",
                      signing_key=publisher.signer_key)
    say("raw: queued %s, one file of %d bytes (the stand-in's stream-file cap lifted)" % (RAW_JOB, len(data)))
    demo.follow_job(svc, RAW_JOB, lambda: device.reboot_requests() > 0 or svc.job_status(demo.THING, RAW_JOB) in
                    ("FAILED", "SUCCEEDED", "REJECTED", "CANCELED"), 3600, time.monotonic())
    if device.reboot_requests() == 0:
        raise RuntimeError("raw job ended %s before a reboot; otad's log:\n%s"
                           % (svc.job_status(demo.THING, RAW_JOB), device.otad.log()[-4000:]))
    device.power_off()
    if device.disk.sha256("B", len(data)) != hashlib.sha256(data).hexdigest():
        raise RuntimeError("slot B does not hold the raw image")
    return {"job": RAW_JOB, "status": "slot B written and verified, reboot requested", "reused": 0, "size": len(data)}


def from_record(svc, job):
    """The install's figures from the stand-in's record (one stand-in per
    install: everything in it is this install's)."""
    rec = svc.record
    sent = rec.sent(demo.THING)
    queued = next(e["time"] for e in sent if e["topic"].endswith("/jobs/notify-next"))
    ready = next(u["time"] for u in rec.status_updates(demo.THING, job, outcome="accepted")
                 if (u["statusDetails"] or {}).get("self_test") == "ready")
    stream = [e for e in sent if "/streams/" in e["topic"]]
    events = sorted([e["time"] for e in stream] +
                    [r["time"] for r in rec.requests(demo.THING) if r["api"].startswith("streams/")])
    busy = sum(b - a for a, b in zip(events, events[1:]) if b - a < PAUSE)
    return {"served": rec.bytes_served(demo.THING), "wire": sum(e["size"] for e in stream),
            "transfer": busy, "span": events[-1] - events[0], "ready": ready - queued,
            "requests": len(rec.requests(demo.THING, "streams/get"))}


def run_install(kind, images, bundle, publisher, raw_limit, caps):
    (v1, image1), (v2, image2) = images
    with Stack(things=[demo.THING]) as stack:
        disk = demo.Disk(stack.workdir, demo.SLOT_MIB)
        device = None
        try:
            if disk.loop is None:
                raise RuntimeError("no loop device with partitions (losetup, partx)")
            if kind == "full":
                for slot in "AB":
                    fill_random(disk.slots[slot], demo.SLOT_MIB * MIB)
            else:
                disk.write("A", image1)
            demo.run(["grub-editenv", os.path.join(stack.workdir, "grubenv"), "create"])
            device = MeasuredDevice(stack, disk, publisher)
            if caps:
                stack.service.set_aws_caps(demo.THING)
            booted, running = device.power_on()
            say("%s: slot A %s (running version %s), otad connected%s" % (
                kind, "random bytes" if kind == "full" else "holds " + v1, running,
                ", AWS IoT's caps on" if caps else ", no caps"))
            if kind == "raw":
                r = install_raw(stack, device, image2, raw_limit, publisher)
            else:
                r = demo.install(stack, device, image2, v2, running, bundle, types.SimpleNamespace(http=False))
                r["size"] = r["image"]
            r.update(from_record(stack.service, r["job"]))
            r.update(kind=kind, cpu=device.cpu, anon_kib=device.sampler.peak_anon)
            return r
        finally:
            if device:
                device.power_off()
            disk.close()


def print_table(rows, image_size, caps):
    raw = rows[0]
    scale = image_size / raw["size"]
    scaled = " (scaled from its first %d MiB)" % (raw["size"] // MIB) if scale != 1 else ""
    print()
    print("Installing %s's %.1f MB image into slot B, %s, over MQTT streams, one run%s:" % (
        rows[1].get("to", "2.0.0"), image_size / 1e6,
        "under AWS IoT's caps (512 KiB/s, 100 publishes/s)" if caps else "WITHOUT caps", scaled))
    print()
    print("| install | on the device before | bytes served | stream messages | transfer | job queued → `self_test: ready` "
          "| bytes / time vs raw | otad peak RssAnon | otad CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    what = {"raw": ("raw image", "slot A: 1.0.0"),
            "full": ("full bundle", "slots A and B: random bytes"),
            "adaptive": ("adaptive (same bundle)", "slot A: 1.0.0")}
    for r in rows:
        name, before = what[r["kind"]]
        if r["kind"] == "raw" and scale != 1:
            name += ", first %d MiB" % (r["size"] // MIB)
        print("| %s | %s | %.1f MB | %.1f MB, %d requests | %.1f s | %.1f s | %.1f %% / %.1f %%%s | %.1f MiB | %.2f s |" % (
            name, before, r["served"] / 1e6, r["wire"] / 1e6, r["requests"], r["transfer"], r["ready"],
            100.0 * r["served"] / (raw["served"] * scale), 100.0 * r["ready"] / (raw["ready"] * scale),
            "" if r["kind"] != "raw" or scale == 1 else " (scaled)", r["anon_kib"] / 1024, r["cpu"]))
    print()
    for r in rows:
        reused = " reused %.1f MB of the image from the device;" % (r["reused"] / 1e6) if r["kind"] != "raw" else ""
        print("%-8s %s;%s transfer span %.1f s (first stream request to last block), local work %.1f s; "
              "%s" % (r["kind"], r["job"], reused, r["span"], r["ready"] - r["transfer"], r["status"]))
    adaptive = rows[-1]
    print("adaptive transfer %.1f s: target < %.0f s  %s" % (
        adaptive["transfer"], TARGET_S, "PASS" if adaptive["transfer"] < TARGET_S else "MISS"))


def main():
    if os.geteuid() != 0:
        print("# skip: needs root (loop devices, building the root file systems)")
        return 0
    for prog in ("losetup", "partx", "sfdisk", "grub-editenv", "debugfs", "mkfs.ext4"):
        if not shutil.which(prog):
            print("# skip: %s missing (tests/install-deps.sh)" % prog)
            return 0
    if not os.access(demo.otad_bin(), os.X_OK):
        print("# skip: %s not built" % demo.otad_bin())
        return 0
    caps = os.environ.get("BENCH_INSTALL_CAPS", "1") != "0"
    rootfs_cache()
    say("root file systems (the demo's, tests/rootfs.py; cached in %s):" % demo.rootfs.cache_dir(demo.build_root()))
    _, built, _, _, _ = demo.build_images(types.SimpleNamespace(from_scratch=False))
    images = [(version, path) for version, path, _ in built[:2]]
    image_size = os.path.getsize(images[1][1])
    raw_limit = min(int(os.environ.get("BENCH_INSTALL_RAW_MIB", "0")) * MIB or image_size, image_size)

    work = tempfile.mkdtemp(prefix="otad-bench-install-")
    try:
        publisher = Pki.create(os.path.join(work, "publisher"), [])
        bundle = os.path.join(work, "bundle-" + images[1][0])
        demo.bundle_create(types.SimpleNamespace(pki=publisher), images[1][1], images[1][0], bundle,
                           types.SimpleNamespace(http=False))
        rows = []
        for kind in ("raw", "full", "adaptive"):
            print(flush=True)
            say("--- %s ---" % kind)
            rows.append(run_install(kind, images, bundle, publisher, raw_limit, caps))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, image_size, caps)
    failed = [r["kind"] for r in rows if r["kind"] != "raw" and r["status"] != "SUCCEEDED"]
    if failed:
        print("# install(s) failed: %s" % ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
