#!/usr/bin/python3
"""A/B updates of a gateway that really boots: QEMU TCG, GRUB, systemd.

The disk (vm.py) is {bios_grub; boot: GRUB with otad.conf(5)'s grub.cfg and
a grubenv provisioned as that page says; rootA; rootB; data: /var/lib/otad}.
Slot A holds the gateway (gateway.py) at version 1.0.0 with otad as the
shipped service; it reaches the host's TLS broker and the AWS IoT stand-in
at 10.0.2.2 through QEMU's user networking. A job's image is a slot-B root
file system at version 2.0.0, signed, in 16 MiB parts (an MQTT stream file
holds at most 24 MB).

Outcomes come from the stand-in's record (the job's statuses) and the serial
console (which slot GRUB booted, from the kernel command line of its menu
entry; journald forwards otad's lines there), and after power-off from the
grubenv on the disk: never from a file otad writes about itself. Needs root
and loop devices (GRUB is installed onto the disk through one).

meson runs the test_update_* and the test_fault_* scenarios as two tests,
each with its own stand-in and machines, so that they share the two cores.
"""

import os
import re
import signal
import subprocess
import threading
import time
import unittest

from harness import Stack   # first: its exit handler runs after ours
import gateway
import vm

THING = "gw-vm"
PART_BYTES = 16 << 20   # an MQTT stream file holds at most 24 MB
# One boot, GRUB to the report on the console: 30-60 s under TCG, more than
# 100 s on a loaded machine.
BOOT_TIMEOUT = 400
CONFIG = """[mqtt]
endpoint = 10.0.2.2
port = {port}
thing_name = {thing}
ca_file = /etc/otad/ca.pem
cert_file = /etc/otad/device.pem.crt
key_file = /etc/otad/private.pem.key

[ota]
# The stand-in is not AWS IoT: the largest blocks, no pacing.
block_size = 131072
window = 8
max_requests_per_second = 0
progress_interval = 5

[update]
health_check = /usr/local/sbin/gateway-health

[bootloader]
type = grub

[target.rootfs]
type = ab

[slot.rootfs.a]
device = /dev/vda3
bootname = A

[slot.rootfs.b]
device = /dev/vda4
bootname = B
"""
HEALTHY = "#!/bin/sh\n# The gateway's application would be checked here.\necho gateway healthy\n"
UNHEALTHY = "#!/bin/sh\necho 'gateway application did not start' >&2\nexit 1\n"
STARTED = r"otad\[\d+\]: otad \S+ started for thing " + THING
WATCHDOG = r"otad\.service: Watchdog timeout"


