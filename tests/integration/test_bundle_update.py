#!/usr/bin/python3
"""Update bundles installed by otad end to end (issues 12 and 13): a bundle
made with `otad bundle create`, queued from its ota-update.json as AWS
would, fetched over MQTT streams or presigned HTTPS, its manifest decided on
before any payload byte, its payload installed into slot B as it arrives
(only the chunks slot A does not hold), read back against the manifest's
image hash, booted once and committed. Checked the way a user would: the
job's statusDetails, the bytes on the slot, the bytes the stand-in served."""

import json
import os
import random
import shutil
import subprocess
import time
import unittest

from harness import Stack, wait_for

THING = "thing-A"
OTAD = os.environ.get("OTAD_BIN")
MIB = 1024 * 1024
IMAGE_SIZE = 6 * MIB


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)



def image_v1(seed=7):
    """Text, zeros and noise, as a file system holds them."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < IMAGE_SIZE:
        kind = rnd.randrange(3)
        n = rnd.randrange(1000, 40000)
        if kind == 0:
            out += bytes(n)
        elif kind == 1:
            out += (b"otad bundle %d " % rnd.randrange(1000)) * (n // 16)
        else:
            out += rnd.randbytes(n)
    return bytes(out[:IMAGE_SIZE])


def image_v2(v1):
    """v1 with a few changes: bytes replaced, some inserted (which moves what
    follows), as one more package in a root file system does."""
    rnd = random.Random(11)
    b = bytearray(v1)
    b[1 * MIB:1 * MIB + 20000] = rnd.randbytes(20000)
    b[3 * MIB:3 * MIB] = rnd.randbytes(50000)
    del b[IMAGE_SIZE:]
    return bytes(b)


class BundleCase(unittest.TestCase):
    def setUp(self):
        self.stack = Stack(things=[THING])
        self.stack.__enter__()
        self.addCleanup(self.stack.__exit__, None, None, None)
        self.svc = self.stack.service
        self.dir = self.stack.workdir
        self.trust = os.path.join(self.dir, "trust")
        os.makedirs(self.trust)
        # The code-signing certificate otad trusts, under the name the tool
        # puts in the job (the --cert file's name).
        self.key = os.path.join(self.dir, "signer.key")
        self.cert = os.path.join(self.dir, "signer.crt")
        shutil.copy(self.stack.pki.signer_key, self.key)
        shutil.copy(self.stack.pki.signer_cert, self.cert)
        shutil.copy(self.cert, os.path.join(self.trust, "signer.crt"))
        self.v1 = image_v1()
        self.slots = {}
        for name, content in (("a", self.v1), ("b", b"")):
            path = os.path.join(self.dir, "slot-%s.img" % name)
            with open(path, "wb") as f:
                f.write(content + b"\0" * (8 * MIB - len(content)))
            self.slots[name] = path
        self.reboots = os.path.join(self.dir, "reboots")
        reboot = os.path.join(self.dir, "reboot.sh")
        with open(reboot, "w") as f:
            f.write("#!/bin/sh\necho reboot >> %s\n" % self.reboots)
        os.chmod(reboot, 0o755)
        self.env = os.path.join(self.dir, "grubenv")
        self.assertEqual(run(["grub-editenv", self.env, "create"]).returncode, 0)
        self.sections = {
            "ota": {"trust_dir": self.trust, "progress_interval": "1", "block_size": "16384", "window": "8",
                    "max_requests_per_second": "0", "http_ca_file": self.stack.pki.ca_cert},
            "target.rootfs": {"type": "ab"},
            "slot.rootfs.a": {"device": self.slots["a"], "bootname": "A"},
            "slot.rootfs.b": {"device": self.slots["b"], "bootname": "B"},
            "bootloader": {"type": "grub", "grubenv": self.env},
            "update": {"booted_slot": "A", "version": "1.0.0", "reboot_command": reboot,
                       "wait_system_running": "no", "health_check": "true", "health_timeout": "20",
                       "compatible": "test-board"},
        }
        self.otad = None

    def bundle(self, image, version, update_id, *args, compatible="test-board"):
        path = os.path.join(self.dir, "image-%s.img" % update_id)
        with open(path, "wb") as f:
            f.write(image)
        out = os.path.join(self.dir, "bundle-" + update_id)
        p = run([OTAD, "bundle", "create", "--key", self.key, "--cert", self.cert, "--version", version,
                 "--compatible", compatible, "--part-size", str(MIB), "--bucket", "standin",
                 "--target", "arn:aws:iot:local:000000000000:thing/%s" % THING,
                 "--role-arn", "arn:aws:iam::000000000000:role/ota", "--ota-update-id", update_id, *args, path, out])
        self.assertEqual(p.returncode, 0, p.stderr)
        with open(os.path.join(out, "ota-update.json")) as f:
            request = json.load(f)
        return out, request

    def queue(self, image, version, update_id, *args, protocols=None, **kw):
        out, request = self.bundle(image, version, update_id, *args, **kw)
        if protocols:
            request["protocols"] = protocols
        info = self.svc.create_ota_update(request, out)
        self.sizes = {f["fileName"]: os.path.getsize(os.path.join(out, f["fileName"])) for f in request["files"]}
        return info["job_id"]

    def start(self, booted, version):
        if self.otad and self.otad.running():
            self.otad.stop()
        self.sections["update"].update(booted_slot=booted, version=version)
        self.otad = self.stack.start_otad(THING, self.sections)
        return self.otad

    def reboot_count(self):
        return len(open(self.reboots).readlines()) if os.path.exists(self.reboots) else 0

    def details(self, job_id):
        return [(u["status"], u["statusDetails"]) for u in self.svc.record.status_updates(THING, job_id)
                if u["outcome"] == "accepted"]

    def slot_bytes(self, name, n):
        with open(self.slots[name], "rb") as f:
            return f.read(n)

    def served(self):
        return self.svc.record.bytes_served(THING)

    def manifest_size(self):
        return next(size for name, size in self.sizes.items() if name.endswith(".manifest"))

    def payload_size(self):
        return sum(size for name, size in self.sizes.items() if not name.endswith(".manifest"))


class BundleUpdate(BundleCase):
    def install(self, job, v2):
        """From the job to the commit, through the reboot into B."""
        otad = self.start("A", "1.0.0")
        self.assertTrue(wait_for(lambda: self.reboot_count() == 1, 120), otad.log()[-4000:])
        self.assertEqual(self.slot_bytes("b", len(v2)), v2, "slot B holds the new image")
        self.assertEqual(run(["grub-editenv", self.env, "set", "B_TRY=1"]).returncode, 0)
        self.start("B", "2.0.0")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "SUCCEEDED", self.otad.log()[-4000:])
        # Read back and hashed once: a slot takes minutes to read on an SD card.
        self.assertEqual(len(self.otad.grep(r"Verifying the bundle's image")), 1,
                         "\n".join(self.otad.grep(r"verif")))
        # What only resumed this install leaves with its record.
        kept = lambda: {"bundle.chunks", "bundle.manifest"} & set(os.listdir(self.stack.state_dir(THING)))  # noqa: E731
        wait_for(lambda: not kept(), 10)
        self.assertEqual(kept(), set())
        details = self.details(job)
        # Every status update says something new (each is a publish and a
        # Jobs API call).
        for before, after in zip(details, details[1:]):
            self.assertNotEqual(before, after, details)
        return details

    def test_bundle_installs_only_what_the_device_lacks_and_commits(self):
        v2 = image_v2(self.v1)
        job = self.queue(v2, "2.0.0", "bundle-delta")
        details = self.install(job, v2)
        final = details[-1][1]
        self.assertEqual((final["reason"], final["updatedBy"]), ("accepted  v2.0.0", "  v1.0.0"))
        fetched, reused = int(final["fetched"]), int(final["reused"])
        served = self.served()
        print("# bundle %d bytes (payload %d), served %d, fetched %d, reused %d image bytes"
              % (self.manifest_size() + self.payload_size(), self.payload_size(), served, fetched, reused))
        self.assertGreater(reused, IMAGE_SIZE // 2, "most of the image came from slot A")
        self.assertLess(fetched, self.payload_size() // 2, "only what slot A lacks was fetched")
        self.assertLessEqual(served, self.manifest_size() + fetched + 64 * 1024)
        self.assertTrue(any(d and "fetched" in d for _, d in details[:-1]), "progress says fetched/reused too")

    def test_the_next_update_back_into_slot_a_reuses_slot_b(self):
        """A second update, the first's record of chunks still in the state
        directory: it is another payload's, so nothing is taken for an
        earlier run of this install."""
        v2 = image_v2(self.v1)
        self.install(self.queue(v2, "2.0.0", "bundle-first"), v2)
        v3 = bytearray(v2)
        v3[5 * MIB:5 * MIB + 30000] = random.Random(13).randbytes(30000)
        v3 = bytes(v3)
        job = self.queue(v3, "3.0.0", "bundle-second")
        self.assertTrue(wait_for(lambda: self.reboot_count() == 2, 120), self.otad.log()[-4000:])
        self.assertEqual(self.slot_bytes("a", len(v3)), v3, "slot A holds the newer image")
        self.assertEqual(run(["grub-editenv", self.env, "set", "A_TRY=1"]).returncode, 0)
        self.start("A", "3.0.0")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "SUCCEEDED", self.otad.log()[-4000:])
        final = self.details(job)[-1][1]
        self.assertGreater(int(final["reused"]), IMAGE_SIZE // 2, final)
        self.assertLess(int(final["fetched"]), self.payload_size() // 2, final)
        installed = [line for line in self.otad.grep(r"Bundle installed into the target") if "bundle-second" in line]
        self.assertEqual(len(installed), 1, installed)
        self.assertIn(" 0 of ", installed[0], "no chunk was written before a restart: there was none")

    def test_bundle_without_a_usable_active_slot_fetches_everything(self):
        with open(self.slots["a"], "wb") as f:
            f.write(b"\xff" * 8 * MIB)  # nothing in common with the bundle
        v2 = image_v2(self.v1)
        job = self.queue(v2, "2.0.0", "bundle-full")
        final = self.install(job, v2)[-1][1]
        self.assertEqual(int(final["reused"]), 0)
        self.assertGreaterEqual(int(final["fetched"]), self.payload_size())

    def test_a_bundle_of_fifty_files_the_most_a_stream_holds(self):
        """A manifest and 49 parts: an OTA update's and a stream's most files
        (AWS IoT's model), which a 1.2 GB payload in 24 MiB parts needs."""
        with open(self.slots["a"], "wb") as f:
            f.write(b"\xff" * 8 * MIB)  # every part is fetched
        v2 = image_v2(self.v1)
        out, request = self.bundle(v2, "2.0.0", "bundle-probe")
        payload = sum(os.path.getsize(os.path.join(out, f["fileName"])) for f in request["files"]
                      if not f["fileName"].endswith(".manifest"))
        job = self.queue(v2, "2.0.0", "bundle-fifty", "--part-size", str(-(-payload // 49)))
        self.assertEqual(len(self.sizes), 50, sorted(self.sizes))
        final = self.install(job, v2)[-1][1]
        self.assertEqual(final["reason"], "accepted  v2.0.0")
        self.assertGreaterEqual(int(final["fetched"]), self.payload_size())

    def test_bundle_over_https(self):
        v2 = image_v2(self.v1)
        job = self.queue(v2, "2.0.0", "bundle-https", protocols=["HTTP"])
        final = self.install(job, v2)[-1][1]
        self.assertLess(int(final["fetched"]), self.payload_size() // 2)

    def status(self):
        conf = self.stack.write_otad_config(THING, self.sections)
        r = run([OTAD, "status", "--json", "-c", conf])
        return json.loads(r.stdout) if r.returncode == 0 else {}

    def test_kill9_during_the_payload_resumes_from_the_chunks_written(self):
        with open(self.slots["a"], "wb") as f:
            f.write(b"\xff" * 8 * MIB)  # everything is fetched: the payload takes a while
        v2 = image_v2(self.v1)
        self.queue(v2, "2.0.0", "bundle-kill")
        # AWS's caps (512 KiB/s): the payload takes a few seconds.
        self.svc.set_aws_caps(THING, bytes_per_s=256 * 1024)
        otad = self.start("A", "1.0.0")
        total = self.manifest_size() + self.payload_size()

        def done():
            j = self.status().get("job") or {}
            return j.get("bytes_done", 0) if j.get("stage") == "download" else 0

        self.assertTrue(wait_for(lambda: done() > total * 0.4, 90), otad.log()[-3000:])
        time.sleep(0.3)  # the chunk map is recorded every 200 ms
        kept = done()
        otad.kill9()
        # What the stand-in still had queued for the dead connection goes
        # out to nobody; only what the restarted otad asks for counts.
        self.svc.set_aws_caps(THING, enabled=False)
        last = -1
        while last != self.served():
            last = self.served()
            time.sleep(0.5)
        before = self.served()
        otad = self.start("A", "1.0.0")
        self.assertTrue(wait_for(lambda: self.reboot_count() == 1, 120), otad.log()[-4000:])
        again = self.served() - before
        print("# %d of %d bytes done at the kill, %d served after the restart" % (kept, total, again))
        # What `otad status` said was done is not fetched again; besides the
        # header, what was in flight may be.
        self.assertLess(again, total - kept + 256 * 1024,
                        "the restart fetched what was missing, not the payload again\n" +
                        "\n".join(otad.grep(r"Fetching|resuming|chunks written|Chunks found")))
        self.assertTrue(otad.grep(r"[1-9][0-9]* of [0-9]+ chunks written before the restart"))
        self.assertEqual(self.slot_bytes("b", len(v2)), v2)


class BundleRefusals(BundleCase):
    """Decided from the manifest alone: a refusal costs its bytes only."""

    def refused(self, job, reason, detail_part):
        self.start("A", "1.0.0")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "FAILED", self.otad.log()[-3000:])
        final = self.details(job)[-1][1]
        self.assertEqual(final["reason"], reason, final)
        self.assertIn(detail_part, final["detail"])
        self.assertEqual(self.served(), self.manifest_size(), "only the manifest was fetched")
        self.assertEqual(self.reboot_count(), 0)
        self.assertEqual(self.slot_bytes("b", 4096), b"\0" * 4096, "slot B untouched")

    def test_downgrade(self):
        self.refused(self.queue(self.v1, "0.9.0", "bundle-down"), "rejected: 0x0000000f", "0.9.0")

    def test_same_version(self):
        self.refused(self.queue(self.v1, "1.0.0", "bundle-same"), "rejected: 0x00000010", "1.0.0")

    def test_incompatible(self):
        self.refused(self.queue(self.v1, "2.0.0", "bundle-other", compatible="other-board"),
                     "0x0000000c: 0x00000004", "other-board")

    def test_manifest_signed_by_another_key(self):
        other_key = os.path.join(self.dir, "other.key")
        run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", other_key])
        run(["openssl", "req", "-new", "-x509", "-key", other_key, "-out", os.path.join(self.dir, "other.crt"),
             "-days", "30", "-subj", "/CN=other"])
        key, cert = self.key, self.cert
        self.key, self.cert = other_key, os.path.join(self.dir, "other.crt")
        # The job names signer.crt, the manifest was signed by another key.
        out, request = self.bundle(image_v2(self.v1), "2.0.0", "bundle-forged")
        self.key, self.cert = key, cert
        for f in request["files"]:
            f["codeSigning"]["customCodeSigning"]["certificateChain"]["certificateName"] = "signer.crt"
        job = self.svc.create_ota_update(request, out)["job_id"]
        self.sizes = {f["fileName"]: os.path.getsize(os.path.join(out, f["fileName"])) for f in request["files"]}
        self.refused(job, "0x000000e3: 0x0000004a", "manifest")

    def test_a_part_from_another_bundle_never_reaches_the_slot(self):
        v2 = image_v2(self.v1)
        out, request = self.bundle(v2, "2.0.0", "bundle-mixed")
        # Same name and size, other bytes in the middle (what a part of
        # another bundle looks like to the device): the chunks there fail
        # their checksums, are fetched again, fail again, and the job fails.
        part = [f["fileName"] for f in request["files"] if not f["fileName"].endswith(".manifest")][1]
        path = os.path.join(out, part)
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2:len(data) // 2 + 4096] = random.Random(5).randbytes(4096)
        with open(path, "wb") as f:
            f.write(data)
        with open(self.slots["a"], "wb") as f:
            f.write(b"\xff" * 8 * MIB)  # nothing to reuse: every chunk is fetched
        job = self.svc.create_ota_update(request, out)["job_id"]
        self.start("A", "1.0.0")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=120), "FAILED", self.otad.log()[-3000:])
        final = self.details(job)[-1][1]
        self.assertEqual(final["reason"], "0x000000e3: 0x0000004a")
        self.assertIn("checksums", final["detail"])
        self.assertEqual(self.reboot_count(), 0, "nothing unverified is activated")


if __name__ == "__main__":
    unittest.main()
