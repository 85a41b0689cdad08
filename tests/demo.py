#!/usr/bin/python3
"""otad's main job, run locally: a Debian root file system updated on an
A/B device through an AWS IoT OTA update, from the publisher's
`otad bundle create` to the device's commit, twice.

Everything is real and on 127.0.0.1: a TLS mosquitto with client
certificates and the device policy as ACL, the AWS IoT stand-in (Jobs, MQTT
file streams, presigned HTTPS), otad. The device is a GPT disk image on a
loop device (as root; files otherwise) with two root slots and a GRUB
environment provisioned as a factory would (empty); a reboot is simulated:
otad asks for it, the documented grub.cfg's choice of slot is applied to
the grubenv, and otad starts again with that slot booted, reading the
running version from the booted slot's /etc/os-release.

Default (needs root and Debian's mirror the first time; cached after):
  1. root file systems: Debian 12 minbase + systemd (debootstrap), as
     reproducible ext4 images: v1.0.0 in slot A at the factory; v2.0.0 =
     v1 + one package; v3.0.0 = v2 + another (tests/rootfs.py);
  2. v2.0.0 published with `otad bundle create` and queued from its
     ota-update.json as `aws iot create-ota-update` would; otad fetches only
     what slot A lacks, writes slot B, boots it once and commits;
  3. v3.0.0 the same way, from slot B back into slot A.
--raw: the earlier demo, a signed random image of --size MiB as a plain
  afr_ota job (no bundle).

Usage: /usr/bin/python3 tests/demo.py [--http] [--one] [--from-scratch] [--aws-caps] [--keep]
       /usr/bin/python3 tests/demo.py --raw [--http] [--size MiB] [--keep]
"""

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "standin"))
import rootfs  # noqa: E402
from harness import Stack  # noqa: E402

THING = "gateway-0001"
JOB = "AFR_OTA-demo-1"
COMPATIBLE = "demo-gateway"
ARN = "arn:aws:iot:eu-west-1:123456789012"
ROLE = "arn:aws:iam::123456789012:role/otad-demo-ota"
BUCKET = "otad-demo-bundles"
# The root file system's size on every release (the same geometry keeps
# unchanged files where they were) and the slots, a little bigger.
IMAGE_MIB = 320
SLOT_MIB = 336
# One package more in each release.
PACKAGES = ("less", "nano")
MB = 1e6
AWS_RATE = 512 * 1024  # AWS IoT's bytes per second per connection
STARTED = time.monotonic()


def otad_bin():
    return os.environ.get("OTAD_BIN", os.path.join(HERE, "..", "build", "src", "otad"))


def build_root():
    return os.environ.get("OTAD_BUILD_ROOT") or os.path.dirname(os.path.dirname(os.path.abspath(otad_bin())))


def say(text):
    print(f"demo: {text}", flush=True)


def run(argv, timeout=60, **kw):
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=timeout, **kw)


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def mb(n):
    return f"{n / MB:.1f} MB"


class Disk:
    """Two slots: GPT partitions on a loop device as root, else two files."""

    def __init__(self, workdir, slot_mib):
        self.loop = None
        self.image = os.path.join(workdir, "disk.img")
        with open(self.image, "wb") as f:
            f.truncate((2 * slot_mib + 2) << 20)
        if os.geteuid() == 0 and shutil.which("losetup") and shutil.which("partx"):
            run(["sfdisk", "-q", self.image],
                input=f"label: gpt\nsize={slot_mib}MiB, name=rootA\nsize={slot_mib}MiB, name=rootB\n")
            self.loop = run(["losetup", "-f", "--show", self.image]).stdout.strip()
            # This kernel reads no partition tables itself.
            run(["partx", "-a", self.loop])
            self.slots = {"A": self.loop + "p1", "B": self.loop + "p2"}
        else:
            self.slots = {}
            for name in "AB":
                path = os.path.join(workdir, f"slot-{name}.img")
                with open(path, "wb") as f:
                    f.truncate(slot_mib << 20)
                self.slots[name] = path

    def read(self, slot, size):
        with open(self.slots[slot], "rb") as f:
            return f.read(size)

    def write(self, slot, path):
        with open(path, "rb") as src, open(self.slots[slot], "r+b") as dst:
            shutil.copyfileobj(src, dst, 4 << 20)
            dst.flush()
            os.fsync(dst.fileno())

    def sha256(self, slot, size):
        h = hashlib.sha256()
        with open(self.slots[slot], "rb") as f:
            while size:
                block = f.read(min(size, 4 << 20))
                h.update(block)
                size -= len(block)
        return h.hexdigest()

    def close(self):
        if self.loop:
            subprocess.run(["partx", "-d", self.loop], capture_output=True)
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = None


