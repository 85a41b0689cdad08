#!/usr/bin/python3
"""A real mosquitto on 127.0.0.1 standing in for the AWS IoT message broker.

Owns: the mosquitto process, its config, ACL and log file in a work dir.
TLS only, client certificates required, username = certificate CN, and an
ACL that mirrors the AWS OTA device policy (a thing may use only its own
`jobs/#` and `streams/#` topics). Never talks to anything but 127.0.0.1.

Differences from AWS IoT that tests must keep in mind (harness.md §1):
* a SUBSCRIBE the ACL forbids is granted (SUBACK 0) and its messages are
  silently filtered; AWS refuses the subscription or disconnects;
* a PUBLISH the ACL forbids is acknowledged and dropped; AWS disconnects.
"""

import os
import socket
import ssl
import subprocess
import time

from pki import SERVICE

MOSQUITTO = "/usr/sbin/mosquitto"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, workdir, pki, port=None):
        self.workdir = workdir
        self.pki = pki
        self.port = port or free_port()
        self._started_once = port is not None   # a caller's port is kept
        self.conf = os.path.join(workdir, "mosquitto.conf")
        self.acl = os.path.join(workdir, "mosquitto.acl")
        self.log = os.path.join(workdir, "mosquitto.log")
        self.proc = None

    def _write_config(self):
        with open(self.acl, "w") as f:
            # %u is the username, i.e. the client certificate's CN = thing name.
            f.write("pattern readwrite $aws/things/%u/jobs/#\n"
                    "pattern readwrite $aws/things/%u/streams/#\n"
                    "user " + SERVICE + "\n"
                    "topic readwrite $aws/things/#\n")
        with open(self.conf, "w") as f:
            f.write("per_listener_settings false\n"
                    "persistence false\n"
                    # A log file in a dir the dropped-privilege 'mosquitto'
                    # user cannot write fails at start: log to stderr.
                    "log_dest stderr\n"
                    "log_type error\nlog_type warning\nlog_type notice\n"
                    "log_type information\nlog_type subscribe\n"
                    "log_type unsubscribe\n"
                    "connection_messages true\n"
                    "allow_anonymous false\n"
                    "acl_file %s\n"
                    "max_inflight_messages 100\n"
                    "max_queued_messages 100000\n"
                    "listener %d 127.0.0.1\n"
                    "cafile %s\ncertfile %s\nkeyfile %s\n"
                    "require_certificate true\n"
                    "use_identity_as_username true\n"
                    "tls_version tlsv1.2\n"
                    % (self.acl, self.port, self.pki.ca_cert,
                       self.pki.server_cert, self.pki.server_key))
        os.chmod(self.acl, 0o644)
        os.chmod(self.conf, 0o644)

    def start(self, timeout=10):
        """Starts mosquitto and returns once it completes a TLS handshake.
        A free port can be taken by a parallel test between our probe and
        mosquitto's bind: then the first start retries on another port."""
        attempts = 1 if self.proc is not None or self._started_once else 3
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                self._started_once = True
                return self
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                self.port = free_port()

    def _start_once(self, timeout):
        self._write_config()
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", self.conf],
                                     stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=logf)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError("mosquitto exited with %d, see %s" % (code, self.log))
            if self._tls_ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("mosquitto not accepting TLS on port %d" % self.port)

    def _tls_ready(self):
        ctx = ssl.create_default_context(cafile=self.pki.ca_cert)
        ctx.load_cert_chain(self.pki.client_cert(SERVICE),
                            self.pki.client_key(SERVICE))
        try:
            with socket.create_connection(("127.0.0.1", self.port), 1) as s:
                with ctx.wrap_socket(s, server_hostname="localhost"):
                    return True
        except OSError:
            return False

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down_seconds=0.0):
        """Stops and starts mosquitto on the same port; clients must reconnect."""
        self.stop()
        time.sleep(down_seconds)
        self.start()

    @property
    def pid(self):
        return self.proc.pid if self.proc else None
