#!/usr/bin/python3
"""A/B updates end to end: otad against the TLS stand-in writes the inactive
slot, switches the bootloader to try it once, "reboots" (otad is restarted
with the other slot booted, as the bootloader would), runs the self-test and
commits or rolls back. Checked the way a user would: the job's statuses, the
bytes on the slot, the bootloader environment through grub-editenv and
fw_printenv, `otad status --json`."""

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import unittest

from harness import Stack, wait_for

THING = "thing-A"
OTAD = os.environ.get("OTAD_BIN")


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)



def grubenv(path):
    r = run(["grub-editenv", path, "list"])
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


class ABCase(unittest.TestCase):
    """One stand-in per test; slots are files unless a test says otherwise."""

    bootloader = "grub"

    def setUp(self):
        self.stack = Stack(things=[THING])
        self.stack.__enter__()
        self.addCleanup(self.stack.__exit__, None, None, None)
        self.svc = self.stack.service
        self.dir = self.stack.workdir
        trust = os.path.join(self.dir, "trust")
        os.makedirs(trust)
        shutil.copy(self.stack.pki.signer_cert, os.path.join(trust, "ota-signer.crt"))
        self.slots = {}
        for name in ("a", "b"):
            path = os.path.join(self.dir, f"slot-{name}.img")
            with open(path, "wb") as f:
                f.write(b"\0" * (8 << 20))
            self.slots[name] = path
        self.reboots = os.path.join(self.dir, "reboots")
        reboot = os.path.join(self.dir, "reboot.sh")
        with open(reboot, "w") as f:
            f.write(f"#!/bin/sh\necho reboot >> {self.reboots}\n")
        os.chmod(reboot, 0o755)
        self.sections = {
            "ota": {"trust_dir": trust, "progress_interval": "1"},
            "target.rootfs": {"type": "ab"},
            "slot.rootfs.a": {"device": self.slots["a"], "bootname": "A"},
            "slot.rootfs.b": {"device": self.slots["b"], "bootname": "B"},
            "update": {"booted_slot": "A", "version": "1.0.0", "reboot_command": reboot,
                       "wait_system_running": "no", "health_check": "true", "health_timeout": "20"},
        }
        self.setup_bootloader()
        self.otad = None

    def setup_bootloader(self):
        self.env = os.path.join(self.dir, "grubenv")
        self.assertEqual(run(["grub-editenv", self.env, "create"]).returncode, 0)
        self.sections["bootloader"] = {"type": "grub", "grubenv": self.env}

    def start(self, booted, version, **update):
        if self.otad and self.otad.running():
            self.otad.stop()
        self.sections["update"].update(booted_slot=booted, version=version, **update)
        self.otad = self.stack.start_otad(THING, self.sections)
        return self.otad

    def status(self):
        conf = self.stack.write_otad_config(THING, self.sections)
        r = run([OTAD, "status", "--json", "-c", conf])
        self.assertEqual(r.returncode, 0, r.stderr)
        return json.loads(r.stdout)

    def reboot_count(self):
        return len(open(self.reboots).readlines()) if os.path.exists(self.reboots) else 0

    def queue(self, job_id, size=3 << 20):
        self.image = os.urandom(size)
        self.svc.queue_ota_job(THING, job_id, self.image, protocols=["MQTT"])

    def download_and_activate(self, job_id):
        """From the job to the first reboot request."""
        self.queue(job_id)
        otad = self.start("A", "1.0.0")
        wait_for(lambda: self.reboot_count() == 1, timeout=60)
        self.assertEqual(self.reboot_count(), 1, otad.log()[-3000:])
        otad.stop()

    def slot_bytes(self, name):
        with open(self.slots[name], "rb") as f:
            return f.read(len(self.image))

    def details(self, job_id):
        return [(u["status"], u["statusDetails"]) for u in self.svc.record.status_updates(THING, job_id)
                if u["outcome"] == "accepted"]


def documented_stages():
    """The OTAD_STAGE= values otad(8) lists under Stages: its .TP tags."""
    text = open(os.path.join(os.environ.get("OTAD_SOURCE_ROOT", "."), "man", "otad.8")).read()
    lines = text.split(".SS Stages", 1)[1].split("\n.PP", 1)[0].splitlines()
    stages = set()
    for tp, tag in zip(lines, lines[1:]):
        if tp == ".TP":
            words = re.sub(r"^\.BR? ", "", tag).replace('", "', " ")
            stages |= {w.replace("\\-", "-") for w in re.findall(r"[a-z][a-z\\-]*", words)}
    return stages