def grubenv_list(path):
    return dict(line.split("=", 1) for line in run(["grub-editenv", path, "list"]).stdout.splitlines() if "=" in line)


def grub_boot(path):
    """What the grub.cfg of otad.conf(5) (BOOTLOADER SCHEMES, GRUB) does at
    power-on: the slot it boots, and the try it counts in the grubenv."""
    v = {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0", "B_TRY": "0"}
    v.update({k: val for k, val in grubenv_list(path).items() if k in v})
    order = v["ORDER"].split()
    slot = next((s for s in order if s in "AB" and v[s + "_OK"] == "1" and v[s + "_TRY"] == "0"), None)
    if slot is None:
        for s in "AB":
            if v[s + "_OK"] == "1":
                v[s + "_TRY"] = "0"
        slot = next((s for s in order if s in "AB" and v[s + "_OK"] == "1"), None)
    if slot:
        v[slot + "_TRY"] = "1"
    run(["grub-editenv", path, "set", "A_TRY=" + v["A_TRY"], "B_TRY=" + v["B_TRY"]])
    return slot or "A"


class Device:
    """The gateway: its disk, its grubenv, otad with a configuration for
    whichever slot booted."""

    def __init__(self, stack, disk, compatible=COMPATIBLE):
        self.stack, self.disk = stack, disk
        work = stack.workdir
        self.grubenv = os.path.join(work, "grubenv")
        self.trust = os.path.join(work, "trust")
        os.makedirs(self.trust)
        shutil.copy(stack.pki.signer_cert, os.path.join(self.trust, "ota-signer.crt"))
        self.reboots = os.path.join(work, "reboot-requests")
        reboot = os.path.join(work, "reboot.sh")
        with open(reboot, "w") as f:
            f.write(f"#!/bin/sh\necho \"$(date +%s)\" >> {self.reboots}\n")
        os.chmod(reboot, 0o755)
        self.os_release = os.path.join(work, "os-release")
        self.booted = None
        self.otad = None
        self.sections = {
            "ota": {"trust_dir": self.trust, "http_ca_file": stack.pki.ca_cert},
            "bootloader": {"type": "grub", "grubenv": self.grubenv},
            "target.rootfs": {"type": "ab"},
            "slot.rootfs.a": {"device": disk.slots["A"], "bootname": "A"},
            "slot.rootfs.b": {"device": disk.slots["B"], "bootname": "B"},
            "update": {"booted_slot": "A", "os_release": self.os_release, "compatible": compatible,
                       "reboot_command": reboot, "wait_system_running": "no"},
            "log": {"level": "info"},
        }

    def reboot_requests(self):
        if not os.path.exists(self.reboots):
            return 0
        with open(self.reboots) as f:
            return len(f.readlines())

    def power_on(self):
        """GRUB picks the slot; the booted system's os-release is the one in
        that slot (what otad reads as the running version)."""
        self.booted = grub_boot(self.grubenv)
        text = subprocess.run(["debugfs", "-R", "cat /usr/lib/os-release", self.disk.slots[self.booted]],
                              capture_output=True, text=True).stdout
        with open(self.os_release, "w") as f:
            f.write(text)
        version = next((line.split("=", 1)[1].strip('"') for line in text.splitlines()
                        if line.startswith("VERSION_ID=")), "?")
        health = f"e2fsck -fn {self.disk.slots[self.booted]}"
        self.sections["update"].update(booted_slot=self.booted, health_check=health)
        self.otad = self.stack.start_otad(THING, self.sections)
        return self.booted, version

    def power_off(self):
        if self.otad:
            self.otad.stop()
            self.otad = None

    def status(self):
        conf = self.stack.write_otad_config(THING, self.sections)
        return json.loads(run([otad_bin(), "status", "--json", "-c", conf]).stdout)


def follow_job(svc, job, until, timeout, started, seen=0):
    """Prints the job's status updates from the seen-th on as the stand-in
    receives them, until until() is true; returns all of them."""
    deadline = time.monotonic() + timeout
    while True:
        updates = svc.record.status_updates(THING, job, outcome="accepted")
        for u in updates[seen:]:
            print(f"    +{time.monotonic() - started:5.1f} s  {u['status']:<12} "
                  f"{json.dumps(u['statusDetails'] or {})}", flush=True)
        seen = len(updates)
        if until():
            return updates
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting on job {job}")
        time.sleep(0.2)


# ---- the bundle demo ----------------------------------------------------------

def build_images(args):
    """(base tree, [(version, image, what)], seconds, reproducible check)."""
    cache = rootfs.cache_dir(build_root())
    rootfs.log = lambda text: say("  " + text)
    t = time.monotonic()
    trees = [rootfs.tree(cache)]
    for n in range(1, len(PACKAGES) + 1):
        trees.append(rootfs.tree(cache, PACKAGES[:n]))
    tree_s = time.monotonic() - t
    used = rootfs.tree_mib(trees[-1])
    if used > IMAGE_MIB * 0.85:
        raise SystemExit(f"demo: the root file system holds {used} MiB, too much for {IMAGE_MIB} MiB images")
    t = time.monotonic()
    check = None
    v1_path = rootfs.image_path(trees[0], IMAGE_MIB, "1.0.0")
    if not os.path.exists(v1_path):
        say("  proving the recipe first: the same tree built twice into two images, compared with cmp")
        check = rootfs.identical_builds(trees[0], IMAGE_MIB, "1.0.0")
    images = [("1.0.0", rootfs.image(trees[0], IMAGE_MIB, "1.0.0"), "Debian 12 minbase + systemd")]
    for n, pkg in enumerate(PACKAGES, 1):
        version = f"{n + 1}.0.0"
        previous = None if args.from_scratch else images[-1][1]
        how = "from scratch" if args.from_scratch else f"derived from {images[-1][0]}'s image"
        images.append((version, rootfs.image(trees[n], IMAGE_MIB, version, previous),
                       f"{images[-1][0]} + {pkg} ({how})"))
    return trees, images, tree_s, time.monotonic() - t, check


def bundle_create(stack, image, version, out, args, previous=None, quiet=False):
    argv = [otad_bin(), "bundle", "create", "--key", stack.pki.signer_key, "--cert", stack.pki.signer_cert,
            "--cert-name", "ota-signer.crt", "--version", version, "--compatible", COMPATIBLE,
            "--bucket", BUCKET, "--target", f"{ARN}:thing/{THING}", "--role-arn", ROLE,
            "--ota-update-id", "demo-" + version.replace(".", "_")]
    if args.http:
        argv += ["--protocol", "HTTP"]
    if previous:
        argv += ["--previous", previous]
    argv += [image, out]
    shown = " ".join(shlex.quote(a if not os.path.isabs(a) else os.path.basename(a)) for a in argv[1:])
    if not quiet:
        say(f"publisher: otad {shown}")
    t = time.monotonic()
    p = run(argv, timeout=1800)
    seconds = time.monotonic() - t
    if not quiet:
        for line in p.stdout.splitlines():
            if line.startswith("  "):
                print("    " + line.strip(), flush=True)
    return seconds


def bundle_size(out):
    with open(os.path.join(out, "ota-update.json")) as f:
        request = json.load(f)
    return sum(os.path.getsize(os.path.join(out, f["fileName"])) for f in request["files"])


def previous_figures(out, previous):
    r = run([otad_bin(), "bundle", "inspect", "--json", "--previous", previous, out], timeout=300)
    return json.loads(r.stdout)["previous"]


def publish(stack, out):
    """The same request `aws iot create-ota-update --cli-input-json
    file://ota-update.json` sends, to the stand-in."""
    with open(os.path.join(out, "ota-update.json")) as f:
        request = json.load(f)
    say("publisher: sh upload.sh, i.e.")
    with open(os.path.join(out, "upload.sh")) as f:
        for line in f:
            if line.startswith("aws "):
                print("    " + line.rstrip(), flush=True)
    info = stack.service.create_ota_update(request, out)
    say(f"cloud: OTA update {request['otaUpdateId']} created: job {info['job_id']} for thing {THING}")
    return info["job_id"]


def install(stack, device, image, version, old_version, out, args):
    """One update: queue the bundle, otad installs it into the other slot,
    the simulated reboot, self-test and commit. Returns its figures."""
    svc, disk = stack.service, device.disk
    source = device.booted
    target = "B" if source == "A" else "A"
    served_before = svc.record.bytes_served(THING)
    https_before = svc.record.bytes_served(THING, "https")
    reboots = device.reboot_requests()
    started = time.monotonic()
    job = publish(stack, out)
    say(f"device: otad on slot {source} ({old_version}) takes the job; the job's status updates as AWS IoT sees them:")
    updates = follow_job(svc, job, lambda: device.reboot_requests() > reboots or svc.job_status(THING, job) in
                         ("FAILED", "SUCCEEDED", "REJECTED", "CANCELED", "TIMED_OUT", "REMOVED"), 1800, started)
    if device.reboot_requests() == reboots:
        raise SystemExit(f"demo: job {job} ended {svc.job_status(THING, job)} before a reboot; otad's log:\n"
                         + device.otad.log()[-4000:])
    to_reboot = time.monotonic() - started
    device.power_off()
    size = os.path.getsize(image)
    with open(image, "rb") as f:
        want = hashlib.sha256()
        for block in iter(lambda: f.read(4 << 20), b""):
            want.update(block)
    if disk.sha256(target, size) != want.hexdigest():
        raise SystemExit(f"demo: slot {target} does not hold the {version} image")
    env = grubenv_list(device.grubenv)
    say(f"device: slot {target} written and verified, set to boot once "
        f"(grubenv: {' '.join(f'{k}={v}' for k, v in sorted(env.items()))}); otad asked for a reboot")
    booted, running = device.power_on()
    say(f"device: rebooted; GRUB booted slot {booted}, whose os-release says VERSION_ID {running}")
    if booted != target:
        raise SystemExit(f"demo: GRUB booted {booted}, not the new slot {target}")
    updates = follow_job(svc, job, lambda: svc.job_status(THING, job) in ("FAILED", "SUCCEEDED"), 300, started,
                         len(updates))
    status = svc.job_status(THING, job)
    total = time.monotonic() - started
    final = updates[-1]["statusDetails"] or {}
    return {"job": job, "status": status, "from": old_version, "to": version, "source": source,
            "target": target, "image": size, "bundle": bundle_size(out), "served": svc.record.bytes_served(THING)
            - served_before, "https": svc.record.bytes_served(THING, "https") > https_before, "fetched": int(final.get("fetched", 0)), "reused": int(final.get("reused", 0)),
            "to_reboot": to_reboot, "total": total}


def bundle_demo(args):
    rootfs_started = time.monotonic()
    say("root file systems (tests/rootfs.py; built once, then taken from the cache):")
    trees, images, tree_s, image_s, check = build_images(args)
    for version, path, what in images:
        say(f"  {version}: {what}, {mib(path)} ext4, {os.path.basename(path)}")
    if check:
        identical, _ = check
        say(f"  reproducible: two builds of the 1.0.0 tree are {'byte-identical' if identical else 'DIFFERENT'}")
        if not identical:
            raise SystemExit("demo: the image recipe is not reproducible (tests/rootfs.py)")
    say(f"  trees {tree_s:.0f} s, images {image_s:.0f} s{' (cached)' if tree_s + image_s < 1 else ''}")
    rootfs_s = time.monotonic() - rootfs_started
    if args.keep:
        os.environ["OTAD_KEEP_TMP"] = "1"

    results = []
    with Stack(things=[THING]) as stack:
        disk = Disk(stack.workdir, SLOT_MIB)
        try:
            say(f"cloud: TLS mosquitto on 127.0.0.1:{stack.broker.port} (client certificates, device policy ACL)"
                " and the AWS IoT stand-in (Jobs, streams, S3 presigned HTTPS)")
            say(f"factory: slot A = {disk.slots['A']} holds {images[0][0]}, slot B = {disk.slots['B']} is empty, "
                "an empty grubenv (otad.conf(5), FACTORY PROVISIONING)")
            disk.write("A", images[0][1])
            run(["grub-editenv", os.path.join(stack.workdir, "grubenv"), "create"])
            device = Device(stack, disk)
            if args.aws_caps:
                stack.service.set_aws_caps(THING)
                say("cloud: AWS IoT's per-connection caps on (512 KiB/s, 100 publishes/s)")
            booted, running = device.power_on()
            say(f"device: powered on; GRUB booted slot {booted}; otad started, running version {running}")

            # The bundle the devices run now: what --previous compares with.
            cache_old = images[0][1] + ".bundle"
            if not os.path.exists(os.path.join(cache_old, "ota-update.json")):
                say(f"publisher: the bundle of {images[0][0]}, what the devices run now, for `bundle create "
                    "--previous` (made once, kept in the cache)")
                shutil.rmtree(cache_old + ".tmp", ignore_errors=True)
                bundle_create(stack, images[0][1], images[0][0], cache_old + ".tmp", args, quiet=True)
                os.rename(cache_old + ".tmp", cache_old)
            # Names as a publisher would have them (the cache's name their recipe).
            previous = os.path.join(stack.workdir, "bundle-" + images[0][0])
            os.symlink(cache_old, previous)
            for version, path, _ in images:
                os.symlink(path, os.path.join(stack.workdir, f"rootfs-{version}.ext4"))
            steps = images[1:2] if args.one else images[1:]
            old_version = images[0][0]
            for n, (version, image, what) in enumerate(steps, 1):
                print(flush=True)
                say(f"--- update {n}: {old_version} -> {version} ({what}) ---")
                out = os.path.join(stack.workdir, "bundle-" + version)
                create_s = bundle_create(stack, os.path.join(stack.workdir, f"rootfs-{version}.ext4"), version, out,
                                         args, previous=previous)
                predicted = previous_figures(out, previous)
                r = install(stack, device, image, version, old_version, out, args)
                r.update(create_s=create_s, predicted=predicted, what=what)
                results.append(r)
                if r["status"] != "SUCCEEDED":
                    break
                previous, old_version = out, version
            time.sleep(0.5)
            report = device.status()
            device.power_off()
            print_summary(results, report, device, images, tree_s, image_s, rootfs_s, check, args)
            ok = all(r["status"] == "SUCCEEDED" for r in results) and len(results) == len(steps)
            return 0 if ok and report["primary_slot"] == results[-1]["target"] else 1
        finally:
            disk.close()


def mib(path):
    return f"{os.path.getsize(path) >> 20} MiB"


def print_summary(results, report, device, images, tree_s, image_s, rootfs_s, check, args):
    print()
    print("=== otad demo summary ===")
    cached = " (from the cache)" if tree_s + image_s < 1 else ""
    print(f"root file systems: {IMAGE_MIB} MiB ext4 images of Debian 12 minbase + systemd, "
          f"{', '.join('+ ' + p for p in PACKAGES)}; trees {tree_s:.0f} s, images {image_s:.0f} s{cached}")
    if check:
        print(f"  reproducible: two builds of the 1.0.0 tree byte-identical: {'yes' if check[0] else 'NO'}")
    for r in results:
        print(f"update {r['from']} -> {r['to']} (slot {r['source']} -> {r['target']}), job {r['job']}: {r['status']}")
        p = r["predicted"]
        print(f"  image {mb(r['image'])}, bundle {mb(r['bundle'])} ({100 * r['bundle'] / r['image']:.0f} %), "
              f"made in {r['create_s']:.0f} s; {p['new_chunks']} of {p['chunks']} chunks new")
        print(f"  fetched {mb(r['served'])} over {'HTTPS' if r['https'] else 'MQTT streams'} ({100 * r['served'] / r['bundle']:.1f} % of the bundle, "
              f"{100 * r['served'] / r['image']:.1f} % of the image), reused {mb(r['reused'])} of the image "
              f"from the device ({100 * r['reused'] / r['image']:.0f} %); "
              f"`bundle create --previous` predicted {mb(p['fetch_payload_bytes'])} of payload")
        print(f"  at AWS IoT's 512 KiB/s: {r['served'] / AWS_RATE:.0f} s fetched vs {r['bundle'] / AWS_RATE / 60:.1f} min "
              f"for the whole bundle, {r['image'] / AWS_RATE / 60:.1f} min for the raw image")
        print(f"  job to reboot request {r['to_reboot']:.1f} s, to commit {r['total']:.1f} s")
    env = grubenv_list(device.grubenv)
    print(f"primary slot: {report['primary_slot']} (grubenv: {' '.join(f'{k}={v}' for k, v in sorted(env.items()))})")
    for slot in report["slots"]:
        print(f"  slot {slot['bootname']}: {slot['device']}, {slot['state']}, version {slot['version']}"
              f"{', booted' if slot['booted'] else ''}")
    print(f"demo: {time.monotonic() - STARTED:.0f} s, of which root file systems {rootfs_s:.0f} s")


# ---- the raw-image demo -------------------------------------------------------

def raw_demo(args):
    if args.keep:
        os.environ["OTAD_KEEP_TMP"] = "1"
    with Stack(things=[THING]) as stack:
        svc, workdir = stack.service, stack.workdir
        disk = Disk(workdir, args.size + 4)
        try:
            say(f"broker: TLS mosquitto on 127.0.0.1:{stack.broker.port}, client certificates, device policy ACL")
            say(f"slots: A = {disk.slots['A']} (booted), B = {disk.slots['B']}")
            grubenv = os.path.join(workdir, "grubenv")
            run(["grub-editenv", grubenv, "create"])
            trust = os.path.join(workdir, "trust")
            os.makedirs(trust)
            shutil.copy(stack.pki.signer_cert, os.path.join(trust, "ota-signer.crt"))
            reboots = os.path.join(workdir, "reboot-requests")
            reboot = os.path.join(workdir, "reboot.sh")
            with open(reboot, "w") as f:
                f.write(f"#!/bin/sh\necho \"$(date +%s)\" >> {reboots}\n")
            os.chmod(reboot, 0o755)
            sections = {
                "ota": {"trust_dir": trust, "http_ca_file": stack.pki.ca_cert, "block_size": "131072"},
                "bootloader": {"type": "grub", "grubenv": grubenv},
                "target.rootfs": {"type": "ab"},
                "slot.rootfs.a": {"device": disk.slots["A"], "bootname": "A"},
                "slot.rootfs.b": {"device": disk.slots["B"], "bootname": "B"},
                "update": {"booted_slot": "A", "version": "1.0.0", "reboot_command": reboot,
                           "wait_system_running": "no", "health_check": f"test -b {disk.slots['B']} -o -f {disk.slots['B']}"},
                "log": {"level": "info"},
            }

            image = os.urandom(args.size << 20)
            protocol = "HTTP" if args.http else "MQTT"
            svc.queue_ota_job(THING, JOB, image, protocols=[protocol])
            say(f"queued job {JOB}: {len(image)} bytes over {protocol}, signed with ECDSA P-256 (sig-sha256-ecdsa)")

            started = time.monotonic()
            otad = stack.start_otad(THING, sections)
            say("otad started on slot A, version 1.0.0")
            wait_for(lambda: os.path.exists(reboots), 300, "the reboot request")
            downloaded = time.monotonic()
            otad.stop()
            say(f"otad downloaded, verified and wrote slot B, set it to boot once, asked to reboot "
                f"({downloaded - started:.1f} s)")
            if disk.read("B", len(image)) != image:
                raise SystemExit("demo: slot B does not hold the image")
            env = run(["grub-editenv", grubenv, "list"]).stdout.split()
            say(f"grubenv after activation: {' '.join(env)}")

            say("simulated reboot: otad restarted on slot B, version 2.0.0")
            run(["grub-editenv", grubenv, "set", "B_TRY=1"])  # what grub.cfg does when it boots B
            otad = stack.start_otad(THING, dict(sections, update=dict(sections["update"], booted_slot="B",
                                                                          version="2.0.0")))
            status = svc.wait_terminal(THING, JOB, timeout=120)
            finished = time.monotonic()
            time.sleep(0.5)
            conf = stack.write_otad_config(THING, dict(sections, update=dict(sections["update"], booted_slot="B",
                                                                                 version="2.0.0")))
            report = json.loads(run([otad_bin(), "status", "--json", "-c", conf]).stdout)
            otad.stop()

            print()
            print("=== otad demo summary ===")
            print(f"job {JOB}: {status}")
            for update in svc.record.status_updates(THING, JOB):
                print(f"  {update['status']:<12} {json.dumps(update['statusDetails'] or {})}")
            print(f"primary slot: {report['primary_slot']} "
                  f"(grubenv: {' '.join(run(['grub-editenv', grubenv, 'list']).stdout.split())})")
            for slot in report["slots"]:
                print(f"  slot {slot['bootname']}: {slot['device']}, {slot['state']}, version {slot['version']}"
                      f"{', booted' if slot['booted'] else ''}")
            served = svc.record.bytes_served(THING, "https" if args.http else "mqtt")
            print(f"image: {len(image)} bytes, {served} bytes served over {protocol}; "
                  f"download to reboot request {downloaded - started:.1f} s, "
                  f"total {finished - started:.1f} s")
            return 0 if status == "SUCCEEDED" and report["primary_slot"] == "B" else 1
        finally:
            disk.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", action="store_true", help="the earlier demo: a random image as a plain OTA job")
    parser.add_argument("--size", type=int, default=16, help="--raw: image size in MiB (default 16)")
    parser.add_argument("--http", action="store_true", help="deliver over presigned HTTPS, not MQTT streams")
    parser.add_argument("--one", action="store_true", help="stop after the first update (v1 -> v2)")
    parser.add_argument("--from-scratch", action="store_true",
                        help="build v2 and v3 from scratch (reproducibly) instead of from the previous image")
    parser.add_argument("--aws-caps", action="store_true",
                        help="serve with AWS IoT's per-connection caps (512 KiB/s, 100 publishes/s)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.raw:
        return raw_demo(args)
    if os.geteuid() != 0:
        raise SystemExit("demo: building the root file systems needs root (debootstrap, chroot, loop mounts); "
                         "--raw runs without")
    return bundle_demo(args)


if __name__ == "__main__":
    sys.exit(main())
