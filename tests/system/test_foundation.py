#!/usr/bin/python3
"""What a user sees of otad before any job: its command line, its
configuration checks, its sd_notify conversation with systemd, its unit file,
its man pages and what `meson install` puts where."""

import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SOURCE = os.environ.get("OTAD_SOURCE_ROOT", os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("OTAD_BUILD_ROOT", os.path.join(SOURCE, "build"))
OTAD = os.environ.get("OTAD_BIN", os.path.join(BUILD, "src", "otad"))


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)


def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def self_signed(key, cn, days_before, days_after):
    """A certificate valid from now - days_before until now + days_after
    (negative: in the past)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=days_before))
            .not_valid_after(now + datetime.timedelta(days=days_after))
            .sign(key, hashes.SHA256()))


class Workdir(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="otad-foundation-")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def write(self, name, text, mode=0o644):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def write_cert(self, name, cert):
        self.write(name, cert.public_bytes(serialization.Encoding.PEM).decode())

    def write_key(self, name, key):
        self.write(name, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()).decode(), 0o600)

    def valid_config(self, extra="", cert_days=365):
        """A configuration --check-config accepts: a CA and a device
        certificate valid for cert_days more days, with its key."""
        self.write_cert("ca.crt", self_signed(new_key(), "test CA", 1, 365))
        self.device_key = new_key()
        self.write_cert("gw.crt", self_signed(self.device_key, "gw-test", 1, cert_days))
        self.write_key("gw.key", self.device_key)
        return self.write("otad.conf", f"""[mqtt]
