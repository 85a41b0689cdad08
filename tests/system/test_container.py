#!/usr/bin/python3
"""otad as the systemd service it ships as, in a booted gateway container.

The gateway rootfs (gateway.py: Debian packages, otad from `meson install
--destdir`, otad.service enabled as shipped, no unit edits) boots under
systemd-nspawn with systemd as PID 1 and talks to the TLS broker and the AWS
IoT stand-in on the host. What is checked is what a user checks: systemctl,
journalctl, the job's status in the stand-in's record, the files a job put
in place. Needs root; the rootfs is shared with the VM scenarios
(test_vm.py) and built once per run.
"""

import os
import re
import shutil
import signal
import time
import unittest

from harness import Stack   # first: its exit handler runs after ours
import gateway
from nspawn import Container

THING = "gw-container"
HANDLER = """#!/bin/sh
# A custom job handler as a user would write one: it reads the job document
# and reports what it found, under the same sandbox as otad.
document=$(cat)
echo "gateway $(hostname): uptime $(cut -d' ' -f1 /proc/uptime) s, document $document"
"""
# otad(8)'s MESSAGE_IDs of the milestones an OTA job into a file target
# passes.
MID = {
    "job received": "c973a4eace2041d59c753beb6330b8c8",
    "update started": "f61209aebc964f75bc360e5f493777b0",
    "image verified": "01b0ee85354f44c7ae5d6756e76c9a5f",
    "slot activated": "2df47ef3a6af4767baae96d5bb0bb256",
    "update committed": "776cc40014444347b20e42b23f576cb2",
    "job finished": "25592f82f6de4a9489e30dafdce2c443",
    "otad started": "53e7acdcb6a24fe4a14f5ddf144cfcc3",
    "otad stopping": "d5b22586263f4f48bc345ca99c219889",
}
STAGES = {"download", "verify", "install", "activate", "self-test", "commit", "rollback"}
# systemd's "Started UNIT" (catalog id of a start job that finished).
SD_UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"


