#!/usr/bin/python3
"""The fault matrix of the update lifecycle (issue 9): for every stage the
lifecycle records, the real otad meets a fault at exactly the moment that
record is written: SIGKILL before it, SIGKILL after it, a power cut (what
was not synced is lost, tests/faultshim.c), a full state directory (ENOSPC)
and a read-only one (EROFS). Then the bootloader environment failing, an
I/O error writing the slot, a health check that hangs with grandchildren
and a command installer that hangs.

Each run goes on as a device would (otad restarted after a crash, a reboot
simulated by booting the slot the documented grub.cfg would boot) until the
job has ended at the stand-in, and asserts what must hold whatever happened:
the job ends SUCCEEDED or FAILED with a reason (never stuck, never
SUCCEEDED without a committed slot), the bootloader boots a good slot next,
no slot is marked good without a passed health check, nothing unverified is
ever booted. Figures: the runs and their outcomes, printed as a table."""

import json
import os
import shutil
import subprocess
import tempfile
import time
import unittest

from harness import Stack

THING = "thing-A"
OTAD = os.environ.get("OTAD_BIN")
SHIM = os.environ.get("OTAD_FAULTSHIM")
IMAGE_SIZE = 1 << 20
RUN_TIMEOUT = 90

STAGES = ["download", "verify", "activate", "reboot", "self-test", "commit", "rollback", "fail"]
KINDS = ["kill-before", "kill-after", "power-cut", "enospc", "erofs"]
# For a developer chasing one cell: OTAD_FAULT_KINDS=enospc,erofs
KINDS = os.environ.get("OTAD_FAULT_KINDS", ",".join(KINDS)).split(",")
OUTCOMES = []


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)


def read_env(path):
    r = run(["grub-editenv", path, "list"])
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def grub_would_boot(env):
    """The slot the documented grub.cfg boots with this environment, and the
    environment it leaves (the try it counts): a slot with X_OK=1 and
    X_TRY=0 first in ORDER, else (every slot tried) the first with X_OK=1."""
    env = dict(env)
    order = env.get("ORDER", "A B").split()
    for s in order:
        if env.get(s + "_OK") == "1" and env.get(s + "_TRY", "0") == "0":
            env[s + "_TRY"] = "1"
            return s, env
    for s in order:
        if env.get(s + "_OK") == "1":
            env[s + "_TRY"] = "0"
    for s in order:
        if env.get(s + "_OK") == "1":
            env[s + "_TRY"] = "1"
            return s, env
    return None, env