class JournalSink:
    """Stands in for journald: a datagram socket bind-mounted over
    /run/systemd/journal in otad's private mount namespace, drained by a
    thread; each entry becomes a dict of its fields."""

    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "journal")
        os.makedirs(self.dir)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(os.path.join(self.dir, "socket"))
        self.sock.settimeout(0.2)
        self.entries = []
        self.stopped = False
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self):
        while not self.stopped:
            try:
                data = self.sock.recv(1 << 20).decode(errors="replace")
            except socket.timeout:
                continue
            except OSError:
                return
            self.entries.append(dict(line.split("=", 1) for line in data.splitlines() if "=" in line))

    def close(self):
        self.stopped = True
        self.thread.join()
        self.sock.close()

    def argv(self, config):
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                "mkdir -p /run/systemd/journal && mount --bind %s /run/systemd/journal && exec %s -c %s"
                % (self.dir, OTAD, config)]


class GrubUpdate(ABCase):
    def test_update_commits_after_reboot(self):
        job = "AFR_OTA-commit"
        self.download_and_activate(job)
        self.assertEqual(self.slot_bytes("b"), self.image, "slot B holds the image")
        self.assertEqual(self.slot_bytes("a"), b"\0" * len(self.image), "the booted slot A is untouched")
        env = grubenv(self.env)
        self.assertEqual(env["ORDER"], "B A", env)
        st = self.status()
        self.assertEqual(st["job"]["stage"], "reboot")
        self.assertEqual(st["job"]["new_slot"], "B")
        self.assertEqual(st["primary_slot"], "B")
        self.assertIn(("IN_PROGRESS", {"self_test": "ready", "updatedBy": "0x01000000"}), self.details(job))

        # GRUB boots B and counts the try, as its grub.cfg does (B_TRY=1).
        self.assertEqual(run(["grub-editenv", self.env, "set", "B_TRY=1"]).returncode, 0)
        self.start("B", "2.0.0")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "SUCCEEDED")
        details = self.details(job)
        self.assertIn(("IN_PROGRESS", {"self_test": "active", "updatedBy": "0x02000000"}), details)
        self.assertEqual(details[-1][1]["reason"], "accepted  v2.0.0")
        self.assertEqual(details[-1][1]["updatedBy"], "  v1.0.0")
        env = grubenv(self.env)
        self.assertEqual((env["ORDER"].split()[0], env["B_OK"], env["B_TRY"]), ("B", "1", "0"), env)
        wait_for(lambda: self.status()["job"] is None, timeout=10)
        st = self.status()
        self.assertIsNone(st["job"])
        self.assertEqual((st["last"]["job_id"], st["last"]["result"]), (job, "SUCCEEDED"))
        slots = {s["bootname"]: s for s in st["slots"]}
        self.assertTrue(slots["B"]["booted"] and slots["B"]["primary"])
        self.assertEqual((slots["B"]["state"], slots["B"]["version"], slots["A"]["version"]), ("good", "2.0.0", "1.0.0"))
        self.assertEqual(self.reboot_count(), 1, "a committed update does not reboot again")

    def test_second_update_goes_back_to_slot_a(self):
        self.download_and_activate("AFR_OTA-first")
        self.start("B", "2.0.0")
        self.assertEqual(self.svc.wait_terminal(THING, "AFR_OTA-first", timeout=60), "SUCCEEDED")
        # The same otad, still running on B, takes the next job into A.
        self.queue("AFR_OTA-second")
        self.assertTrue(wait_for(lambda: self.reboot_count() == 2, 60), self.otad.log()[-3000:])
        self.assertEqual(self.slot_bytes("a"), self.image)
        self.assertEqual(grubenv(self.env)["ORDER"], "A B")
        self.start("A", "3.0.0")
        self.assertEqual(self.svc.wait_terminal(THING, "AFR_OTA-second", timeout=60), "SUCCEEDED")
        self.assertEqual(self.details("AFR_OTA-second")[-1][1]["updatedBy"], "  v2.0.0")
        self.assertEqual(self.reboot_count(), 2)

    def test_job_cancelled_during_reboot_lets_the_next_job_wait_for_the_decision(self):
        self.download_and_activate("AFR_OTA-cancelled")
        self.svc.cancel_job(THING, "AFR_OTA-cancelled")
        self.queue("AFR_OTA-next")
        # Booted B: the self-test of the cancelled job's update still decides
        # (the health check takes 2 s) while the next job is offered.
        otad = self.start("B", "2.0.0", health_check="sleep 2")
        self.assertTrue(wait_for(lambda: self.reboot_count() == 2, 60), otad.log()[-3000:])
        self.assertTrue(otad.grep("Job AFR_OTA-next waits until the update of job AFR_OTA-cancelled is decided"))
        self.assertEqual(grubenv(self.env)["B_OK"], "1", "the cancelled job's update was committed locally")
        self.assertEqual(self.slot_bytes("a"), self.image, "the next job went to slot A")
        self.assertEqual(self.svc.job_status(THING, "AFR_OTA-cancelled"), "CANCELED")
        self.assertIn(("IN_PROGRESS", {"self_test": "ready", "updatedBy": "0x02000000"}), self.details("AFR_OTA-next"))

    def test_failed_health_check_rolls_back(self):
        job = "AFR_OTA-unhealthy"
        self.download_and_activate(job)
        self.start("B", "2.0.0", health_check="echo not healthy; exit 3")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "FAILED")
        final = self.details(job)[-1][1]
        self.assertEqual(final["reason"], "rejected: 0x00000000")
        self.assertIn("health check failed: exit status 3", final["detail"])
        env = grubenv(self.env)
        self.assertEqual((env["ORDER"].split()[0], env["B_OK"]), ("A", "0"), env)
        wait_for(lambda: self.reboot_count() == 2, timeout=20)
        self.assertEqual(self.reboot_count(), 2, "otad reboots back into slot A")
        self.assertTrue(self.otad.grep("rolled back"))
        # Back on A, the result is retired as the last one.
        self.start("A", "1.0.0")
        wait_for(lambda: self.status()["job"] is None, timeout=10)
        self.assertEqual(self.status()["last"]["result"], "FAILED")

    def test_health_check_deadline_rolls_back(self):
        job = "AFR_OTA-slow"
        self.download_and_activate(job)
        self.start("B", "2.0.0", health_check="sleep 30", health_timeout="2")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "FAILED")
        self.assertIn("did not pass within 2 s", self.details(job)[-1][1]["detail"])

    def test_bootloader_fallback_fails_the_job(self):
        job = "AFR_OTA-fallback"
        self.download_and_activate(job)
        # GRUB booted B once (counting the try, as its grub.cfg does), B did
        # not come up, and the next boot went back to A.
        self.assertEqual(run(["grub-editenv", self.env, "set", "B_TRY=1"]).returncode, 0)
        self.start("A", "1.0.0")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "FAILED")
        final = self.details(job)[-1][1]
        self.assertEqual(final["reason"], "rejected: 0x00000010")
        self.assertIn("booted slot A although slot B was activated", final["detail"])
        self.assertIn("fell back", final["detail"])
        self.assertEqual(grubenv(self.env)["B_OK"], "0")
        self.assertEqual(self.reboot_count(), 1, "no further reboot: A is running")

    @unittest.skipUnless(os.geteuid() == 0 and shutil.which("unshare"), "needs root and unshare for a private mount namespace")
    def test_journal_of_an_update(self):
        """What `journalctl -u otad OTAD_JOB_ID=...` shows of an update
        through a reboot: its milestones, exactly one "job finished", and
        only the stage names otad(8) documents in OTAD_STAGE=."""
        job = "AFR_OTA-journal"
        sink = JournalSink(self.dir)
        self.addCleanup(sink.close)
        self.sections["log"] = {"level": "info"}

        def start(booted, version):
            self.sections["update"].update(booted_slot=booted, version=version)
            conf = self.stack.write_otad_config(THING, self.sections)
            name = "otad-journal-%s" % booted
            log = os.path.join(self.dir, name + ".log")
            open(log, "ab").close()
            st = os.stat(log)
            return self.stack.start_process(sink.argv(conf), name,
                                            {"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino)})

        self.queue(job)
        otad = start("A", "1.0.0")
        self.assertTrue(wait_for(lambda: self.reboot_count() == 1, 60), otad.log()[-3000:])
        otad.stop()
        self.assertEqual(run(["grub-editenv", self.env, "set", "B_TRY=1"]).returncode, 0)
        otad = start("B", "2.0.0")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "SUCCEEDED")
        wait_for(lambda: self.status()["job"] is None, timeout=10)
        otad.stop()
        time.sleep(0.5)
        mine = [e for e in sink.entries if e.get("OTAD_JOB_ID") == job]
        ids = [e.get("MESSAGE_ID") for e in mine]
        finished = ids.count("25592f82f6de4a9489e30dafdce2c443")
        self.assertEqual(finished, 1, "one 'job finished' per job: %s" % [e["MESSAGE"] for e in mine
                                                                      if e.get("MESSAGE_ID") == "25592f82f6de4a9489e30dafdce2c443"])
        for mid, what in (("c973a4eace2041d59c753beb6330b8c8", "job received"),
                          ("f61209aebc964f75bc360e5f493777b0", "update started"),
                          ("01b0ee85354f44c7ae5d6756e76c9a5f", "image verified"),
                          ("2df47ef3a6af4767baae96d5bb0bb256", "slot activated"),
                          ("776cc40014444347b20e42b23f576cb2", "committed")):
            self.assertIn(mid, ids, "milestone %s in the journal" % what)
        stages = {e["OTAD_STAGE"] for e in sink.entries if "OTAD_STAGE" in e}
        documented = {"download", "verify", "activate", "reboot", "self-test", "commit", "rollback", "fail"}
        self.assertEqual(documented_stages(), documented, "otad(8) lists the lifecycle's stages")
        self.assertLessEqual(stages, documented, "OTAD_STAGE= values otad(8) does not list")
        self.assertIn("commit", stages)
        self.assertEqual(open(os.path.join(self.dir, "otad-journal-B.log")).read(), "",
                         "nothing on stderr when it is the journal stream")

    def test_same_version_is_refused(self):
        job = "AFR_OTA-same"
        self.download_and_activate(job)
        self.start("B", "1.0.0")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "FAILED")
        final = self.details(job)[-1][1]
        self.assertEqual(final["reason"], "rejected: 0x00000010")
        self.assertIn("same version 1.0.0", final["detail"])
        self.assertEqual(grubenv(self.env)["ORDER"].split()[0], "A")

    def test_downgrade_is_refused(self):
        job = "AFR_OTA-down"
        self.download_and_activate(job)
        self.start("B", "0.9.0")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "FAILED")
        self.assertEqual(self.details(job)[-1][1]["reason"], "rejected: 0x0000000f")

    def test_downgrade_allowed_by_config(self):
        job = "AFR_OTA-down-ok"
        self.download_and_activate(job)
        self.start("B", "0.9.0", allow_downgrade="yes")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "SUCCEEDED")

    def test_reboot_waits_for_the_marker_and_status_follows_each_stage(self):
        job = "AFR_OTA-marker"
        marker = os.path.join(self.dir, "may-reboot")
        self.queue(job, size=4 << 20)
        # Slow blocks, so that the download stage can be seen.
        self.svc.set_faults(THING, delay=0.03)
        self.start("A", "1.0.0", reboot_policy="marker", reboot_marker=marker)
        self.assertTrue(wait_for(lambda: (self.status()["job"] or {}).get("stage") == "download", 30))
        downloading = self.status()["job"]
        self.assertEqual((downloading["job_id"], downloading["protocol"], downloading["files"]), (job, "mqtt", 1))
        self.assertTrue(wait_for(lambda: (self.status()["job"] or {}).get("stage") == "activate", 60))
        time.sleep(2)
        self.assertEqual(self.reboot_count(), 0, "no reboot before the marker exists")
        self.assertEqual(self.status()["job"]["percent"], 100)
        open(marker, "w").close()
        self.assertTrue(wait_for(lambda: self.reboot_count() == 1, 10), "reboot once the marker exists")
        self.start("B", "2.0.0")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "SUCCEEDED")
        self.assertTrue(wait_for(lambda: self.status()["job"] is None, 10))
        self.assertEqual(self.status()["last"]["result"], "SUCCEEDED")

    def test_booted_slot_is_never_written(self):
        job = "AFR_OTA-from-b"
        self.queue(job)
        self.start("B", "1.0.0")
        wait_for(lambda: self.reboot_count() == 1, timeout=60)
        self.assertEqual(self.slot_bytes("a"), self.image, "the inactive slot A holds the image")
        self.assertEqual(self.slot_bytes("b"), b"\0" * len(self.image), "the booted slot B is untouched")
        self.assertEqual(grubenv(self.env)["ORDER"], "A B")