def interrupted(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def loop_devices_work():
    r = subprocess.run(["losetup", "-f"], capture_output=True, text=True)
    return os.path.exists("/dev/loop-control") and r.returncode == 0


@unittest.skipUnless(os.geteuid() == 0, "needs root: loop devices, mounts and grub-install")
class VmScenarios(unittest.TestCase):
    times = {}

    @classmethod
    def setUpClass(cls):
        if not loop_devices_work():
            raise unittest.SkipTest("no loop device support: GRUB is installed onto the disk through one")
        signal.signal(signal.SIGTERM, interrupted)   # meson's timeout: clean up
        started = time.monotonic()
        cls.gw = gateway.gateway()
        built = time.monotonic()
        cls.stack = Stack(things=[THING])
        cls.stack.__enter__()
        try:
            cls.svc = cls.stack.service
            cls.dir = cls.stack.workdir
            cls.vms = []
            cls.make_images()
        except BaseException:
            cls.tearDownClass()
            raise
        cls.times["set-up: gateway rootfs"] = "%.0f s" % (built - started)
        cls.times["set-up: images and disk"] = "%.0f s" % (time.monotonic() - built)
        print("# gateway rootfs %s in %.0f s; slot images (A %d MiB, B %d MiB) and disk in %.0f s"
              % ("built" if cls.gw.built_seconds else "cached", built - started, cls.size_a >> 20,
                 cls.size_b >> 20, time.monotonic() - built))

    @classmethod
    def tearDownClass(cls):
        try:
            for machine in getattr(cls, "vms", []):
                machine.kill()
        finally:
            cls.stack.__exit__(None, None, None)
        if cls.times:
            print("# times: " + ", ".join("%s %s" % kv for kv in cls.times.items()))

    @classmethod
    def make_images(cls):
        pki = cls.stack.pki

        def read(path):
            with open(path, "rb") as f:
                return f.read()

        def files(health):
            return {
                "/etc/otad.conf": CONFIG.format(port=cls.stack.broker.port, thing=THING),
                "/etc/otad/ca.pem": read(pki.ca_cert),
                "/etc/otad/device.pem.crt": read(pki.client_cert(THING)),
                "/etc/otad/private.pem.key": (read(pki.client_key(THING)), 0o600),
                "/etc/otad/trust/ota-signer.crt": read(pki.signer_cert),
                "/usr/local/sbin/gateway-health": (health, 0o755),
            }

        d = cls.dir
        cls.image_a = os.path.join(d, "rootA.img")
        cls.image_b = os.path.join(d, "rootB-2.0.0.img")
        cls.size_a = vm.make_slot_image(cls.gw, cls.image_a, "rootA", "1.0.0", files(HEALTHY))
        cls.size_b = vm.make_slot_image(cls.gw, cls.image_b, "rootB", "2.0.0", files(HEALTHY))
        cls.unhealthy_files = files(UNHEALTHY)
        cls.disk = os.path.join(d, "factory.img")
        # Room for a bigger image than today's.
        vm.make_disk(cls.disk, cls.image_a, max(cls.size_a, cls.size_b) + (32 << 20))

    # ---- helpers ------------------------------------------------------------------

    def machine(self, name):
        disk = os.path.join(self.dir, name + ".img")
        vm.copy_disk(self.disk, disk)
        machine = vm.Vm(disk, self.dir, name)
        self.vms.append(machine)
        started = time.monotonic()
        # Cleanups run last first: the machine is off when its times are taken.
        self.addCleanup(lambda: self.times.__setitem__(
            self._testMethodName[5:], "%.0f s (QEMU CPU %.0f s)" % (time.monotonic() - started, machine.cpu_seconds)))
        self.addCleanup(self.cancel_unfinished)
        self.addCleanup(machine.kill)
        return machine

    def cancel_unfinished(self):
        """A failed scenario's job must not reach the next one's gateway."""
        job = getattr(self, "job", None)
        if job and self.svc.job_status(THING, job) in ("QUEUED", "IN_PROGRESS"):
            self.svc.cancel_job(THING, job)

    def served(self):
        return self.svc.record.bytes_served(THING, "mqtt")

    def queue(self, job, image):
        """A signed afr_ota job of image; above one stream file's size it
        travels as parts named rootfs.img#part=offset/total (otad.conf(5))."""
        total = os.path.getsize(image)
        self.job = job
        if total <= PART_BYTES:
            self.svc.queue_ota_job(THING, job, image, protocols=["MQTT"], filepath="rootfs.img")
            return total
        self.svc.queue_ota_job(THING, job, image, protocols=["MQTT"], split_bytes=PART_BYTES,
                               filepath="rootfs.img",
                               part_fields=lambda i, offset, data: {"filepath": "rootfs.img#part=%d/%d"
                                                                    % (offset, total)})
        return total

    def statuses(self, job):
        return [(u["status"], u["statusDetails"] or {}) for u in self.svc.record.status_updates(THING, job)
                if u["outcome"] == "accepted"]

    def wait_status(self, job, predicate, timeout, machine):
        deadline = time.monotonic() + timeout
        while not any(predicate(s, d) for s, d in self.statuses(job)):
            if not machine.running():
                self.fail("QEMU exited; console ends:\n" + machine.serial()[-3000:])
            if time.monotonic() > deadline:
                self.fail("no such status of %s within %.0f s: %s\nconsole ends:\n%s"
                          % (job, timeout, self.statuses(job)[-3:], machine.serial()[-3000:]))
            time.sleep(0.02)

    def wait_terminal(self, job, machine, timeout=900):
        try:
            return self.svc.wait_terminal(THING, job, timeout=timeout)
        except TimeoutError:
            self.fail("%s not finished within %d s: %s\nconsole ends:\n%s"
                      % (job, timeout, self.statuses(job)[-3:], machine.serial()[-4000:]))

    def assert_started_once_per_boot(self, machine):
        """No watchdog kill and no restart of otad in any boot."""
        console = machine.serial()
        watchdog = re.search(WATCHDOG + ".*", console)
        self.assertIsNone(watchdog, watchdog and watchdog.group(0))
        self.assertEqual(len(re.findall(STARTED, console)), len(machine.boots()),
                         "otad started more often than the gateway booted")

    def slots(self, machine):
        return [(slot, version) for slot, version, _ in machine.boots()]

    # ---- scenarios ----------------------------------------------------------------

    def test_update_1_commit(self):
        """Written to B, reboot, GRUB boots B, health check passes: SUCCEEDED."""
        machine = self.machine("commit")
        job = "AFR_OTA-vm-commit"
        self.queue(job, self.image_b)
        machine.start()
        # Power off the moment the job ends (its last boot's report and
        # health check came before): test_1b reads what GRUB then sees.
        self.wait_status(job, lambda s, d: s not in ("QUEUED", "IN_PROGRESS"), 900, machine)
        machine.power_cut()
        type(self).committed_disk = machine.disk
        self.assertEqual(self.svc.job_status(THING, job), "SUCCEEDED", self.statuses(job)[-1])
        self.assertEqual(self.slots(machine), [("A", "1.0.0"), ("B", "2.0.0")])
        self.assertEqual(machine.boots()[1][2], "/dev/vda4", "B's root is slot B's partition")
        statuses = self.statuses(job)
        self.assertIn(("IN_PROGRESS", {"self_test": "ready", "updatedBy": "0x01000000"}), statuses)
        self.assertIn(("IN_PROGRESS", {"self_test": "active", "updatedBy": "0x02000000"}), statuses)
        self.assertEqual(statuses[-1][1]["reason"], "accepted  v2.0.0")
        self.assertEqual(statuses[-1][1]["updatedBy"], "  v1.0.0")
        self.assert_started_once_per_boot(machine)
        # As Linux sees it (journal replayed): B committed.
        env = vm.read_grubenv(machine.disk)
        self.assertEqual((env.get("ORDER", "").split()[:1], env.get("B_OK"), env.get("B_TRY")), (["B"], "1", "0"), env)

    def test_update_2_grub_sees_the_commit_after_a_power_cut(self):
        """GRUB replays no ext4 journal: what otad wrote must be where GRUB
        reads, not only in the journal, when the power goes."""
        disk = getattr(type(self), "committed_disk", None)
        self.assertTrue(disk, "needs the disk of test_update_1_commit")
        env = vm.read_grubenv(disk, replay=False)
        self.assertEqual((env.get("ORDER", "").split()[:1], env.get("B_OK"), env.get("B_TRY")), (["B"], "1", "0"), env)

    def test_update_3_rollback(self):
        """The health check fails in B: FAILED with the reason, back on A, A
        primary."""
        machine = self.machine("rollback")
        job = "AFR_OTA-vm-rollback"
        image = os.path.join(self.dir, "rootB-2.0.0-unhealthy.img")
        vm.make_slot_image(self.gw, image, "rootB", "2.0.0", self.unhealthy_files)
        self.queue(job, image)
        machine.start()
        self.assertEqual(self.wait_terminal(job, machine), "FAILED", self.statuses(job)[-1])
        details = self.statuses(job)[-1][1]
        self.assertEqual(details["reason"], "rejected: 0x00000000")
        self.assertIn("health check failed: exit status 1", details["detail"])
        machine.wait_boots(3, BOOT_TIMEOUT)
        self.assertEqual(self.slots(machine), [("A", "1.0.0"), ("B", "2.0.0"), ("A", "1.0.0")])
        self.assert_started_once_per_boot(machine)
        machine.power_cut()
        env = vm.read_grubenv(machine.disk)
        self.assertEqual((env.get("ORDER", "").split()[:1], env.get("A_OK"), env.get("B_OK")), (["A"], "1", "0"), env)

    def outcome_after_power_cut(self, machine, job):
        """After the cut: the job ends, and the gateway runs the slot that
        outcome says (B 2.0.0 committed, or A 1.0.0)."""
        cuts = len(machine.boots())
        machine.start()
        result = self.wait_terminal(job, machine)
        self.assertIn(result, ("SUCCEEDED", "FAILED"))
        want = ("B", "2.0.0") if result == "SUCCEEDED" else ("A", "1.0.0")
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not (len(machine.boots()) > cuts and self.slots(machine)[-1] == want):
            self.assertTrue(machine.running() and time.monotonic() < deadline,
                            "%s, but the gateway does not run %s: %s" % (result, want, self.slots(machine)))
            time.sleep(0.5)
        print("# %s: %s %s; boots %s" % (self._testMethodName, result, self.statuses(job)[-1][1],
                                         " ".join("%s %s" % b for b in self.slots(machine))))
        return result

    def test_fault_1_power_cut_while_writing(self):
        machine = self.machine("cut-writing")
        job = "AFR_OTA-vm-cut-writing"
        before = self.served()
        total = self.queue(job, self.image_b)
        cut = threading.Event()
        self.svc.when_bytes_served(THING, total // 2, lambda: (machine.power_cut(), cut.set()))
        machine.start()
        self.assertTrue(cut.wait(600), "half the image never served: %s" % self.statuses(job)[-1:])
        self.assertEqual(self.svc.job_status(THING, job), "IN_PROGRESS")
        self.assertNotIn("self_test", str(self.statuses(job)), "cut while writing, before activation")
        self.outcome_after_power_cut(machine, job)
        print("# power cut while writing: %d MiB served for a %d MiB image"
              % ((self.served() - before) >> 20, total >> 20))

    def test_fault_2_power_cut_after_the_bootloader_switched(self):
        machine = self.machine("cut-switched")
        job = "AFR_OTA-vm-cut-switched"
        self.queue(job, self.image_b)
        machine.start()
        # otad reports self_test "ready" once the try-once of B is written and read back.
        self.wait_status(job, lambda s, d: d.get("self_test") == "ready", 600, machine)
        machine.power_cut()
        self.assertEqual(self.slots(machine), [("A", "1.0.0")])
        self.outcome_after_power_cut(machine, job)

    def test_fault_3_slow_storage_verifies_within_the_watchdog(self):
        """Reading back 16 MiB (one stream file: otad verifies each files[]
        entry on its own) at 192 KiB/s takes longer than the shipped
        WatchdogSec=60s: the watchdog must keep being pinged."""
        machine = self.machine("slow-storage")
        job = "AFR_OTA-vm-slow"
        image = os.path.join(self.dir, "large.img")
        with open(image, "wb") as f:
            f.write(os.urandom(PART_BYTES))
        machine.start()
        machine.wait_boots(1, BOOT_TIMEOUT)
        # Reads only: the download writes at full speed, the read-back crawls.
        rate = 192 << 10
        machine.monitor("block_set_io_throttle disk 0 %d 0 0 0 0" % rate)
        before = self.served()
        total = self.queue(job, image)
        self.assertTrue(self.svc.record.wait_until(lambda r: self.served() - before >= total, 600),
                        "image not downloaded")
        downloaded = time.monotonic()
        deadline = downloaded + 2 * total / rate + 120
        while not any(d.get("self_test") == "ready" for _, d in self.statuses(job)):
            if re.search(WATCHDOG, machine.serial()):
                self.fail("otad killed by the watchdog %.0f s after the download: %s"
                          % (time.monotonic() - downloaded, machine.serial()[-600:]))
            self.assertTrue(machine.running())
            self.assertLess(time.monotonic(), deadline, "not verified in time: " + machine.serial()[-3000:])
            time.sleep(0.5)
        verified = time.monotonic() - downloaded
        machine.power_cut()
        print("# slow storage: %d MiB read back at %d KiB/s, verified in %.0f s"
              % (total >> 20, rate >> 10, verified))
        self.assertGreater(verified, 60, "the read-back must outlast WatchdogSec=60s to prove anything")
        self.assert_started_once_per_boot(machine)


if __name__ == "__main__":
    unittest.main()
