#!/usr/bin/python3
"""otad's main job, run locally: a signed OTA update of the inactive slot of
an A/B pair, from the AWS IoT job to the commit.

Everything is real and on 127.0.0.1: a TLS mosquitto with client
certificates and the device policy as ACL, the AWS IoT stand-in (Jobs and
MQTT file streams), otad. The A/B disk is a GPT disk image on a loop device
when run as root (files otherwise), with a GRUB environment block. The
reboot is simulated: otad asks for it, then is restarted with the other slot
booted, as the bootloader would do.

Usage: /usr/bin/python3 tests/demo.py [--http] [--size MiB] [--keep]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin"))
from harness import Stack  # noqa: E402

THING = "gateway-0001"
JOB = "AFR_OTA-demo-1"


def say(text):
    print(f"demo: {text}", flush=True)


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60, **kw)


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


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

    def close(self):
        if self.loop:
            subprocess.run(["partx", "-d", self.loop], capture_output=True)
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", action="store_true", help="deliver the image over presigned HTTPS, not MQTT")
    parser.add_argument("--size", type=int, default=16, help="image size in MiB (default 16)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
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
            report = json.loads(run([os.environ.get("OTAD_BIN", "build/src/otad"), "status", "--json", "-c", conf]).stdout)
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


if __name__ == "__main__":
    sys.exit(main())
