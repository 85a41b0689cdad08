#!/usr/bin/python3
"""Harness for otad's integration tests and the demo.

Owns: a temporary work dir with PKI, broker, stand-in service (awsiot.py),
HTTPS server and any child process (otad) started through it, and the
guarantee that all of them are stopped and the dir removed when the `with`
block ends, however it ends (exception, SIGINT, SIGTERM).
Set OTAD_KEEP_TMP=1 to keep the work dir; OTAD_BIN to pick the otad binary.
"""

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from awsiot import AwsIot
from broker import Broker
from pki import Pki

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OTAD = os.path.join(REPO_ROOT, "build", "src", "otad")


# Stacks not closed yet. A SIGTERM during a unittest run aborts the run
# without tearDownClass; the interpreter's exit then closes them.
_open_stacks = []


@atexit.register
def _close_open_stacks():
    for stack in reversed(list(_open_stacks)):
        stack.close()


def wait_for(predicate, timeout):
    """Polls predicate until it holds or timeout seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def otad_binary():
    return os.environ.get("OTAD_BIN") or DEFAULT_OTAD


class Process:
    """A child started by the harness; its stdout+stderr go to log_path."""

    def __init__(self, argv, log_path, env=None):
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "ab") as log:
            # Own session: a Ctrl-C on the terminal reaches the harness,
            # which then stops the child in order.
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=log, env=env,
                                          start_new_session=True)
        self.pid = self.popen.pid

    def running(self):
        return self.popen.poll() is None

    def wait_exit(self, timeout=10):
        """Returns the exit status (negative = killed by that signal)."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError("%s (pid %d) still running after %.0f s"
                               % (self.argv[0], self.pid, timeout))

    def stop(self, timeout=10):
        """SIGTERM, then SIGKILL to its whole process group after timeout."""
        if self.running():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()
        return self.popen.wait()

    def kill9(self):
        self.popen.kill()
        self.popen.wait()
        self._kill_group()

    def _kill_group(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def grep(self, pattern):
        """Log lines matching the regular expression."""
        rx = re.compile(pattern)
        return [line for line in self.log().splitlines() if rx.search(line)]

    def wait_for_log(self, pattern, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            lines = self.grep(pattern)
            if lines:
                return lines
            if time.monotonic() > deadline:
                raise TimeoutError("no log line matching %r in %s after %.0f s"
                                   % (pattern, self.log_path, timeout))
            time.sleep(0.1)


def render_config(sections):
    """INI text: [section] then `key = value` lines. True/False -> true/false."""
    out = []
    for name, keys in sections.items():
        out.append("[%s]" % name)
        for k, v in keys.items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            out.append("%s = %s" % (k, v))
        out.append("")
    return "\n".join(out)


def merge_sections(base, override):
    """override's keys replace base's; a value of None deletes the key, a
    section of None deletes the section."""
    merged = {name: dict(keys) for name, keys in base.items()}
    for name, keys in (override or {}).items():
        if keys is None:
            merged.pop(name, None)
            continue
        section = merged.setdefault(name, {})
        for k, v in keys.items():
            if v is None:
                section.pop(k, None)
            else:
                section[k] = v
    return merged


class Stack:
    """with Stack(things=["thing-A"]) as s: s.service.queue_ota_job(...);
    otad = s.start_otad("thing-A"); s.service.wait_terminal(...)"""

    def __init__(self, things=("thing-A", "thing-B"), workdir=None,
                 url_lifetime=1800):
        self.things = list(things)
        self._given_workdir = workdir
        self.url_lifetime = url_lifetime
        self.workdir = None
        self.pki = None
        self.broker = None
        self.service = None
        self.children = []
        self._old_handlers = {}

    def __enter__(self):
        _open_stacks.append(self)
        self._install_signal_handlers()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _start(self):
        if self._given_workdir:
            os.makedirs(self._given_workdir, exist_ok=True)
            self.workdir = os.path.abspath(self._given_workdir)
        else:
            self.workdir = tempfile.mkdtemp(prefix="otad-standin-")
        # mkdtemp makes 0700; mosquitto runs as user 'mosquitto' and must
        # traverse to its certificates.
        os.chmod(self.workdir, 0o755)
        self.pki = Pki.create(os.path.join(self.workdir, "pki"), self.things)
        self.broker = Broker(self.workdir, self.pki).start()
        self.service = AwsIot(self.pki, self.broker,
                              url_lifetime=self.url_lifetime).start()

    def close(self):
        """Stops everything started, in reverse order; removes the work dir
        unless OTAD_KEEP_TMP=1 or it was given by the caller."""
        # A second Ctrl-C/SIGTERM must not interrupt the cleanup itself.
        if threading.current_thread() is threading.main_thread():
            for sig in self._old_handlers:
                signal.signal(sig, signal.SIG_IGN)
        errors = []

        def attempt(step, *args):
            # One failing step must not leave the later ones running.
            try:
                step(*args)
            except Exception as err:
                errors.append(err)

        try:
            for child in reversed(self.children):
                attempt(child.stop)
            self.children = []
            if self.service:
                attempt(self.service.stop)
                self.service = None
            if self.broker:
                attempt(self.broker.stop)
                self.broker = None
            if self.workdir and not self._given_workdir:
                if os.environ.get("OTAD_KEEP_TMP") == "1":
                    sys.stderr.write("OTAD_KEEP_TMP=1: kept %s\n" % self.workdir)
                else:
                    shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            self._restore_signal_handlers()
            if self in _open_stacks:
                _open_stacks.remove(self)
        if errors:
            raise errors[0]

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return

        def interrupted(signum, frame):
            raise KeyboardInterrupt("signal %d" % signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, interrupted)

    def _restore_signal_handlers(self):
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    # ---- things and otad ---------------------------------------------------

    def add_thing(self, thing):
        """Issues a certificate for another thing (the broker needs no change:
        the ACL pattern covers every CN)."""
        self.pki.add_client(thing)
        self.things.append(thing)

    def otad_config(self, thing, sections=None):
        base = {
            "mqtt": {"endpoint": "localhost", "port": self.broker.port,
                     "thing_name": thing, "ca_file": self.pki.ca_cert,
                     "cert_file": self.pki.client_cert(thing),
                     "key_file": self.pki.client_key(thing), "keepalive": 30},
            "state": {"directory": self.state_dir(thing)},
            "log": {"level": "debug"},
        }
        return merge_sections(base, sections)

    def state_dir(self, thing):
        return os.path.join(self.workdir, "state-" + thing)

    def write_otad_config(self, thing, sections=None):
        path = os.path.join(self.workdir, "otad-%s.conf" % thing)
        os.makedirs(self.state_dir(thing), exist_ok=True)
        with open(path, "w") as f:
            f.write("# generated by tests/standin/harness.py\n")
            f.write(render_config(self.otad_config(thing, sections)))
        return path

    def start_otad(self, thing, sections=None, args=(), env=None):
        """Writes the config and starts `otad -c <config>` (OTAD_BIN, default
        build/src/otad); stderr+stdout go to <workdir>/otad-<thing>.log."""
        config = self.write_otad_config(thing, sections)
        argv = [otad_binary(), "-c", config] + list(args)
        return self.start_process(argv, "otad-%s" % thing, env)

    def start_process(self, argv, name, env=None):
        """Any child the harness must stop at the end (stopped in reverse order)."""
        proc = Process(argv, os.path.join(self.workdir, name + ".log"),
                       dict(os.environ, **(env or {})))
        self.children.append(proc)
        return proc