class Device:
    """A/B slots in files, a grubenv, a reboot command that only records the
    request, a health check that leaves a mark when it passes."""

    def __init__(self, test, stack, health_ok=True, extra=None):
        self.test = test
        self.stack = stack
        self.svc = stack.service
        # A directory of its own: runs share the stand-in, nothing else.
        self.dir = tempfile.mkdtemp(prefix="device-", dir=stack.workdir)
        trust = os.path.join(self.dir, "trust")
        os.makedirs(trust, exist_ok=True)
        shutil.copy(stack.pki.signer_cert, os.path.join(trust, "ota-signer.crt"))
        self.slots = {}
        for name in ("a", "b"):
            self.slots[name] = os.path.join(self.dir, "slot-%s.img" % name)
            with open(self.slots[name], "wb") as f:
                f.write(b"\0" * (4 << 20))
        self.env = os.path.join(self.dir, "grubenv")
        # Factory state: A good, B never bootable until otad switched to it.
        assert run(["grub-editenv", self.env, "create"]).returncode == 0
        assert run(["grub-editenv", self.env, "set", "ORDER=A B", "A_OK=1", "A_TRY=0",
                    "B_OK=0", "B_TRY=0"]).returncode == 0
        self.reboots = os.path.join(self.dir, "reboots")
        reboot = os.path.join(self.dir, "reboot.sh")
        with open(reboot, "w") as f:
            f.write("#!/bin/sh\necho reboot >> %s\n" % self.reboots)
        os.chmod(reboot, 0o755)
        self.healthy_mark = os.path.join(self.dir, "health-passed")
        health = ("touch %s" % self.healthy_mark) if health_ok else "echo unhealthy; exit 3"
        self.sections = {
            "ota": {"trust_dir": trust, "progress_interval": "1", "block_size": "16384",
                    "window": "8", "max_requests_per_second": "0"},
            "target.rootfs": {"type": "ab"},
            "slot.rootfs.a": {"device": self.slots["a"], "bootname": "A"},
            "slot.rootfs.b": {"device": self.slots["b"], "bootname": "B"},
            "bootloader": {"type": "grub", "grubenv": self.env},
            "update": {"booted_slot": "A", "version": "1.0.0", "reboot_command": reboot,
                       "wait_system_running": "no", "health_check": health, "health_timeout": "10"},
        }
        for name, keys in (extra or {}).items():
            self.sections.setdefault(name, {}).update(keys)
        self.booted = "A"
        self.otad = None
        self.starts = 0
        self.boots = 0
        self.image = b""
        self.violations = []
        self.fault_env = None

    def reboot_count(self):
        return len(open(self.reboots).readlines()) if os.path.exists(self.reboots) else 0

    def slot_holds_image(self, name):
        with open(self.slots[name], "rb") as f:
            return f.read(len(self.image)) == self.image

    def version_of(self, slot):
        return "2.0.0" if slot == "B" and self.slot_holds_image("b") else "1.0.0"

    def start(self):
        """Every start carries the shim: its once-file keeps it quiet after
        the fault fired, and a stage after the reboot needs it armed."""
        if self.otad and self.otad.running():
            self.otad.stop()
        self.sections["update"].update(booted_slot=self.booted, version=self.version_of(self.booted))
        self.otad = self.stack.start_otad(THING, self.sections, env=self.fault_env)
        self.starts += 1

    def boot(self):
        """The reboot otad asked for: GRUB picks the slot, counts the try."""
        self.otad.stop()
        slot, env = grub_would_boot(read_env(self.env))
        assert run(["grub-editenv", self.env, "set"] + ["%s=%s" % kv for kv in env.items()]).returncode == 0
        if slot == "B" and not self.slot_holds_image("b"):
            self.violations.append("GRUB booted slot B, which does not hold the verified image")
        self.booted = slot
        self.boots += 1
        self.start()

    def idle(self):
        """Nothing left to do: no update, or only an ended one whose report
        the service will never ask for again (it has the result already,
        and a record that could not say so waits for the next job)."""
        conf = self.stack.write_otad_config(THING, self.sections)
        r = run([OTAD, "status", "--json", "-c", conf])
        if r.returncode != 0:
            return False
        job = json.loads(r.stdout)["job"]
        return job is None or job["stage"] in ("commit", "rollback", "fail")