class UBootUpdate(ABCase):
    def setup_bootloader(self):
        self.env = os.path.join(self.dir, "uboot.env")
        with open(self.env, "wb") as f:
            f.write(b"\0" * 0x4000)
        self.fw_config = os.path.join(self.dir, "fw_env.config")
        with open(self.fw_config, "w") as f:
            f.write(f"{self.env} 0x0000 0x4000\n")
        defaults = os.path.join(self.dir, "defaults.txt")
        with open(defaults, "w") as f:
            f.write("BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\n")
        r = run(["fw_setenv", "-c", self.fw_config, "-f", defaults, "BOOT_ORDER", "A B"])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.sections["bootloader"] = {"type": "uboot", "fw_env_config": self.fw_config}

    def printenv(self):
        r = run(["fw_printenv", "-c", self.fw_config])
        self.assertEqual(r.returncode, 0, r.stderr)
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def test_update_commits_after_reboot(self):
        job = "AFR_OTA-uboot"
        self.download_and_activate(job)
        env = self.printenv()
        self.assertEqual((env["BOOT_ORDER"].split()[0], env["BOOT_B_LEFT"]), ("B", "1"), env)
        # U-Boot boots B and uses its try.
        self.assertEqual(run(["fw_setenv", "-c", self.fw_config, "BOOT_B_LEFT", "0"]).returncode, 0)
        self.start("B", "2.0.0")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "SUCCEEDED")
        env = self.printenv()
        self.assertEqual((env["BOOT_ORDER"].split()[0], env["BOOT_B_LEFT"]), ("B", "3"), env)
        self.assertEqual(self.slot_bytes("b"), self.image)