def interrupted(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


@unittest.skipUnless(os.geteuid() == 0, "needs root: systemd-nspawn boots the gateway")
class Container_(unittest.TestCase):
    """One container for the class; the tests run in order (their names say
    it) and each leaves otad running."""

    @classmethod
    def setUpClass(cls):
        signal.signal(signal.SIGTERM, interrupted)   # meson's timeout: clean up
        started = time.monotonic()
        cls.gw = gateway.gateway()
        cls.stack = Stack(things=[THING])
        cls.stack.__enter__()
        try:
            cls.svc = cls.stack.service
            cls.root = os.path.join(cls.stack.workdir, "rootfs")
            gateway.copy_tree(cls.gw.rootfs, cls.root)
            cls.configure(cls.root)
            cls.ct = Container(cls.root, cls.stack.workdir)
            cls.boot_state = cls.ct.start()
        except BaseException:
            cls.tearDownClass()
            raise
        print("# gateway rootfs: %s (%s); container booted: %s; set-up %.1f s"
              % (cls.gw.rootfs, "built in %.0f s" % cls.gw.built_seconds if cls.gw.built_seconds else "cached",
                 cls.boot_state, time.monotonic() - started))

    @classmethod
    def tearDownClass(cls):
        try:
            if getattr(cls, "ct", None) and cls.ct.leader:
                # For the log: what otad said, whatever the outcome.
                r = cls.ct.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic", "-n", "80",
                                "-u", "otad"])
                print("# otad's journal ends:\n" + r.stdout)
        finally:
            try:
                if getattr(cls, "ct", None):
                    cls.ct.stop()
            finally:
                cls.stack.__exit__(None, None, None)

    @classmethod
    def configure(cls, root):
        """/etc/otad.conf and what it names, as an installer puts them on a
        gateway. [target.app] is the example of otad.conf(5) as documented;
        [target.config] is a directory the shipped unit does not open."""
        pki = cls.stack.pki

        def put(path, data, mode=0o644):
            full = os.path.join(root, path.lstrip("/"))
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(data if isinstance(data, bytes) else data.encode())
            os.chmod(full, mode)

        def read(path):
            with open(path, "rb") as f:
                return f.read()

        put("/etc/otad/ca.pem", read(pki.ca_cert))
        put("/etc/otad/device.pem.crt", read(pki.client_cert(THING)))
        put("/etc/otad/private.pem.key", read(pki.client_key(THING)), 0o600)
        put("/etc/otad/trust/ota-signer.crt", read(pki.signer_cert))
        put("/etc/otad/handlers/gateway-info", HANDLER, 0o755)
        os.chmod(os.path.join(root, "etc/otad/handlers"), 0o755)
        os.makedirs(os.path.join(root, "var/lib/app/bundles"))
        os.makedirs(os.path.join(root, "srv/gateway"))
        put("/etc/otad.conf", """[mqtt]
endpoint = 127.0.0.1
port = %d
thing_name = %s
ca_file = /etc/otad/ca.pem
cert_file = /etc/otad/device.pem.crt
key_file = /etc/otad/private.pem.key

[ota]
progress_interval = 1

[target.config]
type = file
match_filepath = gateway.conf
directory = /srv/gateway

[target.app]
type = file
directory = /var/lib/app/bundles
""" % (cls.stack.broker.port, THING))

    # ---- helpers -------------------------------------------------------------

    def otad(self, *props):
        return self.ct.show("otad.service", *props)

    def wait_for(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail("%s: not within %.0f s" % (what, timeout))
            time.sleep(0.2)

    def status_text(self):
        return self.otad("StatusText")["StatusText"]

    def wait_idle(self, timeout=60):
        """STATUS= of otad(8): connected, and no job pending."""
        return self.wait_for(lambda: re.match(r"connected to \S+; no pending job$", self.status_text()), timeout,
                             "otad connected and idle")

    def wait_active(self, timeout=30):
        return self.wait_for(lambda: self.otad("ActiveState")["ActiveState"] == "active", timeout,
                             "otad.service active")

    def final(self, job):
        updates = [u for u in self.svc.record.status_updates(THING, job) if u["outcome"] == "accepted"]
        return updates[-1]["status"], updates[-1]["statusDetails"]

    def container_file(self, path):
        with open(os.path.join(self.root, path.lstrip("/")), "rb") as f:
            return f.read()

    # ---- the unit ------------------------------------------------------------

    def test_01_unit_is_active_only_after_ready(self):
        self.wait_active()
        unit = self.otad("Type", "NotifyAccess", "ExecMainStartTimestampMonotonic",
                         "ActiveEnterTimestampMonotonic", "NRestarts")
        self.assertEqual((unit["Type"], unit["NotifyAccess"], unit["NRestarts"]), ("notify", "main", "0"))
        started = self.ct.journal("-u", "otad.service", "MESSAGE_ID=" + MID["otad started"])
        self.assertEqual(len(started), 1, started)
        logged = int(started[0]["__MONOTONIC_TIMESTAMP"])
        systemd_started = self.ct.journal("_PID=1", "MESSAGE_ID=" + SD_UNIT_STARTED, "UNIT=otad.service")
        self.assertEqual(len(systemd_started), 1)
        # otad logs "started" just before READY=1: systemd must have made
        # the unit active after that, never at fork as for Type=simple.
        self.assertLess(int(unit["ExecMainStartTimestampMonotonic"]), logged)
        self.assertGreaterEqual(int(unit["ActiveEnterTimestampMonotonic"]), logged)
        self.assertGreaterEqual(int(systemd_started[0]["__MONOTONIC_TIMESTAMP"]), logged)

    def test_02_status_shows_the_status_line(self):
        self.wait_idle()
        text = self.status_text()
        r = self.ct.run(["systemctl", "status", "--no-pager", "otad.service"])
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertRegex(r.stdout, r"Active: active \(running\)")
        self.assertIn('Status: "%s"' % text, r.stdout)

    # ---- jobs under the sandbox -----------------------------------------------

    def test_03_ota_job_into_the_documented_file_target(self):
        job = "AFR_OTA-container-app"
        image = os.urandom(3 << 20)
        self.svc.queue_ota_job(THING, job, image, filepath="bundle-1.2.tar", protocols=["MQTT"])
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=120), "SUCCEEDED", self.final(job))
        status, details = self.final(job)
        self.assertRegex(details["reason"], r"^accepted  v")
        self.assertEqual(self.container_file("/var/lib/app/bundles/app"), image)
        self.assertEqual([f for f in os.listdir(os.path.join(self.root, "var/lib/app/bundles"))], ["app"])
        type(self).file_job = job

    def test_04_journal_has_the_jobs_milestones(self):
        job = getattr(type(self), "file_job", None)
        self.assertTrue(job, "needs the job of test_03")
        entries = self.ct.journal("-u", "otad", "OTAD_JOB_ID=" + job)
        ids = [e.get("MESSAGE_ID") for e in entries if e.get("MESSAGE_ID")]
        for name in ("job received", "update started", "image verified", "slot activated", "update committed"):
            self.assertIn(MID[name], ids, "%s missing from journalctl -u otad OTAD_JOB_ID=%s" % (name, job))
        self.assertTrue(all(e.get("OTAD_JOB_ID") == job for e in entries))
        order = [ids.index(MID[n]) for n in ("update started", "image verified", "slot activated",
                                               "update committed")]
        self.assertEqual(order, sorted(order), "milestones out of order")

    def job_entries(self):
        job = getattr(type(self), "file_job", None)
        self.assertTrue(job, "needs the job of test_03")
        return self.ct.journal("-u", "otad", "OTAD_JOB_ID=" + job)

    def test_05a_one_job_finished_per_job(self):
        finished = [e["MESSAGE"] for e in self.job_entries() if e.get("MESSAGE_ID") == MID["job finished"]]
        self.assertEqual(len(finished), 1, finished)

    def test_05b_stages_are_those_of_otad_8(self):
        stages = {e["OTAD_STAGE"] for e in self.job_entries() if "OTAD_STAGE" in e}
        self.assertTrue(stages)
        self.assertLessEqual(stages, STAGES, "OTAD_STAGE values not in otad(8)")

    def test_06_custom_job(self):
        job = "container-custom-1"
        self.svc.queue_job(THING, job, {"operation": "gateway-info", "ask": "uptime"})
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "SUCCEEDED", self.final(job))
        status, details = self.final(job)
        self.assertEqual(details["reason"], "exit status 0")
        self.assertRegex(details["stdout"], r'^gateway \S+: uptime [0-9.]+ s, document \{.*"ask":"uptime"')

    def test_07_unwritable_target_names_the_drop_in(self):
        """A file target outside what the unit opens: --check-config and the
        job's reason say which drop-in to add; with it, as the README shows,
        the same job succeeds."""
        r = self.ct.run(["otad", "--check-config", "-c", "/etc/otad.conf"])
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn('target directory /srv/gateway: otad.service keeps /srv/gateway read-only: '
                      'add "ReadWritePaths=/srv/gateway" in a drop-in (systemctl edit otad.service) '
                      'and restart otad', r.stderr)
        self.assertNotIn("/var/lib/app/bundles", r.stderr, "the documented target is writable as shipped")

        job = "AFR_OTA-container-config-1"
        config = b"[gateway]\nname = test\n"
        self.svc.queue_ota_job(THING, job, config, filepath="gateway.conf", protocols=["MQTT"])
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "FAILED")
        status, details = self.final(job)
        reason = " ".join(details.values())
        self.assertIn("Read-only file system", reason, details)
        self.assertIn('add "ReadWritePaths=/srv/gateway" in a drop-in (systemctl edit otad.service)', reason)

        # What `systemctl edit otad.service` leaves, as the README says.
        dropin = os.path.join(self.root, "etc/systemd/system/otad.service.d/override.conf")
        os.makedirs(os.path.dirname(dropin))
        with open(dropin, "w") as f:
            f.write("[Service]\nReadWritePaths=/srv/gateway\n")
        self.addCleanup(self.remove_dropin, dropin)
        self.ct.run(["systemctl", "daemon-reload"], check=True)
        self.ct.run(["systemctl", "restart", "otad"], check=True)
        r = self.ct.run(["otad", "--check-config", "-c", "/etc/otad.conf"])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stdout, r"^/etc/otad.conf: configuration OK(, \d+ warnings?)?\n$")
        self.assertNotIn("/srv/gateway", r.stderr)
        # Run where the directory is read-only after all (a mount namespace
        # of its own), the check believes the kernel over the unit.
        r = self.ct.run(["unshare", "--mount", "sh", "-c", "mount --bind -o ro /srv/gateway /srv/gateway && "
                         "exec otad --check-config -c /etc/otad.conf"])
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn("target directory /srv/gateway: otad.service keeps /srv/gateway read-only", r.stderr)
        job = "AFR_OTA-container-config-2"
        self.svc.queue_ota_job(THING, job, config, filepath="gateway.conf", protocols=["MQTT"])
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=60), "SUCCEEDED", self.final(job))
        self.assertEqual(self.container_file("/srv/gateway/config"), config)

    def remove_dropin(self, dropin):
        shutil.rmtree(os.path.dirname(dropin))
        self.ct.run(["systemctl", "daemon-reload"], check=True)
        self.ct.run(["systemctl", "restart", "otad"], check=True)

    # ---- stopping and hanging --------------------------------------------------

    def test_08_stop_is_clean_and_the_job_resumes(self):
        job = "AFR_OTA-container-stop"
        image = os.urandom(8 << 20)
        self.wait_active()
        # Slow blocks, so that the stop comes in the middle of the download.
        self.svc.set_faults(THING, delay=0.05)
        self.svc.queue_ota_job(THING, job, image, filepath="bundle-2.0.tar", protocols=["MQTT"])
        self.wait_for(lambda: self.svc.record.bytes_served(THING, "mqtt") and
                      re.search(job + r": download, \d+%", self.status_text()), 60, "download under way")
        started = time.monotonic()
        r = self.ct.run(["systemctl", "stop", "otad"])
        took = time.monotonic() - started
        self.assertEqual(r.returncode, 0, r.stderr)
        unit = self.otad("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
        self.assertEqual((unit["ActiveState"], unit["Result"], unit["ExecMainStatus"]), ("inactive", "success", "0"),
                         unit)
        self.assertLess(took, 10, "stop took %.1f s" % took)
        stopping = self.ct.journal("-u", "otad", "MESSAGE_ID=" + MID["otad stopping"])
        self.assertTrue(stopping)
        self.assertNotRegex("\n".join(e["MESSAGE"] for e in self.ct.journal("-u", "otad")),
                            r"timed out|SIGKILL|code=dumped|status=6/ABRT")
        self.svc.set_faults(THING, delay=0)
        self.ct.run(["systemctl", "start", "otad"], check=True)
        self.assertEqual(self.svc.wait_terminal(THING, job, timeout=120), "SUCCEEDED", self.final(job))
        self.assertEqual(self.container_file("/var/lib/app/bundles/app"), image)

    def test_09_watchdog_restarts_a_hung_otad(self):
        self.wait_active()
        before = self.otad("MainPID", "NRestarts", "WatchdogUSec")
        self.assertEqual(before["WatchdogUSec"], "1min", "the shipped WatchdogSec=60s")
        hung = time.monotonic()
        self.ct.run(["systemctl", "kill", "--kill-who=main", "--signal=SIGSTOP", "otad"], check=True)
        # No ping for 60 s, SIGABRT, RestartSec=5s.
        self.wait_for(lambda: self.otad("NRestarts")["NRestarts"] == str(int(before["NRestarts"]) + 1), 100,
                      "a restart after the watchdog timeout")
        after = self.wait_active(30) and self.otad("MainPID", "Result")
        self.assertNotEqual(after["MainPID"], before["MainPID"])
        messages = [e["MESSAGE"] for e in self.ct.journal("_PID=1", "UNIT=otad.service")]
        self.assertTrue(any("Watchdog timeout" in m for m in messages), messages[-10:])
        self.assertTrue(any("Failed with result 'watchdog'" in m for m in messages), messages[-10:])
        print("# hung otad restarted after %.0f s" % (time.monotonic() - hung))
        self.wait_idle()


if __name__ == "__main__":
    unittest.main()