endpoint = 127.0.0.1
port = 1
thing_name = gw-test
ca_file = {self.dir}/ca.crt
cert_file = {self.dir}/gw.crt
key_file = {self.dir}/gw.key
reconnect_min = 60
reconnect_max = 60
[state]
directory = {self.dir}/state
{extra}""")


class CommandLine(Workdir):
    def test_version(self):
        r = run([OTAD, "--version"])
        self.assertEqual(r.returncode, 0)
        self.assertRegex(r.stdout, r"^otad \d+\.\d+\.\d+\n$")

    def test_unknown_option_fails(self):
        r = run([OTAD, "--no-such-option"])
        self.assertEqual(r.returncode, 1)

    def test_example_config_names_missing_certificates(self):
        r = run([OTAD, "--check-config", "-c", os.path.join(SOURCE, "etc", "otad.conf")])
        self.assertEqual(r.returncode, 1)
        for path in ("/etc/otad/AmazonRootCA1.pem", "/etc/otad/device.pem.crt", "/etc/otad/private.pem.key"):
            self.assertIn(f"{path}: No such file or directory", r.stderr)

    def test_typo_names_file_and_line(self):
        example = open(os.path.join(SOURCE, "etc", "otad.conf")).read()
        line = example.splitlines().index("thing_name = gateway-0001") + 1
        path = self.write("typo.conf", example.replace("thing_name = gateway-0001", "thing_nmae = gateway-0001"))
        r = run([OTAD, "-c", path])
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"{path}:{line}: Unknown key 'thing_nmae' in section [mqtt]", r.stderr)

    def test_valid_config_checks_ok(self):
        path = self.valid_config()
        r = run([OTAD, "--check-config", "-c", path])
        self.assertEqual((r.returncode, r.stdout), (0, f"{path}: configuration OK\n"), r.stderr)

    def test_readable_key_is_refused(self):
        path = self.valid_config()
        os.chmod(os.path.join(self.dir, "gw.key"), 0o644)
        r = run([OTAD, "--check-config", "-c", path])
        self.assertEqual(r.returncode, 1)
        self.assertIn("is accessible by group or others (mode 0644)", r.stderr)

    def test_unknown_key_names_the_target_section(self):
        path = self.valid_config("[target.app]\ntype = file\ndirectroy = /var/lib/app\n")
        line = open(path).read().splitlines().index("directroy = /var/lib/app") + 1
        r = run([OTAD, "--check-config", "-c", path])
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"{path}:{line}: Unknown key 'directroy' in section [target.app]", r.stderr)


class CheckConfigCertificates(Workdir):
    """--check-config judges the device certificate as the broker will:
    its validity period, and whether key_file is its key."""

    def check(self, path):
        return run([OTAD, "--check-config", "-c", path])

    def test_valid_certificate_passes(self):
        path = self.valid_config(cert_days=365)
        r = self.check(path)
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, f"{path}: configuration OK\n", ""))

    def test_expired_certificate_is_refused_with_its_dates(self):
        path = self.valid_config()
        self.write_cert("gw.crt", self_signed(self.device_key, "gw-test", 400, -2))
        r = self.check(path)
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertRegex(r.stderr, rf"cert_file {self.dir}/gw.crt has expired: valid from \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC "
                                   r"until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, now is .*The broker will refuse it")
        self.assertNotIn("configuration OK", r.stdout)

    def test_certificate_expiring_in_10_days_passes_with_a_warning(self):
        path = self.valid_config(cert_days=10)
        r = self.check(path)
        self.assertEqual((r.returncode, r.stdout), (0, f"{path}: configuration OK, 1 warning\n"), r.stderr)
        self.assertIn(f"warning: cert_file {self.dir}/gw.crt expires on ", r.stderr)
        self.assertIn(", in 10 days: the broker will refuse it after that", r.stderr)

    def test_key_of_another_certificate_is_refused(self):
        path = self.valid_config()
        self.write_key("gw.key", new_key())
        r = self.check(path)
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn(f"key_file {self.dir}/gw.key does not belong to cert_file {self.dir}/gw.crt", r.stderr)


class NotifySocket(Workdir):
    """systemd's side of Type=notify, played by a datagram socket we bind."""

    def start(self, watchdog_usec=400000):
        self.sock_path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)
        self.sock.settimeout(0.2)
        env = dict(os.environ, NOTIFY_SOCKET=self.sock_path, WATCHDOG_USEC=str(watchdog_usec))
        env.pop("JOURNAL_STREAM", None)
        self.log = open(os.path.join(self.dir, "otad.log"), "w+")
        self.proc = subprocess.Popen([OTAD, "-c", self.valid_config()], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.messages = []

    def tearDown(self):
        if getattr(self, "proc", None) and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if getattr(self, "sock", None):
            self.sock.close()
        super().tearDown()

    def collect(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            self.messages.append((time.monotonic(), data))

    def received(self, prefix):
        return [(t, m) for t, m in self.messages for line in m.split("\n") if line.startswith(prefix)]

    def test_ready_status_watchdog_and_stop(self):
        self.start()
        self.collect(1.5)
        self.assertTrue(self.received("READY=1"), self.messages)
        self.assertTrue(self.received("STATUS="), self.messages)
        pings = self.received("WATCHDOG=1")
        # sd-event pings at half of WATCHDOG_USEC (0.4 s): about 6 in 1.5 s.
        self.assertGreaterEqual(len(pings), 3, self.messages)
        self.proc.send_signal(signal.SIGTERM)
        self.assertEqual(self.proc.wait(timeout=10), 0)
        self.collect(0.3)
        self.assertTrue(self.received("STOPPING=1"), self.messages)

    def test_sighup_is_ignored_and_logged(self):
        self.start()
        self.collect(0.5)
        self.proc.send_signal(signal.SIGHUP)
        self.collect(0.5)
        self.assertIsNone(self.proc.poll(), "otad exited on SIGHUP")
        self.proc.send_signal(signal.SIGINT)
        self.assertEqual(self.proc.wait(timeout=10), 0)
        self.log.seek(0)
        self.assertIn("Received SIGHUP, ignoring: restart otad to apply a changed configuration", self.log.read())


@unittest.skipUnless(os.geteuid() == 0 and shutil.which("unshare"), "needs root and unshare for a private mount namespace")
class Journal(Workdir):
    """Under systemd, stderr is the journal stream: otad then sends native
    journal entries with structured fields. A socket of ours stands in for
    journald, bind-mounted over /run/systemd/journal in a private mount
    namespace so the host's journal (if any) is not touched."""

    def test_structured_fields_when_stderr_is_the_journal_stream(self):
        journal_dir = os.path.join(self.dir, "journal")
        os.makedirs(journal_dir)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(os.path.join(journal_dir, "socket"))
        sock.settimeout(0.2)
        self.addCleanup(sock.close)
        os.makedirs("/run/systemd/journal", exist_ok=True)
        stderr_path = os.path.join(self.dir, "stderr")
        with open(stderr_path, "w") as stderr:
            st = os.fstat(stderr.fileno())
            env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
            proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                     f"mount --bind {journal_dir} /run/systemd/journal && exec {OTAD} -c {self.valid_config()}"],
                                    env=env, stdout=stderr, stderr=stderr)
            entries = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any("MESSAGE_ID=53e7acdcb6a24fe4a14f5ddf144cfcc3" in e for e in entries):
                try:
                    entries.append(sock.recv(65536).decode())
                except socket.timeout:
                    pass
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(timeout=10), 0)
        try:
            while True:
                entries.append(sock.recv(65536).decode())
        except socket.timeout:
            pass
        fields = [dict(line.split("=", 1) for line in e.splitlines() if "=" in line) for e in entries]
        started = [f for f in fields if f.get("MESSAGE_ID") == "53e7acdcb6a24fe4a14f5ddf144cfcc3"]
        self.assertTrue(started, entries)
        self.assertEqual(started[0]["PRIORITY"], "6")
        self.assertEqual(started[0]["SYSLOG_IDENTIFIER"], "otad")
        self.assertIn("started for thing gw-test", started[0]["MESSAGE"])
        stopping = [f for f in fields if f.get("MESSAGE_ID") == "d5b22586263f4f48bc345ca99c219889"]
        self.assertTrue(stopping, entries)
        self.assertEqual(open(stderr_path).read(), "", "nothing goes to stderr when it is the journal stream")