class CommandInstaller(ABCase):
    def test_command_installer_runs_a_script(self):
        out = os.path.join(self.dir, "installed")
        script = os.path.join(self.dir, "install.sh")
        with open(script, "w") as f:
            f.write("#!/bin/sh\n"
                    f"env | grep ^OTAD_ | sort > {out}.env\n"
                    f"cp \"$1\" {out}\n"
                    "echo installed by script\n")
        os.chmod(script, 0o755)
        self.sections["target.app"] = {"type": "command", "command": script}
        self.sections["target.rootfs"] = None
        job = "AFR_OTA-cmd"
        self.queue(job, size=1 << 20)
        self.start("A", "1.0.0")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "SUCCEEDED")
        with open(out, "rb") as f:
            self.assertEqual(f.read(), self.image)
        env = open(out + ".env").read()
        self.assertIn(f"OTAD_JOB_ID={job}", env)
        self.assertIn(f"OTAD_FILE_SIZE={len(self.image)}", env)
        self.assertTrue(self.otad.grep("installed by script"))
        self.assertEqual(self.reboot_count(), 0)


@unittest.skipUnless(os.geteuid() == 0 and shutil.which("losetup") and shutil.which("partx"),
                     "needs root, losetup and partx")
class LoopDeviceUpdate(ABCase):
    """The same update onto real block devices: a GPT disk image on a loop
    device (the kernel here reads no partition tables: partx -a adds them)."""

    def setUp(self):
        super().setUp()
        disk = os.path.join(self.dir, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(40 << 20)
        r = run(["sfdisk", "-q", disk], input="label: gpt\nsize=16MiB, name=slotA\nsize=16MiB, name=slotB\n")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = run(["losetup", "-f", "--show", disk])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.loop = r.stdout.strip()
        self.addCleanup(lambda: run(["losetup", "-d", self.loop]))
        self.addCleanup(lambda: run(["partx", "-d", self.loop]))
        r = run(["partx", "-a", self.loop])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.slots = {"a": self.loop + "p1", "b": self.loop + "p2"}
        for name, dev in self.slots.items():
            self.assertTrue(os.path.exists(dev), dev)
            self.sections[f"slot.rootfs.{name}"]["device"] = dev

    def test_update_onto_loop_partitions(self):
        job = "AFR_OTA-loop"
        self.download_and_activate(job)
        self.assertEqual(self.slot_bytes("b"), self.image)
        self.start("B", "2.0.0")
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "SUCCEEDED")
        self.assertEqual(grubenv(self.env)["ORDER"].split()[0], "B")


if __name__ == "__main__":
    unittest.main()