class FaultMatrix(unittest.TestCase):
    def setUp(self):
        self.stack = Stack(things=[THING])
        self.stack.__enter__()
        self.addCleanup(self.stack.__exit__, None, None, None)

    def drive(self, dev, job):
        """Runs the device until the job ended and otad has nothing left to
        do; returns the final status at the service (None: stuck)."""
        dev.start()
        handled_reboots = 0
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            if not dev.otad.running():
                if dev.starts > 12:
                    return None  # a start loop: stuck
                dev.start()  # crashed or killed: systemd's Restart=on-failure
            elif dev.reboot_count() > handled_reboots:
                handled_reboots = dev.reboot_count()
                dev.boot()
            else:
                status = dev.svc.job_status(THING, job)
                if status in ("SUCCEEDED", "FAILED") and dev.reboot_count() == handled_reboots and dev.idle():
                    time.sleep(0.5)  # a reboot request right after the report?
                    if dev.reboot_count() == handled_reboots:
                        return status
            time.sleep(0.2)
        return None

    def check(self, dev, job, status, label):
        """What must hold whatever the fault was."""
        details = [u["statusDetails"] for u in dev.svc.record.status_updates(THING, job)
                   if u["outcome"] == "accepted"]
        final = details[-1] if details else {}
        env = read_env(dev.env)
        next_boot, _ = grub_would_boot(env)
        committed = next_boot == "B"
        self.assertIn(status, ("SUCCEEDED", "FAILED"), "%s: the job never ended (%s, %s at the service)\n%s"
                      % (label, status, dev.svc.job_status(THING, job), dev.otad.log()[-6000:]))
        self.assertTrue(final.get("reason"), "%s: the final status has a reason: %r" % (label, final))
        self.assertEqual(dev.violations, [], label)
        if committed:
            self.assertTrue(os.path.exists(dev.healthy_mark),
                            "%s: slot B boots next without a passed health check: %s" % (label, env))
            self.assertTrue(dev.slot_holds_image("b"), "%s: slot B boots next without the verified image" % label)
        if dev.sections["target.rootfs"]["type"] == "ab":
            self.assertEqual(status == "SUCCEEDED", committed,
                             "%s: %s but the next boot takes slot %s (%s)\n%s"
                             % (label, status, next_boot, env, dev.otad.log()[-3000:]))
        else:
            self.assertFalse(committed, "%s: a file or command target never switches slots" % label)
        OUTCOMES.append((label, status, final.get("reason", ""), dev.starts, dev.boots))

    def scenario(self, stage, kind, health_ok=True, signature=None, extra=None, nth=1):
        label = "%s at %s" % (kind, stage)
        dev = status = None
        with self.subTest(label):
            job = "AFR_OTA-%s-%s" % (stage.replace("-", ""), kind.replace("-", ""))
            dev = Device(self, self.stack, health_ok=health_ok, extra=extra)
            dev.image = os.urandom(IMAGE_SIZE)
            once = os.path.join(dev.dir, "fault-%s.fired" % job)
            self.stack.service.queue_ota_job(THING, job, dev.image, protocols=["MQTT"], signature=signature)
            dev.fault_env = {
                "LD_PRELOAD": SHIM,
                "FAULTSHIM_STATE_DIR": self.stack.state_dir(THING),
                "FAULTSHIM_STAGE": stage,
                "FAULTSHIM_KIND": kind,
                "FAULTSHIM_ONCE": once,
                "FAULTSHIM_WATCH": "%s:%s" % (dev.slots["a"], dev.slots["b"]),
                "FAULTSHIM_BOOTENV": dev.env,
                "FAULTSHIM_NTH": str(nth),
            }
            status = self.drive(dev, job)
            self.check(dev, job, status, label)
            if kind in ("enospc", "erofs") and stage not in ("rollback", "fail"):
                self.assertTrue(os.path.exists(once), "%s: the fault fired" % label)
                details = [u["statusDetails"] for u in self.stack.service.record.status_updates(THING, job)
                           if u["outcome"] == "accepted"]
                self.assertEqual(status, "FAILED", label)
                self.assertIn(self.stack.state_dir(THING), details[-1].get("detail", ""),
                              "%s: the reason names the state directory" % label)
                self.assertEqual(details[-1]["reason"][:12], "0x000000e6: ", label)
        if dev and dev.otad and dev.otad.running():
            dev.otad.stop()
        # The next run starts from a clean state directory.
        shutil.rmtree(self.stack.state_dir(THING), ignore_errors=True)
        return dev, status

    def args_for(self, stage):
        if stage == "rollback":
            return {"health_ok": False}
        if stage == "fail":
            # A signature over other bytes: the verification fails.
            return {"signature": "MEUCIQDk0WBqq8fW0ex2i1q2+0ZJ3AxnTX4zkhyTkk5oaUzqhAIgbTd7Z4t3d2cnrzpH3Lbq1fC2XvcCCzI8KvhDw6Z1bWk="}
        return {}


    def test_enospc_before_activation_never_switches_the_bootloader(self):
        """The defect this issue names: a full state directory at the moment
        the intent to switch is recorded. Before the lifecycle, otad
        switched anyway and, after the reboot, marked the new slot good
        without a health check."""
        dev, status = self.scenario("activate", "enospc")
        env = read_env(dev.env)
        self.assertEqual(status, "FAILED")
        self.assertEqual(grub_would_boot(env)[0], "A", env)
        self.assertEqual(env.get("B_OK"), "0", "slot B was never made bootable: %s" % env)
        self.assertEqual(dev.reboot_count(), 0, "no reboot into an unrecorded switch")
        self.assertFalse(os.path.exists(dev.healthy_mark))

    def test_bootloader_environment_write_fails(self):
        for stage, args in (("activate", {}), ("commit", {}), ("rollback", {"health_ok": False})):
            dev, status = self.scenario(stage, "bootenv-eio", **args)
            self.assertEqual(status, "FAILED", "%s: a bootloader that cannot be written never commits" % stage)

    def test_slot_io_error(self):
        """The slot is a loop device whose backing file lives on a tmpfs too
        small for the image: writing it fails with EIO at the sync."""
        if os.geteuid() != 0 or not shutil.which("losetup"):
            self.skipTest("needs root and losetup for a loop device")
        small = tempfile.mkdtemp(prefix="otad-fault-tmpfs-")
        self.addCleanup(shutil.rmtree, small, True)
        if run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", small]).returncode != 0:
            self.skipTest("cannot mount a tmpfs")
        self.addCleanup(run, ["umount", "-l", small])
        backing = os.path.join(small, "slot-b.img")
        with open(backing, "wb") as f:
            f.truncate(4 << 20)  # sparse: room for 256 KiB of the 1 MiB image
        r = run(["losetup", "-f", "--show", backing])
        if r.returncode != 0:
            self.skipTest("no loop device: %s" % r.stderr.strip())
        loop = r.stdout.strip()
        self.addCleanup(run, ["losetup", "-d", loop])
        dev, status = self.scenario("download", "none", extra={"slot.rootfs.b": {"device": loop}})
        self.assertEqual(status, "FAILED")
        details = [u["statusDetails"] for u in self.stack.service.record.status_updates(THING, "AFR_OTA-download-none")
                   if u["outcome"] == "accepted"]
        self.assertIn(loop, details[-1].get("detail", ""), "the reason names the slot device")
        self.assertEqual(grub_would_boot(read_env(dev.env))[0], "A")

    def test_health_check_that_hangs_with_grandchildren(self):
        marker = "sleep 3%d" % (os.getpid() % 1000 + 1000)
        dev, status = self.scenario("self-test", "none", health_ok=True, extra={
            "update": {"health_check": "(%s &) ; %s" % (marker, marker), "health_timeout": "2"}})
        self.assertEqual(status, "FAILED")
        time.sleep(1)
        left = run(["pgrep", "-f", marker]).stdout.split()
        self.assertEqual(left, [], "the whole process group was killed at the deadline")
        details = [u["statusDetails"] for u in self.stack.service.record.status_updates(THING, "AFR_OTA-selftest-none")
                   if u["outcome"] == "accepted"]
        self.assertIn("did not pass within 2 s", details[-1]["detail"])

    def test_file_target_killed_once_its_activation_is_recorded(self):
        """A file target's activation is recorded (the image counted as
        activated) and otad is killed before it says the update is done:
        the restarted otad finishes it. Before the fix it waited for the
        job document, and the delivered job found nothing to hand it."""
        app = os.path.join(self.stack.workdir, "app")
        dev, status = self.scenario("activate", "kill-after", nth=2, extra={
            "target.rootfs": {"type": "file", "directory": app}})
        self.assertEqual(status, "SUCCEEDED")
        with open(os.path.join(app, "rootfs"), "rb") as f:
            self.assertEqual(f.read(), dev.image)

    def test_command_installer_that_hangs(self):
        marker = "sleep 4%d" % (os.getpid() % 1000 + 1000)
        script = os.path.join(self.stack.workdir, "install.sh")
        with open(script, "w") as f:
            f.write("#!/bin/sh\n%s\n" % marker)
        os.chmod(script, 0o755)
        dev, status = self.scenario("activate", "none", extra={
            "target.rootfs": {"type": "command", "command": script, "timeout": "2"}})
        self.assertEqual(status, "FAILED")
        self.assertEqual(run(["pgrep", "-f", marker]).stdout.split(), [], "the installer program was killed")
        details = [u["statusDetails"] for u in self.stack.service.record.status_updates(THING, "AFR_OTA-activate-none")
                   if u["outcome"] == "accepted"]
        self.assertIn("timed out", details[-1]["detail"])

    @classmethod
    def tearDownClass(cls):
        print("# %-28s %-9s %-24s %6s %5s" % ("fault", "result", "reason", "starts", "boots"))
        for label, status, reason, starts, boots in OUTCOMES:
            print("# %-28s %-9s %-24s %6d %5d" % (label, status, reason, starts, boots))
        print("# %d runs" % len(OUTCOMES))


def _stage_test(stage):
    def test(self):
        for kind in KINDS:
            self.scenario(stage, kind, **self.args_for(stage))
    test.__doc__ = "Every state-directory fault at the moment stage %s is recorded." % stage
    return test


for _stage in STAGES:
    setattr(FaultMatrix, "test_state_faults_at_%s" % _stage.replace("-", "_"), _stage_test(_stage))


if __name__ == "__main__":
    unittest.main()