class UnitFile(Workdir):
    def test_systemd_analyze_verify(self):
        if not shutil.which("systemd-analyze"):
            self.skipTest("systemd-analyze not installed")
        # The shipped unit names /usr/sbin/otad; verify the same text with the
        # binary under test, and let man(1) find our pages for Documentation=.
        unit = open(os.path.join(SOURCE, "systemd", "otad.service")).read()
        self.assertIn("ExecStart=/usr/sbin/otad --config /etc/otad.conf", unit)
        path = self.write("otad.service", unit.replace("/usr/sbin/otad", os.path.abspath(OTAD)))
        for section, page in (("8", "otad.8"), ("5", "otad.conf.5")):
            os.makedirs(os.path.join(self.dir, "man", "man" + section), exist_ok=True)
            shutil.copy(os.path.join(SOURCE, "man", page), os.path.join(self.dir, "man", "man" + section))
        r = run(["systemd-analyze", "verify", path], env=dict(os.environ, MANPATH=os.path.join(self.dir, "man")))
        self.assertEqual((r.returncode, r.stdout + r.stderr), (0, ""))

    def test_unit_is_notify_with_watchdog(self):
        unit = open(os.path.join(SOURCE, "systemd", "otad.service")).read()
        for line in ("Type=notify", "NotifyAccess=main", "Restart=on-failure", "ProtectSystem=strict",
                     "ReadWritePaths=/var/lib/otad", "SystemCallFilter=@system-service", "NoNewPrivileges=yes"):
            self.assertIn(line + "\n", unit)
        self.assertRegex(unit, r"\nWatchdogSec=\d+s\n")


def config_table_keys():
    """(section, key) of every entry in config.c's table."""
    text = open(os.path.join(SOURCE, "src", "config.c")).read()
    return set(re.findall(r'^\s+(?:[A-Z]+\s*\(|\{)\s*"([a-z]+)",\s*"([a-z_]+)"', text, re.M))


class Documentation(unittest.TestCase):
    def render(self, page):
        r = run(["man", "-l", os.path.join(SOURCE, "man", page)], env=dict(os.environ, MANWIDTH="200"))
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout

    def test_pages_render(self):
        self.assertIn("over-the-air update daemon", self.render("otad.8"))
        self.assertIn("configuration of the otad", self.render("otad.conf.5"))

    def test_every_key_is_in_the_example_and_the_man_page(self):
        keys = config_table_keys()
        self.assertGreater(len(keys), 40)
        example = open(os.path.join(SOURCE, "etc", "otad.conf")).read()
        page = self.render("otad.conf.5")
        for section, key in sorted(keys):
            self.assertRegex(example, rf"(?m)^#?{key} =", f"[{section}] {key} missing from etc/otad.conf")
            self.assertRegex(page, rf"\b{key}\b", f"[{section}] {key} missing from otad.conf(5)")

    def test_every_example_key_is_known(self):
        keys = {key for _, key in config_table_keys()}
        example = open(os.path.join(SOURCE, "etc", "otad.conf")).read()
        for key in re.findall(r"(?m)^#?([a-z_]+) =", example):
            self.assertIn(key, keys, f"etc/otad.conf documents unknown key {key}")


class Install(Workdir):
    def test_meson_install_puts_everything_in_place(self):
        dest = os.path.join(self.dir, "dest")
        r = run(["meson", "install", "-C", BUILD, "--destdir", dest, "--quiet"])
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        for path in ("usr/sbin/otad", "usr/share/man/man8/otad.8", "usr/share/man/man5/otad.conf.5",
                     "usr/share/doc/otad/examples/otad.conf"):
            self.assertTrue(os.path.isfile(os.path.join(dest, path)), path)
        units = [os.path.join(root, f) for root, _, files in os.walk(dest) for f in files]
        self.assertTrue(any(u.endswith("systemd/system/otad.service") for u in units), units)
        self.assertTrue(any(u.endswith("tmpfiles.d/otad.conf") for u in units), units)


if __name__ == "__main__":
    unittest.main()
